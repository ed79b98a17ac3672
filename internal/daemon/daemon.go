// Package daemon is bangerd's composition root: it alone knows every other
// banger package, builds them in order and passes each its dependencies.
// See ARCHITECTURE.md.
package daemon

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/disk"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/imagefile"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/qemu"
)

// Version is bangerd's version, set with -ldflags.
var Version = "dev"

// Main is bangerd's entry point; it returns the process exit code.
func Main(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("bangerd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", config.DefaultDaemonConfigPath, "daemon configuration file (TOML)")
	socket := fs.String("socket", "", "override socket_path")
	stateDir := fs.String("state-dir", "", "override state_dir")
	logLevel := fs.String("log-level", "", "override log_level (debug, info, warn, error)")
	version := fs.Bool("version", false, "print the version and exit")
	teardown := fs.Bool("teardown-network", false, "remove banger's bridge, nftables tables and iptables accept rules, then exit (bangerd stopped, no bridged VM running)")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	if *version {
		fmt.Fprintln(stderr, "bangerd", Version)
		return 0
	}
	explicit := false
	fs.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "config" })
	cfg, err := config.LoadDaemon(*cfgPath, explicit)
	if err != nil {
		fmt.Fprintln(stderr, "bangerd:", err)
		return 2
	}
	if *socket != "" {
		cfg.SocketPath = *socket
	}
	if *stateDir != "" {
		cfg.StateDir = *stateDir
	}
	if *logLevel != "" {
		cfg.LogLevel = *logLevel
	}
	if err := cfg.Validate(); err != nil {
		fmt.Fprintln(stderr, "bangerd:", err)
		return 2
	}
	if *teardown {
		if err := TeardownNetwork(cfg); err != nil {
			fmt.Fprintln(stderr, "bangerd:", err)
			return 1
		}
		fmt.Fprintf(stderr, "bangerd: removed bridge %s and banger's firewall rules\n", cfg.BridgeName)
		return 0
	}
	log := newLogger(cfg, stderr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := Run(ctx, cfg, log); err != nil {
		log.Error("bangerd failed", "err", err)
		return 1
	}
	return 0
}

func newLogger(cfg config.Daemon, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// Daemon holds bangerd's parts.
type Daemon struct {
	cfg         config.Daemon
	log         *slog.Logger
	store       *store.Store
	driver      vmm.Driver
	cloner      *disk.Cloner
	net         hostNet // bridged VMs' host side
	agentBinary string
	socketGID   int // -1 when no group is configured

	// ctx lives as long as the daemon; VM monitors use it, not request contexts.
	ctx context.Context

	// Replaceable parts (see deps).
	onPhase         func(ctx context.Context, vm, phase string)
	removeDir       func(path string) error
	autoRemoveGrace time.Duration

	mu       sync.Mutex
	locks    map[string]*sync.Mutex // per-VM lifecycle locks, by id
	running  map[string]*runningVM  // by id
	booting  map[string]*boot       // starts in progress, by id
	attached map[string]*attachment // calls on auto-remove VMs, by id
	monitors sync.WaitGroup         // one per running VM
	removals sync.WaitGroup         // auto-removals scheduled or running

	// mainWatches are the daemon's attachments to main processes
	// (mainproc.go), by VM id; kept after the VM stops, until it starts
	// again or is removed.
	mainWatches map[string]*mainWatch

	// create is read-locked by each VM create (they run in parallel) and
	// locked by image rm and promote: no create uses an image they change.
	create sync.RWMutex
	// naming holds the names of the VMs being created: two creates never
	// take one name.
	namingMu sync.Mutex
	naming   map[string]bool
	// timelines holds, by VM id, the boot timeline a start (or the
	// background wait for a full boot) is still writing.
	timelines sync.Map
	// published holds the *publisher of each running --publish-all VM,
	// by id (publishall.go).
	published sync.Map
	// checked holds, by "image id/kernel id", a checkedImage: the files a
	// boot set was last found usable with (see usableImage).
	checked sync.Map
	// pulls holds the running image and kernel pulls (pullops.go), and
	// catalogCache the catalogs they last loaded (pulls.go).
	pulls        pullRegistry
	catalogCache catalogCache
	// staging holds the staging directories handed out and not yet
	// installed or discarded (install.go): image prune leaves them.
	stagingMu sync.Mutex
	staging   map[string]bool
	// localBuilds lets one local image or kernel build run at a time
	// (localbuild.go).
	localBuilds buildTurns
}

// deps are the parts run takes from its caller: production passes the QEMU
// driver and nothing else; tests pass a fake driver and hooks.
type deps struct {
	newDriver func() vmm.Driver // called at the driver's place in the build order
	// newHostNet builds the host side of bridged networks (default: the
	// host's bridge, TAPs, firewall, DHCP, DNS and port forwarders).
	newHostNet func(ctx context.Context, cfg config.Daemon, st *store.Store, log *slog.Logger) hostNet
	// onPhase, when set, is called as a boot enters each phase, with the
	// boot's context (tests block there to abort a boot in that phase).
	onPhase func(ctx context.Context, vm, phase string)
	// removeDir removes a VM directory (default os.RemoveAll).
	removeDir func(path string) error
	// autoRemoveGrace is how long an auto-remove VM waits for its client's
	// next call after a create or start (default 30s).
	autoRemoveGrace time.Duration
	// built, when set, is handed the daemon once it is reconciled, before
	// it serves (tests call its methods).
	built func(*Daemon)
}

// Run builds the daemon's parts in order and serves until ctx ends. VMs keep
// running when it returns.
func Run(ctx context.Context, cfg config.Daemon, log *slog.Logger) error {
	return run(ctx, cfg, log, deps{newDriver: func() vmm.Driver {
		qcfg := qemu.Config{Binary: cfg.QEMUBinary, DefaultAccel: cfg.Accel}
		if cfg.VMMConfine {
			first, last, _ := cfg.UIDRange() // validated with the config
			qcfg.Confine = qemu.NewConfine(ctx, qemu.ConfineOptions{
				User: cfg.VMMUser, UIDFirst: first, UIDLast: last,
				CgroupParent: cfg.VMMCgroupParent, MemoryOverheadMiB: cfg.VMMMemoryOverheadMiB,
			})
			if err := qcfg.Confine.Err; err != nil {
				log.Error("qemu confinement unavailable: vm start will fail", "err", err)
			}
		} else {
			log.Warn("qemu runs unconfined (vmm_confine = false): a guest that escapes QEMU is root on this host")
		}
		return qemu.New(qcfg, log.With("vmm", "qemu"))
	}})
}

// run is Run with its replaceable parts given (tests pass a fake driver).
func run(ctx context.Context, cfg config.Daemon, log *slog.Logger, dp deps) error {
	if dp.removeDir == nil {
		dp.removeDir = os.RemoveAll
	}
	if dp.autoRemoveGrace == 0 {
		dp.autoRemoveGrace = 30 * time.Second
	}
	if dp.newHostNet == nil {
		dp.newHostNet = func(ctx context.Context, cfg config.Daemon, st *store.Store, log *slog.Logger) hostNet {
			return newBridgeHost(ctx, cfg, st, log)
		}
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	for _, sub := range []string{"vms", "images", "kernels", "tmp"} {
		if err := os.MkdirAll(filepath.Join(cfg.StateDir, sub), 0o700); err != nil {
			return fmt.Errorf("create state dir: %w", err)
		}
	}
	lock, err := lockStateDir(cfg.StateDir)
	if err != nil {
		return err
	}
	defer lock.Close()

	st, err := store.Open(ctx, filepath.Join(cfg.StateDir, "state.db"))
	if err != nil {
		return err
	}
	defer st.Close()

	agentBin, err := findAgentBinary(cfg.AgentBinary)
	if err != nil {
		return err
	}
	gid := -1
	if cfg.SocketGroup != "" {
		g, err := user.LookupGroup(cfg.SocketGroup)
		if err != nil {
			return fmt.Errorf("socket_group %q: %w", cfg.SocketGroup, err)
		}
		gid, _ = strconv.Atoi(g.Gid)
	}

	// Monitors live until run returns; the VMs they watch live on.
	ctx, stopMonitors := context.WithCancel(ctx)
	d := &Daemon{
		cfg:             cfg,
		log:             log,
		store:           st,
		driver:          dp.newDriver(),
		net:             dp.newHostNet(ctx, cfg, st, log.With("component", "net")),
		onPhase:         dp.onPhase,
		removeDir:       dp.removeDir,
		autoRemoveGrace: dp.autoRemoveGrace,
		attached:        map[string]*attachment{},
		mainWatches:     map[string]*mainWatch{},
		cloner:          disk.NewCloner(log.With("component", "disk"), cfg.QEMUImgBinary),
		agentBinary:     agentBin,
		socketGID:       gid,
		ctx:             ctx,
		locks:           map[string]*sync.Mutex{},
		running:         map[string]*runningVM{},
		booting:         map[string]*boot{},
		naming:          map[string]bool{},
		staging:         map[string]bool{},
	}
	defer func() {
		stopMonitors()
		// Pulls are cancelled with the daemon's context: they unwind.
		if !d.pulls.wait(20 * time.Second) {
			log.Warn("pulls still running at exit: their staging directories are removed at the next start", "pulls", d.pulls.running())
		}
		d.stopRemovals()
		d.monitors.Wait()
		// The services stop; the bridge, rules and TAPs of running VMs stay.
		d.net.Close()
	}()
	if removed, err := imagefile.RemovePartial(filepath.Join(cfg.StateDir, "images")); err != nil {
		log.Warn("remove interrupted image promotions", "err", err)
	} else if len(removed) > 0 {
		log.Info("removed interrupted image promotions", "dirs", removed)
	}
	if removed, _, err := d.removePartials(resumableMaxAge); err != nil {
		log.Warn("remove interrupted pulls and builds", "err", err)
	} else if len(removed) > 0 {
		log.Info("removed interrupted pulls and builds", "dirs", removed)
	}
	if cfg.Network == api.NetworkBridge || os.Geteuid() == 0 {
		if err := d.net.CheckSubnet(); err != nil {
			log.Warn("bridged VMs can't be created or started until this is fixed", "err", err)
		}
	}
	if err := d.reconcile(ctx); err != nil {
		return fmt.Errorf("reconcile state: %w", err)
	}
	if err := d.reconcileImages(ctx); err != nil {
		return fmt.Errorf("reconcile images: %w", err)
	}

	if dp.built != nil {
		dp.built(d)
	}
	l, err := listen(cfg.SocketPath, gid)
	if err != nil {
		return err
	}
	defer os.Remove(cfg.SocketPath)
	srv := rpc.NewServer(log.With("component", "rpc"), d.authorize)
	d.register(srv)
	log.Info("bangerd serving", "socket", cfg.SocketPath, "state_dir", cfg.StateDir, "version", Version, "agent", agentBin)
	err = srv.Serve(ctx, l)
	d.closeAgents()
	log.Info("bangerd stopped; VMs keep running")
	return err
}

func lockStateDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "bangerd.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("state dir %s is in use by another bangerd: %w", dir, err)
	}
	return f, nil
}

func findAgentBinary(configured string) (string, error) {
	cands := []string{configured}
	if configured == "" {
		cands = nil
		if exe, err := os.Executable(); err == nil {
			cands = append(cands, filepath.Join(filepath.Dir(exe), "banger-vsock-agent"))
		}
		cands = append(cands, "/usr/lib/banger/banger-vsock-agent", "/usr/local/lib/banger/banger-vsock-agent")
	}
	for _, c := range cands {
		if st, err := os.Stat(c); err == nil && st.Mode().IsRegular() {
			return c, nil
		}
	}
	return "", fmt.Errorf("guest agent binary not found (looked in %s): build it with make build or set agent_binary", strings.Join(cands, ", "))
}

// listen opens the RPC socket: mode 0660, group gid (when >= 0). A stale
// socket left by a crash is replaced; a live one means another daemon runs.
func listen(path string, gid int) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket dir: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("socket %s: another bangerd is already serving it", path)
	}
	_ = os.Remove(path)
	// The socket is made in a private directory (0700) beside path, given
	// its mode and group there, then renamed to path: it is never
	// reachable with another mode, and the process's umask (shared by
	// every goroutine, which create files meanwhile) stays as it is.
	tmp, err := os.MkdirTemp(filepath.Dir(path), ".bangerd-socket-")
	if err != nil {
		return nil, fmt.Errorf("create socket: %w", err)
	}
	defer os.RemoveAll(tmp)
	tp := filepath.Join(tmp, "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false) // the daemon removes path when it stops
	fail := func(what string, err error) (net.Listener, error) {
		l.Close()
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := os.Chmod(tp, 0o660); err != nil {
		return fail("chmod socket", err)
	}
	if gid >= 0 {
		if err := os.Chown(tp, 0, gid); err != nil {
			return fail("chown socket", err)
		}
	}
	if err := os.Rename(tp, path); err != nil {
		return fail("create socket "+path, err)
	}
	return l, nil
}

// authorize decides who may call what (docs/security.md, "Who can do
// what"): anyone who can reach the socket may read; root, the daemon's own
// uid and members of socket_group may change VMs and run code in them;
// only root (or the daemon's own uid) may call admin methods, which read
// arbitrary host paths with the daemon's privileges or change images that
// other users' VMs are made from.
func (d *Daemon) authorize(peer rpc.Peer, perm rpc.Perm) error {
	privileged := peer.UID == 0 || uint32(os.Getuid()) == peer.UID
	switch {
	case perm == rpc.PermRead, privileged:
		return nil
	case perm == rpc.PermAdmin:
		return fmt.Errorf("uid %d may not manage images and kernels (image register, promote, prune and rm, kernel import and rm need root): use sudo: %w", peer.UID, errdefs.ErrPermissionDenied)
	case d.socketGID >= 0 && peer.InGroup(uint32(d.socketGID)):
		return nil
	}
	return fmt.Errorf("uid %d may not change banger state: use sudo, or add the user to socket_group: %w", peer.UID, errdefs.ErrPermissionDenied)
}

func (d *Daemon) register(s *rpc.Server) {
	s.Handle(api.MethodPing, rpc.PermRead, d.ping)
	s.Handle(api.MethodImageRegister, rpc.PermAdmin, d.imageRegister)
	s.Handle(api.MethodImagePromote, rpc.PermAdmin, d.imagePromote)
	s.Handle(api.MethodImageList, rpc.PermRead, d.imageList)
	s.Handle(api.MethodImageInspect, rpc.PermRead, d.imageInspect)
	s.Handle(api.MethodImageRemove, rpc.PermAdmin, d.imageRemove)
	s.Handle(api.MethodKernelList, rpc.PermRead, d.kernelList)
	s.Handle(api.MethodKernelInspect, rpc.PermRead, d.kernelInspect)
	s.Handle(api.MethodKernelRemove, rpc.PermAdmin, d.kernelRemove)
	s.Handle(api.MethodKernelImport, rpc.PermAdmin, d.kernelImport)
	s.Handle(api.MethodImagePrune, rpc.PermAdmin, d.imagePrune)
	s.Handle(api.MethodImagePull, rpc.PermAdmin, d.imagePull)
	s.Handle(api.MethodKernelPull, rpc.PermAdmin, d.kernelPull)
	s.Handle(api.MethodPullCancel, rpc.PermAdmin, d.pullCancel)
	s.Handle(api.MethodVMCreate, rpc.PermWrite, d.vmCreate)
	s.Handle(api.MethodVMStart, rpc.PermWrite, d.vmStart)
	s.Handle(api.MethodVMStop, rpc.PermWrite, d.vmStop)
	s.Handle(api.MethodVMKill, rpc.PermWrite, d.vmKill)
	s.Handle(api.MethodVMRemove, rpc.PermWrite, d.vmRemove)
	s.Handle(api.MethodVMList, rpc.PermRead, d.vmList)
	s.Handle(api.MethodVMInspect, rpc.PermRead, d.vmInspect)
	s.Handle(api.MethodVMLogs, rpc.PermRead, d.vmLogs)
	s.Handle(api.MethodVMExec, rpc.PermWrite, d.vmExec, rpc.TakesInput())
	s.Handle(api.MethodVMCopyIn, rpc.PermWrite, d.vmCopyIn, rpc.TakesInput())
	s.Handle(api.MethodVMCopyOut, rpc.PermWrite, d.vmCopyOut)
	s.Handle(api.MethodVMSSHInfo, rpc.PermRead, d.vmSSHInfo)
	s.Handle(api.MethodVMTunnel, rpc.PermWrite, d.vmTunnel, rpc.TakesInput())
	s.Handle(api.MethodVMHold, rpc.PermWrite, d.vmHold)
	s.Handle(api.MethodVMAttach, rpc.PermWrite, d.vmAttach)
}

func (d *Daemon) ping(ctx context.Context, call *rpc.Call) (any, error) {
	return api.PingResult{Version: Version, APIVersion: api.Version, PID: os.Getpid(), StateDir: d.cfg.StateDir,
		DefaultImage: d.cfg.DefaultImageName, DefaultKernel: d.cfg.DefaultKernelName, CatalogURLs: d.cfg.CatalogURLs}, nil
}

// vmLock returns the lifecycle lock of a VM.
func (d *Daemon) vmLock(id string) *sync.Mutex {
	d.mu.Lock()
	defer d.mu.Unlock()
	l, ok := d.locks[id]
	if !ok {
		l = &sync.Mutex{}
		d.locks[id] = l
	}
	return l
}
