package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/client"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/sshcfg"
)

// sshFiles returns the invoking user's banger SSH files.
func (a *app) sshFiles() (sshcfg.Files, error) {
	var u sshcfg.User
	if a.sshUser != nil {
		u = *a.sshUser
	} else {
		var err error
		if u, err = sshcfg.InvokingUser(); err != nil {
			return sshcfg.Files{}, err
		}
	}
	exe := a.sshBanger
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return sshcfg.Files{}, fmt.Errorf("find banger's own path for ssh's ProxyCommand: %w", err)
		}
	}
	return sshcfg.New(u, a.cfg.SSHKeyPath, exe), nil
}

// proxyFlags are the banger flags the ProxyCommand of this invocation
// repeats, so that the proxy reaches the same daemon.
func (a *app) proxyFlags() []string {
	var fl []string
	if a.configPath != "" {
		fl = append(fl, "--config", a.configPath)
	}
	if a.socket != "" {
		fl = append(fl, "--socket", a.socket)
	}
	return fl
}

// sshRefresh asks the daemon how to reach VM name with ssh and records it
// in the user's files: its host keys in banger's known_hosts, its block
// (user, address) in banger's ssh config.
func (a *app) sshRefresh(ctx context.Context, f sshcfg.Files, name string) (api.SSHInfo, error) {
	info, err := a.client().VMSSHInfo(ctx, name)
	if err != nil {
		return info, err
	}
	if err := f.SetHostKeys(name, info.HostKeys); err != nil {
		return info, err
	}
	return info, f.SetHost(sshcfg.Host{Name: name, User: info.User, Direct: info.Direct})
}

// sshRefreshQuietly is sshRefresh after vm create and run: a daemon that
// can't answer (too old, the VM not booted) is no error there.
func (a *app) sshRefreshQuietly(ctx context.Context, name string) {
	f, err := a.sshFiles()
	if err == nil {
		_, err = a.sshRefresh(ctx, f, name)
	}
	if err != nil && !errors.Is(err, errdefs.ErrUnknownMethod) && !errors.Is(err, errdefs.ErrNotFound) {
		fmt.Fprintf(a.stderr, "banger: warning: ssh config for %s not updated: %v\n", name, err)
	}
}

// sshPublicKey is the key vm create and run authorise in the VM; a key
// banger can't read or make is a warning (the VM is still made).
func (a *app) sshPublicKey() []string {
	f, err := a.sshFiles()
	var pub string
	if err == nil {
		pub, err = f.PublicKey()
	}
	if err != nil {
		fmt.Fprintf(a.stderr, "banger: warning: no ssh key authorised in the VM: %v\n", err)
		return nil
	}
	return []string{pub}
}

func (a *app) sshConfigCmd() *cobra.Command {
	var install bool
	cmd := &cobra.Command{
		Use:   "ssh-config [--install]",
		Short: "Print (or install into ~/.ssh/config) the ssh configuration for NAME.banger",
		Long: "Print the ssh configuration that makes `ssh NAME.banger` (and scp, rsync, VS Code Remote-SSH)\n" +
			"reach banger's VMs: a block per VM with its user, and a *.banger block whose ProxyCommand is\n" +
			"`banger vm ssh-proxy`, with banger's known_hosts and key. --install writes it to\n" +
			"~/.config/banger/ssh/config and includes that file at the top of ~/.ssh/config (once). banger\n" +
			"rewrites it on vm create, run and ssh, so new VMs appear. Under sudo, the files are SUDO_USER's.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := a.sshFiles()
			if err != nil {
				return err
			}
			hosts, err := a.sshHosts(cmd.Context(), f, install)
			if err != nil {
				// The daemon can't be asked: the VMs banger knew stay.
				fmt.Fprintf(a.stderr, "banger: warning: the VMs' blocks are not refreshed: %s\n", explain(err, a.cfg.SocketPath))
				if hosts, err = f.Hosts(); err != nil {
					return err
				}
			}
			if !install {
				_, err := io.WriteString(a.stdout, f.ConfigText(hosts))
				return err
			}
			if err := f.EnsureKey(); err != nil {
				return err
			}
			if err := f.WriteConfig(hosts); err != nil {
				return err
			}
			changed, err := f.Install()
			if err != nil {
				return err
			}
			if changed {
				fmt.Fprintf(a.stdout, "added %q at the top of ~/.ssh/config\n", f.IncludeLine())
			}
			fmt.Fprintf(a.stdout, "wrote %s: ssh NAME.banger reaches a VM\n", f.Config)
			return nil
		},
	}
	cmd.Flags().BoolVar(&install, "install", false, "write the config and include it from ~/.ssh/config")
	return cmd
}

// sshHosts asks the daemon for every VM's ssh user and address (and with
// record, writes their host keys to banger's known_hosts).
func (a *app) sshHosts(ctx context.Context, f sshcfg.Files, record bool) ([]sshcfg.Host, error) {
	vms, err := a.client().VMList(ctx)
	if err != nil {
		return nil, err
	}
	hosts := make([]sshcfg.Host, len(vms))
	errs := make([]error, len(vms))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for i, vm := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			hosts[i] = sshcfg.Host{Name: vm.Name}
			info, err := a.client().VMSSHInfo(ctx, vm.Name)
			if err != nil {
				errs[i] = err
				return
			}
			hosts[i].User, hosts[i].Direct = info.User, info.Direct
			if record {
				errs[i] = f.SetHostKeys(vm.Name, info.HostKeys)
			}
		}()
	}
	wg.Wait()
	for i, err := range errs {
		switch {
		case err == nil, errors.Is(err, errdefs.ErrNotFound): // removed meanwhile
		case errors.Is(err, errdefs.ErrUnknownMethod):
			return nil, err
		default:
			fmt.Fprintf(a.stderr, "banger: warning: vm %s: %v\n", vms[i].Name, err)
		}
	}
	return hosts, nil
}

// sshArgFlags are OpenSSH client flags that take an argument; sshNoArgFlags
// those that take none (ssh(1), OpenSSH 9).
const (
	sshArgFlags   = "BbcDEeFIiJLlmOoPpQRSWw"
	sshNoArgFlags = "46AaCfGgKkMNnqsTtVvXxYy"
)

// sshCommandLine is `vm ssh`'s command line: ssh flags, banger's own
// flags, NAME ([USER@]NAME[.banger]) and the remote command.
type sshCommandLine struct {
	sshFlags []string
	login    bool // -l given
	help     bool
	user     string
	name     string
	command  []string
}

// parseSSHCommandLine reads `vm ssh`'s arguments like ssh's getopt does:
// flags until NAME (or "--"), a flag taking an argument joined to it or in
// the next word; everything after NAME is the command. --socket and
// --config are banger's (cobra doesn't parse them here).
func (a *app) parseSSHCommandLine(args []string) (sshCommandLine, error) {
	var c sshCommandLine
	i := 0
	for ; i < len(args); i++ {
		arg := args[i]
		if arg == "--" {
			i++
			break
		}
		if !strings.HasPrefix(arg, "-") || arg == "-" {
			break
		}
		if strings.HasPrefix(arg, "--") {
			key, val, hasVal := strings.Cut(arg[2:], "=")
			switch key {
			case "help":
				c.help = true
				continue
			case "socket", "config":
			default:
				return c, fmt.Errorf("unknown flag %s (ssh flags are single letters; see banger vm ssh --help)", arg)
			}
			if !hasVal {
				if i+1 >= len(args) {
					return c, fmt.Errorf("flag --%s needs an argument", key)
				}
				i++
				val = args[i]
			}
			if key == "socket" {
				a.socket = val
			} else {
				a.configPath = val
			}
			continue
		}
		c.sshFlags = append(c.sshFlags, arg)
		for j := 1; j < len(arg); j++ {
			ch := arg[j]
			switch {
			case ch == 'h':
				c.help = true
			case strings.IndexByte(sshArgFlags, ch) >= 0:
				if ch == 'l' {
					c.login = true
				}
				if j == len(arg)-1 {
					if i+1 >= len(args) {
						return c, fmt.Errorf("ssh flag -%c needs an argument", ch)
					}
					i++
					c.sshFlags = append(c.sshFlags, args[i])
				}
				j = len(arg) // the rest of the word is the argument
			case strings.IndexByte(sshNoArgFlags, ch) >= 0:
			default:
				return c, fmt.Errorf("unknown ssh flag -%c in %s: %w", ch, arg, errdefs.ErrInvalid)
			}
		}
	}
	if c.help {
		return c, nil
	}
	if i >= len(args) {
		return c, fmt.Errorf("no VM named: banger vm ssh [SSH FLAGS] NAME [-- CMD...]: %w", errdefs.ErrInvalid)
	}
	c.name = args[i]
	if at := strings.LastIndexByte(c.name, '@'); at >= 0 {
		c.user, c.name = c.name[:at], c.name[at+1:]
	}
	c.name = strings.TrimSuffix(c.name, sshcfg.HostSuffix)
	c.command = args[i+1:]
	if len(c.command) > 0 && c.command[0] == "--" {
		c.command = c.command[1:]
	}
	return c, nil
}

// sshArgv is the system ssh's command line for VM info.Name: the user's
// ssh flags first (ssh keeps the first value of an option, so theirs
// win), banger's options, the login user and the host after "--".
func (a *app) sshArgv(f sshcfg.Files, info api.SSHInfo, c sshCommandLine) []string {
	argv := append([]string{"ssh"}, c.sshFlags...)
	for _, o := range f.Options() {
		if o[0] == "ProxyCommand" {
			o[1] = f.ProxyCommand(a.proxyFlags()...)
		}
		argv = append(argv, "-o", o[0]+"="+o[1])
	}
	user := c.user
	if user == "" && !c.login {
		user = info.User
	}
	if user != "" {
		argv = append(argv, "-l", user)
	}
	argv = append(argv, "--", c.name+sshcfg.HostSuffix)
	return append(argv, c.command...)
}

const vmSSHLong = `Log into a VM with the system OpenSSH client, or run CMD there (as ssh does: the words are
joined and run by the guest user's shell). ssh's own flags (-A, -L 8080:localhost:80, -v, -o ...) go
before NAME. banger adds what reaches the VM: its ProxyCommand (banger vm ssh-proxy: straight to
the guest's sshd on a bridged network, else a tunnel through bangerd and the guest agent, which
provides an SSH server when the image has none), banger's known_hosts holding the host keys the
agent reported (a changed key is refused, never trusted on first use), the key banger authorised
in the VM, and the image's default user (-l or USER@NAME to choose another). It exits with ssh's
exit code (the command's). The same works with plain ssh NAME.banger after banger ssh-config
--install.`

func (a *app) vmSSHCmd() *cobra.Command {
	return &cobra.Command{
		Use:                "ssh [SSH FLAGS] [USER@]NAME [-- CMD [ARG...]]",
		Short:              "Log into a VM (or run a command) with the system ssh client",
		Long:               vmSSHLong,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.parseSSHCommandLine(args)
			if err != nil {
				return err
			}
			if c.help {
				return cmd.Help()
			}
			// --socket and --config were only parsed now.
			if err := a.loadConfig(); err != nil {
				return err
			}
			return a.vmSSH(cmd.Context(), c)
		},
	}
}

// errNoSSH: ssh can't reach the VM from here (no ssh client, a daemon
// without SSH support, no host keys); vm run falls back to the agent's
// terminal.
var errNoSSH = errors.New("ssh can't be used")

// sshPrepare finds the ssh client, the user's files and key, and the VM's
// ssh info (recorded in known_hosts and the config).
func (a *app) sshPrepare(ctx context.Context, name string) (bin string, f sshcfg.Files, info api.SSHInfo, err error) {
	if bin, err = exec.LookPath("ssh"); err != nil {
		return "", f, info, fmt.Errorf("%w: no ssh client found on PATH: install OpenSSH's client (apt-get install openssh-client), or use banger vm exec: %w",
			errNoSSH, errdefs.ErrFailedPrecondition)
	}
	if f, err = a.sshFiles(); err != nil {
		return "", f, info, err
	}
	info, err = a.sshRefresh(ctx, f, name)
	if errors.Is(err, errdefs.ErrUnknownMethod) {
		err = fmt.Errorf("%w: %w", errNoSSH, err)
	}
	if err != nil {
		return "", f, info, err
	}
	return bin, f, info, f.EnsureKey()
}

// vmSSH runs the system ssh into VM c.name and returns its exit code as
// an exitError.
func (a *app) vmSSH(ctx context.Context, c sshCommandLine) error {
	bin, f, info, err := a.sshPrepare(ctx, c.name)
	if err != nil {
		return err
	}
	// A stopped VM: say so, rather than ssh's "connection closed".
	if vm, err := a.client().VMInspect(ctx, c.name); err == nil && vm.State == api.StateStopped {
		return fmt.Errorf("vm %s is stopped: start it with banger vm start %s: %w", c.name, c.name, errdefs.ErrFailedPrecondition)
	}
	if len(info.HostKeys) == 0 {
		fmt.Fprintf(a.stderr, "banger: vm %s has no SSH host keys recorded yet (is it running? banger vm start %s)\n", c.name, c.name)
	}
	return a.runSSH(ctx, bin, a.sshArgv(f, info, c))
}

// runShell is vm run's session without a command: the system ssh with a
// terminal. An auto-remove VM (--rm) is held by a v1.vm.hold call for as
// long as the session lasts, so the daemon removes it when the session
// ends or this process dies. errNoSSH: ssh can't be used.
func (a *app) runShell(ctx context.Context, name string, hold bool, ef *execFlags) error {
	in, isFile := a.stdin.(*os.File)
	stdinTTY := isFile && term.IsTerminal(int(in.Fd()))
	if ef.noTTY || (!stdinTTY && !ef.tty) {
		return fmt.Errorf("no command given: use banger vm run -- CMD, or run from a terminal (or with -t) for a shell: %w", errdefs.ErrInvalid)
	}
	c := sshCommandLine{name: name, sshFlags: []string{"-t"}}
	if !stdinTTY {
		c.sshFlags = append(c.sshFlags, "-t") // -t asked without a terminal: force it
	}
	bin, f, info, err := a.sshPrepare(ctx, name)
	if err != nil {
		return err
	}
	if len(info.HostKeys) == 0 {
		return fmt.Errorf("%w: vm %s reported no SSH host keys", errNoSSH, name)
	}
	if hold {
		// The session starts once the daemon holds the VM (or the hold
		// failed: the VM then goes when its create's grace period ends).
		hctx, stop := context.WithCancel(ctx)
		held, ended := make(chan struct{}), make(chan struct{})
		var once sync.Once
		go func() {
			defer close(ended)
			err := a.client().VMHold(hctx, name, func() { once.Do(func() { close(held) }) })
			if err != nil {
				fmt.Fprintf(a.stderr, "banger: vm %s is not held for this session: %v\r\n", name, err)
			}
		}()
		defer func() { stop(); <-ended }()
		select {
		case <-held:
		case <-ended:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return a.runSSH(ctx, bin, a.sshArgv(f, info, c))
}

// sshForget removes a removed VM from banger's ssh config and
// known_hosts (when they exist).
func (a *app) sshForget(name string) {
	f, err := a.sshFiles()
	if err != nil {
		return
	}
	if _, err := os.Stat(f.Config); err == nil {
		_ = f.RemoveHost(name)
	}
	if _, err := os.Stat(f.KnownHosts); err == nil {
		_ = f.SetHostKeys(name, nil)
	}
}

// runSSH runs ssh in the foreground, with banger's terminal, and returns
// its exit code as an exitError. A signal that ends banger's context
// (SIGTERM) is passed on to ssh, which ends its session.
func (a *app) runSSH(ctx context.Context, bin string, argv []string) error {
	cmd := exec.Command(bin, argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = a.stdin, a.stdout, a.stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("run ssh: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { _ = cmd.Process.Signal(syscall.SIGTERM) })
	defer stop()
	err := cmd.Wait()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return exitError{128 + int(ws.Signal())}
		}
		return exitError{ee.ExitCode()}
	}
	return fmt.Errorf("run ssh: %w", err)
}

func (a *app) vmSSHProxyCmd() *cobra.Command {
	var direct string
	cmd := &cobra.Command{
		Use:    "ssh-proxy [--direct IP:PORT] NAME[.banger]",
		Short:  "Relay ssh's connection to a VM (ssh's ProxyCommand; not for direct use)",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.sshProxy(cmd.Context(), strings.TrimSuffix(args[0], sshcfg.HostSuffix), direct)
		},
	}
	cmd.Flags().StringVar(&direct, "direct", "", "the VM's sshd address, used when bangerd can't be asked")
	return cmd
}

// directDialTimeout bounds the TCP connect to a VM's sshd before the
// proxy tunnels through the daemon instead.
const directDialTimeout = 2 * time.Second

// sshProxy relays stdin and stdout (ssh's ProxyCommand pipes) to VM
// name's SSH service: straight to its sshd when the daemon says it can be
// reached (SSHInfo.Direct) and a TCP connect succeeds, else through a
// daemon tunnel (v1.vm.tunnel, SSH). It records the VM's host keys in
// banger's known_hosts first, so ssh checks the key the agent reported.
// It writes nothing but the connection's bytes to stdout.
func (a *app) sshProxy(ctx context.Context, name, hint string) error {
	info, err := a.client().VMSSHInfo(ctx, name)
	addr := info.Direct
	switch {
	case err == nil:
		f, ferr := a.sshFiles()
		if ferr == nil {
			ferr = f.SetHostKeys(name, info.HostKeys)
		}
		if ferr != nil {
			fmt.Fprintf(a.stderr, "banger: warning: known_hosts not updated: %v\n", ferr)
		}
		if len(info.HostKeys) == 0 {
			fmt.Fprintf(a.stderr, "banger: vm %s has no SSH host keys recorded yet (is it running? banger vm start %s)\n", name, name)
		}
	case hint != "" && isUnreachable(err):
		// No access to bangerd (a user outside socket_group after sudo
		// banger vm run): the VM's address from the config, and the host
		// keys banger's known_hosts already holds.
		addr = hint
	default:
		return fmt.Errorf("vm %s: %s", name, explain(err, a.cfg.SocketPath))
	}
	if addr != "" {
		d := net.Dialer{Timeout: directDialTimeout}
		conn, derr := d.DialContext(ctx, "tcp", addr)
		if derr == nil {
			return relay(conn, a.stdin, a.stdout)
		}
		if err != nil {
			return fmt.Errorf("vm %s: %s; and its address %s: %w", name, explain(err, a.cfg.SocketPath), addr, derr)
		}
	}
	return a.client().VMTunnel(ctx, api.VMTunnelParams{Name: name, SSH: true}, a.stdin, a.stdout)
}

func isUnreachable(err error) bool {
	return client.IsUnreachable(err) || errors.Is(err, errdefs.ErrPermissionDenied)
}

// relay copies in to conn and conn to out until conn's side ends; the end
// of in half-closes conn.
func relay(conn net.Conn, in io.Reader, out io.Writer) error {
	defer conn.Close()
	go func() {
		_, _ = io.Copy(conn, in)
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}()
	_, err := io.Copy(out, conn)
	return err
}
