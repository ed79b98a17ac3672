package cli

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/doctor"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/sshcfg"
)

// fakeDaemon serves handlers on a unix socket and records the methods
// called, in order.
type fakeDaemon struct {
	sock, dir string
	mu        sync.Mutex
	calls     []string
}

func (d *fakeDaemon) called() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.calls)
}

func startFakeDaemon(t *testing.T, handlers map[string]rpc.Handler) *fakeDaemon {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "bgrssh") // unix socket paths are short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &fakeDaemon{sock: filepath.Join(dir, "bangerd.sock"), dir: dir}
	l, err := net.Listen("unix", d.sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := rpc.NewServer(slog.New(slog.DiscardHandler), nil)
	for m, h := range handlers {
		var opts []rpc.Option
		if m == api.MethodVMTunnel || m == api.MethodVMExec {
			opts = append(opts, rpc.TakesInput())
		}
		srv.Handle(m, rpc.PermWrite, func(ctx context.Context, call *rpc.Call) (any, error) {
			d.mu.Lock()
			d.calls = append(d.calls, m)
			d.mu.Unlock()
			return h(ctx, call)
		}, opts...)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); <-served })
	return d
}

// sshTestApp runs banger commands in-process against sock, with the ssh
// files of a user whose home is a temporary directory.
type sshTestApp struct {
	a              *app
	stdout, stderr *bytes.Buffer
	files          sshcfg.Files
	cfg, sock      string
}

func newSSHTestApp(t *testing.T, sock string, stdin io.Reader) *sshTestApp {
	t.Helper()
	home := t.TempDir()
	cfg := filepath.Join(home, "config.toml")
	if err := os.WriteFile(cfg, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	u := sshcfg.User{Name: "me", UID: os.Getuid(), GID: os.Getgid(), Home: home}
	s := &sshTestApp{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, cfg: cfg, sock: sock}
	s.a = &app{stdin: stdin, stdout: s.stdout, stderr: s.stderr, sshUser: &u, sshBanger: "/usr/bin/banger"}
	s.files = sshcfg.New(u, "", "/usr/bin/banger")
	return s
}

func (s *sshTestApp) run(args ...string) error {
	root := s.a.rootCmd()
	root.SetArgs(append([]string{"--config", s.cfg, "--socket", s.sock}, args...))
	return root.ExecuteContext(context.Background())
}

// fakeSSH puts an ssh on PATH that writes its arguments, one a line, to
// the returned file, and exits with $FAKE_SSH_EXIT.
func fakeSSH(t *testing.T) (argsFile string) {
	t.Helper()
	dir := t.TempDir()
	argsFile = filepath.Join(dir, "args")
	script := `#!/bin/sh
for a in "$@"; do printf '%s\n' "$a"; done > "` + argsFile + `"
exit ${FAKE_SSH_EXIT:-0}
`
	if err := os.WriteFile(filepath.Join(dir, "ssh"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	return argsFile
}

func readArgs(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("fake ssh did not run: %v", err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func newHostKey(t *testing.T) (ssh.Signer, string) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return s, strings.TrimSpace(string(ssh.MarshalAuthorizedKey(s.PublicKey())))
}

func sshInfoHandler(info api.SSHInfo) rpc.Handler {
	return func(ctx context.Context, call *rpc.Call) (any, error) {
		var p api.NameParams
		if err := call.Decode(&p); err != nil {
			return nil, err
		}
		info.Name = p.Name
		return info, nil
	}
}

func TestVMSSHRunsSystemSSH(t *testing.T) {
	argsFile := fakeSSH(t)
	_, key := newHostKey(t)
	state := api.StateRunning
	d := startFakeDaemon(t, map[string]rpc.Handler{
		api.MethodVMSSHInfo: sshInfoHandler(api.SSHInfo{User: "dev", HostKeys: []string{key}, Direct: "10.77.0.5:22"}),
		api.MethodVMInspect: func(ctx context.Context, call *rpc.Call) (any, error) {
			return api.VM{Name: "box", State: state}, nil
		},
	})
	s := newSSHTestApp(t, d.sock, nil)
	t.Setenv("FAKE_SSH_EXIT", "3")
	err := s.run("vm", "ssh", "-A", "-L", "8080:localhost:80", "-vp2222", "-oServerAliveInterval=5", "box.banger", "--", "ls", "-la")
	var ee exitError
	if !errors.As(err, &ee) || ee.code != 3 {
		t.Fatalf("vm ssh: %v, want ssh's exit code 3", err)
	}
	f := s.files
	want := []string{"-A", "-L", "8080:localhost:80", "-vp2222", "-oServerAliveInterval=5",
		"-o", "ProxyCommand=/usr/bin/banger vm ssh-proxy --config " + s.cfg + " --socket " + d.sock + " %h",
		"-o", "UserKnownHostsFile=" + f.KnownHosts, "-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no",
		"-o", "IdentityFile=" + f.Key, "-o", "IdentitiesOnly=yes",
		"-l", "dev", "--", "box.banger", "ls", "-la"}
	if got := readArgs(t, argsFile); !slices.Equal(got, want) {
		t.Errorf("ssh argv:\n%q\nwant:\n%q", got, want)
	}
	kh, _ := os.ReadFile(f.KnownHosts)
	if !strings.HasPrefix(string(kh), "box.banger "+key) {
		t.Errorf("known_hosts:\n%s\nwant box.banger's key", kh)
	}
	if hosts, _ := f.Hosts(); len(hosts) != 1 || hosts[0] != (sshcfg.Host{Name: "box", User: "dev", Direct: "10.77.0.5:22"}) {
		t.Errorf("ssh config hosts %+v, want box (dev, its address)", hosts)
	}
	if _, err := os.Stat(f.Key); err != nil {
		t.Errorf("no key made: %v", err)
	}

	// A user given with USER@ or -l replaces the image's.
	t.Setenv("FAKE_SSH_EXIT", "0")
	if err := s.run("vm", "ssh", "root@box"); err != nil {
		t.Fatal(err)
	}
	got := readArgs(t, argsFile)
	if got[len(got)-4] != "-l" || got[len(got)-3] != "root" || got[len(got)-1] != "box.banger" {
		t.Errorf("ssh argv %q, want -l root -- box.banger", got)
	}
	if err := s.run("vm", "ssh", "-l", "admin", "box", "uptime"); err != nil {
		t.Fatal(err)
	}
	got = readArgs(t, argsFile)
	if slices.Contains(got, "dev") || !slices.Equal(got[:2], []string{"-l", "admin"}) || !slices.Equal(got[len(got)-3:], []string{"--", "box.banger", "uptime"}) {
		t.Errorf("ssh argv %q, want only the user's -l admin", got)
	}

	// A stopped VM is an error that says what to do; ssh doesn't run.
	state = api.StateStopped
	os.Remove(argsFile)
	if err := s.run("vm", "ssh", "box"); err == nil || !strings.Contains(err.Error(), "banger vm start box") {
		t.Errorf("vm ssh of a stopped VM: %v", err)
	}
	if _, err := os.Stat(argsFile); err == nil {
		t.Error("ssh ran for a stopped VM")
	}
}

func TestVMSSHCommandLineErrors(t *testing.T) {
	for args, want := range map[string]string{
		"-Z box":        "unknown ssh flag -Z",
		"-L":            "needs an argument",
		"-A":            "no VM named",
		"--colour box":  "unknown flag --colour",
		"-At -i":        "needs an argument",
		"--socket":      "needs an argument",
		"-46AaCfGgKk -": "",
	} {
		c, err := (&app{}).parseSSHCommandLine(strings.Fields(args))
		if want == "" {
			if err != nil || c.name != "-" {
				t.Errorf("%q: %+v, %v", args, c, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", args, err, want)
		}
	}
	a := &app{}
	c, err := a.parseSSHCommandLine([]string{"-i", "k", "--socket=/s", "-Dlocalhost:1080", "--config", "/c", "-N", "me@web", "a", "--", "b"})
	if err != nil || c.name != "web" || c.user != "me" || !slices.Equal(c.command, []string{"a", "--", "b"}) ||
		!slices.Equal(c.sshFlags, []string{"-i", "k", "-Dlocalhost:1080", "-N"}) || a.socket != "/s" || a.configPath != "/c" {
		t.Errorf("parse: %+v %v (socket %q config %q)", c, err, a.socket, a.configPath)
	}
}

// echoServer accepts one loopback TCP connection, reads until EOF and
// answers "got: " and what it read.
func echoServer(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		c.Write(append([]byte("got: "), b...))
	}()
	return l.Addr().String()
}

func TestSSHProxyDirect(t *testing.T) {
	addr := echoServer(t)
	_, key := newHostKey(t)
	d := startFakeDaemon(t, map[string]rpc.Handler{
		api.MethodVMSSHInfo: sshInfoHandler(api.SSHInfo{User: "dev", HostKeys: []string{key}, Direct: addr}),
		api.MethodVMTunnel: func(ctx context.Context, call *rpc.Call) (any, error) {
			return nil, errors.New("tunnel used although the guest was reachable")
		},
	})
	s := newSSHTestApp(t, d.sock, strings.NewReader("hello"))
	if err := s.run("vm", "ssh-proxy", "box.banger"); err != nil {
		t.Fatal(err)
	}
	if s.stdout.String() != "got: hello" {
		t.Errorf("stdout %q, want the server's answer only", s.stdout)
	}
	if kh, _ := os.ReadFile(s.files.KnownHosts); !strings.HasPrefix(string(kh), "box.banger "+key) {
		t.Errorf("known_hosts:\n%s\nwant box.banger's key", kh)
	}
	if c := d.called(); !slices.Equal(c, []string{api.MethodVMSSHInfo}) {
		t.Errorf("daemon calls %v, want ssh_info only", c)
	}
}

// tunnelEcho is a tunnel that answers "tunnel: " and its input in upper
// case once the client sent EOF.
func tunnelEcho(t *testing.T) rpc.Handler {
	return func(ctx context.Context, call *rpc.Call) (any, error) {
		var p api.VMTunnelParams
		if err := call.Decode(&p); err != nil {
			return nil, err
		}
		if !p.SSH || p.Name != "box" {
			t.Errorf("tunnel params %+v, want box's SSH", p)
		}
		var in []byte
		for f := range call.Frames() {
			if f.Type == api.FrameEOF {
				break
			}
			in = append(in, f.Data...)
		}
		return nil, call.Send(api.Frame{Type: api.FrameStdout, Data: []byte("tunnel: " + strings.ToUpper(string(in)))})
	}
}

func TestSSHProxyTunnel(t *testing.T) {
	// An address that refuses: the proxy falls back to the tunnel.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	l.Close()
	for _, direct := range []string{"", closed} {
		d := startFakeDaemon(t, map[string]rpc.Handler{
			api.MethodVMSSHInfo: sshInfoHandler(api.SSHInfo{User: "dev", Direct: direct}),
			api.MethodVMTunnel:  tunnelEcho(t),
		})
		s := newSSHTestApp(t, d.sock, strings.NewReader("hello"))
		if err := s.run("vm", "ssh-proxy", "box"); err != nil {
			t.Fatalf("direct %q: %v", direct, err)
		}
		if s.stdout.String() != "tunnel: HELLO" {
			t.Errorf("direct %q: stdout %q, want the tunnel's answer", direct, s.stdout)
		}
		if c := d.called(); !slices.Equal(c, []string{api.MethodVMSSHInfo, api.MethodVMTunnel}) {
			t.Errorf("direct %q: daemon calls %v", direct, c)
		}
		if !strings.Contains(s.stderr.String(), "no SSH host keys") {
			t.Errorf("direct %q: stderr %q, want a word on the missing host keys", direct, s.stderr)
		}
	}
}

// With no access to the daemon, the proxy uses the address the config
// block gave it.
func TestSSHProxyDirectHint(t *testing.T) {
	addr := echoServer(t)
	s := newSSHTestApp(t, filepath.Join(t.TempDir(), "none.sock"), strings.NewReader("hi"))
	if err := s.run("vm", "ssh-proxy", "box"); err == nil || !strings.Contains(err.Error(), "bangerd is not running") {
		t.Errorf("no daemon, no hint: %v, want the daemon's absence explained", err)
	}
	if err := s.run("vm", "ssh-proxy", "--direct", addr, "box.banger"); err != nil {
		t.Fatal(err)
	}
	if s.stdout.String() != "got: hi" {
		t.Errorf("stdout %q", s.stdout)
	}
}

func TestSSHConfigCommand(t *testing.T) {
	_, k1 := newHostKey(t)
	d := startFakeDaemon(t, map[string]rpc.Handler{
		api.MethodVMList: func(ctx context.Context, call *rpc.Call) (any, error) {
			return []api.VM{{Name: "web"}, {Name: "box"}}, nil
		},
		api.MethodVMSSHInfo: func(ctx context.Context, call *rpc.Call) (any, error) {
			var p api.NameParams
			call.Decode(&p)
			if p.Name == "web" {
				return api.SSHInfo{Name: "web", User: "admin", HostKeys: []string{k1}, Direct: "10.77.0.9:22"}, nil
			}
			return api.SSHInfo{Name: p.Name, User: "root"}, nil
		},
	})
	s := newSSHTestApp(t, d.sock, nil)
	if err := s.run("ssh-config"); err != nil {
		t.Fatal(err)
	}
	want := s.files.ConfigText([]sshcfg.Host{{Name: "box", User: "root"}, {Name: "web", User: "admin", Direct: "10.77.0.9:22"}})
	if s.stdout.String() != want {
		t.Errorf("ssh-config printed:\n%s\nwant:\n%s", s.stdout, want)
	}
	if _, err := os.Stat(filepath.Join(s.files.User.Home, ".ssh")); err == nil {
		t.Error("ssh-config without --install touched ~/.ssh")
	}
	if _, err := os.Stat(s.files.Dir); err == nil {
		t.Error("ssh-config without --install wrote banger's ssh files")
	}
	s.stdout.Reset()
	if err := s.run("ssh-config", "--install"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(s.files.Config)
	if string(b) != want {
		t.Errorf("%s:\n%s", s.files.Config, b)
	}
	b, _ = os.ReadFile(filepath.Join(s.files.User.Home, ".ssh", "config"))
	if !strings.Contains(string(b), s.files.IncludeLine()+"\n") {
		t.Errorf("~/.ssh/config:\n%s", b)
	}
	if kh, _ := os.ReadFile(s.files.KnownHosts); !strings.HasPrefix(string(kh), "web.banger "+k1) {
		t.Errorf("known_hosts:\n%s", kh)
	}
}

// TestVMRunShellUsesSSH: vm run without a command logs in with ssh (a
// terminal forced with -t), holds the --rm VM during the session, exits
// with ssh's code and removes the VM.
func TestVMRunShellUsesSSH(t *testing.T) {
	argsFile := fakeSSH(t)
	_, key := newHostKey(t)
	held := filepath.Join(t.TempDir(), "held")
	var created api.VMCreateParams
	d := startFakeDaemon(t, map[string]rpc.Handler{
		api.MethodVMCreate: func(ctx context.Context, call *rpc.Call) (any, error) {
			call.Decode(&created)
			return api.VM{Name: "box", State: api.StateStopped}, nil
		},
		api.MethodVMStart: func(ctx context.Context, call *rpc.Call) (any, error) {
			return api.VM{Name: "box", State: api.StateRunning}, nil
		},
		api.MethodVMSSHInfo: sshInfoHandler(api.SSHInfo{User: "dev", HostKeys: []string{key}}),
		api.MethodVMHold: func(ctx context.Context, call *rpc.Call) (any, error) {
			call.Progress(api.Progress{Phase: "held"})
			os.WriteFile(held, nil, 0o644)
			<-ctx.Done() // until the client ends the call
			return nil, ctx.Err()
		},
		api.MethodVMRemove: func(ctx context.Context, call *rpc.Call) (any, error) { return nil, nil },
	})
	s := newSSHTestApp(t, d.sock, strings.NewReader(""))
	t.Setenv("FAKE_SSH_EXIT", "7")
	err := s.run("vm", "run", "--rm", "-t")
	var ee exitError
	if !errors.As(err, &ee) || ee.code != 7 {
		t.Fatalf("vm run: %v (stderr %s), want ssh's exit code 7", err, s.stderr)
	}
	pub, _ := s.files.PublicKey()
	if !created.AutoRemove || !slices.Equal(created.SSHKeys, []string{pub}) {
		t.Errorf("create params %+v, want auto-remove and the user's key %q", created, pub)
	}
	// The fake ssh wrote its args after the hold began: the session
	// starts once the daemon holds the VM.
	if st, err := os.Stat(argsFile); err != nil {
		t.Fatal(err)
	} else if hs, err := os.Stat(held); err != nil || hs.ModTime().After(st.ModTime()) {
		t.Errorf("the hold began after ssh ran (or never): %v", err)
	}
	got := readArgs(t, argsFile)
	if !slices.Equal(got[:2], []string{"-t", "-t"}) || !slices.Equal(got[len(got)-4:], []string{"-l", "dev", "--", "box.banger"}) {
		t.Errorf("ssh argv %q, want -t -t ... -l dev -- box.banger", got)
	}
	calls := d.called()
	want := []string{api.MethodVMCreate, api.MethodVMStart, api.MethodVMSSHInfo, api.MethodVMHold, api.MethodVMRemove}
	if !slices.Equal(calls, want) {
		t.Errorf("daemon calls %v, want %v", calls, want)
	}
	// The VM is gone: so are its block and its keys.
	if hosts, _ := s.files.Hosts(); len(hosts) != 0 {
		t.Errorf("ssh config still has %+v", hosts)
	}
	if kh, _ := os.ReadFile(s.files.KnownHosts); strings.Contains(string(kh), "box.banger") {
		t.Errorf("known_hosts still names box:\n%s", kh)
	}
}

// Without an ssh client, vm run falls back to the agent's terminal.
func TestVMRunShellWithoutSSH(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	var exec api.VMExecParams
	d := startFakeDaemon(t, map[string]rpc.Handler{
		api.MethodVMCreate: func(ctx context.Context, call *rpc.Call) (any, error) {
			return api.VM{Name: "box"}, nil
		},
		api.MethodVMStart: func(ctx context.Context, call *rpc.Call) (any, error) {
			return api.VM{Name: "box", State: api.StateRunning}, nil
		},
		api.MethodVMSSHInfo: sshInfoHandler(api.SSHInfo{User: "dev"}),
		api.MethodVMExec: func(ctx context.Context, call *rpc.Call) (any, error) {
			call.Decode(&exec)
			return api.ExecResult{ExitCode: 5}, nil
		},
	})
	s := newSSHTestApp(t, d.sock, strings.NewReader(""))
	err := s.run("vm", "run", "-t")
	var ee exitError
	if !errors.As(err, &ee) || ee.code != 5 {
		t.Fatalf("vm run: %v, want the agent shell's exit code 5", err)
	}
	if !exec.TTY || len(exec.Argv) != 0 {
		t.Errorf("exec params %+v, want a login shell with a terminal", exec)
	}
	if !strings.Contains(s.stderr.String(), "no ssh client") || !strings.Contains(s.stderr.String(), "guest agent's terminal") {
		t.Errorf("stderr %q, want the fallback explained", s.stderr)
	}
}

func TestDoctorSSHChecks(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	s := newSSHTestApp(t, "/nonexistent.sock", nil)
	cs := s.a.sshChecks()
	if len(cs) != 3 || cs[0].Name != "ssh client" || cs[0].Status != doctor.Warn || !strings.Contains(cs[0].Fix, "openssh-client") {
		t.Fatalf("checks %+v, want a warning for the missing ssh client first", cs)
	}
	if cs[1].Status != doctor.OK || !strings.Contains(cs[1].Detail, "made at the first vm create") {
		t.Errorf("key check %+v", cs[1])
	}
	if !strings.Contains(cs[2].Detail, "ssh-config --install") {
		t.Errorf("config check %+v, want how to install", cs[2])
	}
	s.files.PublicKey()
	os.Chmod(s.files.Key, 0o640)
	if c := s.a.sshChecks()[1]; c.Status != doctor.Warn || !strings.Contains(c.Fix, "chmod 600") {
		t.Errorf("key check of a group-readable key %+v", c)
	}
}

// vm create authorises the user's key and adds the VM to banger's ssh
// files; vm rm takes it out again.
func TestVMCreateAndRmKeepSSHFiles(t *testing.T) {
	_, key := newHostKey(t)
	var created api.VMCreateParams
	d := startFakeDaemon(t, map[string]rpc.Handler{
		api.MethodVMCreate: func(ctx context.Context, call *rpc.Call) (any, error) {
			call.Decode(&created)
			return api.VM{Name: "box", State: api.StateRunning}, nil
		},
		api.MethodVMSSHInfo: sshInfoHandler(api.SSHInfo{User: "dev", HostKeys: []string{key}}),
		api.MethodVMRemove:  func(ctx context.Context, call *rpc.Call) (any, error) { return nil, nil },
	})
	s := newSSHTestApp(t, d.sock, nil)
	if err := s.run("vm", "create", "--start"); err != nil {
		t.Fatal(err)
	}
	pub, _ := s.files.PublicKey()
	if !slices.Equal(created.SSHKeys, []string{pub}) || s.stdout.String() != "box\n" {
		t.Errorf("create params %+v, stdout %q; want the user's key and only the name printed", created, s.stdout)
	}
	if hosts, _ := s.files.Hosts(); len(hosts) != 1 || hosts[0] != (sshcfg.Host{Name: "box", User: "dev"}) {
		t.Errorf("ssh config hosts %+v", hosts)
	}
	if kh, _ := os.ReadFile(s.files.KnownHosts); !strings.HasPrefix(string(kh), "box.banger "+key) {
		t.Errorf("known_hosts:\n%s", kh)
	}
	if err := s.run("vm", "rm", "box"); err != nil {
		t.Fatal(err)
	}
	if hosts, _ := s.files.Hosts(); len(hosts) != 0 {
		t.Errorf("ssh config hosts after rm %+v", hosts)
	}
	if kh, _ := os.ReadFile(s.files.KnownHosts); strings.Contains(string(kh), "box.banger") {
		t.Errorf("known_hosts after rm:\n%s", kh)
	}
	// Without a daemon, ssh-config prints the VMs it knew, with a warning.
	s.files.SetHost(sshcfg.Host{Name: "old", User: "root"})
	s.sock = filepath.Join(t.TempDir(), "none.sock")
	s.stdout.Reset()
	if err := s.run("ssh-config"); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(s.stdout.String(), "Host old.banger\n    User root\n") || !strings.Contains(s.stderr.String(), "not refreshed") {
		t.Errorf("ssh-config without a daemon: stdout\n%s\nstderr\n%s", s.stdout, s.stderr)
	}
}
