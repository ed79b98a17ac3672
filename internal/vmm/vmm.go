// Package vmm defines the contract between bangerd and a virtual machine
// monitor backend (QEMU microvm today, Firecracker next).
//
// The contract, in call order:
//
//   - Start boots a VM described by a Spec and returns a Handle as soon as the
//     VMM process runs. The VMM process is not tied to the caller's context or
//     to the daemon's process: it keeps running when bangerd exits, so that a
//     restarted daemon can adopt it. Start either returns a running VM or
//     leaves nothing behind (no process, no socket).
//   - Alive, Wait, Shutdown, Kill and DialAgent accept a Handle produced by
//     Start, possibly by an earlier daemon process (the Handle is recorded in
//     the state database as JSON).
//   - Shutdown asks the guest to power off (ACPI power button). It returns once
//     the request is delivered; use Wait to learn when the VMM exited.
//   - Kill stops the VMM process immediately. Kill on a VM that already
//     exited is not an error. Kill removes the driver's runtime files.
//   - Cleanup removes runtime files (sockets, pid files) of a VMM that is no
//     longer running. It is idempotent.
//
// All methods are safe for concurrent use, also on one handle: the daemon's
// per-VM monitor runs Wait then Cleanup while a request may run Kill,
// Shutdown or DialAgent. Cleanup never removes the files of a VMM that was
// started again in the same Dir. docs/dev/vmm-drivers.md has the details;
// package vmmtest is the conformance suite every driver runs.
package vmm

import (
	"context"
	"errors"
	"net"
	"os"
)

// Accelerators a driver may use.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Disk formats a driver may accept for the root disk.
const (
	FormatQcow2 = "qcow2"
	FormatRaw   = "raw"
)

// ErrNotRunning is returned when an operation needs a running VMM.
var ErrNotRunning = errors.New("vmm not running")

// Disk is a block device given to the guest.
type Disk struct {
	Path   string
	Format string // FormatQcow2 or FormatRaw
}

// Spec describes a VM to boot.
type Spec struct {
	ID        string // stable unique id, used to tag the process
	Name      string
	Dir       string // runtime directory owned by this VM; the driver puts sockets and pid files here
	CPUs      int
	MemoryMiB int
	Kernel    string
	Initrd    string // optional
	Cmdline   string // kernel command line (driver may append console settings)
	RootDisk  Disk
	Accel     string // AccelAuto, AccelKVM or AccelTCG
	// ConsoleLog is the file the guest's serial console is written to.
	ConsoleLog string
	// Net is the VM's network card; nil: none.
	Net *Net
}

// Network card modes (Net.Mode).
const (
	NetTAP  = "tap"  // a TAP device the daemon opened and attached to its bridge
	NetUser = "user" // the VMM's user-mode network stack (QEMU slirp)
)

// Net is a VM's network card.
type Net struct {
	Mode string // NetTAP or NetUser
	// MAC is the card's address (stable per VM).
	MAC string
	// TAP is the open TAP device (NetTAP); the driver hands it to the VMM
	// and does not close it. TAPName is its name, for messages.
	TAP     *os.File
	TAPName string
	// Forwards are host ports the VMM itself forwards to the guest
	// (NetUser: hostfwd).
	Forwards []Forward
}

// Forward is a port the VMM forwards from the host to the guest.
type Forward struct {
	Proto     string // "tcp" or "udp"
	HostIP    string
	HostPort  int
	GuestPort int
}

// Handle identifies a running VMM process. It is serialised to the state
// database and must stay meaningful across daemon restarts.
type Handle struct {
	Driver        string `json:"driver"`
	PID           int    `json:"pid"`
	StartTime     uint64 `json:"start_time"` // process start time in clock ticks, guards against pid reuse
	ControlSocket string `json:"control_socket"`
	AgentSocket   string `json:"agent_socket"`
	// DataSockets are the host ends of the guest's data ports, port i's
	// at index i (agentproto.DataPortName; what DataDialer.DialData
	// connects to). Empty for a VMM without data ports (one started by
	// an older banger).
	DataSockets []string `json:"data_sockets,omitempty"`
	PIDFile     string   `json:"pid_file,omitempty"`
	Accel       string   `json:"accel"`
	// Confinement is how the VMM process is confined; nil when it is not
	// (confinement turned off). Cleanup removes its cgroups.
	Confinement *Confinement `json:"confinement,omitempty"`
}

// Confinement records how a VMM process is confined, so that a restarted
// daemon keeps showing it and removes its cgroups when the VMM exits.
type Confinement struct {
	// User, UID and GID are the unprivileged credentials the VMM runs with.
	User string `json:"user,omitempty"`
	UID  int    `json:"uid"`
	GID  int    `json:"gid"`
	// Sandbox is the VMM's seccomp policy (QEMU: the -sandbox value).
	Sandbox string `json:"sandbox,omitempty"`
	// CgroupMode is v1 or v2; Cgroups are the VMM's cgroup directories
	// (one on v2, one per controller on v1).
	CgroupMode string   `json:"cgroup_mode,omitempty"`
	Cgroups    []string `json:"cgroups,omitempty"`
	// Unit is the systemd scope holding the cgroups ("" on cgroupfs).
	Unit string `json:"unit,omitempty"`
	// Limits written to the cgroup.
	MemoryLimitBytes int64 `json:"memory_limit_bytes,omitempty"`
	PIDsLimit        int64 `json:"pids_limit,omitempty"`
	CPUWeight        int   `json:"cpu_weight,omitempty"`
}

// Driver is a VMM backend.
type Driver interface {
	// Name is the backend's name ("qemu", "firecracker").
	Name() string
	// DiskFormats lists the root disk formats the driver accepts, preferred first.
	DiskFormats() []string
	Start(ctx context.Context, spec Spec) (Handle, error)
	// Alive reports whether the VMM process of h still runs.
	Alive(h Handle) bool
	// Wait blocks until the VMM process of h exits or ctx ends.
	Wait(ctx context.Context, h Handle) error
	Shutdown(ctx context.Context, h Handle) error
	Kill(ctx context.Context, h Handle) error
	Cleanup(h Handle) error
	// DialAgent connects to the guest agent's transport (virtio-serial or vsock).
	DialAgent(ctx context.Context, h Handle) (net.Conn, error)
}

// Recoverer is an optional Driver ability, found by type assertion: it
// finds a VMM running in a VM directory for which no Handle was recorded
// (the daemon died between Start returning and recording the Handle).
type Recoverer interface {
	// Recover returns the Handle of the VMM running in dir, if any.
	Recover(dir string) (Handle, bool)
}

// DataDialer is an optional Driver ability, found by type assertion: the
// VMM gives the guest data ports beside the agent's transport, raw byte
// channels for bulk streams (agentproto's datastream.go).
type DataDialer interface {
	// DialData connects to data port port (0 <= port <
	// len(h.DataSockets)). A port serves one connection at a time: a
	// second connection is not served until the first is closed (the
	// dial itself doesn't wait for that). On a VM that is not running:
	// an error wrapping ErrNotRunning.
	DialData(ctx context.Context, h Handle, port int) (net.Conn, error)
}

// Releaser is an optional Driver ability, found by type assertion: the
// driver keeps host resources per VM outside the VM's directory (a
// confined QEMU's cgroups), which a start that failed or crashed before
// its Handle was recorded can leave behind.
type Releaser interface {
	// Release removes what the driver keeps for the VM of Spec.ID id,
	// whose VMM no longer runs. Releasing what is gone is not an error.
	Release(id string) error
	// ReleaseStale removes what the driver keeps for VMs that keep(id)
	// says no longer exist and whose VMM doesn't run (a resource still in
	// use is left alone), and returns the ids it released.
	ReleaseStale(keep func(id string) bool) ([]string, error)
}
