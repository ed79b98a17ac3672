// Package agentproto holds the wire contract between bangerd (host side,
// package agent) and banger-vsock-agent (guest side, package guestagent).
//
// The transport is one byte stream (a virtio-serial port with QEMU, a vsock
// connection with Firecracker). It carries an SSH connection
// (golang.org/x/crypto/ssh): the guest agent is the SSH server, the host is
// the client. Both keys are created by the host per VM and handed to the
// guest in the boot initramfs (see Config), so each side authenticates the
// other and nothing is trusted on first use.
package agentproto

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
)

// Version is the agent protocol version. The host refuses agents whose
// major version differs; minor versions add messages (see each one's
// "since"). 1.3: Config.Network and Config.SSH (applied at boot),
// Info.Network, Info.SSHHostKeys, Info.SSHD, Info.Listening, ChanSSH,
// ChanDirectTCPIP. 1.4: Config.Process (the VM's main process),
// Config.ExecDefaults, ExecRequest.User, ReqAttach, Info.MainProcess.
// 1.5: data ports (datastream.go): ExecRequest.Data, CopyRequest.Data,
// Info.DataPorts. 1.6: CopyRequest.DirectIO.
const Version = "1.6"

// VirtioPortName is the name of the virtio-serial port carrying the agent
// connection (/sys/class/virtio-ports/*/name in the guest).
const VirtioPortName = "org.banger.agent.0"

// DefaultVsockPort is the vsock port the agent listens on under Firecracker.
const DefaultVsockPort = 1024

// ConfigPath is where the agent's configuration lives inside the initramfs
// that banger builds.
const ConfigPath = "/banger/agent.json"

// Transport names (Config.Transport).
const (
	TransportVirtioSerial = "virtio-serial"
	TransportVsock        = "vsock"
)

// ModulesFailedMarker starts the console line the agent's init prints when
// kernel modules it was given cannot be loaded; the host looks for it in
// the console log to explain a failed boot.
const ModulesFailedMarker = "kernel modules failed to load:"

// InitPath is the agent's path inside the banger initramfs; the kernel is
// booted with rdinit=InitPath.
const InitPath = "/banger/init"

// Config is handed by the host to the guest agent (JSON, at ConfigPath in the
// initramfs).
type Config struct {
	// Transport is "virtio-serial" or "vsock".
	Transport string `json:"transport"`
	// PortName is the virtio-serial port name (Transport virtio-serial).
	PortName string `json:"port_name,omitempty"`
	// VsockPort is the vsock port to listen on (Transport vsock).
	VsockPort uint32 `json:"vsock_port,omitempty"`
	// HostKey is the agent's SSH host private key (OpenSSH PEM).
	HostKey string `json:"host_key"`
	// AuthorizedKey is the host client's public key (authorized_keys format).
	AuthorizedKey string `json:"authorized_key"`
	// Hostname to set in the guest.
	Hostname string `json:"hostname,omitempty"`
	// Modules lists the kernel modules to load before mounting the root
	// disk, by name ("virtio_blk"; '-' and '_' are equal) or by file path.
	// The agent loads each after its dependencies, resolved from
	// lib/modules/<release>/modules.dep in the initramfs; a name absent from
	// modules.dep is taken to be built into the kernel.
	Modules []string `json:"modules,omitempty"`
	// ModulesRelease is the kernel release whose modules the host packed
	// under lib/modules/<release> in the initramfs; empty when it packed
	// none. When set, the agent treats modules that can't be loaded (or a
	// kernel of another release) as a boot error and says so on the
	// console, with ModulesFailedMarker.
	ModulesRelease string `json:"modules_release,omitempty"`
	// RootDevice is the guest block device holding the root filesystem
	// (default /dev/vda).
	RootDevice string `json:"root_device,omitempty"`
	// RootFSType is the root filesystem type (default ext4).
	RootFSType string `json:"root_fstype,omitempty"`
	// Network configures the guest's network cards (since 1.3); nil: none.
	Network *NetworkConfig `json:"network,omitempty"`
	// SSH prepares the guest for the user's SSH logins (since 1.3).
	SSH *SSHConfig `json:"ssh,omitempty"`
	// Init is the init program to hand over to after mounting the root:
	// "" or "auto" = /sbin/init if present in the root filesystem, else the
	// agent stays PID 1; "none" = the agent stays PID 1; otherwise a path.
	Init string `json:"init,omitempty"`
	// Process is the VM's main process (since 1.4): when the agent stays
	// PID 1 (the image has no init), it runs it once its own setup is done,
	// restarts it per Process.Restart, and powers the VM off when it
	// finally exits. Ignored when PID 1 is handed to an init.
	Process *Process `json:"process,omitempty"`
	// ExecDefaults are the defaults of ReqExecArgv requests that leave
	// Env, Dir or User empty (since 1.4): the image's configuration.
	ExecDefaults *ExecDefaults `json:"exec_defaults,omitempty"`
}

// Process is the VM's main process (an OCI image's Entrypoint+Cmd, run
// the way a container runtime runs it): stdin /dev/null, stdout and stderr
// to the console and to the attach log (ReqAttach).
type Process struct {
	// Argv is the program and its arguments, without a shell; a program
	// without a slash is looked up in the process's PATH.
	Argv []string `json:"argv"`
	// Env (KEY=VALUE) is the process's environment; PATH (when Env has
	// none), HOSTNAME and HOME are added.
	Env []string `json:"env,omitempty"`
	// Dir is the working directory (default /; made when missing).
	Dir string `json:"dir,omitempty"`
	// User is "", a name or a uid, optionally ":group" (name or gid);
	// names are looked up in the guest's /etc/passwd and /etc/group.
	User string `json:"user,omitempty"`
	// Restart is the policy when it exits: RestartNo (default),
	// RestartOnFailure (exit status not 0) or RestartAlways; restarts wait
	// a backoff (0.5 s doubling to 10 s, reset after 10 s of running).
	Restart string `json:"restart,omitempty"`
	// StopSignal is sent to it first when the guest is asked to power off
	// ("SIGTERM" by default; a name with or without SIG, or a number);
	// after StopGraceSec (default 10) the guest stops it anyway.
	StopSignal   string `json:"stop_signal,omitempty"`
	StopGraceSec int    `json:"stop_grace_sec,omitempty"`
}

// Restart policies of Process.
const (
	RestartNo        = "no"
	RestartOnFailure = "on-failure"
	RestartAlways    = "always"
)

// ExecDefaults are the defaults of exec requests (Config.ExecDefaults).
// An explicit ExecRequest value wins; ExecRequest.Env is added after Env.
type ExecDefaults struct {
	Env  []string `json:"env,omitempty"`
	Dir  string   `json:"dir,omitempty"`
	User string   `json:"user,omitempty"`
}

// MainExitMarker starts the console line the agent prints (after
// "banger-init: [time] ") when the main process finally exits, followed
// by the exit code: "main process exited with code 3; powering off".
// A process killed by signal N has code 128+N.
const MainExitMarker = "main process exited with code "

// MainProcessState is the main process's state (Info.MainProcess).
type MainProcessState struct {
	// State is "starting" (before its first run), "running",
	// "restarting" (waiting out the backoff) or "exited" (finally: the
	// guest powers off).
	State string `json:"state"`
	PID   int    `json:"pid,omitempty"`
	// Restarts counts the restarts so far.
	Restarts int `json:"restarts,omitempty"`
	// ExitCode is the last run's exit code (nil while the first runs).
	ExitCode *int `json:"exit_code,omitempty"`
	// Error says why the last run could not be started (the program is
	// missing, the user unknown); its exit code is then 127 or 126.
	Error string `json:"error,omitempty"`
}

// Main process states (MainProcessState.State).
const (
	MainStarting   = "starting"
	MainRunning    = "running"
	MainRestarting = "restarting"
	MainExited     = "exited"
)

// NetworkConfig is the guest's network, applied by the agent at boot
// before the image's init runs (the kernel's ip= can't: virtio_net is a
// module). The agent also writes what keeps the image's own network
// managers (systemd-networkd, NetworkManager, ifupdown) from removing it,
// and DNS settings (/etc/resolv.conf, or systemd-resolved's drop-in).
type NetworkConfig struct {
	Interfaces []Interface `json:"interfaces"`
	// DNS are nameserver addresses.
	DNS []string `json:"dns,omitempty"`
	// Search are DNS search domains.
	Search []string `json:"search,omitempty"`
}

// Interface is one network card, found by its MAC address.
type Interface struct {
	MAC string `json:"mac"`
	// Address is the card's IPv4 address with its prefix ("10.77.0.5/24");
	// empty: the card is brought up without an address.
	Address string `json:"address,omitempty"`
	// Gateway is the default route's next hop; empty: no default route.
	Gateway string `json:"gateway,omitempty"`
	MTU     int    `json:"mtu,omitempty"`
}

// SSHConfig prepares SSH logins into the guest.
type SSHConfig struct {
	// User is the image's default user ("" = root); AuthorizedKeys are
	// added to its ~/.ssh/authorized_keys (once each) at every boot.
	User           string   `json:"user,omitempty"`
	AuthorizedKeys []string `json:"authorized_keys,omitempty"`
}

// ChanSSH is a channel type (since 1.3): the host asks for a byte stream
// to the guest's SSH service. The agent connects it to the guest's sshd
// (127.0.0.1:22) when one listens, else serves it with its own SSH server
// (host key: Config.HostKey; users: SSHConfig; sessions, exec, PTY, sftp,
// direct-tcpip), so `ssh NAME.banger` works in every network mode and with
// images that have no sshd.
const ChanSSH = "banger-ssh@banger.dev"

// ChanDirectTCPIP is the standard "direct-tcpip" channel (RFC 4254 7.2):
// the agent connects to HostToConnect:PortToConnect inside the guest
// (since 1.3).
const ChanDirectTCPIP = "direct-tcpip"

// DirectTCPIPMsg is the extra data of a ChanDirectTCPIP channel.
type DirectTCPIPMsg struct {
	HostToConnect  string
	PortToConnect  uint32
	OriginatorIP   string
	OriginatorPort uint32
}

// NetworkState is how the agent's network setup went (Info.Network).
type NetworkState struct {
	// Configured is true once every configured interface has its address
	// and routes.
	Configured bool     `json:"configured"`
	Addresses  []string `json:"addresses,omitempty"` // CIDR
	Error      string   `json:"error,omitempty"`
}

// Encoding: every JSON document carried inside an SSH message (request
// payloads such as ReqExecArgv, GlobalShutdown and ReqCopyStatus, reply
// payloads such as GlobalInfo's, and the extra data of ChanCopyIn and
// ChanCopyOut) is wrapped in a single SSH string (uint32 big-endian length,
// then the bytes), i.e. ssh.Marshal(struct{ S string }{json}).

// SSH-level names. Standard SSH session semantics are used wherever they
// exist: "session" channels, "pty-req", "window-change", "env", "signal",
// "exit-status", "exit-signal", stdout as channel data, stderr as extended
// data type 1.
const (
	// ReqExecArgv is a session channel request whose payload is an ExecRequest
	// (JSON inside an SSH string). It runs argv without a shell.
	ReqExecArgv = "banger-exec@banger.dev"
	// ChanCopyIn is a channel type: the host sends a tar stream that the guest
	// extracts under CopyRequest.Path.
	ChanCopyIn = "banger-copy-in@banger.dev"
	// ChanCopyOut is a channel type: the guest sends a tar stream of
	// CopyRequest.Path.
	ChanCopyOut = "banger-copy-out@banger.dev"
	// GlobalInfo is a global request answered with an Info (JSON).
	GlobalInfo = "banger-info@banger.dev"
	// GlobalShutdown is a global request asking the guest to power off
	// (Reboot=false) cleanly. The reply is sent before shutdown starts.
	GlobalShutdown = "banger-shutdown@banger.dev"
	// ReqCopyHeader is a channel request (want-reply false) that the guest
	// sends on ChanCopyOut channels before the first byte of the tar
	// stream; its payload is a CopyHeader announcing the stream's size and
	// number of entries. The host stops a stream that goes past either. Since protocol 1.2; hosts
	// refuse to copy out of older agents, whose streams are unbounded.
	ReqCopyHeader = "copy-header@banger.dev"
	// ReqCopyStatus is a channel request (want-reply false) that the guest
	// sends on ChanCopyIn and ChanCopyOut channels just before closing them;
	// its payload is a CopyStatus. On ChanCopyIn it is sent once the host's
	// stream was fully read (host EOF) or as soon as extraction fails; on
	// ChanCopyOut after the last byte of the tar stream. A channel closed
	// without it means the copy did not complete.
	ReqCopyStatus = "copy-status@banger.dev"
	// ReqAttach is a session channel request (since 1.4; payload
	// AttachRequest) attaching to the main process (Config.Process): it is
	// refused when there is none. Its output follows as channel data
	// (stdout) and extended data 1 (stderr), from its first run on (what
	// it wrote before is replayed, at most the last MiB), across restarts;
	// when it finally exits, "exit-status" (128+N for signal N; sent with
	// want-reply true: the client's answer, success or failure, tells the
	// guest it has it) and the channel closes. The guest powers off only
	// once an attached client has the exit status, or after a few seconds
	// without one.
	ReqAttach = "banger-attach@banger.dev"
)

// AttachRequest is the payload of ReqAttach.
type AttachRequest struct {
	// NoReplay skips what the process wrote before the request.
	NoReplay bool `json:"no_replay,omitempty"`
}

// ExecRequest is the payload of ReqExecArgv.
type ExecRequest struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env,omitempty"` // KEY=VALUE, added to the agent's default environment
	Dir  string   `json:"dir,omitempty"`
	// User runs the command as this user (a name or a uid, optionally
	// ":group"; since 1.4, before only root was accepted).
	User string `json:"user,omitempty"`
	// Data, since 1.5, moves the command's stdin, stdout and stderr to a
	// data port (see DataStream); the session channel then carries none
	// of them, only requests and the exit status. Not with a PTY.
	Data *DataStream `json:"data,omitempty"`
}

// CopyRequest is the extra data of ChanCopyIn and ChanCopyOut channels.
type CopyRequest struct {
	Path string `json:"path"`
	// Archive (ChanCopyIn, since 1.2) keeps the stream's ownership and
	// setuid/setgid/sticky bits and lets device nodes and FIFOs be created;
	// without it they are dropped or refused and files belong to root.
	Archive bool `json:"archive,omitempty"`
	// Data, since 1.5, moves the tar stream to a data port (see
	// DataStream); the channel then carries no data, only the copy's
	// header and status.
	Data *DataStream `json:"data,omitempty"`
	// DirectIO (ChanCopyIn, since 1.6) asks the agent to write large
	// files past the guest's page cache (O_DIRECT). The host asks for it
	// when the guest's CPU is emulated (TCG), where the page cache's work
	// per 4 KiB page costs more than the bytes; an older agent ignores it.
	DirectIO bool `json:"direct_io,omitempty"`
}

// CopyHeader is the payload of ReqCopyHeader.
type CopyHeader struct {
	// Size is the exact length in bytes of the tar stream that follows.
	Size int64 `json:"size"`
	// Entries is the number of tar entries in it.
	Entries int64 `json:"entries"`
}

// CopyStatus is the payload of ReqCopyStatus. Error is empty on success.
type CopyStatus struct {
	Error string `json:"error,omitempty"`
}

// ShutdownRequest is the payload of GlobalShutdown.
type ShutdownRequest struct {
	Reboot bool `json:"reboot"`
}

// Info describes the guest, answered to GlobalInfo.
type Info struct {
	AgentVersion  string `json:"agent_version"`
	ProtoVersion  string `json:"proto_version"`
	KernelRelease string `json:"kernel_release"`
	Hostname      string `json:"hostname"`
	// InitMode is "systemd" when the agent handed PID 1 to systemd, "init"
	// when it handed PID 1 to another init, "agent" when the agent is PID 1.
	InitMode string `json:"init_mode"`
	Init     string `json:"init,omitempty"`
	UptimeMS int64  `json:"uptime_ms"`
	// EarlyBootDone tells that the guest is ready for commands: its early
	// boot is over. With systemd, sysinit.target was reached (local
	// filesystems mounted, /dev/pts mounted, tmpfiles applied, so /tmp is
	// no longer emptied behind a command's back); when the agent is PID 1,
	// its own setup is done; with another init, there is nothing to wait
	// for. The host polls GlobalInfo until it is true before it calls a VM
	// started. Added in protocol 1.1.
	EarlyBootDone bool `json:"early_boot_done"`
	// EarlyBootSignal says how EarlyBootDone is known: "unit" (a oneshot
	// unit ordered after sysinit.target left a marker), "systemctl"
	// (asked systemd), "agent" (the agent is PID 1), "none" (another init:
	// nothing to wait for).
	EarlyBootSignal string `json:"early_boot_signal,omitempty"`
	// Network is nil when the config had none (since 1.3).
	Network *NetworkState `json:"network,omitempty"`
	// SSHHostKeys are the public keys (authorized_keys format, without
	// comment) a ChanSSH stream may present: when an sshd is installed, its
	// host keys (/etc/ssh/ssh_host_*_key.pub; the agent makes ed25519 and
	// ECDSA ones before sshd starts when the image has none), then, always
	// last, the agent's own host key (Config.HostKey's), which its SSH
	// server presents while no sshd listens. Pin them all. Since 1.3.
	SSHHostKeys []string `json:"ssh_host_keys,omitempty"`
	// SSHD tells whether something listens on the guest's port 22 such
	// that 127.0.0.1:22 reaches it, right now (read from the kernel's
	// socket table, without connecting). Since 1.3.
	SSHD bool `json:"sshd,omitempty"`
	// Listening are the guest's listening TCP sockets reachable from
	// outside the guest (not bound to a loopback address), one per port
	// (an IPv4 socket wins over an IPv6 one), sorted by port, at most
	// MaxListening; read from /proc/net/tcp and tcp6. The host forwards
	// them for VMs created with --publish-all. Since 1.3.
	Listening []PortListen `json:"listening,omitempty"`
	// MainProcess is the main process's state when the agent runs one
	// (Config.Process, agent as PID 1); nil otherwise. Since 1.4.
	MainProcess *MainProcessState `json:"main_process,omitempty"`
	// DataPorts is how many data ports (DataPortName 0..n-1, all present)
	// the agent serves transfers on. Since 1.5.
	DataPorts int `json:"data_ports,omitempty"`
}

// MaxListening bounds Info.Listening.
const MaxListening = 1024

// PortListen is a listening socket in the guest (Info.Listening).
type PortListen struct {
	Proto string `json:"proto"` // "tcp"
	// Addr is the address the socket is bound to: "0.0.0.0", "::" or one
	// of the guest's addresses.
	Addr string `json:"addr"`
	Port uint16 `json:"port"`
}

// MarshalPayload encodes v as JSON wrapped in an SSH string (see Encoding).
func MarshalPayload(v any) ([]byte, error) {
	doc, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode payload: %w", err)
	}
	b := make([]byte, 4+len(doc))
	binary.BigEndian.PutUint32(b, uint32(len(doc)))
	copy(b[4:], doc)
	return b, nil
}

// ErrBadPayload is returned by UnmarshalPayload for malformed payloads.
var ErrBadPayload = errors.New("malformed payload")

// UnmarshalPayload decodes a payload produced by MarshalPayload into v.
// Trailing bytes after the SSH string are refused.
func UnmarshalPayload(b []byte, v any) error {
	if len(b) < 4 {
		return fmt.Errorf("decode payload: %w: short length", ErrBadPayload)
	}
	n := binary.BigEndian.Uint32(b)
	if uint64(n) != uint64(len(b)-4) {
		return fmt.Errorf("decode payload: %w: length %d, have %d bytes", ErrBadPayload, n, len(b)-4)
	}
	if err := json.Unmarshal(b[4:], v); err != nil {
		return fmt.Errorf("decode payload: %w: %w", ErrBadPayload, err)
	}
	return nil
}

// Payloads of the standard SSH session requests (RFC 4254, section 6),
// encoded with ssh.Marshal.
type (
	// EnvMsg is an "env" request.
	EnvMsg struct {
		Name, Value string
	}
	// PtyReqMsg is a "pty-req" request.
	PtyReqMsg struct {
		Term          string
		Columns, Rows uint32
		Width, Height uint32
		Modes         string
	}
	// WindowChangeMsg is a "window-change" request.
	WindowChangeMsg struct {
		Columns, Rows uint32
		Width, Height uint32
	}
	// SignalMsg is a "signal" request (the name without "SIG").
	SignalMsg struct {
		Signal string
	}
	// ExecMsg is an "exec" request.
	ExecMsg struct {
		Command string
	}
	// ExitStatusMsg is an "exit-status" request.
	ExitStatusMsg struct {
		Status uint32
	}
	// ExitSignalMsg is an "exit-signal" request.
	ExitSignalMsg struct {
		Signal     string
		CoreDumped bool
		Error      string
		Lang       string
	}
)
