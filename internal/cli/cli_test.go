package cli

import (
	"bytes"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/api"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"1024": 1024, "4K": 4 << 10, "512M": 512 << 20, "2G": 2 << 30, "20GiB": 20 << 30, "1t": 1 << 40, "3MB": 3 << 20,
	} {
		got, err := parseSize(in, 1)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	if got, _ := parseSize("768", 1<<20); got != 768<<20 {
		t.Errorf("default unit: %d", got)
	}
	for _, bad := range []string{"", "lots", "-1G", "0", "1.5G", "G", "10X", "99999999999T"} {
		if _, err := parseSize(bad, 1); err == nil {
			t.Errorf("parseSize(%q) accepted", bad)
		}
	}
}

func TestSplitRemote(t *testing.T) {
	for in, want := range map[string][3]string{
		"dev:/root":    {"dev", "/root", "true"},
		"./a:b":        {"", "./a:b", "false"},
		"/abs/path":    {"", "/abs/path", "false"},
		"Bad_Name:/x":  {"", "Bad_Name:/x", "false"},
		"box-2:/a/b:c": {"box-2", "/a/b:c", "true"},
		":/nothing":    {"", ":/nothing", "false"},
	} {
		n, p, ok := splitRemote(in)
		if n != want[0] || p != want[1] || (ok && want[2] != "true") || (!ok && want[2] != "false") {
			t.Errorf("splitRemote(%q) = %q %q %v", in, n, p, ok)
		}
	}
}

func TestProgressLines(t *testing.T) {
	var b bytes.Buffer
	p := &progress{w: &b}
	p.update(api.Progress{Phase: "boot"})
	for i := int64(0); i <= 100; i += 5 {
		p.update(api.Progress{Phase: "copy rootfs", Done: i << 20, Total: 100 << 20})
	}
	out := b.String()
	for _, want := range []string{"==> boot", "==> copy rootfs", "(0%)", "(25%)", "(50%)", "(100%)", "100.0 MiB / 100.0 MiB"} {
		if !strings.Contains(out, want) {
			t.Errorf("progress output lacks %q:\n%s", want, out)
		}
	}
	if strings.Count(out, "\n") > 8 {
		t.Errorf("too chatty when not a terminal:\n%s", out)
	}
}

func TestUnreachableMessage(t *testing.T) {
	a := &app{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}}
	root := a.rootCmd()
	root.SetArgs([]string{"--socket", t.TempDir() + "/none.sock", "vm", "ls"})
	err := root.Execute()
	if err == nil {
		t.Fatal("vm ls without a daemon succeeded")
	}
	msg := explain(err, a.cfg.SocketPath)
	if !strings.Contains(msg, "bangerd is not running") || !strings.Contains(msg, "systemctl start bangerd") {
		t.Fatalf("message: %s", msg)
	}
}

// Flags after the VM name belong to the guest command.
func TestExecArgsAfterNameAreTheCommand(t *testing.T) {
	a := &app{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}}
	root := a.rootCmd()
	exec, _, err := root.Find([]string{"vm", "exec"})
	if err != nil {
		t.Fatal(err)
	}
	if err := exec.ParseFlags([]string{"-t", "box", "ls", "-la", "--color"}); err != nil {
		t.Fatalf("parse: %v", err)
	}
	if got := exec.Flags().Args(); strings.Join(got, " ") != "box ls -la --color" {
		t.Fatalf("args = %q", got)
	}
	if tty, _ := exec.Flags().GetBool("tty"); !tty {
		t.Fatal("-t before the name was not parsed")
	}
}

// `vm exec NAME -- CMD` and `vm exec NAME CMD` run the same command.
func TestExecDoubleDash(t *testing.T) {
	a := &app{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}}
	exec, _, _ := a.rootCmd().Find([]string{"vm", "exec"})
	for _, args := range [][]string{{"box", "--", "ls", "-la"}, {"box", "ls", "-la"}, {"-t", "box", "--", "ls", "-la"}} {
		if err := exec.ParseFlags(args); err != nil {
			t.Fatal(err)
		}
		rest := exec.Flags().Args()
		if rest[0] != "box" || strings.Join(guestArgv(rest[1:]), " ") != "ls -la" {
			t.Errorf("%q: name %q argv %q", args, rest[0], guestArgv(rest[1:]))
		}
	}
}

func TestNetColumns(t *testing.T) {
	for _, tc := range []struct {
		n         *api.NetworkInfo
		ip, ports string
	}{
		{nil, "-", "-"},
		{&api.NetworkInfo{Mode: "user", Ports: []api.PortForward{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 80}}}, "user", "127.0.0.1:8080->80/tcp"},
		{&api.NetworkInfo{Mode: "bridge", IP: "10.77.0.2", Ports: []api.PortForward{
			{Proto: "tcp", HostIP: "0.0.0.0", HostPort: 2222, GuestPort: 22}, {Proto: "udp", HostIP: "127.0.0.1", HostPort: 53, GuestPort: 53}}},
			"10.77.0.2", "0.0.0.0:2222->22/tcp,127.0.0.1:53->53/udp"},
		{&api.NetworkInfo{Mode: "user", PublishAll: true, Ports: []api.PortForward{
			{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 80}, {Proto: "tcp", HostIP: "127.0.0.1", HostPort: 3000, GuestPort: 3000, Auto: true}}},
			"user", "127.0.0.1:8080->80/tcp,127.0.0.1:3000->3000/tcp(auto)"},
	} {
		if ip, ports := netColumns(tc.n); ip != tc.ip || ports != tc.ports {
			t.Errorf("netColumns(%+v) = %q, %q; want %q, %q", tc.n, ip, ports, tc.ip, tc.ports)
		}
	}
}

func TestImageColumns(t *testing.T) {
	for in, want := range map[string]string{
		"sha256:0123456789abcdef0123": "sha256:0123456789ab",
		"0123456789abcdef":            "sha256:0123456789ab",
		"sha256:abc":                  "sha256:abc",
		"":                            "-",
	} {
		if got := shortDigest(in); got != want {
			t.Errorf("shortDigest(%q) = %q, want %q", in, got, want)
		}
	}
	if sourceText("registered", true) != "promoted" || sourceText("registered", false) != "registered" || sourceText("", false) != "-" {
		t.Error("sourceText")
	}
	for in, want := range map[string]bool{"generic-6.1": true, "debcloud": true, "a..b": false, "vmlinuz.": false, "./vmlinuz": false, "/boot/vmlinuz": false, "Bad": false, "": false} {
		if got := isKernelName(in); got != want {
			t.Errorf("isKernelName(%q) = %v, want %v", in, got, want)
		}
	}
}
