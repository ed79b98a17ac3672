package localbuild

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/testenv"
)

func TestReleaseSum(t *testing.T) {
	rel := []byte("Origin: Debian\nMD5Sum:\n 0123 12 main/binary-amd64/Packages.gz\nSHA256:\n " +
		strings.Repeat("a", 64) + " 1234 main/binary-amd64/Packages.xz\n " +
		strings.Repeat("b", 64) + "   5678 main/binary-amd64/Packages.gz\n")
	sum, size, err := releaseSum(rel, "main/binary-amd64/Packages.gz")
	if err != nil || sum != strings.Repeat("b", 64) || size != 5678 {
		t.Fatalf("got %q %d %v", sum, size, err)
	}
	if _, _, err := releaseSum(rel, "main/binary-arm64/Packages.gz"); err == nil {
		t.Fatal("a file Release doesn't list was found")
	}
}

func gz(t *testing.T, s string) []byte {
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	w.Write([]byte(s))
	w.Close()
	return b.Bytes()
}

const packagesIndex = `Package: linux-image-cloud-amd64
Version: 6.1.100-1
Depends: linux-image-6.1.0-20-cloud-amd64 (= 6.1.100-1)

Package: linux-image-cloud-amd64
Version: 6.1.119-1
Depends: linux-image-6.1.0-28-cloud-amd64 (= 6.1.119-1)
Description: multi-line
 text that is skipped

Package: linux-image-6.1.0-28-cloud-amd64
Version: 6.1.119-1
Filename: pool/main/l/linux-signed-amd64/linux-image-6.1.0-28-cloud-amd64_6.1.119-1_amd64.deb
Size: %d
SHA256: %s

Package: linux-image-6.1.0-20-cloud-amd64
Version: 6.1.100-1
Filename: pool/main/l/x/old.deb
Size: 1
SHA256: ` + "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc" + `
`

func TestFindKernelPackage(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "Packages.gz")
	os.WriteFile(p, gz(t, fmt.Sprintf(packagesIndex, 42, strings.Repeat("d", 64))), 0o644)
	meta, pkg, err := findKernelPackage(p, "linux-image-cloud-amd64")
	if err != nil {
		t.Fatal(err)
	}
	if meta.Version != "6.1.119-1" || pkg.Package != "linux-image-6.1.0-28-cloud-amd64" || pkg.Size != 42 || !strings.HasSuffix(pkg.Filename, "6.1.119-1_amd64.deb") {
		t.Fatalf("meta %+v pkg %+v", meta, pkg)
	}
	if _, _, err := findKernelPackage(p, "linux-image-rt-amd64"); err == nil || !strings.Contains(err.Error(), "no package linux-image-rt-amd64") {
		t.Fatalf("missing metapackage: %v", err)
	}
}

func TestVersionLess(t *testing.T) {
	for _, c := range []struct {
		a, b string
		less bool
	}{
		{"6.1.100-1", "6.1.119-1", true},
		{"6.1.119-1", "6.1.99-1", false},
		{"6.1.119-1~bpo", "6.1.119-1", true},
		{"6.1.119-1", "6.1.119-1+deb12u1", true},
		{"6.1.119-1", "6.1.119-1", false},
	} {
		if got := versionLess(c.a, c.b); got != c.less {
			t.Errorf("versionLess(%s, %s) = %v", c.a, c.b, got)
		}
	}
}

// fakeArchive serves a Debian archive of one kernel package on loopback;
// gpgv is replaced by a script that copies its input (or fails when bad).
func fakeArchive(t *testing.T, deb []byte, debSum string, badSig bool) (url, gpgv string) {
	t.Helper()
	sum := sha256.Sum256(deb)
	if debSum == "" {
		debSum = hex.EncodeToString(sum[:])
	}
	index := gz(t, fmt.Sprintf(packagesIndex, len(deb), debSum))
	isum := sha256.Sum256(index)
	release := "Codename: bookworm\nSHA256:\n " + hex.EncodeToString(isum[:]) + " " + strconv.Itoa(len(index)) + " main/binary-amd64/Packages.gz\n"
	mux := http.NewServeMux()
	mux.HandleFunc("/debian/dists/bookworm/InRelease", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte(release)) })
	mux.HandleFunc("/debian/dists/bookworm/main/binary-amd64/Packages.gz", func(w http.ResponseWriter, r *http.Request) { w.Write(index) })
	mux.HandleFunc("/debian/pool/main/l/linux-signed-amd64/", func(w http.ResponseWriter, r *http.Request) { w.Write(deb) })
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	gpgv = filepath.Join(t.TempDir(), "gpgv")
	body := "#!/bin/sh\n# args: --keyring K --output OUT IN\ncp \"$5\" \"$4\"\n"
	if badSig {
		body = "#!/bin/sh\necho 'gpgv: BAD signature' >&2\nexit 1\n"
	}
	os.WriteFile(gpgv, []byte(body), 0o755)
	return srv.URL + "/debian", gpgv
}

func keyring(t *testing.T) string {
	k := filepath.Join(t.TempDir(), "keyring.gpg")
	os.WriteFile(k, []byte("k"), 0o644)
	return k
}

func TestFetchDebianKernel(t *testing.T) {
	deb := bytes.Repeat([]byte("deb!"), 100000)
	url, gpgv := fakeArchive(t, deb, "", false)
	dir := t.TempDir()
	var mu sync.Mutex
	var frames []api.Progress
	k, err := FetchDebianKernel(context.Background(), dir, KernelOptions{Mirror: url, Gpgv: gpgv, Keyring: keyring(t),
		Progress: func(p api.Progress) { mu.Lock(); frames = append(frames, p); mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(k.Path)
	if !bytes.Equal(got, deb) || k.Version != "6.1.119-1" || k.Package != "linux-image-6.1.0-28-cloud-amd64" {
		t.Fatalf("kernel %+v (%d bytes)", k, len(got))
	}
	last := frames[len(frames)-1]
	if last.Unit != "bytes" || last.Done != int64(len(deb)) || last.Total != int64(len(deb)) {
		t.Errorf("last progress %+v", last)
	}
}

func TestFetchDebianKernelRefusals(t *testing.T) {
	deb := []byte("a kernel package")
	for _, c := range []struct {
		name   string
		sum    string
		badSig bool
		want   string
	}{
		{"checksum mismatch", strings.Repeat("e", 64), false, "sha256"},
		{"bad signature", "", true, "is not signed"},
	} {
		t.Run(c.name, func(t *testing.T) {
			url, gpgv := fakeArchive(t, deb, c.sum, c.badSig)
			dir := t.TempDir()
			_, err := FetchDebianKernel(context.Background(), dir, KernelOptions{Mirror: url, Gpgv: gpgv, Keyring: keyring(t)})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want %q", err, c.want)
			}
			debs, _ := filepath.Glob(filepath.Join(dir, "*.deb"))
			if len(debs) != 0 {
				t.Errorf("left behind: %v", debs)
			}
		})
	}
	if _, err := FetchDebianKernel(context.Background(), t.TempDir(), KernelOptions{Keyring: "/nonexistent/keyring.gpg"}); err == nil || !strings.Contains(err.Error(), "debian-archive-keyring") {
		t.Errorf("missing keyring: %v", err)
	}
}

func TestCommandCancelKillsGroup(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	pids := make(chan int, 1)
	done := make(chan error, 1)
	go func() {
		done <- command{
			name:  "sh",
			args:  []string{"-c", "trap '' TERM; sleep 300 & echo child $!; wait"},
			grace: 200 * time.Millisecond,
			onLine: func(l string) {
				if s, ok := strings.CutPrefix(l, "child "); ok {
					n, _ := strconv.Atoi(s)
					pids <- n
				}
			},
		}.run(ctx)
	}()
	var child int
	select {
	case child = <-pids:
	case <-time.After(10 * time.Second):
		t.Fatal("the command never started its child")
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run didn't return after cancel")
	}
	deadline := time.Now().Add(5 * time.Second)
	for alive(child) {
		if time.Now().After(deadline) {
			t.Fatalf("child %d of the cancelled command still runs", child)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// alive reports whether pid runs (a zombie doesn't).
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

func TestCommandFailureQuotesOutput(t *testing.T) {
	err := command{name: "sh", args: []string{"-c", "echo first; echo 'E: Unable to locate package nosuch' >&2; exit 100"}}.run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "Unable to locate package nosuch") || !strings.Contains(err.Error(), "exit status 100") {
		t.Fatalf("err = %v", err)
	}
	err = command{name: "no-such-program-banger"}.run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "is not installed") {
		t.Fatalf("missing program: %v", err)
	}
}

// TestRemoveAllUnmounts: a staging directory with a bind mount inside (as a
// killed mmdebstrap leaves /dev in its chroot) is removed without touching
// what the mount shows. In a mount namespace of the test's own.
func TestRemoveAllUnmounts(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Missing(t, "root (mounts)")
	}
	outside := t.TempDir()
	canary := filepath.Join(outside, "canary")
	os.WriteFile(canary, []byte("keep me"), 0o644)
	dir := t.TempDir()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with its namespace
		if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
			errc <- err
			return
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			errc <- err
			return
		}
		mp := filepath.Join(dir, "rootfs", "dev")
		os.MkdirAll(mp, 0o755)
		if err := unix.Mount(outside, mp, "", unix.MS_BIND, ""); err != nil {
			errc <- err
			return
		}
		if _, err := os.Stat(filepath.Join(mp, "canary")); err != nil {
			errc <- fmt.Errorf("bind mount not visible: %w", err)
			return
		}
		errc <- RemoveAll(dir, nil)
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(canary); err != nil || string(b) != "keep me" {
		t.Fatalf("the mounted directory's file was touched: %q %v", b, err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("staging dir still there: %v", err)
	}
}

func TestAptProgress(t *testing.T) {
	var got []api.Progress
	p := newAptProgress(func(f api.Progress) { got = append(got, f) })
	for _, l := range []string{
		"I: chroot architecture amd64 is equal to the host's architecture",
		"I: downloading packages with apt...",
		"0 upgraded, 2 newly installed, 0 to remove and 0 not upgraded.",
		"I: running --customize-hook in shell: sh -c 'chroot ...'",
		"[provision] apt: systemd-sysv udev",
		"0 upgraded, 3 newly installed, 0 to remove and 0 not upgraded.",
		"Setting up a (1) ...",
	} {
		p.line(l)
	}
	p.flush()
	var phases []string
	for _, f := range got {
		phases = append(phases, f.Phase)
	}
	last := got[len(got)-1]
	if last.Phase != "provision: apt" || last.Total != 3 || last.Done != 1 || last.Unit != "packages" {
		t.Fatalf("last frame %+v (phases %q)", last, phases)
	}
	if !strings.Contains(strings.Join(phases, "|"), "debootstrap: downloading packages with apt") {
		t.Errorf("phases %q", phases)
	}
}

// TestBuildGolden runs the build with a stand-in for mmdebstrap (a script
// making a small root) and the real mkfs.ext4.
func TestBuildGolden(t *testing.T) {
	for _, tool := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Missing(t, "%s (e2fsprogs)", tool)
		}
	}
	work := t.TempDir()
	fake := filepath.Join(t.TempDir(), "mmdebstrap")
	// The root is the second-to-last argument; the hooks name provision.sh.
	os.WriteFile(fake, []byte(`#!/bin/sh
for a; do case "$a" in --customize-hook=copy-in*provision.sh*) script=$(echo "$a" | cut -d' ' -f2);; esac; done
root=$(eval echo \${$(($#-1))})
mkdir -p "$root/etc" "$root/usr/bin" "$root/usr/sbin"
: >"$root/usr/sbin/depmod"
echo host >"$root/etc/hostname"
echo "nameserver 1.1.1.1" >"$root/etc/resolv.conf"
cp "$script" "$root/provision-seen"
echo "I: running --customize-hook"
echo "[provision] done"
`), 0o755)
	mods := filepath.Join(t.TempDir(), "6.1.0-9-cloud-amd64")
	os.MkdirAll(filepath.Join(mods, "kernel"), 0o755)
	os.WriteFile(filepath.Join(mods, "modules.dep"), []byte("kernel/overlay.ko:\n"), 0o644)
	os.WriteFile(filepath.Join(mods, "kernel", "overlay.ko"), []byte("ko"), 0o644)
	out := filepath.Join(work, "rootfs.ext4")
	// A stand-in for chroot: records the depmod run in the root.
	chroot := filepath.Join(t.TempDir(), "chroot")
	os.WriteFile(chroot, []byte("#!/bin/sh\nroot=$1; shift\necho \"$@\" >\"$root/depmod-ran\"\n"), 0o755)
	var phases []string
	err := BuildGolden(context.Background(), work, out, GoldenOptions{
		Mmdebstrap: fake, Chroot: chroot, Script: []byte("#!/bin/sh\necho provisioned\n"), HeadroomMiB: 16,
		Modules: mods, Release: "6.1.0-9-cloud-amd64",
		Progress: func(p api.Progress) { phases = append(phases, p.Phase) },
	})
	if err != nil {
		t.Fatal(err)
	}
	cat := func(p string) string {
		b, err := exec.Command("debugfs", "-R", "cat "+p, out).Output()
		if err != nil {
			t.Fatalf("debugfs cat %s: %v", p, err)
		}
		return string(b)
	}
	if got := cat("/provision-seen"); got != "#!/bin/sh\necho provisioned\n" {
		t.Errorf("the hook got script %q", got)
	}
	if got := cat("/lib/modules/6.1.0-9-cloud-amd64/modules.dep"); got != "kernel/overlay.ko:\n" {
		t.Errorf("modules.dep in the image: %q", got)
	}
	if got := cat("/depmod-ran"); got != "/usr/sbin/depmod 6.1.0-9-cloud-amd64\n" {
		t.Errorf("depmod in the image: %q", got)
	}
	if got := cat("/etc/hostname"); got != "debian\n" {
		t.Errorf("hostname %q", got)
	}
	if got := cat("/etc/resolv.conf"); got != "" {
		t.Errorf("the host's resolv.conf stayed: %q", got)
	}
	if j := strings.Join(phases, ","); !strings.Contains(j, "provision") || !strings.Contains(j, "modules") || !strings.HasSuffix(j, "mkfs") {
		t.Errorf("phases %s", j)
	}
	// Same input, same label and epoch: the same file system.
	out2 := filepath.Join(work, "again.ext4")
	if err := MakeExt4(context.Background(), filepath.Join(work, "rootfs"), out2, 32, "banger-golden", DefaultSourceDateEpoch, "", nil); err != nil {
		t.Fatal(err)
	}
	out3 := filepath.Join(work, "again2.ext4")
	if err := MakeExt4(context.Background(), filepath.Join(work, "rootfs"), out3, 32, "banger-golden", DefaultSourceDateEpoch, "", nil); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(out2)
	b, _ := os.ReadFile(out3)
	if !bytes.Equal(a, b) {
		t.Error("two mkfs runs of the same tree differ")
	}
}

func TestBuildGoldenFailure(t *testing.T) {
	work := t.TempDir()
	fake := filepath.Join(t.TempDir(), "mmdebstrap")
	os.WriteFile(fake, []byte("#!/bin/sh\necho 'E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease' >&2\nexit 1\n"), 0o755)
	err := BuildGolden(context.Background(), work, filepath.Join(work, "out.ext4"), GoldenOptions{Mmdebstrap: fake})
	if err == nil || !strings.Contains(err.Error(), "Failed to fetch") {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(filepath.Join(work, "out.ext4")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an image was written: %v", err)
	}
}

func TestTreeSizeCountsHardLinksOnce(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "a"), make([]byte, 1<<20), 0o644)
	one, err := treeSize(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		if err := os.Link(filepath.Join(dir, "a"), filepath.Join(dir, "l"+strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	linked, err := treeSize(dir)
	if err != nil {
		t.Fatal(err)
	}
	if linked != one || one < 1<<20 {
		t.Errorf("one file: %d, with 10 hard links: %d", one, linked)
	}
}
