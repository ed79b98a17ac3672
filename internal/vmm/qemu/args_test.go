package qemu

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
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
		"-cpu", "max,-erms,-fsrm",
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
		"-chardev", "socket,id=data0,path=/run/banger/vms/0123abcd/data0.sock,server=on,wait=off",
		"-device", "virtserialport,chardev=data0,name=org.banger.data.0",
		"-chardev", "socket,id=data1,path=/run/banger/vms/0123abcd/data1.sock,server=on,wait=off",
		"-device", "virtserialport,chardev=data1,name=org.banger.data.1",
		"-chardev", "socket,id=data2,path=/run/banger/vms/0123abcd/data2.sock,server=on,wait=off",
		"-device", "virtserialport,chardev=data2,name=org.banger.data.2",
		"-chardev", "socket,id=data3,path=/run/banger/vms/0123abcd/data3.sock,server=on,wait=off",
		"-device", "virtserialport,chardev=data3,name=org.banger.data.3",
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
		"path=/tmp/x,,y/data3.sock,server=on",
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

// TestConfinedArgsDataPorts: a confined QEMU gets each data port as a
// listening socket it inherits (fd=N), bound to the port's path in the VM
// directory, reachable by root only.
func TestConfinedArgsDataPorts(t *testing.T) {
	assets := t.TempDir()
	kernel := filepath.Join(assets, "vmlinuz")
	disk := filepath.Join(assets, "root.raw")
	for _, p := range []string{kernel, disk} {
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	spec := vmm.Spec{ID: "v", Name: "v", Dir: dir, CPUs: 1, MemoryMiB: 128, Kernel: kernel,
		RootDisk: vmm.Disk{Path: disk, Format: vmm.FormatRaw}}
	paths := PathsFor(dir)
	cf, err := New(Config{}, nil).prepareConfined(spec, paths, 65534, 65534)
	if err != nil {
		t.Fatal(err)
	}
	defer cf.close()
	joined := strings.Join(buildConfinedArgs(spec, vmm.AccelTCG, cf), " ")
	if len(cf.dataFDs) != DataPorts {
		t.Fatalf("%d data port descriptors, want %d", len(cf.dataFDs), DataPorts)
	}
	for i, fd := range cf.dataFDs {
		want := fmt.Sprintf("-chardev socket,id=data%d,fd=%d,server=on,wait=off -device virtserialport,chardev=data%d,name=%s",
			i, fd, i, agentproto.DataPortName(i))
		if !strings.Contains(joined, want) {
			t.Errorf("confined args lack %q:\n%s", want, joined)
		}
		// QEMU's fd N is ExtraFiles[N-3]: the listening socket of the port.
		sa, err := unix.Getsockname(int(cf.files[fd-3].Fd()))
		if su, ok := sa.(*unix.SockaddrUnix); err != nil || !ok || su.Name != paths.DataSockets[i] {
			t.Errorf("fd %d of data port %d is bound to %+v (%v), want %s", fd, i, sa, err, paths.DataSockets[i])
		}
		if fi, err := os.Stat(paths.DataSockets[i]); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
			t.Errorf("data socket %s: %v, %v; want a socket of mode 0600", paths.DataSockets[i], fi.Mode(), err)
		}
	}
	if strings.Contains(joined, "data0.sock") {
		t.Errorf("confined args name a data socket path:\n%s", joined)
	}
}

// TestRecoverDataSockets: Recover gives a VM the data sockets its QEMU
// has on its command line, none to a QEMU an older banger started.
func TestRecoverDataSockets(t *testing.T) {
	paths := PathsFor("/run/banger/vms/x")
	spec := vmm.Spec{ID: "x", Name: "x", Dir: "/run/banger/vms/x", CPUs: 1, MemoryMiB: 128, Kernel: "/k",
		RootDisk: vmm.Disk{Path: "/d", Format: vmm.FormatRaw}}
	cmdline := []byte("qemu-system-x86_64\x00" + strings.Join(BuildArgs(spec, vmm.AccelTCG, paths), "\x00") + "\x00")
	if got := recoverDataSockets(cmdline, paths); !slices.Equal(got, paths.DataSockets) {
		t.Errorf("recovered %q, want %q", got, paths.DataSockets)
	}
	old := bytes.ReplaceAll(cmdline, []byte(agentproto.DataPortPrefix), []byte("org.example.other."))
	if got := recoverDataSockets(old, paths); len(got) != 0 {
		t.Errorf("recovered %q from a QEMU without data ports", got)
	}
}
