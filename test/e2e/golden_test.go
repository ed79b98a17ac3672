//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/test/harness"
)

// TestGoldenLocalBuild: with an empty state directory and only the
// catalogs compiled into banger (whose debian-bookworm and generic-6.1
// entries have no bundle a machine of ours can fetch), `image pull
// debian-bookworm` builds the golden image and its kernel from Debian's
// archive and npm (docs/golden-image.md), and a VM of it has tmux, docker,
// mise and opencode on PATH, a running sshd and dockerd, and the user dev.
//
// It reaches Debian's archive and npm and takes many minutes (figures in
// docs/golden-image.md): it runs under CI=1 or BANGER_E2E_GOLDEN=1 only,
// and nothing is cached across runs (a fresh state directory each time).
func TestGoldenLocalBuild(t *testing.T) {
	if os.Getenv("CI") != "1" && os.Getenv("BANGER_E2E_GOLDEN") != "1" {
		t.Skip("long (builds the golden image from Debian's archive and npm): set BANGER_E2E_GOLDEN=1 (CI=1 runs it)")
	}
	// The test harness turns the embedded catalogs and local builds off
	// (no test builds or downloads by accident): this one needs both.
	e := harness.NewWithConfig(t, binDir, imageDir, "embedded_catalogs = true\nlocal_builds = true\ndefault_kernel_name = \"generic-6.1\"\n")

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 75*time.Minute)
	defer cancel()
	var out, errOut bytes.Buffer
	pull := e.Command(ctx, "image", "pull", "debian-bookworm")
	pull.Stdout, pull.Stderr = &out, &errOut
	if err := pull.Run(); err != nil {
		t.Fatalf("image pull debian-bookworm: %v\nstdout: %s\nstderr: %s", err, out.String(), lastLines(errOut.String(), 40))
	}
	built := time.Since(start)
	t.Logf("image pull debian-bookworm (local build of the image and its kernel): %s", built.Round(time.Second))
	if !strings.Contains(errOut.String()+out.String(), "provision") {
		t.Errorf("the pull's progress never named the provision phase:\n%s", lastLines(errOut.String(), 40))
	}

	var im api.Image
	if err := json.Unmarshal([]byte(e.Must("image", "inspect", "debian-bookworm")), &im); err != nil {
		t.Fatal(err)
	}
	if im.Source != api.SourceLocalBuild || im.Version == "" || im.KernelName != "generic-6.1" || im.User != "dev" {
		t.Errorf("image: source %q version %q kernel %q user %q", im.Source, im.Version, im.KernelName, im.User)
	}
	var k api.Kernel
	if err := json.Unmarshal([]byte(e.Must("kernel", "inspect", "generic-6.1")), &k); err != nil {
		t.Fatal(err)
	}
	if k.Source != api.SourceLocalBuild || !strings.HasSuffix(k.Release, "-cloud-amd64") {
		t.Errorf("kernel: source %q release %q", k.Source, k.Release)
	}
	// No SSH host keys baked into the image: each VM gets its own.
	if ls, err := exec.Command("debugfs", "-R", "ls /etc/ssh", im.Rootfs).Output(); err != nil {
		t.Errorf("debugfs ls /etc/ssh: %v", err)
	} else if strings.Contains(string(ls), "ssh_host_") {
		t.Errorf("the image has SSH host keys: %s", ls)
	}
	// The kernel's modules are in the image (docker loads overlay, br_netfilter).
	if ls, err := exec.Command("debugfs", "-R", "ls /lib/modules/"+k.Release, im.Rootfs).CombinedOutput(); err != nil || !strings.Contains(string(ls), "modules.dep") {
		t.Errorf("the image lacks /lib/modules/%s: %v %s", k.Release, err, ls)
	}

	bootStart := time.Now()
	e.Must("vm", "create", "--name", "golden", "--image", "debian-bookworm", "--memory", "2048", "--start", "--wait-boot")
	t.Logf("boot to ready (systemd booted): %s", time.Since(bootStart).Round(time.Second))

	for _, tool := range []string{"tmux", "docker", "mise", "opencode"} {
		if o, se, code := e.Exec("golden", "sh", "-c", "command -v "+tool); code != 0 {
			t.Errorf("%s is not on PATH: %s %s", tool, o, se)
		}
	}
	for _, argv := range [][]string{{"tmux", "-V"}, {"mise", "--version"}, {"opencode", "--version"}, {"docker", "--version"}} {
		o, se, code := e.Exec("golden", argv...)
		if code != 0 {
			t.Errorf("%s: exit %d: %s %s", strings.Join(argv, " "), code, o, se)
			continue
		}
		t.Logf("%s: %s", strings.Join(argv, " "), strings.TrimSpace(o))
	}
	if o, _, _ := e.Exec("golden", "systemctl", "is-active", "ssh"); strings.TrimSpace(o) != "active" {
		t.Errorf("sshd: %q", o)
	}
	if o := e.MustExec("golden", "id", "dev"); !strings.Contains(o, "uid=1000(dev)") || !strings.Contains(o, "(docker)") || !strings.Contains(o, "(sudo)") {
		t.Errorf("user dev: %q", o)
	}
	if _, se, code := e.Exec("golden", "su", "-s", "/bin/sh", "dev", "-c", "sudo -n true"); code != 0 {
		t.Errorf("dev has no passwordless sudo: %s", se)
	}
	// dockerd: enabled in the image, started by systemd (slow under TCG).
	var state string
	harness.WaitFor(t, 3*time.Minute, "dockerd active", func() bool {
		o, _, _ := e.Exec("golden", "systemctl", "is-active", "docker")
		state = strings.TrimSpace(o)
		return state == "active" || state == "failed"
	})
	if state != "active" {
		o, _, _ := e.Exec("golden", "journalctl", "-u", "docker", "--no-pager", "-n", "30")
		t.Fatalf("dockerd is %s:\n%s", state, o)
	}
	if o, se, code := e.Exec("golden", "docker", "version", "--format", "{{.Client.Version}} {{.Server.Version}}"); code != 0 {
		t.Errorf("docker version: exit %d: %s %s", code, o, se)
	} else {
		t.Logf("docker client and server: %s", strings.TrimSpace(o))
	}
	t.Logf("whole test: %s", time.Since(start).Round(time.Second))
}

// lastLines is s's last n lines.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
