//go:build e2e

package bench

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/test/harness"
)

// BenchmarkBundleInstall: `banger image pull` of a catalog image (a
// bundle of the test image's rootfs, served on 127.0.0.1: downloaded,
// decompressed, every file's sha256 and the bundle's checked, written
// sparse, registered) against `curl -s URL | zstd -d > file` from the same
// server, same bundle, alternating; goal: pull throughput >= 0.9 of
// curl | zstd. Throughput is the bundle's compressed bytes per second.
func BenchmarkBundleInstall(b *testing.B) {
	for _, tool := range []string{"curl", "zstd"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Fatalf("%s not found: install it (scripts/install-deps.sh)", tool)
		}
	}
	binDir, imageDir, err := harness.Locate()
	if err != nil {
		b.Fatal(err)
	}
	bundles := harness.MakeBundles(b, imageDir, "catdeb", "catkernel")
	base := harness.ServeBundles(b, bundles, nil)
	catalogURL, imageURL := base+"/catalog.json", base+"/image.tar.zst"
	e := harness.NewWithConfig(b, binDir, imageDir, fmt.Sprintf("catalog_urls = [%q]\n", catalogURL))
	e.Must("kernel", "pull", "catkernel") // not measured
	// curl's output goes next to the daemon's state: the same filesystem.
	out := filepath.Join(e.StateDir(), "curl-out.tar")
	var pulls, curls, pullCPU, curlCPU []time.Duration
	const rounds = 3
	for range rounds {
		os.Remove(out)
		exec.Command("sync").Run()
		c0 := cpuTime(syscall.RUSAGE_CHILDREN)
		start := time.Now()
		cmd := exec.Command("sh", "-c", `curl -sSf "$1" | zstd -dq > "$2"`, "sh", imageURL, out)
		if o, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("curl | zstd: %v\n%s", err, o)
		}
		curls = append(curls, time.Since(start))
		curlCPU = append(curlCPU, cpuTime(syscall.RUSAGE_CHILDREN)-c0)
		os.Remove(out)

		exec.Command("sync").Run()
		d0 := procCPU(b, e.DaemonPID())
		start = time.Now()
		e.Must("image", "pull", "catdeb")
		pulls = append(pulls, time.Since(start))
		pullCPU = append(pullCPU, procCPU(b, e.DaemonPID())-d0)
		e.Must("image", "rm", "catdeb")
	}
	mbps := func(d time.Duration) float64 { return float64(bundles.Image.Size) / 1e6 / d.Seconds() }
	pull, curl := mbps(median(pulls)), mbps(median(curls))
	b.ReportMetric(pull, "pull-MB/s")
	b.ReportMetric(curl, "curl-zstd-MB/s")
	b.ReportMetric(pull/curl, "ratio")
	// The machines are shared: wall time swings with the load; CPU time
	// (bangerd's for the pull, curl's and zstd's) says what each costs.
	pc, cc := median(pullCPU), median(curlCPU)
	b.ReportMetric(cc.Seconds()/pc.Seconds(), "cpu-ratio")
	fmt.Printf("bundle install CPU time: bangerd %v, curl + zstd %v (ratio curl / pull %.2f)\n", pc, cc, cc.Seconds()/pc.Seconds())
	fmt.Printf("bundle install (%.0f MB compressed): banger image pull %.1f MB/s (median of %v), curl | zstd -d %.1f MB/s (median of %v): ratio %.2f (goal >= 0.9)\n",
		float64(bundles.Image.Size)/1e6, pull, pulls, curl, curls, pull/curl)
}

// procCPU is the user + system time of a running process (/proc/PID/stat,
// in clock ticks of 10 ms).
func procCPU(b *testing.B, pid int) time.Duration {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	s := string(raw)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:]) // from field 3 (state) on
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond
}
