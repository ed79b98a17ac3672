package sshcfg

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/errdefs"
)

func testFiles(t *testing.T) Files {
	t.Helper()
	home := t.TempDir()
	return New(User{Name: "dev", UID: os.Getuid(), GID: os.Getgid(), Home: home}, "", "/opt/banger bin/banger")
}

func hostKey(t *testing.T) string {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pk, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pk))) + " root@guest"
}

func TestKeyMadeOnceAndReused(t *testing.T) {
	f := testFiles(t)
	pub, err := f.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(pub, "ssh-ed25519 ") {
		t.Fatalf("public key %q, want ssh-ed25519", pub)
	}
	priv, err := os.ReadFile(f.Key)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(priv), "-----BEGIN OPENSSH PRIVATE KEY-----") {
		t.Errorf("private key is not in OpenSSH format:\n%s", priv)
	}
	signer, err := ssh.ParsePrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(signer.PublicKey()))); !strings.HasPrefix(pub, got+" ") {
		t.Errorf("public key %q does not match the private key's %q", pub, got)
	}
	for path, want := range map[string]os.FileMode{f.Key: 0o600, f.Dir: 0o700, filepath.Join(f.User.Home, ".config", "banger"): 0o700} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", path, fi.Mode().Perm(), want)
		}
	}
	if out, err := exec.Command("ssh-keygen", "-y", "-f", f.Key).Output(); err == nil {
		if !strings.HasPrefix(pub, strings.TrimSpace(string(out))) {
			t.Errorf("ssh-keygen -y gives %q, want %q", out, pub)
		}
	}
	again, err := f.PublicKey()
	if err != nil || again != pub {
		t.Errorf("second PublicKey() = %q, %v; want the same key %q", again, err, pub)
	}
	// A private key without its .pub gets it back.
	os.Remove(f.Key + ".pub")
	if again, err := f.PublicKey(); err != nil || strings.Fields(again)[1] != strings.Fields(pub)[1] {
		t.Errorf("PublicKey() without .pub = %q, %v; want %q", again, err, pub)
	}
}

func TestKeyInfo(t *testing.T) {
	f := testFiles(t)
	if d, err := f.KeyInfo(); err != nil || !strings.Contains(d, "made at the first vm create") {
		t.Errorf("KeyInfo() before the key = %q, %v", d, err)
	}
	pub, err := f.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	pk, _, _, _, _ := ssh.ParseAuthorizedKey([]byte(pub))
	if d, err := f.KeyInfo(); err != nil || !strings.Contains(d, ssh.FingerprintSHA256(pk)) {
		t.Errorf("KeyInfo() = %q, %v; want the fingerprint", d, err)
	}
	os.Chmod(f.Key, 0o644)
	if _, err := f.KeyInfo(); err == nil || !strings.Contains(err.Error(), "others can read") {
		t.Errorf("KeyInfo() of a 0644 key: %v", err)
	}
	g := New(f.User, "/nonexistent/key", "")
	if _, err := g.KeyInfo(); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("KeyInfo() of a missing configured key: %v", err)
	}
}

func TestConfiguredKey(t *testing.T) {
	home := t.TempDir()
	u := User{Name: "dev", UID: os.Getuid(), GID: os.Getgid(), Home: home}
	f := New(u, "~/.ssh/mine", "/usr/bin/banger")
	if f.Key != filepath.Join(home, ".ssh", "mine") || !f.KeyConfigured {
		t.Fatalf("key %s (configured %v), want ~ expanded to the home", f.Key, f.KeyConfigured)
	}
	if _, err := f.PublicKey(); !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "ssh-keygen") {
		t.Fatalf("PublicKey() of a missing configured key: %v, want a precondition error saying how to make it", err)
	}
	if _, err := os.Stat(f.Key); err == nil {
		t.Fatal("a configured key was generated")
	}
	// An existing configured key is used.
	os.MkdirAll(filepath.Dir(f.Key), 0o700)
	if err := New(u, "", "").write(f.Key, nil); err != nil {
		t.Fatal(err)
	}
	g := New(User{Name: "dev", Home: t.TempDir()}, "", "")
	pub, err := g.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(f.Key+".pub", []byte(pub+"\n"), 0o644)
	if got, err := f.PublicKey(); err != nil || got != pub {
		t.Errorf("PublicKey() = %q, %v; want the configured key's %q", got, err, pub)
	}
}

func TestSetHostKeys(t *testing.T) {
	f := testFiles(t)
	other := "other.banger " + strings.Join(strings.Fields(hostKey(t))[:2], " ") + "\n"
	os.MkdirAll(f.Dir, 0o700)
	if err := os.WriteFile(f.KnownHosts, []byte("# mine\n"+other+"box.banger ssh-rsa AAAAold\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	k1, k2 := hostKey(t), hostKey(t)
	if err := f.SetHostKeys("box", []string{k1, k2}); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(f.KnownHosts)
	want := "# mine\n" + other + "box.banger " + strings.Join(strings.Fields(k1)[:2], " ") + "\nbox.banger " + strings.Join(strings.Fields(k2)[:2], " ") + "\n"
	if string(b) != want {
		t.Fatalf("known_hosts:\n%s\nwant:\n%s", b, want)
	}
	// Parsed back by x/crypto's known_hosts reader.
	rest := b
	var n int
	for len(rest) > 0 {
		_, hosts, _, _, r, err := ssh.ParseKnownHosts(rest)
		if err != nil {
			break
		}
		if hosts[0] == "box.banger" {
			n++
		}
		rest = r
	}
	if n != 2 {
		t.Errorf("box.banger has %d parsable keys, want 2:\n%s", n, b)
	}
	// A changed key replaces both, and the other VM stays.
	k3 := hostKey(t)
	if err := f.SetHostKeys("box", []string{k3}); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(f.KnownHosts)
	if strings.Count(string(b), "box.banger") != 1 || !strings.Contains(string(b), strings.Fields(k3)[1]) || !strings.Contains(string(b), other) {
		t.Errorf("after a new key:\n%s", b)
	}
	// No key leaves none (ssh refuses then).
	if err := f.SetHostKeys("box", nil); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(f.KnownHosts)
	if strings.Contains(string(b), "box.banger") {
		t.Errorf("box.banger kept a key:\n%s", b)
	}
	if err := f.SetHostKeys("box", []string{"not a key"}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("SetHostKeys with a bad key: %v, want ErrInvalid", err)
	}
}

func TestConfigText(t *testing.T) {
	f := testFiles(t)
	got := f.ConfigText([]Host{{Name: "web", User: "dev", Direct: "10.77.0.5:22"}, {Name: "box", User: "root"}, {Name: "bad", User: "x\n  ProxyCommand evil"}})
	want := configHeader + `
Host box.banger
    User root

Host web.banger
    User dev
    ProxyCommand '/opt/banger bin/banger' vm ssh-proxy --direct 10.77.0.5:22 %h

Host *.banger
    ProxyCommand '/opt/banger bin/banger' vm ssh-proxy %h
    UserKnownHostsFile ` + f.KnownHosts + `
    StrictHostKeyChecking yes
    UpdateHostKeys no
    IdentityFile ` + f.Key + `
    IdentitiesOnly yes
`
	if got != want {
		t.Fatalf("config:\n%s\nwant:\n%s", got, want)
	}
	if err := f.WriteConfig([]Host{{Name: "bad", User: "x y"}}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("WriteConfig with a bad user: %v, want ErrInvalid", err)
	}
	if q := configQuote(`/a b/50%"x`); q != `"/a b/50%%\"x"` {
		t.Errorf("configQuote = %s", q)
	}
	// ssh itself reads it: ssh -G prints the options it would use.
	if _, err := exec.LookPath("ssh"); err != nil {
		return
	}
	if err := f.WriteConfig([]Host{{Name: "web", User: "dev", Direct: "10.77.0.5:22"}}); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("ssh", "-F", f.Config, "-G", "web.banger").CombinedOutput()
	if err != nil {
		t.Fatalf("ssh -G: %v\n%s", err, out)
	}
	for _, line := range []string{"user dev", "stricthostkeychecking true", "identitiesonly yes",
		"proxycommand '/opt/banger bin/banger' vm ssh-proxy --direct 10.77.0.5:22 %h",
		"userknownhostsfile " + f.KnownHosts, "identityfile " + f.Key} {
		if !strings.Contains(string(out), line+"\n") {
			t.Errorf("ssh -G web.banger has no %q:\n%s", line, out)
		}
	}
	out, _ = exec.Command("ssh", "-F", f.Config, "-G", "other.banger").CombinedOutput()
	if !strings.Contains(string(out), "proxycommand '/opt/banger bin/banger' vm ssh-proxy %h\n") {
		t.Errorf("ssh -G other.banger:\n%s", out)
	}
}

func TestSetAndRemoveHost(t *testing.T) {
	f := testFiles(t)
	if err := f.WriteConfig([]Host{{Name: "a", User: "root"}, {Name: "b", User: "dev", Direct: "10.77.0.3:22"}}); err != nil {
		t.Fatal(err)
	}
	if err := f.SetHost(Host{Name: "a", User: "admin"}); err != nil {
		t.Fatal(err)
	}
	if err := f.SetHost(Host{Name: "c"}); err != nil {
		t.Fatal(err)
	}
	if err := f.RemoveHost("b"); err != nil {
		t.Fatal(err)
	}
	hosts, err := f.Hosts()
	if err != nil {
		t.Fatal(err)
	}
	if len(hosts) != 2 || hosts[0] != (Host{Name: "a", User: "admin"}) || hosts[1] != (Host{Name: "c"}) {
		t.Errorf("hosts %+v, want a (admin) and c", hosts)
	}
	if err := f.SetHost(Host{Name: "b", User: "dev", Direct: "10.77.0.3:22"}); err != nil {
		t.Fatal(err)
	}
	hosts, _ = f.Hosts()
	if len(hosts) != 3 || hosts[1] != (Host{Name: "b", User: "dev", Direct: "10.77.0.3:22"}) {
		t.Errorf("hosts %+v, want b read back with its address", hosts)
	}
}

func TestInstall(t *testing.T) {
	f := testFiles(t)
	// Missing ~/.ssh/config: made, 0600.
	if f.Installed() {
		t.Error("Installed() before Install")
	}
	changed, err := f.Install()
	if err != nil || !changed {
		t.Fatalf("Install() = %v, %v", changed, err)
	}
	// The temporary home is not the passwd entry's: the Include names
	// the file by its path.
	line := f.IncludeLine()
	if line != "Include "+f.Config {
		t.Errorf("include line %q for a home that isn't the passwd entry's", line)
	}
	if l := New(User{UID: 0, Home: "/root"}, "", "").IncludeLine(); l != IncludeLine {
		t.Errorf("root's include line %q, want %q", l, IncludeLine)
	}
	path := filepath.Join(f.User.Home, ".ssh", "config")
	b, _ := os.ReadFile(path)
	if !strings.Contains(string(b), "\n"+line+"\n") {
		t.Fatalf("~/.ssh/config:\n%s", b)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	if changed, err := f.Install(); err != nil || changed {
		t.Errorf("second Install() = %v, %v; want no change", changed, err)
	}
	if !f.Installed() {
		t.Error("Installed() after Install")
	}
	// An existing config keeps its lines and mode; the Include goes on
	// top even when one was below a Host line.
	user := "Host *\n    ServerAliveInterval 30\n" + IncludeLine + "\n\nHost gh\n    HostName github.com\n"
	os.WriteFile(path, []byte(user), 0o640)
	os.Chmod(path, 0o640)
	if changed, err := f.Install(); err != nil || !changed {
		t.Fatalf("Install() = %v, %v", changed, err)
	}
	b, _ = os.ReadFile(path)
	if strings.Count(string(b), "Include") != 1 || !strings.HasSuffix(string(b), "\nHost *\n    ServerAliveInterval 30\n\nHost gh\n    HostName github.com\n") {
		t.Errorf("~/.ssh/config:\n%s", b)
	}
	first := ""
	for _, l := range strings.Split(string(b), "\n") {
		if l != "" && !strings.HasPrefix(l, "#") {
			first = l
			break
		}
	}
	if first != line {
		t.Errorf("first directive %q, want the Include", first)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
		t.Errorf("mode %v, want 0640 kept", fi.Mode().Perm())
	}
	if changed, _ := f.Install(); changed {
		t.Error("third Install() changed the file")
	}
	// A symlinked config (dotfiles) is edited where it points.
	target := filepath.Join(f.User.Home, "dotfiles-ssh-config")
	os.WriteFile(target, []byte("Host x\n"), 0o600)
	os.Remove(path)
	os.Symlink(target, path)
	if _, err := f.Install(); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the symlink was replaced: %v", err)
	}
	if b, _ := os.ReadFile(target); !strings.HasPrefix(strings.SplitN(string(b), "\n", 2)[1], line+"\n") {
		t.Errorf("target:\n%s", b)
	}
	// ssh reads the result.
	if _, err := exec.LookPath("ssh"); err == nil {
		if err := f.WriteConfig([]Host{{Name: "web", User: "dev"}}); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("ssh", "-F", target, "-G", "web.banger").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "\nuser dev\n") {
			t.Errorf("ssh -G through the Include: %v\n%s", err, out)
		}
	}
}

// TestSudoOwnership: run as root for a sudo user, every file and
// directory banger makes is theirs.
func TestSudoOwnership(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give files away")
	}
	home := t.TempDir()
	u := User{Name: "dev", UID: 1234, GID: 1235, Home: home, Chown: true}
	f := New(u, "", "/usr/bin/banger")
	if _, err := f.PublicKey(); err != nil {
		t.Fatal(err)
	}
	if err := f.SetHostKeys("box", []string{hostKey(t)}); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteConfig([]Host{{Name: "box", User: "root"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Install(); err != nil {
		t.Fatal(err)
	}
	var n int
	err := filepath.Walk(home, func(p string, fi os.FileInfo, err error) error {
		if err != nil || p == home {
			return err
		}
		n++
		st := fi.Sys().(*syscall.Stat_t)
		if st.Uid != 1234 || st.Gid != 1235 {
			t.Errorf("%s is %d:%d, want 1234:1235", p, st.Uid, st.Gid)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// .config .config/banger .config/banger/ssh, .lock, id_ed25519(.pub),
	// known_hosts, config, .ssh, .ssh/config
	if n != 10 {
		t.Errorf("%d files and directories, want 10", n)
	}
}

func TestInvokingUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("sudo applies to root only")
	}
	t.Setenv("SUDO_USER", "nobody")
	t.Setenv("SUDO_UID", "65534")
	t.Setenv("SUDO_GID", "65534")
	u, err := InvokingUser()
	if err != nil {
		t.Fatal(err)
	}
	if u.Name != "nobody" || u.UID != 65534 || u.GID != 65534 || !u.Chown || u.Home == "" || u.Home == os.Getenv("HOME") {
		t.Errorf("InvokingUser() under sudo = %+v, want nobody with their passwd home", u)
	}
	t.Setenv("SUDO_GID", "staff")
	if _, err := InvokingUser(); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("a non-numeric SUDO_GID: %v, want ErrInvalid", err)
	}
	os.Unsetenv("SUDO_UID")
	home := t.TempDir()
	t.Setenv("HOME", home)
	u, err = InvokingUser()
	if err != nil || u.UID != 0 || u.Chown || u.Home != home {
		t.Errorf("InvokingUser() without sudo = %+v, %v; want root in $HOME, nothing given away", u, err)
	}
}

// Concurrent writers (proxies of several ssh sessions) don't lose each
// other's lines.
func TestConcurrentWrites(t *testing.T) {
	f := testFiles(t)
	key := hostKey(t)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 20 {
		wg.Add(2)
		go func() { defer wg.Done(); errs <- f.SetHostKeys(fmt.Sprintf("vm%d", i), []string{key}) }()
		go func() { defer wg.Done(); errs <- f.SetHost(Host{Name: fmt.Sprintf("vm%d", i), User: "dev"}) }()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	b, _ := os.ReadFile(f.KnownHosts)
	if n := strings.Count(string(b), ".banger "); n != 20 {
		t.Errorf("known_hosts has %d lines, want 20:\n%s", n, b)
	}
	if hosts, _ := f.Hosts(); len(hosts) != 20 {
		t.Errorf("config has %d hosts, want 20", len(hosts))
	}
}
