// Package cli implements the banger command line. It reaches bangerd only
// through the typed client package.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/client"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/sshcfg"
)

// Version is banger's version, set with -ldflags.
var Version = "dev"

// exitError carries an exit code out of a command (vm exec's remote code).
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// app is the state shared by the commands.
type app struct {
	configPath string
	socket     string
	cfg        config.CLI
	stdin      io.Reader
	stdout     io.Writer
	stderr     io.Writer
	// sshUser and sshBanger replace the invoking user and the banger
	// executable for the ssh files (tests); nil and "": the real ones.
	sshUser   *sshcfg.User
	sshBanger string
}

func (a *app) client() *client.Client { return client.New(a.cfg.SocketPath) }

// Main runs the CLI and returns the process exit code.
func Main(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	a := &app{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}
	return a.main(ctx, args)
}

func (a *app) main(ctx context.Context, args []string) int {
	root := a.rootCmd()
	root.SetArgs(args[1:])
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	fmt.Fprintln(a.stderr, "banger:", explain(err, a.cfg.SocketPath))
	return 1
}

// explain turns errors into messages that say what to do next.
func explain(err error, socket string) string {
	switch {
	case client.IsUnreachable(err):
		if errors.Is(err, os.ErrPermission) || strings.Contains(err.Error(), "permission denied") {
			return fmt.Sprintf("permission denied on bangerd's socket %s: run banger with sudo, or ask for membership of the daemon's socket_group", socket)
		}
		return fmt.Sprintf("bangerd is not running (no daemon at %s).\nStart it with: sudo systemctl start bangerd   (or in the foreground: sudo bangerd)", socket)
	case errors.Is(err, errdefs.ErrUnknownMethod):
		return err.Error() + "\nbanger and bangerd versions differ: upgrade them together"
	}
	return err.Error()
}

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "banger",
		Short:         "Disposable, strongly isolated Linux microVMs",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			return a.loadConfig()
		},
	}
	root.SetIn(a.stdin)
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	root.PersistentFlags().StringVar(&a.configPath, "config", "", "CLI config file (default ~/.config/banger/config.toml)")
	root.PersistentFlags().StringVar(&a.socket, "socket", "", "bangerd socket (default /run/banger/bangerd.sock, or $BANGER_SOCKET)")
	root.AddCommand(a.vmCmd(), a.imageCmd(), a.kernelCmd(), a.doctorCmd(), a.sshConfigCmd(), &cobra.Command{
		Use:   "version",
		Short: "Print banger's version and the daemon's",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			fmt.Fprintln(a.stdout, "banger", Version)
			if p, err := a.client().Ping(cmd.Context()); err == nil {
				fmt.Fprintf(a.stdout, "bangerd %s (api v%d, pid %d)\n", p.Version, p.APIVersion, p.PID)
			}
			return nil
		},
	})
	return root
}

// loadConfig reads the CLI config (--config, else the invoking user's
// ~/.config/banger/config.toml: under sudo, SUDO_USER's) and applies
// --socket.
func (a *app) loadConfig() error {
	path, must := a.configPath, true
	if path == "" {
		path, must = config.DefaultCLIPath(), false
		if u, err := sshcfg.InvokingUser(); err == nil && u.Chown && a.sshUser == nil {
			path = filepath.Join(u.Home, ".config", "banger", "config.toml")
		}
	}
	cfg, err := config.LoadCLI(path, must)
	if err != nil {
		return err
	}
	if a.socket != "" {
		cfg.SocketPath = a.socket
	}
	a.cfg = cfg
	return nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// parseSize parses sizes like 512M, 4G, 20GiB, 1073741824 (bytes when no
// unit; defUnit multiplies a bare number, e.g. MiB for memory).
func parseSize(s string, defUnit int64) (int64, error) {
	t := strings.TrimSpace(strings.ToUpper(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	mult := defUnit
	if t != "" {
		switch t[len(t)-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult != defUnit || strings.ContainsAny(t[len(t)-1:], "KMGT") {
			t = t[:len(t)-1]
		}
	}
	var n int64
	if _, err := fmt.Sscanf(t, "%d", &n); err != nil || n <= 0 || fmt.Sprint(n) != t {
		return 0, fmt.Errorf("invalid size %q: use a positive number with an optional unit K, M, G or T (e.g. 4G)", s)
	}
	if n > (1<<62)/mult {
		return 0, fmt.Errorf("invalid size %q: too large", s)
	}
	return n * mult, nil
}
