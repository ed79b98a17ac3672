package qemu

import (
	"slices"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/kvmcheck"
	"github.com/bangerdev/banger/internal/vmm"
)

func TestBuildArgsTCG(t *testing.T) {
	spec := vmm.Spec{
		ID:         "0123abcd",
		Name:       "dev",
		Dir:        "/run/banger/vms/0123abcd",
		CPUs:       2,
		MemoryMiB:  1024,
		Kernel:     "/var/lib/banger/kernels/vmlinuz",
		Initrd:     "/run/banger/vms/0123abcd/initrd.img",
		Cmdline:    "rdinit=/banger/init quiet",
		RootDisk:   vmm.Disk{Path: "/var/lib/banger/vms/0123abcd/root.qcow2", Format: vmm.FormatQcow2},
		ConsoleLog: "/var/lib/banger/vms/0123abcd/console.log",
	}
	got := BuildArgs(spec, vmm.AccelTCG, PathsFor(spec.Dir))
	want := []string{
		"-name", "banger-0123abcd,process=banger-dev",
		"-M", "microvm",
		"-accel", "tcg",
		"-cpu", "max",
		"-smp", "2",
		"-m", "1024",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", "/var/lib/banger/kernels/vmlinuz",
		"-initrd", "/run/banger/vms/0123abcd/initrd.img",
		"-append", "rdinit=/banger/init quiet console=ttyS0",
		"-chardev", "file,id=console,path=/var/lib/banger/vms/0123abcd/console.log,append=on",
		"-serial", "chardev:console",
		"-drive", "id=root,file=/var/lib/banger/vms/0123abcd/root.qcow2,format=qcow2,if=none,cache=writeback,discard=unmap",
		"-device", "virtio-blk-device,drive=root",
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path=/run/banger/vms/0123abcd/agent.sock,server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=org.banger.agent.0",
		"-chardev", "socket,id=qmp,path=/run/banger/vms/0123abcd/qmp.sock,server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		"-pidfile", "/run/banger/vms/0123abcd/qemu.pid",
		"-daemonize",
	}
	if !slices.Equal(got, want) {
		t.Errorf("BuildArgs:\n got %q\nwant %q", got, want)
	}
}

func TestBuildArgsKVMNoInitrdEscapes(t *testing.T) {
	spec := vmm.Spec{
		ID: "id,1", Name: "a,b", Dir: "/tmp/x,y", CPUs: 1, MemoryMiB: 256,
		Kernel: "/k", Cmdline: "console=ttyS0,115200 root=/dev/vda",
		RootDisk: vmm.Disk{Path: "/d,isk.raw", Format: vmm.FormatRaw},
	}
	got := BuildArgs(spec, vmm.AccelKVM, PathsFor(spec.Dir))
	joined := strings.Join(got, " ")
	for _, s := range []string{
		"-accel kvm", "-cpu host",
		"-name banger-id,,1,process=banger-a,,b",
		"file=/d,,isk.raw,format=raw",
		"path=/tmp/x,,y/agent.sock,server=on",
		"path=/tmp/x,,y/qmp.sock,server=on",
		"path=/tmp/x,,y/console.log,append=on",                // default console log
		"-append console=ttyS0,115200 root=/dev/vda -chardev", // console not added twice
		"-pidfile /tmp/x,y/qemu.pid",                          // plain argument, not escaped
	} {
		if !strings.Contains(joined, s) {
			t.Errorf("args lack %q:\n%s", s, joined)
		}
	}
	if slices.Contains(got, "-initrd") {
		t.Errorf("args have -initrd without Spec.Initrd: %q", got)
	}
}

func TestKernelCmdline(t *testing.T) {
	tests := map[string]string{
		"":                          "console=ttyS0",
		"quiet":                     "quiet console=ttyS0",
		"console=ttyS0":             "console=ttyS0",
		"console=ttyS0,115200n8 ro": "console=ttyS0,115200n8 ro",
		"console=hvc0":              "console=hvc0 console=ttyS0",
		"xconsole=ttyS0":            "xconsole=ttyS0 console=ttyS0",
	}
	for in, want := range tests {
		if got := KernelCmdline(in); got != want {
			t.Errorf("KernelCmdline(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestTCGCmdline(t *testing.T) {
	if got := TCGCmdline("quiet", 2600000); got != "quiet tsc_early_khz=2600000" {
		t.Errorf("got %q", got)
	}
	if got := TCGCmdline("tsc_early_khz=1000 quiet", 2600000); got != "tsc_early_khz=1000 quiet" {
		t.Errorf("existing value overridden: %q", got)
	}
	if got := TCGCmdline("quiet", 0); got != "quiet" {
		t.Errorf("zero frequency added: %q", got)
	}
}

func TestChooseAccel(t *testing.T) {
	hw := kvmcheck.Result{DevicePresent: true, DeviceOpens: true, CreateVM: true, Flavour: kvmcheck.FlavourIntel, Usable: true, Reason: "hardware KVM (kvm_intel)"}
	pvm := kvmcheck.Result{DevicePresent: true, DeviceOpens: true, CreateVM: true, Flavour: kvmcheck.FlavourPVM,
		Reason: "KVM is PVM-only here (kvm_pvm, no kvm_intel/kvm_amd, no vmx/svm): stock guest kernels hang under it"}
	none := kvmcheck.Result{Reason: "KVM unavailable: /dev/kvm does not exist"}

	tests := []struct {
		name, requested string
		probe           kvmcheck.Result
		want            string
		wantWarn        string // substring; "" = no warning
		wantErr         bool
	}{
		{"auto hw", "auto", hw, vmm.AccelKVM, "", false},
		{"empty hw", "", hw, vmm.AccelKVM, "", false},
		{"auto pvm", "auto", pvm, vmm.AccelTCG, "KVM is PVM-only here", false},
		{"auto none", "", none, vmm.AccelTCG, "using TCG (slow)", false},
		{"kvm hw", "kvm", hw, vmm.AccelKVM, "", false},
		{"kvm pvm forced", "kvm", pvm, vmm.AccelKVM, "forced", false},
		{"kvm none", "kvm", none, "", "", true},
		{"tcg", "tcg", kvmcheck.Result{}, vmm.AccelTCG, "", false},
		{"tcg on hw", "tcg", hw, vmm.AccelTCG, "", false},
		{"bogus", "hvf", hw, "", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, warn, err := ChooseAccel(tt.requested, tt.probe)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("accel = %q, want %q", got, tt.want)
			}
			if tt.wantWarn == "" && warn != "" {
				t.Errorf("unexpected warning %q", warn)
			}
			if !strings.Contains(warn, tt.wantWarn) {
				t.Errorf("warning %q lacks %q", warn, tt.wantWarn)
			}
		})
	}
}
