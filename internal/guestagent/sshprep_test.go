package guestagent

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/testenv"
)

func TestEnsureHostKeys(t *testing.T) {
	r := makeRoot(t, InitModeSystemd, map[string]string{"/usr/sbin/sshd": "", "/etc/ssh/sshd_config": ""})
	if !r.sshdInstalled() {
		t.Fatal("sshd not found")
	}
	made, err := r.ensureHostKeys("root@vm1")
	if err != nil {
		t.Fatal(err)
	}
	if len(made) != 2 {
		t.Fatalf("made %v, want ed25519 and ecdsa keys", made)
	}
	for _, kt := range []string{"ed25519", "ecdsa"} {
		priv := filepath.Join("/etc/ssh", "ssh_host_"+kt+"_key")
		st, err := os.Stat(r.path(priv))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v, mode %v; want 0600", priv, err, st.Mode())
		}
		if st, err := os.Stat(r.path(priv + ".pub")); err != nil || st.Mode().Perm() != 0o644 {
			t.Fatalf("%s.pub: %v; want 0644", priv, err)
		}
		signer, err := ssh.ParsePrivateKey([]byte(readFile(t, r, priv)))
		if err != nil {
			t.Fatalf("%s: %v", priv, err)
		}
		pub, comment, _, _, err := ssh.ParseAuthorizedKey([]byte(readFile(t, r, priv+".pub")))
		if err != nil || comment != "root@vm1" {
			t.Fatalf("%s.pub: %v, comment %q", priv, err, comment)
		}
		if string(pub.Marshal()) != string(signer.PublicKey().Marshal()) {
			t.Errorf("%s.pub does not match its private key", priv)
		}
	}
	keys := r.sshdHostKeys()
	if len(keys) != 2 || !strings.HasPrefix(keys[0], "ecdsa-sha2-nistp256 ") || !strings.HasPrefix(keys[1], "ssh-ed25519 ") {
		t.Errorf("sshdHostKeys = %q", keys)
	}

	// Existing keys stay; a missing .pub is made from its private key.
	before := readFile(t, r, "/etc/ssh/ssh_host_ed25519_key")
	pub := readFile(t, r, "/etc/ssh/ssh_host_ed25519_key.pub")
	if err := os.Remove(r.path("/etc/ssh/ssh_host_ed25519_key.pub")); err != nil {
		t.Fatal(err)
	}
	made, err = r.ensureHostKeys("root@vm1")
	if err != nil || len(made) != 0 {
		t.Fatalf("second run: made %v, %v; want nothing", made, err)
	}
	if readFile(t, r, "/etc/ssh/ssh_host_ed25519_key") != before || readFile(t, r, "/etc/ssh/ssh_host_ed25519_key.pub") != pub {
		t.Errorf("existing host key changed, or its .pub not remade the same")
	}
}

const (
	testKey1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB8pQ8Jr1G6Q2p5sPQdZ2yJ6E5vTqH4m3cWlq2r2hYkF alice@laptop"
	testKey2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx2l0WkVq2qGmV9PZzqKj8d1jv0l0M3uCQ6O1yB5rQe bob@desk"
)

func devRoot(t *testing.T, files map[string]string) guestRoot {
	t.Helper()
	if os.Geteuid() != 0 {
		testenv.Missing(t, "authorized_keys ownership needs root")
	}
	all := map[string]string{"/etc/passwd": "root:x:0:0:root:/root:/bin/bash\ndev:x:1000:1000::/home/dev:/bin/bash\n"}
	for k, v := range files {
		all[k] = v
	}
	r := makeRoot(t, InitModeSystemd, all)
	if err := os.MkdirAll(r.path("/home/dev"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(r.path("/home/dev"), 1000, 1000); err != nil {
		t.Fatal(err)
	}
	return r
}

func owner(t *testing.T, p string) (uid uint32, mode os.FileMode) {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Uid, fi.Mode()
}

func TestAuthorizeKeys(t *testing.T) {
	r := devRoot(t, nil)
	sc := &agentproto.SSHConfig{User: "dev", AuthorizedKeys: []string{testKey1, testKey2, testKey1}}
	if err := r.authorizeKeys(sc); err != nil {
		t.Fatal(err)
	}
	ak := r.path("/home/dev/.ssh/authorized_keys")
	if uid, mode := owner(t, filepath.Dir(ak)); uid != 1000 || mode != os.ModeDir|0o700 {
		t.Errorf(".ssh: uid %d mode %v, want 1000 drwx------", uid, mode)
	}
	if uid, mode := owner(t, ak); uid != 1000 || mode != 0o600 {
		t.Errorf("authorized_keys: uid %d mode %v, want 1000 -rw-------", uid, mode)
	}
	want := testKey1 + "\n" + testKey2 + "\n"
	if got := readFile(t, r, "/home/dev/.ssh/authorized_keys"); got != want {
		t.Errorf("authorized_keys:\n%s\nwant\n%s", got, want)
	}
	// Again: nothing duplicated.
	if err := r.authorizeKeys(sc); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, r, "/home/dev/.ssh/authorized_keys"); got != want {
		t.Errorf("after a second boot:\n%s\nwant\n%s", got, want)
	}
}

func TestAuthorizeKeysExisting(t *testing.T) {
	// A key already there with options and another comment counts; the
	// file, without a final newline, gets one before the new key.
	existing := `restrict,command="true" ` + strings.TrimSuffix(testKey1, " alice@laptop") + " old-comment"
	r := devRoot(t, map[string]string{"/home/dev/.ssh/authorized_keys": existing})
	if err := os.Chmod(r.path("/home/dev/.ssh/authorized_keys"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := r.authorizeKeys(&agentproto.SSHConfig{User: "dev", AuthorizedKeys: []string{testKey1, testKey2}}); err != nil {
		t.Fatal(err)
	}
	if got, want := readFile(t, r, "/home/dev/.ssh/authorized_keys"), existing+"\n"+testKey2+"\n"; got != want {
		t.Errorf("authorized_keys:\n%s\nwant\n%s", got, want)
	}
}

func TestAuthorizeKeysRoot(t *testing.T) {
	r := devRoot(t, nil)
	if err := r.authorizeKeys(&agentproto.SSHConfig{AuthorizedKeys: []string{testKey1}}); err != nil {
		t.Fatal(err)
	}
	if uid, mode := owner(t, r.path("/root/.ssh/authorized_keys")); uid != 0 || mode != 0o600 {
		t.Errorf("root's authorized_keys: uid %d mode %v", uid, mode)
	}
	// A user whose home is missing (and its parent): made for them, the
	// parent open to all.
	must(t, os.WriteFile(r.path("/etc/passwd"), []byte("ann:x:1001:1001::/srv/users/ann:/bin/sh\n"), 0o644))
	if err := r.authorizeKeys(&agentproto.SSHConfig{User: "ann", AuthorizedKeys: []string{testKey1}}); err != nil {
		t.Fatal(err)
	}
	if uid, mode := owner(t, r.path("/srv/users/ann")); uid != 1001 || mode != os.ModeDir|0o700 {
		t.Errorf("made home: uid %d mode %v", uid, mode)
	}
	if uid, mode := owner(t, r.path("/srv/users")); uid != 0 || mode != os.ModeDir|0o755 {
		t.Errorf("made home's parent: uid %d mode %v", uid, mode)
	}
	if err := r.authorizeKeys(&agentproto.SSHConfig{User: "nobody-here", AuthorizedKeys: []string{testKey1}}); err == nil || !strings.Contains(err.Error(), "not in the image's /etc/passwd") {
		t.Errorf("unknown user: %v", err)
	}
	if err := r.authorizeKeys(&agentproto.SSHConfig{User: "dev", AuthorizedKeys: []string{"not a key"}}); err == nil {
		t.Errorf("a malformed key was accepted")
	}
}

// TestAuthorizeKeysRefusesLinks: the user may have prepared ~/.ssh to make
// root write elsewhere; nothing outside is touched.
func TestAuthorizeKeysRefusesLinks(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, r guestRoot)
	}{
		{"ssh dir symlink", func(t *testing.T, r guestRoot) {
			must(t, os.Symlink(r.path("/victim"), r.path("/home/dev/.ssh")))
		}},
		{"authorized_keys symlink", func(t *testing.T, r guestRoot) {
			must(t, os.Mkdir(r.path("/home/dev/.ssh"), 0o700))
			must(t, os.Symlink(r.path("/victim/authorized_keys"), r.path("/home/dev/.ssh/authorized_keys")))
		}},
		{"authorized_keys hard link", func(t *testing.T, r guestRoot) {
			must(t, os.Mkdir(r.path("/home/dev/.ssh"), 0o700))
			must(t, os.Link(r.path("/victim/authorized_keys"), r.path("/home/dev/.ssh/authorized_keys")))
		}},
		{"authorized_keys fifo", func(t *testing.T, r guestRoot) {
			must(t, os.Mkdir(r.path("/home/dev/.ssh"), 0o700))
			must(t, syscall.Mkfifo(r.path("/home/dev/.ssh/authorized_keys"), 0o600))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := devRoot(t, map[string]string{"/victim/authorized_keys": "root's\n"})
			tc.setup(t, r)
			err := r.authorizeKeys(&agentproto.SSHConfig{User: "dev", AuthorizedKeys: []string{testKey1}})
			if err == nil || !strings.Contains(err.Error(), "refused") {
				t.Errorf("err = %v, want a refusal", err)
			}
			if got := readFile(t, r, "/victim/authorized_keys"); got != "root's\n" {
				t.Errorf("the link's target was written: %q", got)
			}
		})
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
