package qemu

import (
	"crypto/rand"
	"debug/elf"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/initramfs"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmtest"
)

// The tests that boot real VMs need qemu-system-x86_64, a static
// /bin/busybox (Debian: busybox-static) and the test image of
// scripts/make-test-image.sh in $BANGER_TESTIMAGE_DIR or
// /var/cache/banger/testimage (vmlinuz, kernel-release, modules/). The
// guest is a tiny initramfs: busybox, the virtio modules and a shell /init
// (see guestInit).

// TestConformance runs the driver conformance suite (docs/dev/vmm-drivers.md).
func TestConformance(t *testing.T) {
	requireQEMU(t)
	img := findTestImage(t)
	vmmtest.Run(t, vmmtest.Factory{
		New:  func(t *testing.T) vmm.Driver { return New(Config{}, testLogger(t)) },
		Spec: img.spec,
	})
}

const defaultTestImageDir = "/var/cache/banger/testimage"

// guestModules are the modules the test guest loads (with their
// dependencies): the virtio-mmio bus, the disk and virtio-serial.
var guestModules = []string{"virtio_mmio", "virtio_blk", "virtio_console"}

// testImage is what a test guest boots from.
type testImage struct {
	kernel  string
	busybox string
	modules []string // host paths of guestModules and their dependencies, in load order
}

// findTestImage finds the test image, or skips the test.
func findTestImage(t *testing.T) testImage {
	t.Helper()
	return findTestImageWith(t, guestModules)
}

// findTestImageWith finds the test image with the kernel modules mods
// (and their dependencies) for the guest, or skips the test.
func findTestImageWith(t *testing.T, mods []string) testImage {
	t.Helper()
	dir := os.Getenv("BANGER_TESTIMAGE_DIR")
	if dir == "" {
		dir = defaultTestImageDir
	}
	hint := "run scripts/make-test-image.sh as root, or set BANGER_TESTIMAGE_DIR"
	img := testImage{kernel: filepath.Join(dir, "vmlinuz"), busybox: "/bin/busybox"}
	if _, err := os.Stat(img.kernel); err != nil {
		testenv.Missing(t, "no test image kernel (%s): %v", hint, err)
	}
	rel, err := os.ReadFile(filepath.Join(dir, "kernel-release"))
	if err != nil {
		testenv.Missing(t, "incomplete test image in %s (%s): %v", dir, hint, err)
	}
	resolved, err := initramfs.ResolveModules(filepath.Join(dir, "modules"), strings.TrimSpace(string(rel)), mods)
	if err != nil {
		testenv.Missing(t, "no usable kernel modules in test image %s (%s): %v", dir, hint, err)
	}
	for _, f := range resolved.Files {
		img.modules = append(img.modules, filepath.Join(resolved.ReleaseDir, f))
	}
	bb, err := elf.Open(img.busybox)
	if err != nil {
		testenv.Missing(t, "no usable %s (install busybox-static): %v", img.busybox, err)
	}
	defer bb.Close()
	for _, p := range bb.Progs {
		if p.Type == elf.PT_INTERP {
			testenv.Missing(t, "%s is dynamically linked; the guest needs a static one (install busybox-static)", img.busybox)
		}
	}
	return img
}

// guestInit returns the test guest's /init for b (see vmmtest.Behaviour).
// The RunForever guest also prints "vmmtest-disk-sectors=N", the size of
// the virtio-blk root disk it sees, and "vmmtest-port NAME=DEVICE" for
// each port it echoes on: the agent's and the DataPorts data ports.
func guestInit(b vmmtest.Behaviour) string {
	switch b {
	case vmmtest.PowerOffAfterBoot:
		return vmmtest.GuestPrelude + "echo " + vmmtest.Marker + "\n$bb poweroff -f\n"
	case vmmtest.RunForever:
		// A virtio-serial port can be opened once at a time, so each echo
		// reads and writes one read-write descriptor. Reading it returns
		// EOF while no host client is connected: cat then ends, and runs
		// again. The port names are read with the shell's read (no fork:
		// forks are slow under TCG).
		return vmmtest.GuestPrelude + strings.NewReplacer(
			"AGENTPORT", agentproto.VirtioPortName,
			"DATAPREFIX", agentproto.DataPortPrefix,
			"NPORTS", strconv.Itoa(1+DataPorts),
			"MARKER", vmmtest.Marker,
		).Replace(`for i in $($bb seq 100); do
  ports=
  for p in /sys/class/virtio-ports/*; do
    [ -e $p/name ] && read -r name < $p/name || continue
    case "$name" in
      AGENTPORT|DATAPREFIX*) [ -e /dev/${p##*/} ] && ports="$ports $name=/dev/${p##*/}" ;;
    esac
  done
  set -- $ports
  [ $# -eq NPORTS ] && [ -e /dev/vda ] && break
  $bb sleep 0.1
done
echo "vmmtest-disk-sectors=$($bb cat /sys/block/vda/size)"
for port in $ports; do
  echo "vmmtest-port $port"
  ( exec 3<>${port#*=} && while :; do $bb cat <&3 >&3; $bb sleep 0.1; done ) &
done
echo MARKER
while :; do $bb sleep 3600; done
`)
	}
	panic("unknown vmmtest.Behaviour " + b.String())
}

// testDiskBytes is the size of the test guest's (sparse, empty) raw disk.
const testDiskBytes = 16 << 20

// spec implements vmmtest.Factory.Spec: a 1-CPU VM booting the test
// image's kernel with a busybox initramfs. The initramfs and the disk live
// outside dir.
func (img testImage) spec(t *testing.T, dir string, b vmmtest.Behaviour) vmm.Spec {
	t.Helper()
	assets := t.TempDir()
	initrd := filepath.Join(assets, "initramfs.cpio")
	if err := vmmtest.BusyboxInitramfs(initrd, img.busybox, guestInit(b), img.modules); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(assets, "root.raw")
	if err := os.WriteFile(disk, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, testDiskBytes); err != nil {
		t.Fatal(err)
	}
	id := make([]byte, 8)
	rand.Read(id)
	return vmm.Spec{
		ID:         hex.EncodeToString(id),
		Name:       "vmmtest-" + filepath.Base(dir),
		Dir:        dir,
		CPUs:       1,
		MemoryMiB:  256,
		Kernel:     img.kernel,
		Initrd:     initrd,
		Cmdline:    "panic=-1 quiet",
		RootDisk:   vmm.Disk{Path: disk, Format: vmm.FormatRaw},
		Accel:      vmm.AccelAuto,
		ConsoleLog: filepath.Join(dir, "console.log"),
	}
}

// TestConformanceConfined runs the conformance suite with QEMU confined
// (docs/security.md): another user, seccomp, its own cgroup, descriptors
// instead of paths.
func TestConformanceConfined(t *testing.T) {
	requireQEMU(t)
	img := findTestImage(t)
	conf := testConfine(t)
	vmmtest.Run(t, vmmtest.Factory{
		New:  func(t *testing.T) vmm.Driver { return New(Config{Confine: conf}, testLogger(t)) },
		Spec: img.spec,
	})
}
