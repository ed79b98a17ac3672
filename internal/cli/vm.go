package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/client"
	"github.com/bangerdev/banger/internal/errdefs"
)

// createFlags are shared by vm create and vm run.
type createFlags struct {
	name, image, memory, diskSize, accel string
	cpus                                 int
	network                              string
	publish, allow                       []string
	publishAll                           bool
	restart                              string
	kernel                               string
}

func (f *createFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.name, "name", "", "VM name (a DNS label; generated when omitted)")
	cmd.Flags().StringVar(&f.image, "image", "", "image name or id (default: the configured default image)")
	cmd.Flags().IntVar(&f.cpus, "cpus", 0, "virtual CPUs (default from config, 2)")
	cmd.Flags().StringVar(&f.memory, "memory", "", "memory, e.g. 1024 (MiB) or 2G (default from config, 1024 MiB)")
	cmd.Flags().StringVar(&f.diskSize, "disk-size", "", "root disk size, e.g. 10G (default: the image's size); the guest filesystem grows to it")
	cmd.Flags().StringVar(&f.accel, "accel", "", "accelerator: auto, kvm or tcg (default from the daemon's config)")
	cmd.Flags().StringVar(&f.network, "network", "", "network: bridge (an address on banger's bridge, NAT), user (QEMU's user-mode network) or none (default from the daemon's config)")
	cmd.Flags().StringArrayVarP(&f.publish, "publish", "p", nil, "forward a host port to the VM: [HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp] (repeatable; host side 127.0.0.1 unless HOSTIP is given)")
	cmd.Flags().BoolVar(&f.publishAll, "publish-all", false, "while the VM runs, forward each TCP port the guest listens on (not on its loopback) from the same port on the host's 127.0.0.1; privileged ports (< 1024), ports taken on the host and -p ports are skipped")
	cmd.Flags().StringSliceVar(&f.allow, "allow", nil, "let the VM reach more than the default (bridge network): host, vm, lan, link-local (comma list)")
	cmd.Flags().StringVar(&f.kernel, "kernel", "", "kernel to boot instead of the image's (a kernel's name: banger kernel ls)")
	cmd.Flags().StringVar(&f.restart, "restart", "", "restart policy of the main process (an image without an init system runs its Entrypoint+Cmd): no (default: the VM stops when it exits), on-failure or always")
}

// userNetWarning is printed for --network user: QEMU's user-mode network
// has no firewall (docs/security.md).
const userNetWarning = "banger: warning: --network user has no isolation: the guest reaches the host's loopback services through 10.0.2.2, and the LAN and cloud metadata through QEMU's NAT (use --network bridge to isolate it)"

func (a *app) createParams(f *createFlags) (api.VMCreateParams, error) {
	p := api.VMCreateParams{Name: f.name, Image: f.image, CPUs: f.cpus, Accel: f.accel, Network: f.network, Ports: f.publish, PublishAll: f.publishAll, Allow: f.allow, Restart: f.restart, Kernel: f.kernel}
	if p.Network == api.NetworkUser {
		fmt.Fprintln(a.stderr, userNetWarning)
	}
	if p.Image == "" {
		p.Image = a.cfg.DefaultImageName
	}
	if p.CPUs == 0 {
		p.CPUs = a.cfg.DefaultCPUs
	}
	if p.CPUs < 0 {
		return p, fmt.Errorf("--cpus %d: must be positive", p.CPUs)
	}
	p.MemoryMiB = a.cfg.DefaultMemoryMiB
	if f.memory != "" {
		n, err := parseSize(f.memory, 1<<20)
		if err != nil {
			return p, fmt.Errorf("--memory: %w", err)
		}
		if n%(1<<20) != 0 {
			return p, fmt.Errorf("--memory %s: must be a whole number of MiB", f.memory)
		}
		p.MemoryMiB = int(n >> 20)
	}
	if f.diskSize != "" {
		n, err := parseSize(f.diskSize, 1)
		if err != nil {
			return p, fmt.Errorf("--disk-size: %w", err)
		}
		p.DiskBytes = n
	}
	// The invoking user's key, always: `vm ssh` and ssh NAME.banger log in
	// with it.
	p.SSHKeys = a.sshPublicKey()
	return p, nil
}

func (a *app) vmCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "vm", Short: "Create, run and manage VMs"}
	cmd.AddCommand(a.vmCreateCmd(), a.vmStartCmd(), a.vmStopCmd(), a.vmKillCmd(), a.vmRmCmd(), a.vmLsCmd(),
		a.vmInspectCmd(), a.vmLogsCmd(), a.vmExecCmd(), a.vmRunCmd(), a.vmAttachCmd(), a.vmCpCmd(), a.vmSSHCmd(), a.vmSSHProxyCmd())
	return cmd
}

func (a *app) vmCreateCmd() *cobra.Command {
	var f createFlags
	var start, waitBoot, timings bool
	cmd := &cobra.Command{
		Use:   "create [flags] [-- ARG...]",
		Short: "Create a VM with a copy-on-write root disk",
		Long: "Create a VM with a copy-on-write root disk. For an image without an init system (an OCI image),\n" +
			"ARGS replace the image's Cmd for its main process (its Entrypoint+Cmd, run when the VM starts),\n" +
			"as docker create does.",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 && cmd.ArgsLenAtDash() != 0 {
				return fmt.Errorf("unexpected argument %q: the main process's arguments come after --", args[0])
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := a.createParams(&f)
			if err != nil {
				return err
			}
			p.Cmd = args
			p.Start, p.WaitBoot = start, waitBoot
			if waitBoot && !start {
				return fmt.Errorf("--wait-boot needs --start")
			}
			if timings && !start {
				return fmt.Errorf("--timings needs --start")
			}
			pr := a.progress()
			vm, err := a.client().VMCreate(cmd.Context(), p, pr.update)
			pr.done()
			if timings && err == nil {
				a.timingsAfter(cmd.Context(), vm.Name, vm, nil)
			}
			if err != nil {
				return err
			}
			a.sshRefreshQuietly(cmd.Context(), vm.Name)
			fmt.Fprintln(a.stdout, vm.Name)
			return nil
		},
	}
	f.add(cmd)
	cmd.Flags().BoolVar(&start, "start", false, "start the VM and wait until it is ready")
	cmd.Flags().BoolVar(&waitBoot, "wait-boot", false, "with --start: "+waitBootHelp)
	cmd.Flags().BoolVar(&timings, "timings", false, "with --start: "+timingsHelp)
	return cmd
}

// forEach runs fn for each named VM, reporting every failure.
func (a *app) forEach(names []string, fn func(name string) error) error {
	var failed int
	for _, n := range names {
		if err := fn(n); err != nil {
			fmt.Fprintf(a.stderr, "banger: %s: %s\n", n, explain(err, a.cfg.SocketPath))
			failed++
			continue
		}
		fmt.Fprintln(a.stdout, n)
	}
	if failed > 0 {
		return exitError{1}
	}
	return nil
}

const waitBootHelp = "also wait until the guest's init has finished booting (systemd: its services are up), not only for the agent"

func (a *app) vmStartCmd() *cobra.Command {
	var waitBoot, timings bool
	cmd := &cobra.Command{
		Use:   "start NAME...",
		Short: "Start VMs and wait until they are ready",
		Long: "Start VMs and wait until they are ready. Starting a VM that another start is booting fails\n" +
			"at once (it says the VM is booting); vm stop, kill or rm abort a boot in any phase.",
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.forEach(args, func(n string) error {
				pr := a.progress()
				defer pr.done()
				vm, err := a.client().VMStart(cmd.Context(), api.VMStartParams{Name: n, WaitBoot: waitBoot}, pr.update)
				if timings {
					pr.done()
					a.timingsAfter(cmd.Context(), n, vm, err)
				}
				return err
			})
		},
	}
	cmd.Flags().BoolVar(&waitBoot, "wait-boot", false, waitBootHelp)
	cmd.Flags().BoolVar(&timings, "timings", false, timingsHelp)
	return cmd
}

func (a *app) vmStopCmd() *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "stop NAME...",
		Short: "Stop VMs gracefully (guest agent, then ACPI), killing them after the timeout",
		Long: "Stop VMs gracefully (guest agent, then ACPI), killing them after the timeout. A VM that is\n" +
			"booting has its boot aborted (at any phase) and ends stopped.",
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p := api.VMStopParams{}
			if timeout > 0 {
				p.Timeout = timeout.String()
			}
			return a.forEach(args, func(n string) error {
				p.Name = n
				pr := a.progress()
				defer pr.done()
				_, err := a.client().VMStop(cmd.Context(), p, pr.update)
				return err
			})
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "time to wait for a graceful stop before killing (default from the daemon's config, 30s)")
	return cmd
}

func (a *app) vmKillCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "kill NAME...",
		Short: "Stop VMs immediately",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.forEach(args, func(n string) error {
				_, err := a.client().VMKill(cmd.Context(), n)
				return err
			})
		},
	}
}

func (a *app) vmRmCmd() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:     "rm NAME...",
		Aliases: []string{"remove"},
		Short:   "Remove VMs and their disks",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.forEach(args, func(n string) error {
				if err := a.client().VMRemove(cmd.Context(), api.VMRemoveParams{Name: n, Force: force}); err != nil {
					return err
				}
				a.sshForget(n)
				return nil
			})
		},
	}
	cmd.Flags().BoolVarP(&force, "force", "f", false, "kill running VMs first")
	return cmd
}

func (a *app) vmLsCmd() *cobra.Command {
	var asJSON, quiet bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List VMs",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			vms, err := a.client().VMList(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(a.stdout, vms)
			}
			if quiet {
				for _, v := range vms {
					fmt.Fprintln(a.stdout, v.Name)
				}
				return nil
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSTATE\tIMAGE\tCPUS\tMEMORY\tDISK\tACCEL\tIP\tPORTS\tCREATED")
			for _, v := range vms {
				accel := v.Accel
				if accel == "" {
					accel = "-"
				}
				ip, ports := netColumns(v.Network)
				state := v.State
				if v.State == api.StateStopped && v.MainExitCode != nil {
					// Stopped with its main process: its exit code.
					state = fmt.Sprintf("%s (exit %d)", v.State, *v.MainExitCode)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d MiB\t%s\t%s\t%s\t%s\t%s\n", v.Name, state, v.Image, v.CPUs, v.MemoryMiB,
					humanBytes(v.DiskBytes), accel, ip, ports, ago(v.CreatedAt))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print names only")
	return cmd
}

// netColumns are a VM's IP and PORTS columns in vm ls: the bridge
// address ("user" for the user-mode network, "-" without a network), and
// the forwarded ports as HOSTIP:PORT->GUESTPORT/PROTO, "(auto)" after
// those forwarded because the guest listens on them (--publish-all).
func netColumns(n *api.NetworkInfo) (ip, ports string) {
	if n == nil {
		return "-", "-"
	}
	ip = n.IP
	if ip == "" {
		ip = n.Mode
	}
	var ps []string
	for _, p := range n.Ports {
		s := fmt.Sprintf("%s:%d->%d/%s", p.HostIP, p.HostPort, p.GuestPort, p.Proto)
		if p.Auto {
			s += "(auto)"
		}
		ps = append(ps, s)
	}
	if len(ps) == 0 {
		return ip, "-"
	}
	return ip, strings.Join(ps, ",")
}

func ago(t time.Time) string {
	d := time.Since(t)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	}
	return fmt.Sprintf("%dd ago", int(d.Hours()/24))
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (a *app) vmInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a VM as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm, err := a.client().VMInspect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return writeJSON(a.stdout, vm)
		},
	}
}

func (a *app) vmLogsCmd() *cobra.Command {
	var follow bool
	var tail int
	cmd := &cobra.Command{
		Use:   "logs NAME",
		Short: "Print a VM's serial console",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.client().VMLogs(cmd.Context(), api.VMLogsParams{Name: args[0], Follow: follow, Tail: tail}, a.stdout)
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output until the VM stops")
	cmd.Flags().IntVarP(&tail, "tail", "n", 0, "print only the last N lines")
	return cmd
}

// execFlags are shared by vm exec and vm run.
type execFlags struct {
	tty, noTTY bool
	env        []string
	dir        string
}

func (f *execFlags) add(cmd *cobra.Command) {
	cmd.Flags().BoolVarP(&f.tty, "tty", "t", false, "allocate a terminal (default when no command is given and stdin is a terminal)")
	cmd.Flags().BoolVarP(&f.noTTY, "no-tty", "T", false, "never allocate a terminal")
	cmd.Flags().StringArrayVarP(&f.env, "env", "e", nil, "set an environment variable KEY=VALUE (repeatable)")
	cmd.Flags().StringVarP(&f.dir, "workdir", "w", "", "working directory in the guest")
}

func (a *app) vmExecCmd() *cobra.Command {
	var f execFlags
	cmd := &cobra.Command{
		Use:   "exec NAME [-- CMD [ARG...]]",
		Short: "Run a command in a running VM; banger exits with its exit code",
		Long: "Run a command in a running VM. stdout and stderr stay separate, stdin is forwarded,\n" +
			"and banger exits with the command's exit code. Without a command, opens a login shell.",
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			oneThread()
			return a.exec(cmd.Context(), args[0], guestArgv(args[1:]), &f)
		},
	}
	f.add(cmd)
	// Everything after NAME belongs to the command: `vm exec box ls -la`.
	cmd.Flags().SetInterspersed(false)
	return cmd
}

// guestArgv is the command after vm exec's NAME. Flag parsing stops at NAME,
// so a "--" written after it reaches us and is dropped.
func guestArgv(rest []string) []string {
	if len(rest) > 0 && rest[0] == "--" {
		return rest[1:]
	}
	return rest
}

func (a *app) exec(ctx context.Context, name string, argv []string, f *execFlags) error {
	for _, e := range f.env {
		if !strings.Contains(e, "=") || strings.HasPrefix(e, "=") {
			return fmt.Errorf("--env %q: want KEY=VALUE", e)
		}
	}
	in, isFile := a.stdin.(*os.File)
	stdinTTY := isFile && term.IsTerminal(int(in.Fd()))
	tty := !f.noTTY && (f.tty || (len(argv) == 0 && stdinTTY))
	if len(argv) == 0 && !tty {
		return fmt.Errorf("no command given: use banger vm exec %s -- CMD, or run from a terminal for a shell", name)
	}
	p := api.VMExecParams{Name: name, Argv: argv, Env: f.env, Dir: f.dir, TTY: tty}
	eio := client.ExecIO{Stdin: a.stdin, Stdout: a.stdout, Stderr: a.stderr}
	if tty && stdinTTY {
		p.Term = os.Getenv("TERM")
		if w, h, err := term.GetSize(int(in.Fd())); err == nil {
			p.Cols, p.Rows = w, h
		}
		old, err := term.MakeRaw(int(in.Fd()))
		if err != nil {
			return fmt.Errorf("set terminal raw mode: %w", err)
		}
		defer term.Restore(int(in.Fd()), old)
		resize := make(chan [2]int, 1)
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				if w, h, err := term.GetSize(int(in.Fd())); err == nil {
					select {
					case resize <- [2]int{h, w}:
					default:
					}
				}
			}
		}()
		eio.Resize = resize
	}
	code, err := a.client().VMExec(ctx, p, eio)
	if err != nil {
		return err
	}
	if code != 0 {
		return exitError{code}
	}
	return nil
}

func (a *app) vmRunCmd() *cobra.Command {
	var f createFlags
	var ef execFlags
	var rm, waitBoot, timings, detach bool
	cmd := &cobra.Command{
		Use:   "run [flags] [-- CMD [ARG...]]",
		Short: "Create and start a VM, wait until it is ready, then run a command or a shell in it",
		Long: "Create and start a VM, wait until it is ready, then run CMD in it and exit with its exit code.\n" +
			"Without a command, log into it with the system ssh client and a real terminal (as banger vm ssh\n" +
			"does; the guest agent's terminal when there is no ssh client, or with --env/--workdir) and exit\n" +
			"with the shell's exit code. With --rm the VM is removed afterwards: the daemon removes it when\n" +
			"the command or the ssh session ends, even if this client is killed.\n\n" +
			"An image without an init system (an OCI image such as nginx, or FROM scratch) runs its\n" +
			"Entrypoint+Cmd as the VM's main process (CMD replaces its Cmd, as with docker run): banger\n" +
			"prints its output and exits with its exit code; the VM stops when it exits (see --restart).\n" +
			"With -d, banger prints the VM's name and returns; with -d --rm the VM is removed once its\n" +
			"main process has ended.",
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := a.createParams(&f)
			if err != nil {
				return err
			}
			p.AutoRemove = rm
			p.Cmd = args
			const detachRmHelp = "-d with --rm needs an image with a main process (an Entrypoint or Cmd, no init system): the daemon removes the VM when it ends"
			if detach && rm {
				// The daemon removes it when its main process ends; an image
				// with an init system has none, so it would never go. (An
				// image not pulled yet is checked after its start.)
				im, err := a.client().ImageInspect(cmd.Context(), p.Image)
				if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
					return err
				}
				if c := im.Config; err == nil && (c == nil || (len(c.Entrypoint) == 0 && len(c.Cmd) == 0 && len(args) == 0)) {
					return fmt.Errorf("%s; image %s has none: drop --rm and remove the VM with banger vm rm -f", detachRmHelp, im.Name)
				}
			}
			pr := a.progress()
			defer pr.done()
			vm, err := a.client().VMCreate(cmd.Context(), p, pr.update)
			if err != nil {
				return err
			}
			// With -d --rm the VM stays only once its main process runs.
			removeAtEnd := rm
			if rm {
				defer func() {
					if !removeAtEnd {
						return
					}
					// Remove even when the start failed or we were interrupted.
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					defer cancel()
					// The daemon removes the VM too (it is AutoRemove);
					// this makes it gone before we exit.
					if err := a.client().VMRemove(ctx, api.VMRemoveParams{Name: vm.Name, Force: true}); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
						fmt.Fprintf(a.stderr, "banger: remove %s: %v\n", vm.Name, err)
					}
					a.sshForget(vm.Name)
				}()
			}
			started, err := a.client().VMStart(cmd.Context(), api.VMStartParams{Name: vm.Name, WaitBoot: waitBoot}, pr.update)
			pr.done()
			if timings {
				a.timingsAfter(cmd.Context(), vm.Name, started, err)
			}
			if err != nil {
				return err
			}
			if detach {
				if rm && started.MainState == "" && started.MainExitCode == nil {
					return fmt.Errorf("vm %s runs no main process (its image has an init system), so it was removed: %s", vm.Name, detachRmHelp)
				}
				removeAtEnd = false
				if !rm {
					a.sshRefreshQuietly(cmd.Context(), vm.Name)
				}
				fmt.Fprintln(a.stdout, vm.Name)
				if started.MainState == "" && started.MainExitCode == nil && len(args) > 0 {
					return fmt.Errorf("vm %s runs no main process (its image has an init system): the command was not run; use banger vm exec %s -- CMD", vm.Name, vm.Name)
				}
				return nil
			}
			if started.MainState != "" || started.MainExitCode != nil {
				// The image's main process: follow it and exit with its code.
				if len(ef.env) > 0 || ef.dir != "" {
					fmt.Fprintln(a.stderr, "banger: warning: --env and --workdir apply to commands run with vm exec, not to the image's main process")
				}
				code, err := a.client().VMAttach(cmd.Context(), vm.Name, a.stdout, a.stderr)
				if err != nil {
					return err
				}
				if code != 0 {
					return exitError{code}
				}
				return nil
			}
			if !rm {
				fmt.Fprintf(a.stderr, "VM %s is running (banger vm ssh %s; banger vm exec %s -- CMD; banger vm rm -f %s)\n", vm.Name, vm.Name, vm.Name, vm.Name)
			}
			if len(args) == 0 && len(ef.env) == 0 && ef.dir == "" {
				err := a.runShell(cmd.Context(), vm.Name, rm, &ef)
				if !errors.Is(err, errNoSSH) {
					return err
				}
				fmt.Fprintf(a.stderr, "banger: %v; using the guest agent's terminal instead\n", err)
			}
			if !rm {
				a.sshRefreshQuietly(cmd.Context(), vm.Name)
			}
			return a.exec(cmd.Context(), vm.Name, args, &ef)
		},
	}
	f.add(cmd)
	ef.add(cmd)
	cmd.Flags().BoolVar(&rm, "rm", false, "remove the VM when the command (or the image's main process) exits")
	cmd.Flags().BoolVarP(&detach, "detach", "d", false, "start the VM, print its name and return (the image's main process keeps running)")
	cmd.Flags().BoolVar(&waitBoot, "wait-boot", false, waitBootHelp)
	cmd.Flags().BoolVar(&timings, "timings", false, timingsHelp)
	cmd.Flags().SetInterspersed(false)
	return cmd
}

func (a *app) vmAttachCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "attach NAME",
		Short: "Print a VM's main process's output until it exits; banger exits with its exit code",
		Long: "Print the output of a VM's main process (an image without an init system runs its Entrypoint+Cmd),\n" +
			"from its start (the last MiB), until it exits, and exit with its exit code. Ctrl-C detaches: the\n" +
			"process goes on. A VM that already stopped gives its last exit code.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			code, err := a.client().VMAttach(cmd.Context(), args[0], a.stdout, a.stderr)
			if err != nil {
				return err
			}
			if code != 0 {
				return exitError{code}
			}
			return nil
		},
	}
}

// oneThread runs a command that only relays a stream (vm exec) with one
// thread running Go code, unless the user set GOMAXPROCS. The CLI shares
// the host's cores with the VM (under TCG, QEMU's emulated CPUs want all
// of them), and with more threads the Go scheduler spins between the
// stream's bursts, taking the CPU the guest needs: vm exec of 200 MiB out
// of a TCG guest took 2.8 s with one thread against 3.2 s with two
// (docs/dev/data-path.md). vm cp, which also packs or unpacks tar, gained
// nothing measurable from it (five samples each way) and keeps its threads.
func oneThread() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
}
