package localbuild

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/bangerdev/banger/images/golden"
)

// DefaultMirror is the Debian archive local builds use.
const DefaultMirror = "http://deb.debian.org/debian"

// DefaultCABundle is the host's CA bundle (Debian's ca-certificates).
const DefaultCABundle = "/etc/ssl/certs/ca-certificates.crt"

// DefaultHeadroomMiB is the free space a built root filesystem gets on top
// of its content (a VM's disk can be grown at create anyway).
const DefaultHeadroomMiB = 1024

// DefaultSourceDateEpoch is the timestamp of a golden build when none is
// given: 2026-12-06T00:00:00Z, the recipe's date.
const DefaultSourceDateEpoch = 1796515200

// GoldenOptions configures BuildGolden. Zero values mean the defaults.
type GoldenOptions struct {
	Suite  string // golden.Suite
	Mirror string // DefaultMirror
	// Script is the provisioning script run in the chroot
	// (golden.ProvisionScript).
	Script []byte
	// User is the default user the script makes (golden.User).
	User string
	// Modules, when set, is a kernel's modules directory for Release
	// (lib/modules/<release> of a kernel package): it is copied into the
	// image's /lib/modules/<release>, so what runs in the guest (docker's
	// modprobe of overlay, br_netfilter, nf_*) finds the kernel's modules.
	Modules string
	Release string
	// HeadroomMiB is free space in the image (DefaultHeadroomMiB).
	HeadroomMiB int64
	// Label names the ext4 file system; its UUID and directory hash seed
	// derive from it (reproducible). Default "banger-golden".
	Label string
	// SourceDateEpoch fixes timestamps (DefaultSourceDateEpoch).
	SourceDateEpoch int64
	// CABundle is a PEM bundle npm trusts while provisioning (default the
	// host's, DefaultCABundle; "-" none): hosts behind a TLS-intercepting
	// proxy trust its CA there. It is not kept in the image.
	CABundle string
	// Mmdebstrap, Mkfs and Chroot are the programs run ("mmdebstrap",
	// "mkfs.ext4", "chroot").
	Mmdebstrap, Mkfs, Chroot string
	Progress                 Progress
	Log                      *slog.Logger
	// LogFile, when set, receives the build's full output.
	LogFile io.Writer
}

func (o *GoldenOptions) defaults() {
	if o.Suite == "" {
		o.Suite = golden.Suite
	}
	if o.Mirror == "" {
		o.Mirror = DefaultMirror
	}
	if o.Script == nil {
		o.Script = golden.ProvisionScript
	}
	if o.User == "" {
		o.User = golden.User
	}
	if o.HeadroomMiB == 0 {
		o.HeadroomMiB = DefaultHeadroomMiB
	}
	if o.Label == "" {
		o.Label = "banger-golden"
	}
	if o.SourceDateEpoch == 0 {
		o.SourceDateEpoch = DefaultSourceDateEpoch
	}
	switch o.CABundle {
	case "":
		o.CABundle = DefaultCABundle
	case "-":
		o.CABundle = ""
	}
	if o.Mmdebstrap == "" {
		o.Mmdebstrap = "mmdebstrap"
	}
	if o.Mkfs == "" {
		o.Mkfs = "mkfs.ext4"
	}
	if o.Chroot == "" {
		o.Chroot = "chroot"
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

// Phases of a golden build, as progress frames name them.
const (
	PhaseBootstrap = "debootstrap"
	PhaseProvision = "provision"
	PhaseModules   = "modules"
	PhaseMkfs      = "mkfs"
)

// BuildGolden builds the golden image's root filesystem into out (an ext4
// file), working in work (an empty directory on the same machine; the
// caller removes it with RemoveAll). Progress: phases "debootstrap"
// (mmdebstrap's own steps), "provision" (the script; Done/Total count
// packages set up when apt says how many), "modules", "mkfs".
//
// What is reproducible: the suite, the script and its pinned npm versions,
// SOURCE_DATE_EPOCH (file times clamped by mmdebstrap and dpkg, and the
// ext4's times, UUID and hash seed). Not bit-for-bit: the package versions
// are today's in the archive, and files written while provisioning (npm's
// install, ldconfig's cache) carry their own contents.
func BuildGolden(ctx context.Context, work, out string, o GoldenOptions) error {
	o.defaults()
	if len(o.Script) == 0 {
		return errors.New("golden build: empty provisioning script")
	}
	script := filepath.Join(work, "provision.sh")
	if err := os.WriteFile(script, o.Script, 0o755); err != nil {
		return fmt.Errorf("golden build: %w", err)
	}
	root := filepath.Join(work, "rootfs")

	o.Progress.send(PhaseBootstrap, 0, 0, "")
	args := []string{
		"--variant=minbase", "--mode=root", "--verbose", "--components=main",
		`--aptopt=Acquire::Retries "3"`,
		"--customize-hook=copy-in " + script + " /tmp",
	}
	// npm trusts what the host trusts during the build (a host behind a
	// TLS-intercepting proxy has its CA there); not kept in the image.
	ca := ""
	if o.CABundle != "" && fileExists(o.CABundle) {
		ca = filepath.Join(work, "build-ca.crt")
		if err := copyFile(o.CABundle, ca); err != nil {
			return fmt.Errorf("golden build: %w", err)
		}
		args = append(args, "--customize-hook=copy-in "+ca+" /tmp")
		ca = "/tmp/build-ca.crt"
	}
	args = append(args,
		"--customize-hook="+provisionHook(o.User, ca),
		`--customize-hook=rm -f "$1/tmp/provision.sh" "$1/tmp/build-ca.crt"`,
	)
	if kr := "/usr/share/keyrings/debian-archive-keyring.gpg"; fileExists(kr) {
		args = append(args, "--keyring="+kr)
	}
	args = append(args, o.Suite, root, o.Mirror)
	pp := newAptProgress(o.Progress)
	err := command{
		name:   o.Mmdebstrap,
		args:   args,
		env:    []string{"SOURCE_DATE_EPOCH=" + strconv.FormatInt(o.SourceDateEpoch, 10), "DEBIAN_FRONTEND=noninteractive"},
		dir:    work,
		log:    o.LogFile,
		onLine: pp.line,
	}.run(ctx)
	pp.flush()
	if err != nil {
		return fmt.Errorf("golden build: %w", err)
	}
	if err := finishRoot(root); err != nil {
		return fmt.Errorf("golden build: %w", err)
	}

	if o.Modules != "" {
		o.Progress.send(PhaseModules, 0, 0, "")
		if o.Release == "" || strings.ContainsAny(o.Release, "/\x00") || o.Release == "." || o.Release == ".." {
			return fmt.Errorf("golden build: modules given without a valid kernel release (%q)", o.Release)
		}
		dst := filepath.Join(root, "lib", "modules", o.Release)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return fmt.Errorf("golden build: %w", err)
		}
		_ = os.RemoveAll(dst)
		if err := (command{name: "cp", args: []string{"-a", "--reflink=auto", "--", o.Modules, dst}, log: o.LogFile}).run(ctx); err != nil {
			return fmt.Errorf("golden build: copy the kernel's modules: %w", err)
		}
		// The guest's modprobe (kmod) reads depmod's binary indexes
		// (modules.dep.bin, modules.alias.bin, ...), not only modules.dep:
		// the image's own depmod makes them.
		if depmod := imageDepmod(root); depmod != "" {
			err := command{
				name: o.Chroot, args: []string{root, depmod, o.Release},
				env: []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}, log: o.LogFile,
			}.run(ctx)
			if err != nil {
				return fmt.Errorf("golden build: index the kernel's modules: %w", err)
			}
		} else {
			o.Log.Warn("golden build: the image has no depmod: its modprobe won't find the kernel's modules")
		}
	}

	content, err := treeSize(root)
	if err != nil {
		return fmt.Errorf("golden build: %w", err)
	}
	sizeMiB := content/(1<<20) + content/(1<<20)/10 + o.HeadroomMiB
	o.Log.Info("golden build: making the root file system", "content_mib", content>>20, "image_mib", sizeMiB)
	o.Progress.send(PhaseMkfs, 0, sizeMiB<<20, "bytes")
	if err := MakeExt4(ctx, root, out, sizeMiB, o.Label, o.SourceDateEpoch, o.Mkfs, o.LogFile); err != nil {
		return fmt.Errorf("golden build: %w", err)
	}
	o.Progress.send(PhaseMkfs, sizeMiB<<20, sizeMiB<<20, "bytes")
	return nil
}

// imageDepmod is the image's depmod, as a path inside it ("" if none).
func imageDepmod(root string) string {
	for _, p := range []string{"/usr/sbin/depmod", "/sbin/depmod"} {
		if _, err := os.Lstat(filepath.Join(root, p)); err == nil {
			return p
		}
	}
	return ""
}

// provisionHook is the mmdebstrap hook running provision.sh in the chroot
// with a clean environment (proxies kept).
func provisionHook(user, ca string) string {
	env := []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root", "LC_ALL=C.UTF-8", "DEBIAN_FRONTEND=noninteractive",
		"GOLDEN_USER=" + shellQuote(user),
	}
	if ca != "" {
		env = append(env, "BUILD_CA_BUNDLE="+ca)
	}
	for _, k := range []string{"http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "NPM_CONFIG_REGISTRY"} {
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+shellQuote(v))
		}
	}
	return `chroot "$1" /usr/bin/env -i ` + strings.Join(env, " ") + ` /bin/bash /tmp/provision.sh`
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// finishRoot removes what the build host left in the root: its resolver
// and hostname (banger's agent writes both at boot).
func finishRoot(root string) error {
	for _, p := range []string{"etc/resolv.conf", "etc/hostname"} {
		full := filepath.Join(root, p)
		if fi, err := os.Lstat(full); err == nil && fi.Mode().IsRegular() {
			if err := os.Remove(full); err != nil {
				return err
			}
		}
	}
	return os.WriteFile(filepath.Join(root, "etc", "hostname"), []byte("debian\n"), 0o644)
}

// MakeExt4 makes out, an ext4 file of sizeMiB holding dir's tree (mkfs.ext4
// -d), reproducibly: its timestamps are epoch, its UUID and directory hash
// seed derive from label.
func MakeExt4(ctx context.Context, dir, out string, sizeMiB int64, label string, epoch int64, mkfs string, logw io.Writer) error {
	if mkfs == "" {
		mkfs = "mkfs.ext4"
	}
	_ = os.Remove(out)
	f, err := os.OpenFile(out, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("mkfs: %w", err)
	}
	if err := f.Truncate(sizeMiB << 20); err != nil {
		f.Close()
		return fmt.Errorf("mkfs: size %s: %w", out, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("mkfs: %w", err)
	}
	uuid := uuidFrom(label)
	err = command{
		name: mkfs,
		args: []string{"-q", "-F", "-t", "ext4", "-L", truncLabel(label), "-U", uuid,
			"-E", "hash_seed=" + uuid + ",root_owner=0:0", "-d", dir, out},
		env: []string{"E2FSPROGS_FAKE_TIME=" + strconv.FormatInt(epoch, 10)},
		log: logw,
	}.run(ctx)
	if err != nil {
		_ = os.Remove(out)
		return err
	}
	return nil
}

// uuidFrom makes a UUID (version 4 layout) from a name's sha256.
func uuidFrom(name string) string {
	h := sha256.Sum256([]byte(name))
	h[6] = h[6]&0x0f | 0x40
	h[8] = h[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
}

// truncLabel fits an ext4 label (16 bytes).
func truncLabel(s string) string {
	if len(s) > 16 {
		return s[:16]
	}
	return s
}

// treeSize estimates the space dir's tree takes in an ext4: data rounded to
// 4 KiB blocks plus an inode (256 bytes) per entry.
func treeSize(dir string) (int64, error) {
	var total int64
	type inode struct{ dev, ino uint64 }
	linked := map[inode]bool{} // hard links count once (git-core has ~100)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.Type().IsRegular() && !d.IsDir() {
			total += 256
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && !d.IsDir() && st.Nlink > 1 {
			k := inode{uint64(st.Dev), st.Ino}
			if linked[k] {
				return nil
			}
			linked[k] = true
		}
		total += 256 + (fi.Size()+4095)&^4095
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", dir, err)
	}
	return total, nil
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o644)
}

func fileExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

// aptProgress turns mmdebstrap's and apt's output into progress frames:
// the phase from mmdebstrap's "I: ..." lines and provision.sh's
// "[provision]" lines, Done/Total from apt's "N newly installed" and its
// "Get:"/"Setting up" lines. Frames are sent on a phase change or at most
// every 200 ms.
type aptProgress struct {
	mu          sync.Mutex
	send        Progress
	phase, step string
	done, total int64
	last        time.Time
}

var (
	reNewly = regexp.MustCompile(`(\d+) upgraded, (\d+) newly installed`)
	reGet   = regexp.MustCompile(`^Get:(\d+) `)
)

func newAptProgress(p Progress) *aptProgress { return &aptProgress{send: p, phase: PhaseBootstrap} }

func (a *aptProgress) line(l string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	phase, step := a.phase, a.step
	switch {
	case strings.HasPrefix(l, "I: running --customize-hook") || strings.HasPrefix(l, "[provision]"):
		phase = PhaseProvision
		if rest, ok := strings.CutPrefix(l, "[provision] "); ok {
			step = strings.Fields(rest + " ")[0]
			step = strings.TrimSuffix(step, ":")
		}
	case strings.HasPrefix(l, "I: "):
		if phase != PhaseProvision {
			step = strings.TrimSuffix(strings.TrimSpace(strings.TrimPrefix(l, "I: ")), "...")
			if len(step) > 40 {
				step = step[:40]
			}
		}
	}
	if phase != a.phase || step != a.step {
		a.phase, a.step, a.done, a.total = phase, step, 0, 0
		a.emit(true)
	}
	if m := reNewly.FindStringSubmatch(l); m != nil {
		n, _ := strconv.ParseInt(m[2], 10, 64)
		a.total, a.done = n, 0
		a.emit(true)
		return
	}
	if m := reGet.FindStringSubmatch(l); m != nil && a.total > 0 {
		n, _ := strconv.ParseInt(m[1], 10, 64)
		a.done = min(n, a.total)
		a.emit(false)
		return
	}
	if strings.HasPrefix(l, "Setting up ") && a.total > 0 {
		a.done = min(a.done+1, a.total)
		a.emit(false)
	}
}

func (a *aptProgress) emit(force bool) {
	if a.send == nil || (!force && time.Since(a.last) < 200*time.Millisecond) {
		return
	}
	a.last = time.Now()
	phase := a.phase
	if a.step != "" {
		phase += ": " + a.step
	}
	unit := ""
	if a.total > 0 {
		unit = "packages"
	}
	a.send.send(phase, a.done, a.total, unit)
}

func (a *aptProgress) flush() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.emit(true)
}
