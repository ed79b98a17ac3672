package kernelimage

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/testenv"
)

// testImageDir is where scripts/make-test-image.sh puts the test image.
func testImageDir() string {
	if d := os.Getenv("BANGER_TESTIMAGE_DIR"); d != "" {
		return d
	}
	return "/var/cache/banger/testimage"
}

// TestReleaseTestImageKernel reads the release of the real Debian bzImage
// the test image holds and compares it with the release its package named.
func TestReleaseTestImageKernel(t *testing.T) {
	dir := testImageDir()
	f, err := os.Open(filepath.Join(dir, "vmlinuz"))
	if err != nil {
		testenv.Missing(t, "no test image kernel (run scripts/make-test-image.sh): %v", err)
	}
	defer f.Close()
	want, err := os.ReadFile(filepath.Join(dir, "kernel-release"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Release(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	if got != strings.TrimSpace(string(want)) {
		t.Errorf("Release = %q, want %q", got, strings.TrimSpace(string(want)))
	}
}

// bzImage builds the first sectors of a bzImage whose kernel_version
// string is version.
func bzImage(version string, proto uint16) []byte {
	b := make([]byte, 5*512)
	b[bzSetupSectsOff] = 4
	copy(b[bzMagicOff:], bzMagic)
	binary.LittleEndian.PutUint16(b[bzVersionOff:], proto)
	const ptr = 0x300 // relative to 0x200
	binary.LittleEndian.PutUint16(b[bzKernelVerOff:], ptr)
	copy(b[ptr+bzSetupBase:], version+"\x00")
	return b
}

func TestReleaseBzImage(t *testing.T) {
	img := bzImage("6.1.0-28-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)", 0x020f)
	got, err := Release(bytes.NewReader(img), int64(len(img)))
	if err != nil || got != "6.1.0-28-cloud-amd64" {
		t.Errorf("Release = %q, %v", got, err)
	}

	for name, img := range map[string][]byte{
		"old protocol": bzImage("6.1 (x)", 0x01ff),
		"empty string": bzImage("", 0x020f),
		"slash":        bzImage("../../etc (x) #1", 0x020f),
		"null pointer": func() []byte {
			b := bzImage("6.1 (x)", 0x020f)
			b[bzKernelVerOff], b[bzKernelVerOff+1] = 0, 0
			return b
		}(),
		"past setup":    func() []byte { b := bzImage("6.1 (x)", 0x020f); b[bzSetupSectsOff] = 1; return b }(),
		"not a kernel":  make([]byte, 4096),
		"short garbage": []byte("hello"),
	} {
		if rel, err := Release(bytes.NewReader(img), int64(len(img))); !errors.Is(err, ErrNoRelease) {
			t.Errorf("%s: Release = %q, %v; want ErrNoRelease", name, rel, err)
		}
	}
}

// elfImage builds a 64-bit ELF file with a .rodata section holding data
// and, when withSym, a symbol table with linux_banner at bannerOff.
func elfImage(t *testing.T, data []byte, bannerOff int, withSym bool) []byte {
	t.Helper()
	le := binary.LittleEndian
	const rodataAddr = 0xffffffff82000000
	shstr := []byte("\x00.rodata\x00.symtab\x00.strtab\x00.shstrtab\x00")
	strtab := []byte("\x00linux_banner\x00other\x00")
	var syms bytes.Buffer
	binary.Write(&syms, le, elf.Sym64{}) // index 0
	binary.Write(&syms, le, elf.Sym64{Name: 14, Info: elf.ST_INFO(elf.STB_GLOBAL, elf.STT_OBJECT), Shndx: 1, Value: rodataAddr, Size: 4})
	binary.Write(&syms, le, elf.Sym64{Name: 1, Info: elf.ST_INFO(elf.STB_GLOBAL, elf.STT_OBJECT), Shndx: 1, Value: rodataAddr + uint64(bannerOff), Size: uint64(len(data) - bannerOff)})

	var body bytes.Buffer
	body.Write(make([]byte, 64)) // ELF header, written last
	place := func(b []byte) uint64 {
		off := uint64(body.Len())
		body.Write(b)
		for body.Len()%8 != 0 {
			body.WriteByte(0)
		}
		return off
	}
	rodataOff := place(data)
	symOff := place(syms.Bytes())
	strOff := place(strtab)
	shstrOff := place(shstr)
	shoff := uint64(body.Len())
	sections := []elf.Section64{
		{},
		{Name: 1, Type: uint32(elf.SHT_PROGBITS), Flags: uint64(elf.SHF_ALLOC), Addr: rodataAddr, Off: rodataOff, Size: uint64(len(data)), Addralign: 1},
		{Name: 9, Type: uint32(elf.SHT_SYMTAB), Off: symOff, Size: uint64(syms.Len()), Link: 3, Info: 1, Entsize: 24, Addralign: 8},
		{Name: 17, Type: uint32(elf.SHT_STRTAB), Off: strOff, Size: uint64(len(strtab)), Addralign: 1},
		{Name: 25, Type: uint32(elf.SHT_STRTAB), Off: shstrOff, Size: uint64(len(shstr)), Addralign: 1},
	}
	if !withSym {
		sections[2].Type = uint32(elf.SHT_PROGBITS) // no symbol table any more
	}
	for _, s := range sections {
		binary.Write(&body, le, s)
	}
	out := body.Bytes()
	var hdr bytes.Buffer
	ident := [elf.EI_NIDENT]byte{0x7f, 'E', 'L', 'F', byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)}
	binary.Write(&hdr, le, elf.Header64{
		Ident: ident, Type: uint16(elf.ET_EXEC), Machine: uint16(elf.EM_X86_64), Version: uint32(elf.EV_CURRENT),
		Shoff: shoff, Ehsize: 64, Shentsize: 64, Shnum: uint16(len(sections)), Shstrndx: 4,
	})
	copy(out, hdr.Bytes())
	return out
}

func TestReleaseELF(t *testing.T) {
	// The format string comes first, as in a real vmlinux's .rodata: only
	// the banner itself may be taken.
	data := []byte("junk\x00Linux version %s (%s)\x00Linux version 6.6.0-firecracker (builder@host) (gcc 12) #1 SMP\n\x00tail")
	bannerOff := bytes.LastIndex(data, []byte("Linux version "))
	for _, withSym := range []bool{true, false} {
		img := elfImage(t, data, bannerOff, withSym)
		got, err := Release(bytes.NewReader(img), int64(len(img)))
		if err != nil || got != "6.6.0-firecracker" {
			t.Errorf("symbols %v: Release = %q, %v", withSym, got, err)
		}
	}
	// linux_banner wins over another banner-like string earlier in the data.
	data2 := []byte("Linux version 1.0-decoy (x) #1\x00Linux version 6.6.1-real (y) #2\x00")
	img := elfImage(t, data2, bytes.LastIndex(data2, []byte("Linux version ")), true)
	if got, err := Release(bytes.NewReader(img), int64(len(img))); err != nil || got != "6.6.1-real" {
		t.Errorf("linux_banner: Release = %q, %v", got, err)
	}
	// No banner at all.
	img = elfImage(t, []byte("nothing here\x00"), 0, true)
	if rel, err := Release(bytes.NewReader(img), int64(len(img))); !errors.Is(err, ErrNoRelease) {
		t.Errorf("no banner: Release = %q, %v", rel, err)
	}
}

func TestReleaseRawImage(t *testing.T) {
	// An uncompressed image (arm64 Image) carries the banner in its data.
	img := make([]byte, 3<<20)
	copy(img[0x38:], "ARM\x64")
	// Across the 1 MiB chunk boundary of the scan.
	copy(img[1<<20-8:], "Linux version 6.1.0-arm64 (b@h) #1 SMP\x00")
	got, err := Release(bytes.NewReader(img), int64(len(img)))
	if err != nil || got != "6.1.0-arm64" {
		t.Errorf("Release = %q, %v", got, err)
	}
}

func TestValidRelease(t *testing.T) {
	for _, ok := range []string{"6.1.0-28-cloud-amd64", "5.10.0+", "6.6.0_rc1~x"} {
		if err := ValidRelease(ok); err != nil {
			t.Errorf("ValidRelease(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "a/b", "a b", "%s", strings.Repeat("x", 65), "6.1\x00"} {
		if err := ValidRelease(bad); err == nil {
			t.Errorf("ValidRelease(%q) = nil", bad)
		}
	}
}
