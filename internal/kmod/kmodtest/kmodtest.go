// Package kmodtest makes fake kernel module trees for tests: module files
// are minimal ELF relocatable files whose .modinfo carries a vermagic, so
// the release checks of package kmod read them as real modules.
package kmodtest

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Module returns the bytes of a fake module for release named name.
func Module(name, release string) []byte { return ModuleDepends(name, release) }

// ModuleDepends is Module for a module that depends on the modules deps
// (its .modinfo's "depends=").
func ModuleDepends(name, release string, deps ...string) []byte {
	le := binary.LittleEndian
	modinfo := []byte("license=GPL\x00depends=" + strings.Join(deps, ",") + "\x00name=" + name + "\x00vermagic=" + release + " SMP preempt mod_unload modversions \x00")
	shstr := []byte("\x00.modinfo\x00.shstrtab\x00")
	var b bytes.Buffer
	b.Write(make([]byte, 64))
	modOff := b.Len()
	b.Write(modinfo)
	shstrOff := b.Len()
	b.Write(shstr)
	for b.Len()%8 != 0 {
		b.WriteByte(0)
	}
	shoff := b.Len()
	for _, s := range []elf.Section64{
		{},
		{Name: 1, Type: uint32(elf.SHT_PROGBITS), Flags: uint64(elf.SHF_ALLOC), Off: uint64(modOff), Size: uint64(len(modinfo)), Addralign: 1},
		{Name: 10, Type: uint32(elf.SHT_STRTAB), Off: uint64(shstrOff), Size: uint64(len(shstr)), Addralign: 1},
	} {
		binary.Write(&b, le, s)
	}
	out := b.Bytes()
	var hdr bytes.Buffer
	binary.Write(&hdr, le, elf.Header64{
		Ident: [elf.EI_NIDENT]byte{0x7f, 'E', 'L', 'F', byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)},
		Type:  uint16(elf.ET_REL), Machine: uint16(elf.EM_X86_64), Version: uint32(elf.EV_CURRENT),
		Shoff: uint64(shoff), Ehsize: 64, Shentsize: 64, Shnum: 3, Shstrndx: 2,
	})
	copy(out, hdr.Bytes())
	return out
}

// SampleDep is the modules.dep WriteRelease writes: a small virtio guest.
const SampleDep = `kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
`

// WriteRelease writes a release directory at dir: SampleDep as modules.dep,
// a modules.builtin, and a fake module built for release per line.
func WriteRelease(t testing.TB, dir, release string) {
	t.Helper()
	for _, line := range strings.Split(strings.TrimSpace(SampleDep), "\n") {
		p, _, _ := strings.Cut(line, ":")
		full := filepath.Join(dir, filepath.FromSlash(p))
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		name := strings.TrimSuffix(filepath.Base(p), ".ko")
		if err := os.WriteFile(full, Module(name, release), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(SampleDep), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/fs/ext4/ext4.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// Kernel returns a fake bzImage (boot sector and setup code only) whose
// setup header names release, as package kernelimage reads it.
func Kernel(release string) []byte {
	le := binary.LittleEndian
	b := make([]byte, 5*512)
	b[0x1f1] = 4 // setup_sects
	copy(b[0x202:], "HdrS")
	le.PutUint16(b[0x206:], 0x020f) // boot protocol 2.15
	const ptr = 0x300               // kernel_version, relative to 0x200
	le.PutUint16(b[0x20e:], ptr)
	copy(b[0x200+ptr:], release+" (builder@host) #1 SMP PREEMPT_DYNAMIC\x00")
	return b
}

// WriteKernel writes Kernel(release) to a file in a temporary directory and
// returns its path.
func WriteKernel(t testing.TB, release string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(p, Kernel(release), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
