// Package api holds the types of bangerd's RPC: method names, parameters,
// results, stream frames and error codes. It is shared by the daemon and
// the typed client and depends on nothing else in banger.
package api

import "time"

// Version is the RPC protocol version. Methods are named "v1.<noun>.<verb>".
const Version = 1

// Method names.
const (
	MethodPing          = "v1.daemon.ping"
	MethodImageRegister = "v1.image.register"
	MethodImagePromote  = "v1.image.promote"
	MethodImageList     = "v1.image.list"
	MethodImageInspect  = "v1.image.inspect"
	MethodImageRemove   = "v1.image.remove"
	// MethodImagePull installs an image: a catalog entry (NAME or
	// NAME@VERSION: a bundle download, or a local build when the catalog
	// says how and the bundle can't be fetched), else an OCI reference
	// (PullParams). Progress frames report each phase with bytes; the pull
	// runs in the daemon and goes on if the client goes away (a second
	// pull of the same thing attaches to it). Result: Image.
	MethodImagePull = "v1.image.pull"
	// MethodImagePrune removes unused managed images and kernels that came
	// from catalogs or OCI (with All: every unused managed one) and the
	// leftovers of interrupted pulls. Result: PruneResult.
	MethodImagePrune = "v1.image.prune"
	// MethodPullCancel cancels the running pull of PullCancelParams.Ref
	// (image pull --cancel, Ctrl-C in image pull). Result: none.
	MethodPullCancel = "v1.pull.cancel"
	// Kernels: objects of their own, shared by images (Kernel).
	MethodKernelList    = "v1.kernel.list"
	MethodKernelInspect = "v1.kernel.inspect"
	MethodKernelRemove  = "v1.kernel.remove"
	MethodKernelImport  = "v1.kernel.import"
	MethodKernelPull    = "v1.kernel.pull" // PullParams; Result: Kernel
	MethodVMCreate      = "v1.vm.create"
	MethodVMStart       = "v1.vm.start"
	MethodVMStop        = "v1.vm.stop"
	MethodVMKill        = "v1.vm.kill"
	MethodVMRemove      = "v1.vm.remove"
	MethodVMList        = "v1.vm.list"
	MethodVMInspect     = "v1.vm.inspect"
	MethodVMLogs        = "v1.vm.logs"
	MethodVMExec        = "v1.vm.exec"
	MethodVMCopyIn      = "v1.vm.copy_in"
	MethodVMCopyOut     = "v1.vm.copy_out"
	// MethodVMSSHInfo answers what a client needs to reach a VM with the
	// system ssh client (SSHInfo).
	MethodVMSSHInfo = "v1.vm.ssh_info"
	// MethodVMTunnel opens a byte stream to a TCP port of the guest (or to
	// its SSH service) through the agent: after the response header the
	// call carries FrameStdin frames to the guest and FrameStdout frames
	// back, until either side sends EOF. Works in every network mode.
	MethodVMTunnel = "v1.vm.tunnel"
	// MethodVMHold holds an auto-remove VM for as long as the call lasts
	// (vm run --rm while the user's ssh session runs): the VM is removed
	// when the call ends, however it ends.
	MethodVMHold = "v1.vm.hold"
	// MethodVMAttach streams the output of a VM's main process (an
	// init-less image's Entrypoint+Cmd run by the agent; see
	// ImageConfig) as FrameStdout/FrameStderr frames, from its start
	// (what it wrote before the call is replayed, within a bound), until
	// it exits. Result: ExecResult with its exit code.
	MethodVMAttach = "v1.vm.attach"
)

// Error codes carried on the wire. The daemon maps its errors to these at
// the RPC edge; the client maps them back to sentinel errors.
const (
	CodeInternal         = "internal"
	CodeInvalid          = "invalid_argument"
	CodeNotFound         = "not_found"
	CodeAlreadyExists    = "already_exists"
	CodeFailedPrecond    = "failed_precondition"
	CodePermissionDenied = "permission_denied"
	CodeUnknownMethod    = "unknown_method"
	CodeCanceled         = "canceled"
)

// PingResult answers MethodPing.
type PingResult struct {
	Version    string `json:"version"`
	APIVersion int    `json:"api_version"`
	PID        int    `json:"pid"`
	StateDir   string `json:"state_dir"`
	// DefaultImage and DefaultKernel are the daemon's default_image_name
	// and default_kernel_name; CatalogURLs its catalog_urls (doctor).
	DefaultImage  string   `json:"default_image,omitempty"`
	DefaultKernel string   `json:"default_kernel,omitempty"`
	CatalogURLs   []string `json:"catalog_urls,omitempty"`
}

// Image is an image as the daemon reports it.
type Image struct {
	ID         string    `json:"id"`
	Name       string    `json:"name"`
	Managed    bool      `json:"managed"`
	Rootfs     string    `json:"rootfs"`
	Kernel     string    `json:"kernel"`
	Initrd     string    `json:"initrd,omitempty"`
	ModulesDir string    `json:"modules_dir,omitempty"`
	SizeBytes  int64     `json:"size_bytes"`
	CreatedAt  time.Time `json:"created_at"`
	UsedBy     []string  `json:"used_by,omitempty"`
	// PromotedFrom is the rootfs a managed image was copied from.
	PromotedFrom string `json:"promoted_from,omitempty"`
	// User is the image's default user (`vm ssh` logs in as it); "root"
	// when none was given at register.
	User string `json:"user"`
	// Files are the fingerprints of the image's rootfs, kernel and initrd
	// (image inspect only; VMs are refused once one no longer matches).
	Files []ImageFile `json:"files,omitempty"`
	// ModulesFiles is how many files and symlinks of the modules tree are
	// fingerprinted (image inspect only).
	ModulesFiles int `json:"modules_files,omitempty"`

	// KernelID and KernelName are the kernel object the image boots with
	// (vm create --kernel overrides it). Kernel, Initrd and ModulesDir
	// above are that kernel's files.
	KernelID   string `json:"kernel_id,omitempty"`
	KernelName string `json:"kernel_name,omitempty"`
	// Source is where the image came from: SourceCatalog, SourceOCI,
	// SourceRegistered (host files), SourceLocalBuild.
	Source string `json:"source"`
	// Version is the catalog version (catalog and local builds).
	Version string `json:"version,omitempty"`
	// Ref is the OCI reference or catalog URL it was pulled from; Digest
	// the OCI manifest digest or the bundle's sha256.
	Ref    string `json:"ref,omitempty"`
	Digest string `json:"digest,omitempty"`
	// Config is the image's process configuration (OCI images; nil
	// otherwise): defaults for vm exec and vm run, and the main process
	// of an image without an init system.
	Config *ImageConfig `json:"config,omitempty"`
	// InUse is how many VMs use the image (len(UsedBy)).
	InUse int `json:"in_use"`
}

// Image and kernel sources.
const (
	SourceCatalog    = "catalog"
	SourceOCI        = "oci"
	SourceRegistered = "registered"
	SourceLocalBuild = "local-build"
	SourceImported   = "imported" // kernel import
)

// ImageConfig is the part of an OCI image's configuration banger uses.
type ImageConfig struct {
	Env          []string `json:"env,omitempty"`
	WorkingDir   string   `json:"working_dir,omitempty"`
	User         string   `json:"user,omitempty"`
	Entrypoint   []string `json:"entrypoint,omitempty"`
	Cmd          []string `json:"cmd,omitempty"`
	ExposedPorts []string `json:"exposed_ports,omitempty"` // "80/tcp"
	StopSignal   string   `json:"stop_signal,omitempty"`
}

// Kernel is a kernel object: a kernel image, with an optional initrd and
// modules tree, registered, imported or pulled once and shared by images.
type Kernel struct {
	ID         string    `json:"id"`
	Name       string    `json:"name"`
	Managed    bool      `json:"managed"`
	Source     string    `json:"source"`
	Version    string    `json:"version,omitempty"`
	Release    string    `json:"release,omitempty"` // uname -r of the kernel
	Kernel     string    `json:"kernel"`
	Initrd     string    `json:"initrd,omitempty"`
	ModulesDir string    `json:"modules_dir,omitempty"`
	Ref        string    `json:"ref,omitempty"`
	Digest     string    `json:"digest,omitempty"`
	SizeBytes  int64     `json:"size_bytes"`
	CreatedAt  time.Time `json:"created_at"`
	// Images and VMs using the kernel (VMs through --kernel).
	Images []string    `json:"images,omitempty"`
	VMs    []string    `json:"vms,omitempty"`
	Files  []ImageFile `json:"files,omitempty"` // kernel inspect only
}

// KernelImportParams imports a kernel: from a kernel image file (bzImage
// or ELF vmlinux) with optional initrd and modules directory, or from a
// Debian kernel package (Deb). The files are copied into daemon-owned
// storage. Paths are absolute.
type KernelImportParams struct {
	Name       string `json:"name"`
	Kernel     string `json:"kernel,omitempty"`
	Initrd     string `json:"initrd,omitempty"`
	ModulesDir string `json:"modules_dir,omitempty"`
	Deb        string `json:"deb,omitempty"`
}

// PullParams pulls an image (MethodImagePull) or a kernel
// (MethodKernelPull).
type PullParams struct {
	// Ref is a catalog name (NAME or NAME@VERSION) or, for images, an OCI
	// reference: "debian:bookworm", "REG/x@sha256:...", "oci:DIR" or a
	// directory holding an OCI layout, "docker-archive:FILE" or a
	// `docker save` tarball, "docker-daemon:IMAGE".
	Ref string `json:"ref"`
	// Name is the local name (default: the catalog name, or a DNS label
	// derived from the OCI reference).
	Name string `json:"name,omitempty"`
	// Platform is an OCI platform ("linux/amd64"); default the host's.
	Platform string `json:"platform,omitempty"`
	// Insecure allows plain HTTP and unverified TLS for a registry that is
	// not on localhost (localhost registries may use plain HTTP anyway).
	Insecure bool `json:"insecure,omitempty"`
	// Kernel is the kernel an OCI image boots with (default: the daemon's
	// default_kernel_name, pulled when missing).
	Kernel string `json:"kernel,omitempty"`
}

// PullCancelParams cancels a pull (MethodPullCancel).
type PullCancelParams struct {
	// Kind is "image" or "kernel".
	Kind string `json:"kind"`
	Ref  string `json:"ref"`
}

// PruneParams prunes images (MethodImagePrune).
type PruneParams struct {
	// All also removes unused managed images from other sources
	// (promoted and local builds). Unmanaged (registered) images are never
	// removed.
	All bool `json:"all,omitempty"`
}

// PruneResult lists what a prune removed.
type PruneResult struct {
	Images         []string `json:"images,omitempty"`
	Kernels        []string `json:"kernels,omitempty"`
	PartialFiles   []string `json:"partial_files,omitempty"`
	ReclaimedBytes int64    `json:"reclaimed_bytes"`
}

// ImageFile is the recorded fingerprint of one file of an image.
type ImageFile struct {
	Role    string    `json:"role"` // rootfs, kernel, initrd
	Path    string    `json:"path"`
	Size    int64     `json:"size"`
	ModTime time.Time `json:"mtime"`
	Inode   uint64    `json:"inode"`
	SHA256  string    `json:"sha256,omitempty"` // recorded when promote made the copy
}

// ImageRegisterParams registers host files as an unmanaged image. Paths
// must be absolute (the CLI absolutises them).
type ImageRegisterParams struct {
	Name       string `json:"name"`
	Rootfs     string `json:"rootfs"`
	Kernel     string `json:"kernel"`
	Initrd     string `json:"initrd,omitempty"`
	ModulesDir string `json:"modules_dir,omitempty"`
	// User is the image's default user, whom `vm ssh` logs in as and for
	// whom the invoking user's key is authorised; empty = root.
	User string `json:"user,omitempty"`
	// KernelName names a kernel object to boot with instead of Kernel,
	// Initrd and ModulesDir (which must then be empty). With Kernel, an
	// unmanaged kernel object is registered for those files.
	KernelName string `json:"kernel_name,omitempty"`
}

// NameParams names one object (a VM or an image, by name or id).
type NameParams struct {
	Name string `json:"name"`
}

// VM states. The state database records stopped or running (running: a
// VMM handle is recorded); starting is reported while a start call is in
// progress (the VMM may not run yet, or its agent not answer yet). A failed
// start leaves the VM stopped with LastError set.
const (
	StateStopped  = "stopped"
	StateStarting = "starting"
	StateRunning  = "running"
)

// VM is a VM as the daemon reports it.
type VM struct {
	ID           string     `json:"id"`
	Name         string     `json:"name"`
	Image        string     `json:"image"`
	ImageID      string     `json:"image_id"`
	State        string     `json:"state"`
	CPUs         int        `json:"cpus"`
	MemoryMiB    int        `json:"memory_mib"`
	DiskBytes    int64      `json:"disk_bytes"`
	DiskPath     string     `json:"disk_path"`
	DiskFormat   string     `json:"disk_format"`
	DiskStrategy string     `json:"disk_strategy"`
	VMM          string     `json:"vmm"`
	Accel        string     `json:"accel"`
	AccelWanted  string     `json:"accel_wanted"`
	PID          int        `json:"pid,omitempty"`
	Dir          string     `json:"dir"`
	ConsoleLog   string     `json:"console_log"`
	CreatedAt    time.Time  `json:"created_at"`
	StartedAt    *time.Time `json:"started_at,omitempty"`
	Guest        *GuestInfo `json:"guest,omitempty"`
	LastError    string     `json:"last_error,omitempty"`
	AutoRemove   bool       `json:"auto_remove,omitempty"` // see VMCreateParams
	// BootTimeline is the VM's last (or current) start, phase by phase.
	BootTimeline *BootTimeline `json:"boot_timeline,omitempty"`
	// Confinement is how the running VM's VMM is confined; absent when the
	// VM is stopped or runs unconfined (vmm_confine = false).
	Confinement *Confinement `json:"confinement,omitempty"`
	// Network is the VM's network (nil: none).
	Network *NetworkInfo `json:"network,omitempty"`
	// Kernel is the kernel object the VM boots with (the image's unless
	// overridden at create).
	Kernel string `json:"kernel,omitempty"`
	// MainProcess is the argv the agent runs as the VM's main process
	// (init-less images with an Entrypoint or Cmd); Restart its policy.
	MainProcess []string `json:"main_process,omitempty"`
	Restart     string   `json:"restart,omitempty"`
	// MainState is the state of the VM's main process in its last boot:
	// "running" (restarts included) or "exited" (it ended: the VM stopped,
	// or is stopping, with it); empty when the guest runs none (its image
	// has an init) or the daemon has not seen it (restarted since).
	// MainExitCode is its last final exit code (128+N for signal N), kept
	// until the VM starts again.
	MainState    string `json:"main_state,omitempty"`
	MainExitCode *int   `json:"main_exit_code,omitempty"`
}

// Boot phases, in order (BootPhase.Name). Clone is recorded only for the
// first start after vm create; full boot ends when the guest's init has
// finished booting (systemd: is-system-running leaves "starting"), which a
// start waits for only with WaitBoot and otherwise records in the
// background.
const (
	PhaseClone         = "clone"
	PhaseInitramfs     = "initramfs"
	PhaseVMMStart      = "vmm start"
	PhaseKernelToAgent = "kernel to agent"
	PhaseEarlyBoot     = "early boot"
	PhaseFullBoot      = "full boot"
)

// BootTimeline records where a VM's start spent its time, so that a slow or
// stuck boot says where it is.
type BootTimeline struct {
	StartedAt time.Time   `json:"started_at"`
	Phases    []BootPhase `json:"phases"`
	// Ready: early boot is over, the VM takes commands.
	Ready bool `json:"ready"`
	// Done: every phase ended (full boot included).
	Done bool `json:"done"`
	// Error is why the start failed, in the last phase.
	Error string `json:"error,omitempty"`
}

// BootPhase is one phase of a BootTimeline. A running phase's duration is
// the time it has lasted so far.
type BootPhase struct {
	Name       string    `json:"name"`
	StartedAt  time.Time `json:"started_at"`
	DurationMS float64   `json:"duration_ms"`
	Running    bool      `json:"running,omitempty"`
}

// Confinement describes a confined VMM process (docs/security.md).
type Confinement struct {
	User       string   `json:"user,omitempty"`
	UID        int      `json:"uid"`
	GID        int      `json:"gid"`
	Sandbox    string   `json:"sandbox,omitempty"` // QEMU's -sandbox policy
	CgroupMode string   `json:"cgroup_mode,omitempty"`
	Cgroups    []string `json:"cgroups,omitempty"`
	// Unit is the systemd scope holding the cgroups ("" on cgroupfs).
	Unit             string `json:"unit,omitempty"`
	MemoryLimitBytes int64  `json:"memory_limit_bytes,omitempty"`
	PIDsLimit        int64  `json:"pids_limit,omitempty"`
	CPUWeight        int    `json:"cpu_weight,omitempty"`
}

// GuestInfo is what the guest agent reports.
type GuestInfo struct {
	KernelRelease string `json:"kernel_release"`
	InitMode      string `json:"init_mode"`
	AgentVersion  string `json:"agent_version"`
	Hostname      string `json:"hostname"`
}

// VMCreateParams creates a VM.
type VMCreateParams struct {
	Name      string `json:"name,omitempty"` // generated when empty
	Image     string `json:"image,omitempty"`
	CPUs      int    `json:"cpus,omitempty"`
	MemoryMiB int    `json:"memory_mib,omitempty"`
	DiskBytes int64  `json:"disk_bytes,omitempty"` // 0 = the image's size
	Accel     string `json:"accel,omitempty"`      // auto, kvm, tcg
	Start     bool   `json:"start,omitempty"`      // start and wait until ready
	WaitBoot  bool   `json:"wait_boot,omitempty"`  // with Start: see VMStartParams
	// Network is the VM's network mode: NetworkBridge, NetworkUser or
	// NetworkNone; empty = the daemon's default (config "network").
	Network string `json:"network,omitempty"`
	// Ports are port forwards, each "[HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp]"
	// (vm create -p); the host side is 127.0.0.1 unless HOSTIP is given.
	Ports []string `json:"ports,omitempty"`
	// PublishAll forwards, while the VM runs, every TCP port the guest
	// listens on (not bound to its loopback) from the same port on the
	// host's 127.0.0.1 (through the guest agent; bridge mode: straight to
	// the guest's address when it can), as Lima does (vm create
	// --publish-all). Privileged ports (< 1024), ports taken on the host,
	// ports given in Ports and host ports of other VMs' Ports are left out.
	PublishAll bool `json:"publish_all,omitempty"`
	// Allow opens what the VM may reach, beyond the daemon's defaults:
	// "host" (the host's own services), "vm" (other VMs), "lan" (the
	// host's LAN ranges), "link-local" (169.254.0.0/16, cloud metadata).
	Allow []string `json:"allow,omitempty"`
	// SSHKeys are public keys (authorized_keys lines) authorised for the
	// image's default user at every boot: the invoking user's banger key.
	SSHKeys []string `json:"ssh_keys,omitempty"`
	// AutoRemove makes the daemon remove the VM when an exec call on it
	// ends (however it ends: the command exited, the client was killed),
	// when the client of its create or start goes away, when no call comes
	// back for it within 30s after its create or start, when its VMM
	// exits, and at daemon start (vm run --rm; Docker's AutoRemove).
	AutoRemove bool `json:"auto_remove,omitempty"`
	// Kernel overrides the image's kernel (a kernel object's name; pulled
	// from the kernel catalog when missing).
	Kernel string `json:"kernel,omitempty"`
	// Cmd replaces the image's Cmd for the main process (an init-less
	// image with an Entrypoint or Cmd): vm run --image X -- ARGS, as
	// docker run does. Ignored for images with an init system.
	Cmd []string `json:"cmd,omitempty"`
	// Restart is the main process's restart policy: "no" (default: the VM
	// stops when it exits), "on-failure" or "always".
	Restart string `json:"restart,omitempty"`
}

// Restart policies of a VM's main process.
const (
	RestartNo        = "no"
	RestartOnFailure = "on-failure"
	RestartAlways    = "always"
)

// Network modes.
const (
	NetworkBridge = "bridge" // a TAP on banger's bridge, NAT to the outside
	NetworkUser   = "user"   // the VMM's user-mode network (QEMU slirp)
	NetworkNone   = "none"   // no network card
)

// PortForward is one forwarded port as the daemon reports it.
type PortForward struct {
	Proto     string `json:"proto"` // tcp or udp
	HostIP    string `json:"host_ip"`
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
	// Auto marks a port forwarded because the guest listens on it
	// (VMCreateParams.PublishAll), for as long as it does.
	Auto bool `json:"auto,omitempty"`
}

// NetworkInfo is a VM's network as the daemon reports it.
type NetworkInfo struct {
	Mode    string        `json:"mode"`
	IP      string        `json:"ip,omitempty"`      // bridge: the VM's address
	Gateway string        `json:"gateway,omitempty"` // bridge: banger's bridge address
	MAC     string        `json:"mac,omitempty"`
	TAP     string        `json:"tap,omitempty"`
	Ports   []PortForward `json:"ports,omitempty"`
	Allow   []string      `json:"allow,omitempty"`
	// PublishAll: the guest's listening ports are forwarded (Ports with
	// Auto).
	PublishAll bool `json:"publish_all,omitempty"`
}

// SSHInfo answers MethodVMSSHInfo.
type SSHInfo struct {
	Name string `json:"name"`
	// User is the image's default user.
	User string `json:"user"`
	// HostKeys are the guest's SSH host keys (authorized_keys format),
	// learned through the agent at the last boot: the guest's sshd's, or
	// the agent's own SSH server's when the guest has none.
	HostKeys []string `json:"host_keys"`
	// Direct is "IP:PORT" when the client may reach the guest's sshd
	// straight over the network (bridge mode, sshd listening); empty when
	// it must tunnel through the daemon (MethodVMTunnel, SSH true).
	Direct string `json:"direct,omitempty"`
}

// VMTunnelParams opens a tunnel (MethodVMTunnel).
type VMTunnelParams struct {
	Name string `json:"name"`
	// SSH asks for the guest's SSH service: its sshd on port 22 if one
	// listens, else the agent's own SSH server. Port is ignored then.
	SSH  bool `json:"ssh,omitempty"`
	Port int  `json:"port,omitempty"`
}

// VMStartParams starts a VM.
type VMStartParams struct {
	Name string `json:"name"`
	// WaitBoot also waits until the guest's init has finished booting
	// (systemd: is-system-running leaves "starting"), not only for the agent.
	WaitBoot bool `json:"wait_boot,omitempty"`
}

// VMStopParams stops a VM.
type VMStopParams struct {
	Name    string `json:"name"`
	Timeout string `json:"timeout,omitempty"` // Go duration; default from daemon config
}

// VMRemoveParams removes a VM.
type VMRemoveParams struct {
	Name  string `json:"name"`
	Force bool   `json:"force,omitempty"`
}

// VMLogsParams reads a VM's serial console.
type VMLogsParams struct {
	Name   string `json:"name"`
	Follow bool   `json:"follow,omitempty"`
	Tail   int    `json:"tail,omitempty"` // lines; 0 = everything
}

// VMExecParams runs a command in a VM. After the response header, the
// connection carries Frames both ways.
type VMExecParams struct {
	Name string   `json:"name"`
	Argv []string `json:"argv"` // empty with TTY = login shell
	Env  []string `json:"env,omitempty"`
	Dir  string   `json:"dir,omitempty"`
	TTY  bool     `json:"tty,omitempty"`
	Term string   `json:"term,omitempty"`
	Rows int      `json:"rows,omitempty"`
	Cols int      `json:"cols,omitempty"`
}

// VMCopyParams copies files: MethodVMCopyIn carries a tar stream from the
// client (FrameStdin frames) extracted under Path in the guest;
// MethodVMCopyOut sends a tar of Path as FrameStdout frames, no longer than
// the size the guest announced, for the client to extract.
type VMCopyParams struct {
	Name string `json:"name"`
	Path string `json:"path"`
	// Archive (copy in) keeps the stream's ownership, setuid/setgid/sticky
	// bits and special files in the guest.
	Archive bool `json:"archive,omitempty"`
}

// Frame types of a streaming call.
const (
	FrameProgress = "progress" // server → client: Progress
	FrameStdout   = "stdout"   // server → client: Data
	FrameStderr   = "stderr"   // server → client: Data
	FrameStdin    = "stdin"    // client → server: Data
	FrameEOF      = "eof"      // client → server: stdin closed
	FrameResize   = "resize"   // client → server: Rows, Cols
)

// Progress reports a long operation's phase and byte counts.
type Progress struct {
	Phase string `json:"phase"`
	Done  int64  `json:"done,omitempty"`
	Total int64  `json:"total,omitempty"`
	// Unit is what Done and Total count: "" or "bytes", or "files".
	Unit string `json:"unit,omitempty"`
}

// ExecResult ends an exec call.
type ExecResult struct {
	ExitCode int `json:"exit_code"`
}

// Frame is one message of a streaming call after the request. In a call
// in binary framing (internal/rpc) stdout, stderr and stdin frames travel
// as raw data messages, Data unencoded; the others as JSON.
type Frame struct {
	Type     string    `json:"type"`
	Data     []byte    `json:"data,omitempty"`
	Progress *Progress `json:"progress,omitempty"`
	Rows     int       `json:"rows,omitempty"`
	Cols     int       `json:"cols,omitempty"`
}
