//go:build e2e

package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/client"
	"github.com/bangerdev/banger/test/harness"
)

// The data path's workloads (issue 8).
const (
	bigSize     = 200 << 20 // the large stream and file
	treeFiles   = 10000     // files of the small-file tree
	treeFile    = 1000      // bytes per file of the tree
	sparseSize  = 2 << 30   // the sparse file's size
	sparseChunk = 1 << 20   // each of its data regions
	dpRuns      = 3         // samples of each figure (medians are reported)
)

// sparseAt are the offsets of the sparse file's data regions (4 MiB of
// data, the last one ending the file).
var sparseAt = []int64{0, 512 << 20, 1 << 30, sparseSize - sparseChunk}

// BenchmarkDataPath measures moving bytes between host and guest (issue
// 8), in one run: first the raw virtio-serial channel of a bare QEMU
// booted with banger's kernel, initrd and command line (200 MiB out and
// in; a tar stream of a 10,000-file tree out and in), then the same
// through banger on a VM of the Debian test image:
//
//	(a) banger vm exec NAME -- cat FILE, 200 MiB out; goal >= 0.8 of raw out
//	(b) 200 MiB into banger vm exec NAME -- sh -c 'cat > /dev/null'; goal >= 0.8 of raw in
//	(c) banger vm cp of a 200 MiB file in and out; goal >= 0.8 of raw, same direction
//	(d) banger vm cp of the 10,000-file tree in and out; goal >= 0.5 of the raw tar stream
//	(e) a 2 GiB sparse file with 4 MiB of data in and out; goal < 2 s each way,
//	    its data size on disk on both sides
//
// The CLI runs as a user runs it: the built binary, its output to
// /dev/null, its input from a file. Each banger figure also reports the CPU
// time the CLI, bangerd and QEMU (the guest, under TCG) spent on it. Last,
// the hops inside the guest alone (docs/dev/data-path.md): producing and
// reading the bytes, tar of the tree, and the ciphers (guesttool
// cipherbench) in the guest and on the host.
func BenchmarkDataPath(b *testing.B) {
	e, imageDir := setup(b)
	e.RegisterImages()
	ctx := context.Background()
	c := client.New(e.Socket())
	work := b.TempDir()
	files := makeDataFiles(b, work)

	// The banger VM first boots once for the initrd and command line the
	// bare QEMU boots with, then waits, stopped, while the raw channel is
	// measured: one VM at a time on the host.
	e.Must("vm", "create", "--name", "dp", "--image", "debian", "--memory", "1024", "--disk-size", "4G", "--start")
	vmDir := e.Inspect("dp").Dir
	cmdline := appendArg(b, vmDir)
	initrd := filepath.Join(work, "initrd.img")
	if out, err := exec.Command("cp", filepath.Join(vmDir, "initrd.img"), initrd).CombinedOutput(); err != nil {
		b.Fatalf("cp initrd: %v: %s", err, out)
	}
	if _, err := c.VMKill(ctx, "dp"); err != nil {
		b.Fatal(err)
	}
	raw := measureRaw(b, bootBare(b, imageDir, vmDir, initrd, cmdline), files)
	fmt.Printf("data path, medians of %d (raw: a bare QEMU with banger's kernel, initrd and command line, one extra virtio-serial port)\n", dpRuns)
	fmt.Printf("%-34s %8v %7.1f MB/s  [qemu cpu %v; samples %v]\n", "raw out (guest dd > port)", raw.out.Round(time.Millisecond), mb(bigSize, raw.out), r10(raw.cpu[0]), rounded(raw.all[0]))
	fmt.Printf("%-34s %8v %7.1f MB/s  [qemu cpu %v; samples %v]\n", "raw in (host > port, guest dd)", raw.in.Round(time.Millisecond), mb(bigSize, raw.in), r10(raw.cpu[1]), rounded(raw.all[1]))
	fmt.Printf("%-34s %8v %7.1f MB/s (%d-byte tar stream)  [qemu cpu %v; samples %v]\n", "raw tar out (guest tar -c > port)", raw.tarOut.Round(time.Millisecond), mb(raw.tarOutSize, raw.tarOut), raw.tarOutSize, r10(raw.cpu[2]), rounded(raw.all[2]))
	fmt.Printf("%-34s %8v %7.1f MB/s (%d-byte tar stream)  [qemu cpu %v; samples %v]\n", "raw tar in (port > guest tar -x)", raw.tarIn.Round(time.Millisecond), mb(raw.tarInSize, raw.tarIn), raw.tarInSize, r10(raw.cpu[3]), rounded(raw.all[3]))
	for _, m := range []struct {
		name string
		v    float64
	}{{"raw-out-MB/s", mb(bigSize, raw.out)}, {"raw-in-MB/s", mb(bigSize, raw.in)},
		{"raw-tar-out-s", raw.tarOut.Seconds()}, {"raw-tar-in-s", raw.tarIn.Seconds()}} {
		b.ReportMetric(m.v, m.name)
	}

	// --wait-boot: the figures are the data path's, not the guest's boot
	// (systemd starting its services takes the guest's CPU for seconds).
	e.Must("vm", "start", "--wait-boot", "dp")
	d := &dpVM{b: b, e: e, name: "dp", dir: vmDir, work: work}
	// Each figure is printed once measured, so that a run cut short
	// still shows what it measured.
	d.measure(files, raw)
	fmt.Println("hops alone:")
	for _, h := range d.guestHops() {
		b.ReportMetric(h.mbps, h.metric+"-MB/s")
		fmt.Printf("  %-58s %8.1f MB/s\n", h.label, h.mbps)
	}
}

// report prints and reports a banger figure against its raw counterpart
// (the same size moved in rawT, or for a tree the raw tar stream's).
//
// On a shared machine the load moves every time (a sample can take 4
// times another), so two more ratios are printed beside the medians':
// best of the samples against best, and QEMU's CPU time (the guest's work
// under TCG, which the load hardly changes) of the raw counterpart against
// banger's.
func (d *dpVM) report(label, metric string, s sample, size int64, rawAll []time.Duration, rawCPU time.Duration, rawSize int64, goal float64) {
	t, cpu := s.t, s.cpu
	rawT := median(rawAll)
	mbps, rawMBps := mb(size, t), mb(rawSize, rawT)
	ratio := mbps / rawMBps
	best := mb(size, slices.Min(s.all)) / mb(rawSize, slices.Min(rawAll))
	cpuRatio := rawCPU.Seconds() / cpu.qemu.Seconds()
	ok := "MET"
	if ratio < goal {
		ok = "not met"
	}
	d.b.ReportMetric(mbps, metric+"-MB/s")
	d.b.ReportMetric(ratio, metric+"-ratio")
	d.b.ReportMetric(best, metric+"-best-ratio")
	d.b.ReportMetric(cpuRatio, metric+"-cpu-ratio")
	fmt.Printf("%-34s %8v %7.1f MB/s  %.2f of raw (%.1f MB/s), goal >= %.1f: %s; best-of-%d ratio %.2f, guest cpu ratio %.2f (raw %v)  [cpu: cli %v, bangerd %v, qemu %v; samples %v]\n",
		label, t.Round(time.Millisecond), mbps, ratio, rawMBps, goal, ok, dpRuns, best, cpuRatio, r10(rawCPU), cpu.cli, cpu.daemon, cpu.qemu, rounded(s.all))
}

// reportSparse prints and reports a sparse file's figure: its time and the
// bytes it occupies on side's disk.
func (d *dpVM) reportSparse(label, metric string, s sample, disk int64, side string) {
	data := int64(len(sparseAt) * sparseChunk)
	ok := "MET"
	if s.t >= 2*time.Second || disk > data+sparseChunk {
		ok = "not met"
	}
	d.b.ReportMetric(s.t.Seconds(), metric+"-s")
	d.b.ReportMetric(float64(disk)/(1<<20), metric+"-disk-MiB")
	fmt.Printf("%-34s %8v  %.1f MiB on the %s's disk (data %d MiB), goal < 2s and the data's size: %s  [cpu: cli %v, bangerd %v, qemu %v; samples %v]\n",
		label, s.t.Round(time.Millisecond), float64(disk)/(1<<20), side, data>>20, ok, s.cpu.cli, s.cpu.daemon, s.cpu.qemu, rounded(s.all))
}

func mb(size int64, d time.Duration) float64 { return float64(size) / 1e6 / d.Seconds() }

// r10 rounds d to the clock tick of CPU times.
func r10(d time.Duration) time.Duration { return d.Round(10 * time.Millisecond) }

// rounded returns ds rounded to milliseconds, for printing.
func rounded(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(time.Millisecond)
	}
	return out
}

// dataFiles are the host's sources of the workloads.
type dataFiles struct {
	big       string // bigSize bytes of random data
	bigSum    [32]byte
	tree      string // treeFiles files of treeFile bytes, in 100 directories
	treeTar   string // GNU tar's stream of tree (padded to its records)
	sparse    string // sparseSize bytes, data at sparseAt
	sparseSum [32]byte
}

func makeDataFiles(b *testing.B, dir string) dataFiles {
	f := dataFiles{big: filepath.Join(dir, "big"), tree: filepath.Join(dir, "tree"),
		treeTar: filepath.Join(dir, "tree.tar"), sparse: filepath.Join(dir, "sparse")}
	buf := make([]byte, bigSize)
	rand.Read(buf)
	f.bigSum = sha256.Sum256(buf)
	if err := os.WriteFile(f.big, buf, 0o644); err != nil {
		b.Fatal(err)
	}
	for i := 0; i < treeFiles; i++ {
		d := filepath.Join(f.tree, fmt.Sprintf("d%02d", i/100))
		if i%100 == 0 {
			if err := os.MkdirAll(d, 0o755); err != nil {
				b.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("f%04d", i)), buf[i*treeFile:(i+1)*treeFile], 0o644); err != nil {
			b.Fatal(err)
		}
	}
	if out, err := exec.Command("tar", "-cf", f.treeTar, "-C", f.tree, ".").CombinedOutput(); err != nil {
		b.Fatalf("tar: %v: %s", err, out)
	}
	sp, err := os.Create(f.sparse)
	if err != nil {
		b.Fatal(err)
	}
	if err := sp.Truncate(sparseSize); err != nil {
		b.Fatal(err)
	}
	for i, off := range sparseAt {
		if _, err := sp.WriteAt(buf[i*sparseChunk:(i+1)*sparseChunk], off); err != nil {
			b.Fatal(err)
		}
	}
	if err := sp.Close(); err != nil {
		b.Fatal(err)
	}
	f.sparseSum = fileSum(b, f.sparse)
	return f
}

func fileSum(b *testing.B, path string) [32]byte {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		b.Fatal(err)
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

// rawFigures are the raw channel's medians.
type rawFigures struct {
	out, in, tarOut, tarIn time.Duration
	tarOutSize, tarInSize  int64
	all                    [4][]time.Duration // the samples of out, in, tarOut, tarIn
	cpu                    [4]time.Duration   // QEMU's mean CPU time for out, in, tarOut, tarIn
}

// measureRaw measures the raw channel of vm, then stops it.
func measureRaw(b *testing.B, vm *bareVM, f dataFiles) rawFigures {
	defer vm.stop()
	var r rawFigures
	var out, in, tarOut, tarIn []time.Duration
	// cpu adds QEMU's CPU time during f to r.cpu[k] (a mean of dpRuns).
	cpu := func(k int, f func() time.Duration) time.Duration {
		settle(func(script string) string { return vm.sh(b, script) })
		c0 := procCPU(b, vm.pid)
		d := f()
		r.cpu[k] += (procCPU(b, vm.pid) - c0) / dpRuns
		return d
	}
	for i := 0; i < dpRuns; i++ {
		out = append(out, cpu(0, func() time.Duration {
			return vm.rawOut(b, fmt.Sprintf("dd if=/dev/zero of=$PORT bs=1M count=%d 2>/dev/null", bigSize>>20), bigSize)
		}))
		in = append(in, cpu(1, func() time.Duration {
			return vm.rawIn(b, fmt.Sprintf("dd if=$PORT of=/dev/null bs=1M count=%d iflag=fullblock 2>/dev/null", bigSize>>20), func(w io.Writer) error {
				// 1 MiB writes: the host side is never what slows the guest.
				buf := make([]byte, 1<<20)
				for left := int64(bigSize); left > 0; {
					n, err := w.Write(buf[:min(int64(len(buf)), left)])
					if err != nil {
						return err
					}
					left -= int64(n)
				}
				return nil
			})
		}))
	}
	st, err := os.Stat(f.treeTar)
	if err != nil {
		b.Fatal(err)
	}
	r.tarInSize = st.Size()
	for i := 0; i < dpRuns; i++ {
		// GNU tar reads the port until the archive's end, which the host's
		// stream pads to whole records.
		tarIn = append(tarIn, cpu(3, func() time.Duration {
			return vm.rawIn(b, fmt.Sprintf("mkdir /root/rt%d && tar -xf - -C /root/rt%d < $PORT", i, i), func(w io.Writer) error {
				t, err := os.Open(f.treeTar)
				if err != nil {
					return err
				}
				defer t.Close()
				_, err = io.Copy(w, t)
				return err
			})
		}))
	}
	if n := strings.TrimSpace(vm.sh(b, "find /root/rt0 -type f | wc -l")); n != strconv.Itoa(treeFiles) {
		b.Fatalf("raw tar in: %s files in the guest, want %d", n, treeFiles)
	}
	r.tarOutSize, err = strconv.ParseInt(strings.TrimSpace(vm.sh(b, "tar -cf - -C /root/rt0 . | wc -c")), 10, 64)
	if err != nil {
		b.Fatal(err)
	}
	for i := 0; i < dpRuns; i++ {
		tarOut = append(tarOut, cpu(2, func() time.Duration {
			return vm.rawOut(b, fmt.Sprintf("tar -cf - -C /root/rt%d . > $PORT", i), r.tarOutSize)
		}))
	}
	r.out, r.in, r.tarOut, r.tarIn = median(out), median(in), median(tarOut), median(tarIn)
	r.all = [4][]time.Duration{out, in, tarOut, tarIn}
	return r
}

// dpVM is the banger VM of the benchmark.
type dpVM struct {
	b         *testing.B
	e         *harness.Env
	name, dir string
	work      string
}

// cpuTimes is the CPU time (user and system) the CLI, bangerd and QEMU
// spent on one sample (averaged over the samples).
type cpuTimes struct{ cli, daemon, qemu time.Duration }

type sample struct {
	t   time.Duration
	cpu cpuTimes
	all []time.Duration // every sample's time, for a median
}

func (d *dpVM) qemuPID() int {
	p, err := os.ReadFile(filepath.Join(d.dir, "qemu.pid"))
	if err != nil {
		d.b.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(p)))
	if err != nil {
		d.b.Fatal(err)
	}
	return pid
}

// run runs the CLI with stdin from the file in ("" for none) and stdout
// to /dev/null, and returns how long it took and the CPU it, bangerd and
// QEMU spent.
func (d *dpVM) run(in string, args ...string) sample {
	d.b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := d.e.Command(ctx, args...)
	devnull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		d.b.Fatal(err)
	}
	defer devnull.Close()
	cmd.Stdout = devnull
	var errOut bytes.Buffer
	cmd.Stderr = &errOut
	if in != "" {
		f, err := os.Open(in)
		if err != nil {
			d.b.Fatal(err)
		}
		defer f.Close()
		cmd.Stdin = f
	}
	qpid, dpid := d.qemuPID(), d.e.DaemonPID()
	q0, d0 := procCPU(d.b, qpid), procCPU(d.b, dpid)
	start := time.Now()
	err = cmd.Run()
	t := time.Since(start)
	if err != nil {
		d.b.Fatalf("banger %s: %v\n%s", strings.Join(args, " "), err, errOut.String())
	}
	cli := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	return sample{t: t, cpu: cpuTimes{cli, procCPU(d.b, dpid) - d0, procCPU(d.b, qpid) - q0}}
}

// sh runs script in the guest and returns its output.
func (d *dpVM) sh(script string) string {
	d.b.Helper()
	return d.e.MustExec(d.name, "sh", "-c", script)
}

// medianSample returns the median time of ss with the mean CPU times.
func medianSample(ss []sample) sample {
	var ts []time.Duration
	var cpu cpuTimes
	for _, s := range ss {
		ts = append(ts, s.t)
		cpu.cli += s.cpu.cli
		cpu.daemon += s.cpu.daemon
		cpu.qemu += s.cpu.qemu
	}
	n := time.Duration(len(ss))
	return sample{median(ts), cpuTimes{r10(cpu.cli / n), r10(cpu.daemon / n), r10(cpu.qemu / n)}, ts}
}

// times runs f dpRuns times, prepare (untimed) before each.
func times(sh func(string) string, prepare func(i int), f func(i int) sample) sample {
	var ss []sample
	for i := 0; i < dpRuns; i++ {
		if prepare != nil {
			prepare(i)
		}
		settle(sh)
		ss = append(ss, f(i))
	}
	return medianSample(ss)
}

// settle waits until neither the host nor the guest (sh runs a command in
// it) has dirty data to write back: a sample taken while the kernel
// writes back what the previous one left (a tree extracted, the data
// files made) measures the writeback too (raw out varied from 0.35 s to
// 1.75 s without it).
func settle(sh func(string) string) {
	syscall.Sync()
	sh("sync")
}

// measure measures and reports (a) to (e).
func (d *dpVM) measure(f dataFiles, raw rawFigures) {
	b := d.b
	host := func(i int) string { return filepath.Join(d.work, fmt.Sprintf("out%d", i)) }
	fresh := func(i int) {
		os.RemoveAll(host(i))
		if err := os.Mkdir(host(i), 0o755); err != nil {
			b.Fatal(err)
		}
	}

	// (c) in: the file the other figures read in the guest.
	cpIn := times(d.sh, func(int) { d.sh("rm -f /root/big") }, func(int) sample { return d.run("", "vm", "cp", f.big, d.name+":/root") })
	if got := strings.TrimSpace(d.sh("stat -c %s /root/big")); got != strconv.Itoa(bigSize) {
		b.Fatalf("vm cp in: /root/big has %s bytes, want %d", got, bigSize)
	}
	d.report("(c) vm cp file in", "c-cp-in", cpIn, bigSize, raw.all[1], raw.cpu[1], bigSize, 0.8)
	// (a), (b)
	d.report("(a) vm exec -- cat, out", "a-exec-out",
		times(d.sh, func(int) { d.sh("cat /root/big > /dev/null") }, func(int) sample { return d.run("", "vm", "exec", d.name, "--", "cat", "/root/big") }), bigSize, raw.all[0], raw.cpu[0], bigSize, 0.8)
	d.report("(b) vm exec, stdin in", "b-exec-in",
		times(d.sh, nil, func(int) sample { return d.run(f.big, "vm", "exec", d.name, "--", "sh", "-c", "cat > /dev/null") }), bigSize, raw.all[1], raw.cpu[1], bigSize, 0.8)
	// (c) out
	cpOut := times(d.sh, fresh, func(i int) sample { return d.run("", "vm", "cp", d.name+":/root/big", host(i)) })
	if fileSum(b, filepath.Join(host(0), "big")) != f.bigSum {
		b.Fatal("vm cp out: the file differs from the one copied in")
	}
	d.report("(c) vm cp file out", "c-cp-out", cpOut, bigSize, raw.all[0], raw.cpu[0], bigSize, 0.8)

	// (d)
	treeIn := times(d.sh, func(int) { d.sh("rm -rf /root/tree") }, func(int) sample { return d.run("", "vm", "cp", f.tree, d.name+":/root") })
	if n := strings.TrimSpace(d.sh("find /root/tree -type f | wc -l")); n != strconv.Itoa(treeFiles) {
		b.Fatalf("vm cp tree in: %s files in the guest, want %d", n, treeFiles)
	}
	// A tree's figures compare times: the same tree, as banger's stream
	// and as GNU tar's.
	d.report("(d) vm cp tree in", "d-tree-in", treeIn, raw.tarInSize, raw.all[3], raw.cpu[3], raw.tarInSize, 0.5)
	treeOut := times(d.sh, fresh, func(i int) sample { return d.run("", "vm", "cp", d.name+":/root/tree", host(i)) })
	if n := countFiles(b, filepath.Join(host(0), "tree")); n != treeFiles {
		b.Fatalf("vm cp tree out: %d files on the host, want %d", n, treeFiles)
	}
	d.report("(d) vm cp tree out", "d-tree-out", treeOut, raw.tarOutSize, raw.all[2], raw.cpu[2], raw.tarOutSize, 0.5)

	// (e)
	sparseIn := times(d.sh, func(int) { d.sh("rm -f /root/sparse") }, func(int) sample { return d.run("", "vm", "cp", f.sparse, d.name+":/root") })
	var size, blocks, blockSize int64
	if _, err := fmt.Sscan(d.sh("stat -c '%s %b %B' /root/sparse"), &size, &blocks, &blockSize); err != nil || size != sparseSize {
		b.Fatalf("vm cp sparse in: size %d (%v), want %d", size, err, int64(sparseSize))
	}
	d.reportSparse("(e) 2 GiB sparse file in", "e-sparse-in", sparseIn, blocks*blockSize, "guest")
	sparseOut := times(d.sh, fresh, func(i int) sample { return d.run("", "vm", "cp", d.name+":/root/sparse", host(i)) })
	p := filepath.Join(host(0), "sparse")
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		b.Fatal(err)
	}
	if st.Size != sparseSize || fileSum(b, p) != f.sparseSum {
		b.Fatalf("vm cp sparse out: %d bytes or content differs from the source", st.Size)
	}
	d.reportSparse("(e) 2 GiB sparse file out", "e-sparse-out", sparseOut, st.Blocks*512, "host")
	for i := 0; i < dpRuns; i++ {
		os.RemoveAll(host(i))
	}
}

func countFiles(b *testing.B, dir string) int {
	n := 0
	err := filepath.WalkDir(dir, func(_ string, de fs.DirEntry, err error) error {
		if err == nil && de.Type().IsRegular() {
			n++
		}
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	return n
}

// hop is one hop of the data path measured alone.
type hop struct {
	label, metric string
	mbps          float64
}

// guestHops measures, inside the guest, what the path's ends cost alone
// (the guest's clock times each), and the ciphers in the guest (TCG) and
// on the host (what a KVM guest's CPU would do).
func (d *dpVM) guestHops() []hop {
	b := d.b
	timed := func(script string) time.Duration {
		out := d.sh("s=$(date +%s%N); " + script + "; e=$(date +%s%N); echo $((e-s))")
		ns, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
		if err != nil {
			b.Fatalf("guest timing of %q: %q", script, out)
		}
		return time.Duration(ns)
	}
	tarSize, err := strconv.ParseInt(strings.TrimSpace(d.sh("tar -cf - -C /root/tree . | wc -c")), 10, 64)
	if err != nil {
		b.Fatal(err)
	}
	d.sh("tar -cf /root/tree.tar -C /root/tree . && mkdir -p /root/x")
	hops := []hop{
		{"guest: head -c 200MiB /dev/zero > /dev/null", "guest-produce", mb(bigSize, timed(fmt.Sprintf("head -c %d /dev/zero > /dev/null", bigSize)))},
		{"guest: cat 200MiB file > /dev/null", "guest-cat-file", mb(bigSize, timed("cat /root/big > /dev/null"))},
		{"guest: cat 200MiB file | cat > /dev/null (a pipe)", "guest-cat-pipe", mb(bigSize, timed("cat /root/big | cat > /dev/null"))},
		{"guest: tar -c of the tree | cat > /dev/null", "guest-tar-c", mb(tarSize, timed("tar -cf - -C /root/tree . | cat > /dev/null"))},
		{"guest: tar -x of the tree from a local file", "guest-tar-x", mb(tarSize, timed("tar -xf /root/tree.tar -C /root/x"))},
	}
	d.e.InstallGuestTool(d.name)
	parse := func(where, out string) {
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			var name string
			var v float64
			if _, err := fmt.Sscanf(l, "%s %f MB/s", &name, &v); err != nil {
				b.Fatalf("cipherbench: %q: %v", l, err)
			}
			hops = append(hops, hop{where + ": " + name, where + "-" + name, v})
		}
	}
	parse("guest", d.e.MustExec(d.name, harness.GuestToolPath, "cipherbench", "-t", "2"))
	out, err := exec.Command(filepath.Join(d.e.Dir(), "guesttool"), "cipherbench", "-t", "1").Output()
	if err != nil {
		b.Fatalf("cipherbench on the host: %v", err)
	}
	parse("host", string(out))
	return hops
}
