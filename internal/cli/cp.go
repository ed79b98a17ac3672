package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/tarcopy"
	"github.com/bangerdev/banger/internal/vmname"
)

// splitRemote splits "NAME:/path" into its parts; ok is false for a local path.
func splitRemote(s string) (name, path string, ok bool) {
	i := strings.IndexByte(s, ':')
	if i <= 0 || vmname.Validate(s[:i]) != nil {
		return "", s, false
	}
	return s[:i], s[i+1:], true
}

func (a *app) vmCpCmd() *cobra.Command {
	var archive, quiet bool
	var maxFileSize string
	cmd := &cobra.Command{
		Use:   "cp [-a] [-q] SRC DST",
		Short: "Copy files or directories between the host and a VM",
		Long: "Copy SRC into the directory DST. One side names a VM as NAME:/path.\n" +
			"  banger vm cp ./project dev:/root        → /root/project in the guest\n" +
			"  banger vm cp dev:/var/log/syslog ./out  → ./out/syslog on the host\n" +
			"Permissions and modification times are kept and sparse files stay sparse.\n" +
			"Setuid, setgid and sticky bits are dropped, device nodes and FIFOs refused,\n" +
			"and copies belong to the invoking user (under sudo, SUDO_UID/SUDO_GID)\n" +
			"unless -a keeps them with the original ownership, like cp -a.\n" +
			"A copy out of a VM takes nothing but SRC's tree from the guest; if the guest\n" +
			"sends anything else, the copy stops and what it wrote is removed.\n" +
			"On a terminal, a copy of 4 MiB or more shows a progress bar on stderr (bytes,\n" +
			"rate, ETA; -q hides it); piped or redirected, only errors go to stderr.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			srcVM, src, srcRemote := splitRemote(args[0])
			dstVM, dst, dstRemote := splitRemote(args[1])
			switch {
			case srcRemote == dstRemote:
				return fmt.Errorf("exactly one of SRC and DST must name a VM (NAME:/path): %w", errdefs.ErrInvalid)
			case dstRemote:
				if !strings.HasPrefix(dst, "/") {
					return fmt.Errorf("guest path %q must be absolute: %w", dst, errdefs.ErrInvalid)
				}
				src, err := filepath.Abs(src)
				if err != nil {
					return err
				}
				if _, err := os.Lstat(src); err != nil {
					return err
				}
				meter := newCopyMeter(a.progress(), "copy "+filepath.Base(src), quiet)
				defer meter.finish()
				if meter.active() {
					go countTar(src, meter)
				}
				return sendTar(cmd.Context(), func(w io.Writer) error {
					return tarcopy.Write(w, src, tarcopy.WriteOptions{})
				}, func(ctx context.Context, r io.Reader) error {
					return a.client().VMCopyIn(ctx, api.VMCopyParams{Name: dstVM, Path: dst, Archive: archive}, meter.Reader(r))
				})
			default:
				if !strings.HasPrefix(src, "/") {
					return fmt.Errorf("guest path %q must be absolute: %w", src, errdefs.ErrInvalid)
				}
				dst, err := filepath.Abs(dst)
				if err != nil {
					return err
				}
				opts := tarcopy.ExtractOptions{Base: guestBase(src), Archive: archive}
				if maxFileSize != "" {
					if opts.MaxFileSize, err = parseSize(maxFileSize, 1); err != nil {
						return fmt.Errorf("--max-file-size: %w: %w", err, errdefs.ErrInvalid)
					}
				}
				if !archive {
					if opts.Owner, err = invokingUser(); err != nil {
						return err
					}
				}
				meter := newCopyMeter(a.progress(), "copy "+guestBase(src), quiet)
				defer meter.finish()
				// The daemon sends the size the guest announced before the
				// stream (a progress frame); the bar counts the bytes handed
				// to the extractor.
				onSize := func(pr api.Progress) {
					if pr.Total > 0 && (pr.Unit == "" || pr.Unit == "bytes") {
						meter.start(pr.Total)
					}
				}
				return tarcopy.ExtractFrom(func(w io.Writer) error {
					return a.client().VMCopyOutProgress(cmd.Context(), api.VMCopyParams{Name: srcVM, Path: src}, meter.Writer(w), onSize)
				}, dst, opts)
			}
		},
	}
	cmd.Flags().BoolVarP(&archive, "archive", "a", false,
		"keep ownership, setuid/setgid/sticky bits and (as root) device nodes and FIFOs")
	cmd.Flags().StringVar(&maxFileSize, "max-file-size", "",
		"copy out: refuse files larger than this, holes included, e.g. 200G (default 64G)")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "show no progress bar: only errors on stderr")
	return cmd
}

// errCounted ends countTar's walk once it has the stream's size.
var errCounted = errors.New("stream size counted")

// countTar starts meter with the size of src's tar stream, from a walk of
// the tree that reads no file (tarcopy.Write's announcement, the stream
// itself not written), beside the copy: the copy doesn't wait for it, and
// is the same whether a bar shows or not.
func countTar(src string, meter *copyMeter) {
	_ = tarcopy.Write(io.Discard, src, tarcopy.WriteOptions{Announce: func(size, _ int64) error {
		meter.start(size)
		return errCounted
	}})
}

// sendTar runs send (a copy in) with the stream that write writes (a tar
// of the source). When write fails (a file that can't be read, or that
// changed during the copy), send's call is cancelled instead of seeing the
// stream end: its end would look like a complete tar to the guest, which
// takes a stream cut at an entry's boundary for a whole one. Write's error
// is returned then, else send's.
func sendTar(ctx context.Context, write func(io.Writer) error, send func(context.Context, io.Reader) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pr, pw := io.Pipe()
	written := make(chan struct{})
	go func() {
		defer close(written)
		pw.CloseWithError(write(pw))
	}()
	sent := make(chan struct{})
	src := &abortReader{r: pr, cancel: cancel, sent: sent}
	err := send(ctx, src)
	failed := src.end()
	close(sent)
	pr.Close() // a writer blocked on a call that ended returns
	<-written
	if failed != nil {
		return fmt.Errorf("%w (the copy was stopped; the guest may hold part of it)", failed)
	}
	return err
}

// abortReader reads the tar stream for sendTar. A read error other than
// the stream's end cancels the call and is returned only once the call
// has ended, so the call never takes it for the end of its input.
type abortReader struct {
	r      io.Reader
	cancel context.CancelFunc
	sent   <-chan struct{} // closed when the call has ended

	mu   sync.Mutex
	err  error // the stream's failure while the call ran
	over bool  // the call has ended
}

func (a *abortReader) Read(p []byte) (int, error) {
	n, err := a.r.Read(p)
	if err != nil && err != io.EOF {
		a.mu.Lock()
		if !a.over {
			a.err = err
		}
		a.mu.Unlock()
		a.cancel()
		// The call ends once its connection closes, which the cancel
		// does; the bound only keeps a client that waited for its input's
		// reader from waiting forever.
		select {
		case <-a.sent:
		case <-time.After(10 * time.Second):
		}
	}
	return n, err
}

// end marks the call ended and returns the stream's failure, if any.
func (a *abortReader) end() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.over = true
	return a.err
}

// guestBase is the top-level name of the tar stream of guest path src, the
// only name a copy out accepts ("." for "/").
func guestBase(src string) string {
	b := path.Base(path.Clean(src))
	if b == "/" {
		return "."
	}
	return b
}

// invokingUser is the owner to give copied files when banger runs as root
// on behalf of a sudo user (SUDO_UID, SUDO_GID); nil otherwise: the
// process's own user is the invoking user.
func invokingUser() (*tarcopy.Owner, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	su, sg := os.Getenv("SUDO_UID"), os.Getenv("SUDO_GID")
	if su == "" {
		return nil, nil
	}
	uid, err1 := strconv.Atoi(su)
	gid, err2 := strconv.Atoi(sg)
	if err1 != nil || err2 != nil || uid < 0 || gid < 0 {
		return nil, fmt.Errorf("SUDO_UID=%q SUDO_GID=%q: not numeric ids; unset them or use -a: %w", su, sg, errdefs.ErrInvalid)
	}
	return &tarcopy.Owner{UID: uid, GID: gid}, nil
}
