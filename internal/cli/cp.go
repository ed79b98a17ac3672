package cli

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/api"
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
	return &cobra.Command{
		Use:   "cp SRC DST",
		Short: "Copy files or directories between the host and a VM",
		Long: "Copy SRC into the directory DST. One side names a VM as NAME:/path.\n" +
			"  banger vm cp ./project dev:/root        → /root/project in the guest\n" +
			"  banger vm cp dev:/var/log/syslog ./out  → ./out/syslog on the host\n" +
			"Modes and modification times are kept.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			srcVM, src, srcRemote := splitRemote(args[0])
			dstVM, dst, dstRemote := splitRemote(args[1])
			switch {
			case srcRemote == dstRemote:
				return fmt.Errorf("exactly one of SRC and DST must name a VM (NAME:/path)")
			case dstRemote:
				if !strings.HasPrefix(dst, "/") {
					return fmt.Errorf("guest path %q must be absolute", dst)
				}
				src, err := filepath.Abs(src)
				if err != nil {
					return err
				}
				if _, err := os.Lstat(src); err != nil {
					return err
				}
				pr, pw := io.Pipe()
				go func() { pw.CloseWithError(tarcopy.Write(pw, src, nil)) }()
				err = a.client().VMCopyIn(cmd.Context(), api.VMCopyParams{Name: dstVM, Path: dst}, pr)
				pr.Close()
				return err
			default:
				if !strings.HasPrefix(src, "/") {
					return fmt.Errorf("guest path %q must be absolute", src)
				}
				dst, err := filepath.Abs(dst)
				if err != nil {
					return err
				}
				pr, pw := io.Pipe()
				done := make(chan error, 1)
				go func() {
					err := tarcopy.Extract(pr, dst, nil)
					pr.CloseWithError(err)
					done <- err
				}()
				err = a.client().VMCopyOut(cmd.Context(), api.VMCopyParams{Name: srcVM, Path: src}, pw)
				pw.CloseWithError(err)
				if xerr := <-done; err == nil {
					err = xerr
				}
				return err
			}
		},
	}
}
