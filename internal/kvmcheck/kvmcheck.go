// Package kvmcheck finds out whether this host's KVM can run stock guest
// kernels.
//
// Having a /dev/kvm that opens is not enough: some hosts (nested cloud
// sandboxes) expose PVM, a paravirtual KVM implementation (kvm_pvm) under
// which only kernels built with PVM guest support boot; a stock Debian or
// upstream kernel hangs right after decompression. Probe reports such a KVM
// as not usable so that callers fall back to software emulation (TCG).
package kvmcheck

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// KVM flavours, named after the kernel module that provides them.
const (
	FlavourIntel = "kvm_intel"
	FlavourAMD   = "kvm_amd"
	FlavourPVM   = "kvm_pvm"
)

// kvmAPIVersion is KVM_API_VERSION, the only API version Linux has shipped
// since 2.6.22.
const kvmAPIVersion = 12

// ioctl numbers from <linux/kvm.h>: _IO(KVMIO, 0x00) and _IO(KVMIO, 0x01).
const (
	ioctlKVMGetAPIVersion = 0xAE00
	ioctlKVMCreateVM      = 0xAE01
)

// Result is what Probe found.
type Result struct {
	// DevicePresent is true when /dev/kvm exists.
	DevicePresent bool `json:"device_present"`
	// DeviceOpens is true when /dev/kvm could be opened read-write.
	DeviceOpens bool `json:"device_opens"`
	// APIVersion is the answer to KVM_GET_API_VERSION (0 when not asked).
	APIVersion int `json:"api_version,omitempty"`
	// CreateVM is true when KVM_CREATE_VM succeeded.
	CreateVM bool `json:"create_vm"`
	// Error describes the first step that failed (open, ioctl), if any.
	Error string `json:"error,omitempty"`
	// Modules lists the KVM flavour modules found under /sys/module, in the
	// order FlavourIntel, FlavourAMD, FlavourPVM.
	Modules []string `json:"modules,omitempty"`
	// Flavour is the flavour KVM runs as: FlavourIntel or FlavourAMD when a
	// hardware module is loaded (it wins over kvm_pvm), FlavourPVM when only
	// kvm_pvm is, "" when none of them is.
	Flavour string `json:"flavour,omitempty"`
	// CPUFlag is "vmx" or "svm" when /proc/cpuinfo advertises hardware
	// virtualisation, "" otherwise.
	CPUFlag string `json:"cpu_flag,omitempty"`
	// Usable is true when KVM works and is hardware KVM, so a stock guest
	// kernel boots under it.
	Usable bool `json:"usable"`
	// Reason explains the verdict in one line, for logs and banger doctor.
	Reason string `json:"reason"`
}

// Works reports whether KVM itself works (a VM can be created), whatever its
// flavour.
func (r Result) Works() bool { return r.DeviceOpens && r.CreateVM }

// PVMOnly reports whether KVM works but is only the paravirtual kvm_pvm.
func (r Result) PVMOnly() bool { return r.Works() && r.Flavour == FlavourPVM }

// Probe inspects the running host.
func Probe() Result { return ProbeRoot("/") }

// ProbeRoot is Probe with /dev, /sys and /proc looked up under root, so that
// tests can point it at fake files. A fake /dev/kvm that is a regular file
// opens but fails the ioctls.
func ProbeRoot(root string) Result {
	return probe(root, kvmIoctls)
}

// kvmIoctls opens the KVM device at path, asks its API version and creates
// (and closes) a VM. It returns how far it got.
func kvmIoctls(path string) (opened bool, apiVersion int, err error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, 0, fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(fd)
	v, err := unix.IoctlRetInt(fd, ioctlKVMGetAPIVersion)
	if err != nil {
		return true, 0, fmt.Errorf("KVM_GET_API_VERSION on %s: %w", path, err)
	}
	if v != kvmAPIVersion {
		return true, v, fmt.Errorf("KVM_GET_API_VERSION on %s: got %d, want %d", path, v, kvmAPIVersion)
	}
	vmfd, err := unix.IoctlRetInt(fd, ioctlKVMCreateVM)
	if err != nil {
		return true, v, fmt.Errorf("KVM_CREATE_VM on %s: %w", path, err)
	}
	unix.Close(vmfd)
	return true, v, nil
}

type ioctlFunc func(path string) (opened bool, apiVersion int, err error)

func probe(root string, ioctls ioctlFunc) Result {
	var r Result
	dev := filepath.Join(root, "dev", "kvm")
	if _, err := os.Stat(dev); err == nil {
		r.DevicePresent = true
		opened, v, err := ioctls(dev)
		r.DeviceOpens = opened
		r.APIVersion = v
		if err != nil {
			r.Error = err.Error()
		} else {
			r.CreateVM = true
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		r.Error = fmt.Sprintf("stat %s: %v", dev, err)
	}

	for _, m := range []string{FlavourIntel, FlavourAMD, FlavourPVM} {
		if _, err := os.Stat(filepath.Join(root, "sys", "module", m)); err == nil {
			r.Modules = append(r.Modules, m)
		}
	}
	switch {
	case slices.Contains(r.Modules, FlavourIntel):
		r.Flavour = FlavourIntel
	case slices.Contains(r.Modules, FlavourAMD):
		r.Flavour = FlavourAMD
	case slices.Contains(r.Modules, FlavourPVM):
		r.Flavour = FlavourPVM
	}
	r.CPUFlag = cpuVirtFlag(filepath.Join(root, "proc", "cpuinfo"))
	r.Usable, r.Reason = verdict(r)
	return r
}

// verdict decides whether r describes a KVM that runs stock guest kernels.
func verdict(r Result) (bool, string) {
	switch {
	case !r.DevicePresent:
		if r.Error != "" {
			return false, "KVM unavailable: " + r.Error
		}
		return false, "KVM unavailable: /dev/kvm does not exist (virtualisation disabled in firmware, or kvm_intel/kvm_amd not loaded)"
	case !r.DeviceOpens:
		return false, "KVM unavailable: " + r.Error
	case !r.CreateVM:
		return false, "KVM does not work: " + r.Error
	case r.Flavour == FlavourIntel || r.Flavour == FlavourAMD:
		return true, fmt.Sprintf("hardware KVM (%s)", r.Flavour)
	case r.Flavour == FlavourPVM && r.CPUFlag == "":
		return false, "KVM is PVM-only here (kvm_pvm, no kvm_intel/kvm_amd, no vmx/svm): stock guest kernels hang under it"
	case r.Flavour == FlavourPVM:
		return false, fmt.Sprintf("KVM is PVM (kvm_pvm) although the CPU has %s: load kvm_intel or kvm_amd; stock guest kernels hang under PVM", r.CPUFlag)
	case r.CPUFlag != "":
		// No flavour module visible (unusual: built-in modules with
		// parameters still appear in /sys/module), but the CPU has hardware
		// virtualisation and KVM works.
		return true, fmt.Sprintf("KVM works and the CPU has %s (no kvm_intel/kvm_amd module seen)", r.CPUFlag)
	default:
		return false, "KVM works but is not hardware KVM (no kvm_intel/kvm_amd module, no vmx/svm CPU flag): stock guest kernels may hang under it"
	}
}

// cpuVirtFlag returns "vmx" or "svm" if the flags line of the cpuinfo file at
// path lists it.
func cpuVirtFlag(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(key) != "flags" {
			continue
		}
		for _, fl := range strings.Fields(val) {
			if fl == "vmx" || fl == "svm" {
				return fl
			}
		}
		// All CPUs have the same flags; the first flags line decides.
		return ""
	}
	return ""
}
