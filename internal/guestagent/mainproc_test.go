package guestagent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
)

func writeEtc(t *testing.T, passwd, group string) string {
	t.Helper()
	dir := t.TempDir()
	if passwd != "" {
		if err := os.WriteFile(filepath.Join(dir, "passwd"), []byte(passwd), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if group != "" {
		if err := os.WriteFile(filepath.Join(dir, "group"), []byte(group), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestResolveUser(t *testing.T) {
	etc := writeEtc(t,
		"root:x:0:0:root:/root:/bin/sh\nnginx:x:101:102:nginx:/var/cache/nginx:/sbin/nologin\napp:x:1000:1000::/home/app:/bin/sh\n",
		"root:x:0:\nnginx:x:102:\napp:x:1000:\nwww:x:33:app,nginx\ndocker:x:999:app\n")
	for _, tc := range []struct {
		spec string
		want procUser
	}{
		{"", procUser{name: "root", home: "/root"}},
		{"root", procUser{name: "root", home: "/root"}},
		{"nginx", procUser{name: "nginx", uid: 101, gid: 102, home: "/var/cache/nginx", groups: []uint32{33}}},
		{"app", procUser{name: "app", uid: 1000, gid: 1000, home: "/home/app", groups: []uint32{33, 999}}},
		{"1000", procUser{name: "app", uid: 1000, gid: 1000, home: "/home/app", groups: []uint32{33, 999}}},
		{"4242", procUser{uid: 4242, home: "/"}},
		{"4242:4343", procUser{uid: 4242, gid: 4343, home: "/"}},
		{"app:www", procUser{name: "app", uid: 1000, gid: 33, home: "/home/app"}},
		{"nginx:0", procUser{name: "nginx", uid: 101, gid: 0, home: "/var/cache/nginx"}},
	} {
		got, err := resolveUser(etc, tc.spec)
		if err != nil {
			t.Errorf("resolveUser(%q): %v", tc.spec, err)
			continue
		}
		if got.name != tc.want.name || got.uid != tc.want.uid || got.gid != tc.want.gid || got.home != tc.want.home || !slices.Equal(got.groups, tc.want.groups) {
			t.Errorf("resolveUser(%q) = %+v, want %+v", tc.spec, got, tc.want)
		}
	}
	for _, spec := range []string{"nobody", "app:nogroup", "app:"} {
		if _, err := resolveUser(etc, spec); err == nil {
			t.Errorf("resolveUser(%q) succeeded, want an error", spec)
		}
	}

	// A FROM scratch image: no /etc at all. Root and numeric users work.
	none := filepath.Join(t.TempDir(), "etc")
	if u, err := resolveUser(none, ""); err != nil || u.uid != 0 || u.home != "/root" {
		t.Errorf("root without passwd: %+v, %v", u, err)
	}
	if u, err := resolveUser(none, "65532:65532"); err != nil || u.uid != 65532 || u.gid != 65532 || u.home != "/" {
		t.Errorf("numeric user without passwd: %+v, %v", u, err)
	}
	if _, err := resolveUser(none, "nginx"); err == nil || !strings.Contains(err.Error(), "no such user") {
		t.Errorf("named user without passwd: %v, want no such user", err)
	}
	cred := procUser{uid: 5, gid: 6, groups: []uint32{6, 7}}.credential()
	if cred.Uid != 5 || cred.Gid != 6 || !slices.Equal(cred.Groups, []uint32{6, 7}) {
		t.Errorf("credential %+v", cred)
	}
}

func TestProcessEnv(t *testing.T) {
	u := procUser{home: "/home/app"}
	got := processEnv([]string{"FOO=1"}, "box", u)
	want := []string{"FOO=1", "PATH=" + defaultPath, "HOSTNAME=box", "HOME=/home/app"}
	if !slices.Equal(got, want) {
		t.Errorf("processEnv = %q, want %q", got, want)
	}
	// The image's own PATH, HOME and HOSTNAME win.
	got = processEnv([]string{"PATH=/opt/bin", "HOME=/srv", "HOSTNAME=x"}, "box", u)
	if !slices.Equal(got, []string{"PATH=/opt/bin", "HOME=/srv", "HOSTNAME=x"}) {
		t.Errorf("processEnv with the image's values = %q", got)
	}
}

func TestShouldRestart(t *testing.T) {
	for _, tc := range []struct {
		policy   string
		code     int
		stopping bool
		want     bool
	}{
		{"", 1, false, false},
		{agentproto.RestartNo, 1, false, false},
		{agentproto.RestartOnFailure, 0, false, false},
		{agentproto.RestartOnFailure, 2, false, true},
		{agentproto.RestartOnFailure, 137, false, true},
		{agentproto.RestartAlways, 0, false, true},
		{agentproto.RestartAlways, 0, true, false},
		{agentproto.RestartOnFailure, 1, true, false},
	} {
		if got := shouldRestart(tc.policy, tc.code, tc.stopping); got != tc.want {
			t.Errorf("shouldRestart(%q, %d, %v) = %v, want %v", tc.policy, tc.code, tc.stopping, got, tc.want)
		}
	}
	if !validRestart("") || !validRestart("always") || validRestart("sometimes") {
		t.Error("validRestart")
	}
}

func TestParseSignal(t *testing.T) {
	for in, want := range map[string]syscall.Signal{
		"": syscall.SIGTERM, "SIGQUIT": syscall.SIGQUIT, "quit": syscall.SIGQUIT, "INT": syscall.SIGINT, "9": syscall.SIGKILL, "SIGWINCH": syscall.SIGWINCH,
	} {
		got, err := parseSignal(in)
		if err != nil || got != want {
			t.Errorf("parseSignal(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"SIGNOPE", "0", "99", "-1"} {
		if _, err := parseSignal(bad); err == nil {
			t.Errorf("parseSignal(%q) succeeded", bad)
		}
	}
	if d := stopGraceOf(&agentproto.Process{}); d != defaultStopGrace {
		t.Errorf("default stop grace %s", d)
	}
	if d := stopGraceOf(&agentproto.Process{StopGraceSec: 3}); d != 3*time.Second {
		t.Errorf("stop grace %s", d)
	}
}

func TestOutputLogBound(t *testing.T) {
	l := newOutputLog(10)
	l.append(entryStdout, []byte("aaaa"))
	l.append(entryStderr, []byte("bbbb"))
	l.append(entryStdout, []byte("cccc")) // 12 bytes: the first goes
	es, next, more := l.read(0)
	if next != 3 || more != nil || len(es) != 2 || string(es[0].data) != "bbbb" || es[1].kind != entryStdout {
		t.Fatalf("read(0) = %v, %d, %v", es, next, more)
	}
	// Caught up: a channel that closes at the next append.
	es, next, more = l.read(3)
	if len(es) != 0 || next != 3 || more == nil {
		t.Fatalf("read(3) = %v, %d, %v", es, next, more)
	}
	l.append(entryStdout, bytes.Repeat([]byte("d"), 50)) // larger than the bound: kept alone
	select {
	case <-more:
	default:
		t.Fatal("append did not wake the reader")
	}
	es, next, _ = l.read(3)
	if len(es) != 1 || len(es[0].data) != 50 || next != 4 || l.end() != 4 {
		t.Fatalf("after a large entry: %v, %d", es, next)
	}
}

func TestOutputLogFollow(t *testing.T) {
	l := newOutputLog(mainLogMax)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got := make(chan string, 1)
	go func() {
		var b strings.Builder
		err := l.follow(ctx, 0, func(e logEntry) (bool, error) {
			if e.kind == entryState {
				return false, nil
			}
			b.Write(e.data)
			return true, nil
		})
		if err != nil {
			b.WriteString(" err " + err.Error())
		}
		got <- b.String()
	}()
	for i := range 100 {
		l.append(entryStdout, fmt.Appendf(nil, "%d,", i))
	}
	l.append(entryState, []byte("{}"))
	var want strings.Builder
	for i := range 100 {
		fmt.Fprintf(&want, "%d,", i)
	}
	if s := <-got; s != want.String() {
		t.Errorf("followed %q", s)
	}
}

func TestLinkEntries(t *testing.T) {
	var b bytes.Buffer
	for _, e := range []logEntry{{entryStdout, []byte("out")}, {entryStderr, nil}, {entryState, []byte(`{"state":"running"}`)}} {
		if err := writeLinkEntry(&b, e); err != nil {
			t.Fatal(err)
		}
	}
	r := bytes.NewReader(b.Bytes())
	for _, want := range []string{"o:out", "e:", `s:{"state":"running"}`} {
		e, err := readLinkEntry(r)
		if err != nil || string(e.kind)+":"+string(e.data) != want {
			t.Errorf("readLinkEntry = %q %q, %v; want %s", e.kind, e.data, err, want)
		}
	}
	if _, err := readLinkEntry(r); err != io.EOF {
		t.Errorf("at the end: %v, want EOF", err)
	}
	if _, err := readLinkEntry(bytes.NewReader([]byte{'x', 0, 0, 0, 0})); err == nil {
		t.Error("unknown entry type accepted")
	}
	if _, err := readLinkEntry(bytes.NewReader([]byte{'o', 0xff, 0, 0, 0})); err == nil {
		t.Error("oversized entry accepted")
	}
	if _, err := readLinkEntry(bytes.NewReader([]byte{'o', 0, 0, 0, 5, 'a'})); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("truncated entry: %v", err)
	}
}

// TestMainLinkState: the agent's end of the link mirrors the state and
// output PID 1 sends, and acknowledges once.
func TestMainLinkState(t *testing.T) {
	a, b, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	m := NewMainLink(b, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if s := m.State(); s.State != agentproto.MainStarting {
		t.Errorf("State() before PID 1 sent one: %+v, want starting", s)
	}
	ran := make(chan struct{})
	go func() { m.Run(ctx); close(ran) }()
	st, _ := json.Marshal(agentproto.MainProcessState{State: agentproto.MainRunning, PID: 42})
	for _, e := range []logEntry{{entryStdout, []byte("x")}, {entryState, st}} {
		if err := writeLinkEntry(a, e); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for m.State().State == agentproto.MainStarting && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if s := m.State(); s == nil || s.PID != 42 || s.State != agentproto.MainRunning {
		t.Fatalf("State() = %+v", s)
	}
	if m.log.end() != 2 {
		t.Errorf("mirrored %d entries, want 2", m.log.end())
	}
	m.delivered()
	m.delivered()
	buf := make([]byte, 4)
	a.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, _ := a.Read(buf)
	if n != 1 || buf[0] != linkAck {
		t.Errorf("acknowledgements %q, want one", buf[:n])
	}
	a.Close()
	select {
	case <-ran:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not end when PID 1's end closed")
	}
}

// TestAttachServed attaches a host client to a main process whose
// supervisor is simulated on the link: replayed and live output on the
// right streams, the final exit status, the acknowledgement to PID 1; and
// an agent without a main process refuses attach.
func TestAttachServed(t *testing.T) {
	pid1, agentEnd, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer pid1.Close()
	link := NewMainLink(agentEnd, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go link.Run(ctx)
	send := func(kind byte, data string) {
		t.Helper()
		if err := writeLinkEntry(pid1, logEntry{kind, []byte(data)}); err != nil {
			t.Fatal(err)
		}
	}
	running, _ := json.Marshal(agentproto.MainProcessState{State: agentproto.MainRunning, PID: 7})
	send(entryState, string(running))
	send(entryStdout, "before attach\n")

	c := dialTestAgent(t, ctx, Hooks{Main: link}, nil)
	var stdout, stderr bytes.Buffer
	res := make(chan error, 1)
	var code int
	go func() {
		var err error
		code, err = c.Attach(ctx, agentAttachOptions(&stdout, &stderr))
		res <- err
	}()
	time.Sleep(200 * time.Millisecond)
	send(entryStderr, "live err\n")
	code3 := 3
	exited, _ := json.Marshal(agentproto.MainProcessState{State: agentproto.MainExited, ExitCode: &code3})
	send(entryState, string(exited))
	select {
	case err := <-res:
		if err != nil || code != 3 {
			t.Fatalf("attach: %d, %v; want 3", code, err)
		}
	case <-ctx.Done():
		t.Fatal("attach did not end at the final exit")
	}
	if stdout.String() != "before attach\n" || stderr.String() != "live err\n" {
		t.Errorf("stdout %q stderr %q", stdout.String(), stderr.String())
	}
	ack := make([]byte, 1)
	pid1.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, _ := pid1.Read(ack); n != 1 || ack[0] != linkAck {
		t.Errorf("PID 1 got no acknowledgement of the delivered exit")
	}
	inf := c.infoForTest(t, ctx)
	if inf.MainProcess == nil || inf.MainProcess.State != agentproto.MainExited || *inf.MainProcess.ExitCode != 3 {
		t.Errorf("Info.MainProcess %+v", inf.MainProcess)
	}

	// Without a main process: refused.
	c2 := dialTestAgent(t, ctx, Hooks{}, nil)
	if _, err := c2.Attach(ctx, agentAttachOptions(nil, nil)); !errors.Is(err, errAgentNoMain) {
		t.Errorf("attach without a main process: %v, want the no-main-process error", err)
	}
}

// TestExecDefaults: exec requests get the image's env, directory and user
// (Config.ExecDefaults) unless they give their own; the request's env is
// added to the image's.
func TestExecDefaults(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("runs commands as another user: needs root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir := t.TempDir()
	// The other user must reach it.
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c := dialTestAgent(t, ctx, Hooks{}, func(cfg *agentproto.Config) {
		cfg.ExecDefaults = &agentproto.ExecDefaults{Env: []string{"FOO=image", "BAR=image"}, Dir: dir, User: "65534"}
	})
	for _, tc := range []struct {
		env       []string
		dir, user string
		want      string
	}{
		{nil, "", "", "image image " + dir + " 65534\n"},
		{[]string{"FOO=mine"}, "/", "root", "mine image / 0\n"},
		{nil, "/", "0:0", "image image / 0\n"},
	} {
		var out, errOut strings.Builder
		code, err := c.Exec(ctx, agentExecOptions(tc.env, tc.dir, tc.user, &out, &errOut))
		if err != nil || code != 0 || out.String() != tc.want {
			t.Errorf("exec env %q dir %q user %q: code %d err %v out %q stderr %q; want %q", tc.env, tc.dir, tc.user, code, err, out.String(), errOut.String(), tc.want)
		}
	}
	var errOut strings.Builder
	code, _ := c.Exec(ctx, agentExecOptions(nil, "/", "no-such-user-here", nil, &errOut))
	if code != 126 || !strings.Contains(errOut.String(), "no such user") {
		t.Errorf("exec as an unknown user: code %d stderr %q, want 126 and no such user", code, errOut.String())
	}
}
