//go:build e2e

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/test/harness"
)

// TestReady: a VM that vm start/run calls started is usable at once. With
// systemd, early boot (sysinit.target: tmpfiles, /dev/pts) is over before
// the first command runs; every start records a boot timeline.
func TestReady(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	banger := filepath.Join(binDir, "banger")

	t.Run("tmp-survives-early-boot", func(t *testing.T) {
		e.T = t
		// systemd-tmpfiles-setup empties /tmp during early boot: a command
		// started before it would lose its file.
		out, errOut, code := e.Banger("vm", "run", "--rm", "--image", "debian", "--", "sh", "-c", "echo x > /tmp/f; sleep 10; cat /tmp/f")
		if code != 0 || strings.TrimSpace(out) != "x" {
			t.Fatalf("vm run: exit %d, stdout %q, stderr %s", code, out, errOut)
		}
	})

	t.Run("pty-right-after-start", func(t *testing.T) {
		e.T = t
		// The seed's first command: vm run without a command opens a
		// shell on a terminal, which needs /dev/pts in the guest.
		cmd := exec.Command("script", "-qfec", strings.Join([]string{banger, "--socket", e.Socket(),
			"vm", "run", "--rm", "--image", "debian"}, " "), "/dev/null")
		cmd.Env = append(os.Environ(), "XDG_CONFIG_HOME="+t.TempDir())
		cmd.Stdin = strings.NewReader("tty; echo shell-ok; exit 0\n")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("script: %v\n%s", err, out)
		}
		if !strings.Contains(string(out), "/dev/pts/") || !strings.Contains(string(out), "shell-ok") {
			t.Fatalf("no shell on a terminal right after the start: %q", out)
		}
		// And with a command: vm run -t.
		cmd = exec.Command("script", "-qfec", strings.Join([]string{banger, "--socket", e.Socket(),
			"vm", "run", "--rm", "-t", "--image", "debian", "--", "tty"}, " "), "/dev/null")
		cmd.Env = append(os.Environ(), "XDG_CONFIG_HOME="+t.TempDir())
		out, err = cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "/dev/pts/") {
			t.Fatalf("vm run -t -- tty: %v\n%q", err, out)
		}
	})

	want := []string{api.PhaseClone, api.PhaseInitramfs, api.PhaseVMMStart, api.PhaseKernelToAgent, api.PhaseEarlyBoot, api.PhaseFullBoot}
	t.Run("timeline", func(t *testing.T) {
		e.T = t
		e.Must("vm", "create", "--name", "tl", "--image", "debian")
		defer e.Banger("vm", "rm", "-f", "tl")
		_, errOut, code := e.Banger("vm", "start", "--timings", "tl")
		if code != 0 {
			t.Fatalf("vm start --timings: exit %d: %s", code, errOut)
		}
		t.Logf("vm start --timings:\n%s", errOut)
		last := -1
		for _, p := range want {
			re := regexp.MustCompile(`(?m)^  ` + p + `\s+\S+`)
			loc := re.FindStringIndex(errOut)
			if loc == nil || loc[0] < last {
				t.Fatalf("--timings lacks phase %q (or out of order):\n%s", p, errOut)
			}
			last = loc[0]
		}
		vm := e.Inspect("tl")
		tl := vm.BootTimeline
		if tl == nil || !tl.Ready {
			t.Fatalf("inspect: boot timeline %+v", tl)
		}
		var names []string
		for _, p := range tl.Phases {
			names = append(names, p.Name)
		}
		if !slices.Equal(names, want) {
			t.Fatalf("inspect: phases %v, want %v", names, want)
		}
		for _, p := range tl.Phases[:len(tl.Phases)-1] {
			if p.Running || p.DurationMS <= 0 {
				t.Errorf("phase %s: running %v, duration %.3f ms", p.Name, p.Running, p.DurationMS)
			}
		}
		// Full boot is recorded in the background after the start.
		harness.WaitFor(t, 3*time.Minute, "the full boot in vm inspect", func() bool {
			tl := e.Inspect("tl").BootTimeline
			return tl != nil && tl.Done
		})
		tl = e.Inspect("tl").BootTimeline
		if p := tl.Phases[len(tl.Phases)-1]; p.Name != api.PhaseFullBoot || p.Running || p.DurationMS <= 0 {
			t.Errorf("full boot phase %+v", p)
		}
		if out := e.Must("vm", "exec", "tl", "--", "systemctl", "is-active", "sysinit.target"); strings.TrimSpace(out) != "active" {
			t.Errorf("sysinit.target %q after the start", out)
		}
	})

	t.Run("busybox", func(t *testing.T) {
		e.T = t
		out, errOut, code := e.Banger("vm", "run", "--rm", "--timings", "--image", "tiny", "--", "sh", "-c", "echo x > /tmp/f; cat /tmp/f; test -e /dev/pts/ptmx && echo pts")
		if code != 0 || strings.TrimSpace(out) != "x\npts" {
			t.Fatalf("vm run (no init): exit %d, stdout %q, stderr %s", code, out, errOut)
		}
		if !regexp.MustCompile(`(?m)^  early boot\s+\S+`).MatchString(errOut) {
			t.Errorf("--timings without the early boot phase:\n%s", errOut)
		}
	})
}
