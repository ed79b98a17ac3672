package qemu

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/kvmcheck"
	"github.com/bangerdev/banger/internal/vmm"
)

// Runtime file names inside Spec.Dir.
const (
	QMPSocketName   = "qmp.sock"
	AgentSocketName = "agent.sock"
	PIDFileName     = "qemu.pid"
)

// DataPorts is the number of data ports every VM gets beside the agent's
// port (agentproto.DataPortName(0..DataPorts-1)): raw virtio-serial
// channels for bulk streams (agentproto's datastream.go), reached with
// DialData.
const DataPorts = 4

// The number of data ports fits the agent protocol's limit.
var _ [agentproto.MaxDataPorts - DataPorts]struct{}

// DataSocketName is the name, inside Spec.Dir, of data port i's socket.
func DataSocketName(i int) string { return "data" + strconv.Itoa(i) + ".sock" }

// Paths are the runtime files of one QEMU process.
type Paths struct {
	QMPSocket   string
	AgentSocket string
	// DataSockets are the host ends of the data ports, port i's at
	// index i.
	DataSockets []string
	PIDFile     string
	Log         string // a confined QEMU's stderr
}

// PathsFor returns the runtime files QEMU uses in the VM directory dir.
func PathsFor(dir string) Paths {
	p := Paths{
		QMPSocket:   filepath.Join(dir, QMPSocketName),
		AgentSocket: filepath.Join(dir, AgentSocketName),
		PIDFile:     filepath.Join(dir, PIDFileName),
		Log:         filepath.Join(dir, LogFileName),
	}
	for i := range DataPorts {
		p.DataSockets = append(p.DataSockets, filepath.Join(dir, DataSocketName(i)))
	}
	return p
}

// sockets returns every unix socket of p.
func (p Paths) sockets() []string {
	return append([]string{p.QMPSocket, p.AgentSocket}, p.DataSockets...)
}

// files returns the runtime files QEMU's start creates in the VM
// directory (not the log, which a confined QEMU's Cleanup removes).
func (p Paths) files() []string {
	return append(p.sockets(), p.PIDFile)
}

// ChooseAccel picks the accelerator for a requested one ("", "auto", "kvm"
// or "tcg") given what kvmcheck found. warning is non-empty when the choice
// deserves a log line (falling back to TCG, or KVM forced on a host where
// stock kernels hang).
func ChooseAccel(requested string, probe kvmcheck.Result) (accel string, warning string, err error) {
	switch requested {
	case "", vmm.AccelAuto:
		if probe.Usable {
			return vmm.AccelKVM, "", nil
		}
		return vmm.AccelTCG, probe.Reason + "; using TCG (slow)", nil
	case vmm.AccelKVM:
		if !probe.Works() {
			return "", "", fmt.Errorf("accelerator kvm requested but unavailable: %s: %w", probe.Reason, errdefs.ErrFailedPrecondition)
		}
		if !probe.Usable {
			return vmm.AccelKVM, "accelerator kvm forced although " + probe.Reason, nil
		}
		return vmm.AccelKVM, "", nil
	case vmm.AccelTCG:
		return vmm.AccelTCG, "", nil
	default:
		return "", "", fmt.Errorf("unknown accelerator %s (want auto, kvm or tcg): %w", errdefs.Quote(requested), errdefs.ErrInvalid)
	}
}

// KernelCmdline returns the kernel command line QEMU passes to the guest:
// cmdline with console=ttyS0 appended unless it already names ttyS0.
func KernelCmdline(cmdline string) string {
	if hasParam(cmdline, "console", func(v string) bool { return strings.HasPrefix(v, "ttyS0") }) {
		return strings.TrimSpace(cmdline)
	}
	return strings.TrimSpace(cmdline + " console=ttyS0")
}

// TCGCmdline adds tsc_early_khz=<tscKHz> to cmdline unless it is already set
// or tscKHz is 0.
//
// Under TCG the guest's TSC runs at the host's TSC rate, but the microvm
// machine has no HPET and no ACPI PM timer, so the guest can only calibrate
// its TSC against the emulated PIT. That calibration fails whenever the
// vCPU thread is descheduled during it (any load on the host), and the kernel
// then hangs before reaching init. Telling the kernel the frequency skips
// the calibration.
func TCGCmdline(cmdline string, tscKHz uint64) string {
	if tscKHz == 0 || hasParam(cmdline, "tsc_early_khz", nil) {
		return cmdline
	}
	return strings.TrimSpace(cmdline + " tsc_early_khz=" + strconv.FormatUint(tscKHz, 10))
}

// hasParam reports whether cmdline has the parameter name (name=value, with
// match(value) true when match is not nil).
func hasParam(cmdline, name string, match func(string) bool) bool {
	for _, f := range strings.Fields(cmdline) {
		k, v, ok := strings.Cut(f, "=")
		if ok && k == name && (match == nil || match(v)) {
			return true
		}
	}
	return false
}

// CPUModel is the -cpu of a VM under accel: the host's CPU under KVM.
// Under TCG it is QEMU's "max" model without ERMS and FSRM. A guest kernel
// that sees them copies and clears memory with byte-wise "rep movsb" and
// "rep stosb" (every read, write, pipe and page cache copy), and QEMU 7.2's
// TCG emulates those one byte per iteration; without them the kernel uses
// "rep movsq" and "rep stosq", eight bytes per iteration (with QEMU 6.1's
// and later "max", which the kernel trusts with rep_good; before, its
// unrolled loops). On a 200 MiB exec stream out of a guest under QEMU 7.2
// the guest's share of the copy functions fell from 28 % to 10 % of its
// time (docs/dev/data-path.md). Both feature names exist since QEMU 5.1.
func CPUModel(accel string) string {
	if accel == vmm.AccelKVM {
		return "host"
	}
	return "max,-erms,-fsrm"
}

// BuildArgs returns the qemu-system-x86_64 arguments for spec, with the
// chosen accelerator (vmm.AccelKVM or vmm.AccelTCG) and runtime paths. It
// is pure: Start validates the spec and adds the TCG timer hint
// (TCGCmdline) to spec.Cmdline before calling it.
//
// The microvm machine's defaults are what a stock distribution kernel needs:
// ACPI is on, so a kernel without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES finds the
// virtio-mmio devices through the DSDT once virtio_mmio is loaded; the
// 8250 serial port (ttyS0), PIT, PIC and IO-APIC are present; the RTC is on
// under TCG (under KVM, kvmclock gives the wall clock).
func BuildArgs(spec vmm.Spec, accel string, paths Paths) []string {
	consoleLog := spec.ConsoleLog
	if consoleLog == "" {
		consoleLog = filepath.Join(spec.Dir, "console.log")
	}
	args := []string{
		"-name", "banger-" + escape(spec.ID) + ",process=banger-" + escape(spec.Name),
		"-M", "microvm",
		"-accel", accel,
		"-cpu", CPUModel(accel),
		"-smp", strconv.Itoa(spec.CPUs),
		"-m", strconv.Itoa(spec.MemoryMiB),
		// -display none rather than -nographic: with -nodefaults they are
		// equivalent, and -nographic is refused with -daemonize whenever a
		// default serial port or monitor would go to stdio.
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", spec.Kernel,
	}
	if spec.Initrd != "" {
		args = append(args, "-initrd", spec.Initrd)
	}
	args = append(args,
		"-append", KernelCmdline(spec.Cmdline),
		"-chardev", "file,id=console,path="+escape(consoleLog)+",append=on",
		"-serial", "chardev:console",
		"-drive", "id=root,file="+escape(spec.RootDisk.Path)+",format="+spec.RootDisk.Format+",if=none,cache=writeback,discard=unmap",
		"-device", "virtio-blk-device,drive=root",
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path="+escape(paths.AgentSocket)+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name="+agentproto.VirtioPortName,
	)
	for i, sock := range paths.DataSockets {
		args = append(args, dataPortArgs(i, "path="+escape(sock))...)
	}
	args = append(args, netArgs(spec.Net, unconfinedTAPFD)...)
	args = append(args,
		// Same as -qmp unix:PATH,server=on,wait=off, but the path can hold
		// commas (escaped as ",,").
		"-chardev", "socket,id=qmp,path="+escape(paths.QMPSocket)+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		"-pidfile", paths.PIDFile,
		"-daemonize",
	)
	return args
}

// dataPortArgs are the arguments of data port i, a virtio-serial port on
// the VM's virtio-serial device whose host end is the listening socket
// addr ("path=P" or "fd=N").
func dataPortArgs(i int, addr string) []string {
	id := "data" + strconv.Itoa(i)
	return []string{
		"-chardev", "socket,id=" + id + "," + addr + ",server=on,wait=off",
		"-device", "virtserialport,chardev=" + id + ",name=" + agentproto.DataPortName(i),
	}
}

// unconfinedTAPFD is the descriptor of the TAP device in an unconfined
// QEMU: the first of its ExtraFiles.
const unconfinedTAPFD = 3

// escape quotes a value for QEMU's key=value,key=value option syntax.
func escape(v string) string { return strings.ReplaceAll(v, ",", ",,") }
