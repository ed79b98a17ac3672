package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/client"
)

// pullFlags are image pull's and kernel pull's.
type pullFlags struct {
	name, platform, kernel string
	insecure, asJSON       bool
	cancel                 bool
}

func (a *app) imagePullCmd() *cobra.Command {
	var f pullFlags
	cmd := &cobra.Command{
		Use:   "pull REF",
		Short: "Pull an image: a catalog name (NAME or NAME@VERSION), else an OCI reference",
		Long: "Pull an image into daemon-managed storage. REF is a catalog name (NAME, the newest version, or\n" +
			"NAME@VERSION): its bundle is downloaded (resumed after an interruption, every file verified), after\n" +
			"the kernel it boots with; when the bundle can't be fetched and the catalog has a recipe, the image is\n" +
			"built locally. Any other REF is an OCI reference: debian:bookworm, ghcr.io/x/y:tag, REG/x@sha256:...,\n" +
			"oci:DIR, docker-archive:FILE, docker-daemon:IMAGE (docs/oci-import.md).\n\n" +
			"The pull runs in bangerd: it goes on if this command is killed, and a second pull of the same REF\n" +
			"shares it. Ctrl-C cancels it; --cancel cancels the running pull of REF from another terminal.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ref, err := localPullRef(args[0])
			if err != nil {
				return err
			}
			p := api.PullParams{Ref: ref, Name: f.name, Platform: f.platform, Insecure: f.insecure, Kernel: f.kernel}
			return a.runPull(cmd.Context(), "image", p, f, func(ctx context.Context, progress client.ProgressFunc) (any, string, error) {
				im, err := a.client().ImagePull(ctx, p, progress)
				return im, im.Name, err
			})
		},
	}
	cmd.Flags().StringVar(&f.name, "name", "", "local name (default: the catalog name, or one derived from the OCI reference)")
	cmd.Flags().StringVar(&f.platform, "platform", "", "OCI platform, e.g. linux/arm64 (default: this host's)")
	cmd.Flags().BoolVar(&f.insecure, "insecure", false, "allow plain HTTP and unverified TLS for a registry not on localhost")
	cmd.Flags().StringVar(&f.kernel, "kernel", "", "kernel an OCI image boots with (default: the daemon's default_kernel_name, pulled when missing)")
	f.addCommon(cmd)
	return cmd
}

// localPullRef makes the path of a local OCI source absolute (bangerd
// reads it, from another directory): oci:DIR, oci-archive:FILE,
// docker-archive:FILE, ./PATH, ../PATH. Registry references and
// docker-daemon:IMAGE are unchanged.
func localPullRef(ref string) (string, error) {
	for _, prefix := range []string{"oci:", "oci-archive:", "docker-archive:"} {
		if rest, ok := strings.CutPrefix(ref, prefix); ok && rest != "" && !filepath.IsAbs(rest) {
			abs, err := filepath.Abs(rest)
			return prefix + abs, err
		}
	}
	if strings.HasPrefix(ref, "./") || strings.HasPrefix(ref, "../") {
		return filepath.Abs(ref)
	}
	return ref, nil
}

func (a *app) kernelPullCmd() *cobra.Command {
	var f pullFlags
	cmd := &cobra.Command{
		Use:   "pull NAME",
		Short: "Pull a kernel of the kernel catalog (NAME or NAME@VERSION)",
		Long: "Pull a kernel of the kernel catalog into daemon-managed storage: its bundle is downloaded (resumed\n" +
			"after an interruption, every file verified), or, when it can't be fetched and the catalog has a\n" +
			"recipe, the kernel is built locally. The pull runs in bangerd (see banger image pull).",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p := api.PullParams{Ref: args[0], Name: f.name}
			return a.runPull(cmd.Context(), "kernel", p, f, func(ctx context.Context, progress client.ProgressFunc) (any, string, error) {
				k, err := a.client().KernelPull(ctx, p, progress)
				return k, k.Name, err
			})
		},
	}
	cmd.Flags().StringVar(&f.name, "name", "", "local name (default: the catalog name)")
	f.addCommon(cmd)
	return cmd
}

func (f *pullFlags) addCommon(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&f.asJSON, "json", false, `print progress as JSON lines on stdout ({"progress":{...}}), then the result ({"image":{...}} or {"kernel":{...}})`)
	cmd.Flags().BoolVar(&f.cancel, "cancel", false, "cancel the running pull of REF (started by another command) and wait until it has unwound")
}

// errInterrupted ends a pull cancelled with Ctrl-C: exit status 130, as a
// shell reports SIGINT.
var errInterrupted = exitError{130}

// runPull runs a pull call, showing its progress. The call runs with a
// context of its own: when ctx ends (Ctrl-C), the daemon is asked to
// cancel the pull (it would go on otherwise), and the command exits 130.
func (a *app) runPull(ctx context.Context, kind string, p api.PullParams, f pullFlags, do func(context.Context, client.ProgressFunc) (any, string, error)) error {
	if f.cancel {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if err := a.client().PullCancel(cctx, kind, p.Ref); err != nil {
			return err
		}
		fmt.Fprintf(a.stderr, "banger: cancelled the %s pull of %s\n", kind, p.Ref)
		return nil
	}
	callCtx, stopCall := context.WithCancel(context.WithoutCancel(ctx))
	defer stopCall()
	interrupted := make(chan struct{})
	stopWatch := context.AfterFunc(ctx, func() {
		defer close(interrupted)
		// Ctrl-C: ask the daemon to cancel; the call then ends with
		// the cancellation. If the daemon can't be asked, leave.
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := a.client().PullCancel(cctx, kind, p.Ref); err != nil {
			fmt.Fprintf(a.stderr, "banger: cancel the pull: %s\n", explain(err, a.cfg.SocketPath))
		}
		stopCall()
	})
	defer stopWatch()

	var onProgress client.ProgressFunc
	var pr *progress
	if f.asJSON {
		enc := json.NewEncoder(a.stdout)
		onProgress = func(p api.Progress) {
			_ = enc.Encode(struct {
				Progress api.Progress `json:"progress"`
			}{p})
		}
	} else {
		pr = a.progress()
		onProgress = pr.update
	}
	res, name, err := do(callCtx, onProgress)
	if pr != nil {
		pr.done()
	}
	if ctx.Err() != nil {
		<-interrupted
		fmt.Fprintf(a.stderr, "banger: %s pull of %s cancelled\n", kind, p.Ref)
		return errInterrupted
	}
	if err != nil {
		return err
	}
	if f.asJSON {
		return writeJSONLine(a.stdout, map[string]any{kind: res})
	}
	fmt.Fprintln(a.stdout, name)
	return nil
}

func writeJSONLine(w io.Writer, v any) error {
	if err := json.NewEncoder(w).Encode(v); err != nil {
		return fmt.Errorf("write JSON: %w", err)
	}
	return nil
}
