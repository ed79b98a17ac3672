package kvmcheck

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	intelCPUInfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc msr pae vmx ept\n\nprocessor\t: 1\nflags\t\t: fpu vme de pse tsc msr pae vmx ept\n"
	amdCPUInfo   = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme de svm npt\n"
	pvmCPUInfo   = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc hypervisor tsc_known_freq\n"
)

// fakeHost writes a fake root with the given /sys/module entries and cpuinfo;
// kvm says whether /dev/kvm exists.
func fakeHost(t *testing.T, kvm bool, modules []string, cpuinfo string) string {
	t.Helper()
	root := t.TempDir()
	mustMkdir(t, filepath.Join(root, "dev"))
	mustMkdir(t, filepath.Join(root, "proc"))
	for _, m := range modules {
		mustMkdir(t, filepath.Join(root, "sys", "module", m, "parameters"))
	}
	if kvm {
		if err := os.WriteFile(filepath.Join(root, "dev", "kvm"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "proc", "cpuinfo"), []byte(cpuinfo), 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

func mustMkdir(t *testing.T, p string) {
	t.Helper()
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
}

func kvmOK(string) (bool, int, error) { return true, kvmAPIVersion, nil }

func TestProbeVerdicts(t *testing.T) {
	tests := []struct {
		name        string
		kvm         bool
		modules     []string
		cpuinfo     string
		ioctls      ioctlFunc
		wantUsable  bool
		wantFlavour string
		wantFlag    string
		wantReason  string
	}{
		{
			name: "intel", kvm: true, modules: []string{"kvm", FlavourIntel}, cpuinfo: intelCPUInfo, ioctls: kvmOK,
			wantUsable: true, wantFlavour: FlavourIntel, wantFlag: "vmx", wantReason: "hardware KVM (kvm_intel)",
		},
		{
			name: "amd", kvm: true, modules: []string{"kvm", FlavourAMD}, cpuinfo: amdCPUInfo, ioctls: kvmOK,
			wantUsable: true, wantFlavour: FlavourAMD, wantFlag: "svm", wantReason: "hardware KVM (kvm_amd)",
		},
		{
			name: "pvm only", kvm: true, modules: []string{"kvm", FlavourPVM}, cpuinfo: pvmCPUInfo, ioctls: kvmOK,
			wantUsable: false, wantFlavour: FlavourPVM, wantReason: "KVM is PVM-only here",
		},
		{
			name: "pvm and intel: hardware wins", kvm: true, modules: []string{"kvm", FlavourIntel, FlavourPVM}, cpuinfo: intelCPUInfo, ioctls: kvmOK,
			wantUsable: true, wantFlavour: FlavourIntel, wantFlag: "vmx",
		},
		{
			name: "pvm although cpu has vmx", kvm: true, modules: []string{"kvm", FlavourPVM}, cpuinfo: intelCPUInfo, ioctls: kvmOK,
			wantUsable: false, wantFlavour: FlavourPVM, wantFlag: "vmx", wantReason: "load kvm_intel or kvm_amd",
		},
		{
			name: "no dev kvm", kvm: false, modules: []string{FlavourIntel}, cpuinfo: intelCPUInfo, ioctls: kvmOK,
			wantUsable: false, wantFlavour: FlavourIntel, wantFlag: "vmx", wantReason: "/dev/kvm does not exist",
		},
		{
			name: "permission denied", kvm: true, modules: []string{FlavourIntel}, cpuinfo: intelCPUInfo,
			ioctls:     func(p string) (bool, int, error) { return false, 0, errors.New("open " + p + ": permission denied") },
			wantUsable: false, wantFlavour: FlavourIntel, wantFlag: "vmx", wantReason: "permission denied",
		},
		{
			name: "create vm fails", kvm: true, modules: []string{FlavourIntel}, cpuinfo: intelCPUInfo,
			ioctls:     func(string) (bool, int, error) { return true, 12, errors.New("KVM_CREATE_VM: device or resource busy") },
			wantUsable: false, wantFlavour: FlavourIntel, wantFlag: "vmx", wantReason: "KVM does not work",
		},
		{
			name: "unknown flavour with vmx", kvm: true, cpuinfo: intelCPUInfo, ioctls: kvmOK,
			wantUsable: true, wantFlag: "vmx",
		},
		{
			name: "unknown flavour without vmx", kvm: true, cpuinfo: pvmCPUInfo, ioctls: kvmOK,
			wantUsable: false, wantReason: "not hardware KVM",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := fakeHost(t, tt.kvm, tt.modules, tt.cpuinfo)
			r := probe(root, tt.ioctls)
			if r.Usable != tt.wantUsable {
				t.Errorf("Usable = %v, want %v (reason %q)", r.Usable, tt.wantUsable, r.Reason)
			}
			if r.Flavour != tt.wantFlavour {
				t.Errorf("Flavour = %q, want %q", r.Flavour, tt.wantFlavour)
			}
			if r.CPUFlag != tt.wantFlag {
				t.Errorf("CPUFlag = %q, want %q", r.CPUFlag, tt.wantFlag)
			}
			if r.Reason == "" || !strings.Contains(r.Reason, tt.wantReason) {
				t.Errorf("Reason = %q, want it to contain %q", r.Reason, tt.wantReason)
			}
			if r.DevicePresent != tt.kvm {
				t.Errorf("DevicePresent = %v, want %v", r.DevicePresent, tt.kvm)
			}
		})
	}
}

func TestPVMOnlyHelpers(t *testing.T) {
	root := fakeHost(t, true, []string{"kvm", FlavourPVM}, pvmCPUInfo)
	r := probe(root, kvmOK)
	if !r.Works() || !r.PVMOnly() {
		t.Fatalf("Works=%v PVMOnly=%v, want both true: %+v", r.Works(), r.PVMOnly(), r)
	}
}

// TestProbeRootFakeDevice runs the real ioctl path against a regular file:
// it opens, but KVM_GET_API_VERSION fails.
func TestProbeRootFakeDevice(t *testing.T) {
	root := fakeHost(t, true, []string{FlavourIntel}, intelCPUInfo)
	r := ProbeRoot(root)
	if !r.DevicePresent || !r.DeviceOpens || r.CreateVM || r.Usable {
		t.Fatalf("got %+v, want present, opens, no VM, not usable", r)
	}
	if !strings.Contains(r.Error, "KVM_GET_API_VERSION") {
		t.Errorf("Error = %q, want it to name KVM_GET_API_VERSION", r.Error)
	}
}

// TestProbeThisHost checks the real probe on the machine running the tests.
func TestProbeThisHost(t *testing.T) {
	r := Probe()
	t.Logf("probe: %+v", r)
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil && r.Flavour == FlavourPVM {
		if r.Usable {
			t.Errorf("PVM-only host reported usable: %+v", r)
		}
	}
	if r.Usable && !r.Works() {
		t.Errorf("usable but KVM does not work: %+v", r)
	}
}
