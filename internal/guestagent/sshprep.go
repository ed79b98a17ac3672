package guestagent

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
)

// SSH preparation, done by init in the new root before the image's init
// runs (so before any sshd starts):
//
//   - when an sshd is installed and host keys are missing (images made
//     without them, as cloud images are), ed25519 and ECDSA host keys are
//     made, as ssh-keygen -A would (RSA is left out: slow to make under
//     emulation, and OpenSSH's default HostKey list skips missing files
//     quietly);
//   - SSHConfig.AuthorizedKeys are added, once each, to the default user's
//     ~/.ssh/authorized_keys. This runs as root in a guest whose files the
//     user may have prepared (a VM outlives a boot): ~/.ssh and the file
//     are opened without following symlinks, a hard-linked file or one
//     owned by another user is refused, and what is created belongs to the
//     user (0700 directory, 0600 file).

var sshdBinaries = []string{"/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd", "/usr/local/sbin/sshd"}

const sshDir = "/etc/ssh"

func (r guestRoot) sshdInstalled() bool { return r.anyExists(sshdBinaries...) }

// ensureHostKeys makes the host keys that are missing (ed25519, ECDSA
// P-256) and the .pub files of keys that lack one. It returns the private
// key paths it made.
func (r guestRoot) ensureHostKeys(comment string) (made []string, err error) {
	var errs []error
	for _, kt := range []string{"ed25519", "ecdsa"} {
		priv := filepath.Join(sshDir, "ssh_host_"+kt+"_key")
		if _, err := os.Lstat(r.path(priv)); err == nil {
			if err := r.ensurePublicKey(priv, comment); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		key, err := newHostKey(kt)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		block, err := ssh.MarshalPrivateKey(key, comment)
		if err != nil {
			errs = append(errs, fmt.Errorf("host key %s: %w", priv, err))
			continue
		}
		signer, err := ssh.NewSignerFromSigner(key)
		if err != nil {
			errs = append(errs, fmt.Errorf("host key %s: %w", priv, err))
			continue
		}
		// The public half first: sshd needs only the private file, and a
		// private key without its .pub is repaired at the next boot.
		if err := r.writeFile(priv+".pub", authorizedLine(signer.PublicKey(), comment), 0o644); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := r.writeFile(priv, pem.EncodeToMemory(block), 0o600); err != nil {
			errs = append(errs, err)
			continue
		}
		made = append(made, priv)
	}
	return made, errors.Join(errs...)
}

func newHostKey(kt string) (crypto.Signer, error) {
	switch kt {
	case "ed25519":
		_, k, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("make ed25519 host key: %w", err)
		}
		return k, nil
	case "ecdsa":
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("make ecdsa host key: %w", err)
		}
		return k, nil
	}
	return nil, fmt.Errorf("unknown host key type %q", kt)
}

// ensurePublicKey writes priv.pub from priv when it is missing.
func (r guestRoot) ensurePublicKey(priv, comment string) error {
	if _, err := os.Lstat(r.path(priv + ".pub")); err == nil {
		return nil
	}
	b, err := os.ReadFile(r.path(priv))
	if err != nil {
		return fmt.Errorf("host key %s: %w", priv, err)
	}
	signer, err := ssh.ParsePrivateKey(b)
	if err != nil {
		return fmt.Errorf("host key %s: %w", priv, err)
	}
	return r.writeFile(priv+".pub", authorizedLine(signer.PublicKey(), comment), 0o644)
}

func authorizedLine(k ssh.PublicKey, comment string) []byte {
	line := bytes.TrimSpace(ssh.MarshalAuthorizedKey(k))
	if comment != "" {
		line = append(line, ' ')
		line = append(line, comment...)
	}
	return append(line, '\n')
}

// sshdHostKeys returns the public host keys in /etc/ssh
// (ssh_host_*_key.pub whose private key exists), in authorized_keys form
// without comments, sorted by file name.
func (r guestRoot) sshdHostKeys() []string {
	pubs, _ := filepath.Glob(r.path(filepath.Join(sshDir, "ssh_host_*_key.pub")))
	var keys []string
	for _, p := range pubs {
		if _, err := os.Stat(strings.TrimSuffix(p, ".pub")); err != nil {
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		k, _, _, _, err := ssh.ParseAuthorizedKey(b)
		if err != nil {
			continue
		}
		keys = append(keys, string(bytes.TrimSpace(ssh.MarshalAuthorizedKey(k))))
	}
	return keys
}

// passwdEntry is a user of the image (/etc/passwd).
type passwdEntry struct {
	name     string
	uid, gid int
	home     string
}

// lookupUser finds name in the image's /etc/passwd; root needs no entry.
func (r guestRoot) lookupUser(name string) (passwdEntry, error) {
	f, err := os.Open(r.path("/etc/passwd"))
	if err == nil {
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Split(sc.Text(), ":")
			if len(fields) < 7 || fields[0] != name {
				continue
			}
			uid, err1 := strconv.Atoi(fields[2])
			gid, err2 := strconv.Atoi(fields[3])
			if err1 != nil || err2 != nil || uid < 0 || gid < 0 {
				return passwdEntry{}, fmt.Errorf("user %s: bad /etc/passwd entry", name)
			}
			if !filepath.IsAbs(fields[5]) {
				return passwdEntry{}, fmt.Errorf("user %s: home %q is not an absolute path", name, fields[5])
			}
			return passwdEntry{name: name, uid: uid, gid: gid, home: fields[5]}, nil
		}
	}
	if name == "root" {
		return passwdEntry{name: "root", home: "/root"}, nil
	}
	return passwdEntry{}, fmt.Errorf("user %s: not in the image's /etc/passwd", name)
}

// authorizeKeys adds sc.AuthorizedKeys to the user's authorized_keys.
func (r guestRoot) authorizeKeys(sc *agentproto.SSHConfig) error {
	if sc == nil || len(sc.AuthorizedKeys) == 0 {
		return nil
	}
	name := sc.User
	if name == "" {
		name = "root"
	}
	u, err := r.lookupUser(name)
	if err != nil {
		return fmt.Errorf("authorize ssh keys: %w", err)
	}
	if err := r.addAuthorizedKeys(u, sc.AuthorizedKeys); err != nil {
		return fmt.Errorf("authorize ssh keys for %s: %w", name, err)
	}
	return nil
}

func (r guestRoot) addAuthorizedKeys(u passwdEntry, keys []string) error {
	var wanted []ssh.PublicKey
	var lines []string
	for _, k := range keys {
		pk, _, _, _, err := ssh.ParseAuthorizedKey([]byte(k))
		if err != nil {
			return fmt.Errorf("key %.40q: %w", k, err)
		}
		wanted, lines = append(wanted, pk), append(lines, strings.TrimSpace(k))
	}

	// The home directory's path belongs to root (/home, or the user's
	// entry): it may go through symlinks. What is inside may be the
	// user's: never follow a symlink there.
	home := r.path(u.home)
	if _, err := os.Stat(home); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(filepath.Dir(home), 0o755); err != nil {
			return fmt.Errorf("create home %s: %w", u.home, err)
		}
		if err := os.Mkdir(home, 0o700); err != nil {
			return fmt.Errorf("create home %s: %w", u.home, err)
		}
		if err := os.Chown(home, u.uid, u.gid); err != nil {
			return fmt.Errorf("create home %s: %w", u.home, err)
		}
	}
	homeFD, err := unix.Open(home, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open home %s: %w", u.home, err)
	}
	defer unix.Close(homeFD)

	dirFD, err := openOwnedAt(homeFD, ".ssh", u, true)
	if err != nil {
		return fmt.Errorf("%s/.ssh: %w", u.home, err)
	}
	defer unix.Close(dirFD)
	fd, err := openOwnedAt(dirFD, "authorized_keys", u, false)
	if err != nil {
		return fmt.Errorf("%s/.ssh/authorized_keys: %w", u.home, err)
	}
	f := os.NewFile(uintptr(fd), "authorized_keys")
	defer f.Close()

	old, err := io.ReadAll(io.LimitReader(f, 16<<20))
	if err != nil {
		return fmt.Errorf("read %s/.ssh/authorized_keys: %w", u.home, err)
	}
	add := missingKeys(old, wanted, lines)
	if len(add) == 0 {
		return nil
	}
	var b bytes.Buffer
	if len(old) > 0 && old[len(old)-1] != '\n' {
		b.WriteByte('\n')
	}
	for _, l := range add {
		b.WriteString(l + "\n")
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		return fmt.Errorf("write %s/.ssh/authorized_keys: %w", u.home, err)
	}
	if _, err := f.Write(b.Bytes()); err != nil {
		return fmt.Errorf("write %s/.ssh/authorized_keys: %w", u.home, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("write %s/.ssh/authorized_keys: %w", u.home, err)
	}
	return nil
}

// missingKeys returns the lines of the wanted keys that existing (an
// authorized_keys file) does not hold yet, in any form (with options or
// another comment), each once.
func missingKeys(existing []byte, wanted []ssh.PublicKey, lines []string) []string {
	have := map[string]bool{}
	rest := existing
	for len(rest) > 0 {
		k, _, _, next, err := ssh.ParseAuthorizedKey(rest)
		if err != nil {
			break // no more keys (the parser skips bad lines itself)
		}
		have[string(k.Marshal())] = true
		rest = next
	}
	var add []string
	for i, k := range wanted {
		id := string(k.Marshal())
		if have[id] {
			continue
		}
		have[id] = true
		add = append(add, lines[i])
	}
	return add
}

// openOwnedAt opens name in dirFD without following a symlink: a
// directory (dir) or a regular file for reading and writing, made for u
// when missing (0700 or 0600, owned by u). An existing one must be owned
// by u or root and, for a file, have no other hard link.
func openOwnedAt(dirFD int, name string, u passwdEntry, dir bool) (int, error) {
	created := false
	var fd int
	var err error
	if dir {
		if err = unix.Mkdirat(dirFD, name, 0o700); err == nil {
			created = true
		} else if !errors.Is(err, unix.EEXIST) {
			return -1, fmt.Errorf("create: %w", err)
		}
		fd, err = unix.Openat(dirFD, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	} else {
		const flags = unix.O_RDWR | unix.O_NOFOLLOW | unix.O_NONBLOCK | unix.O_CLOEXEC
		fd, err = unix.Openat(dirFD, name, flags|unix.O_CREAT|unix.O_EXCL, 0o600)
		if err == nil {
			created = true
		} else if errors.Is(err, unix.EEXIST) {
			fd, err = unix.Openat(dirFD, name, flags, 0)
		}
	}
	if errors.Is(err, unix.ELOOP) || (dir && errors.Is(err, unix.ENOTDIR)) {
		return -1, errors.New("is a symlink or not a directory: refused")
	}
	if err != nil {
		return -1, fmt.Errorf("open: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("stat: %w", err)
	}
	switch {
	case !dir && st.Mode&unix.S_IFMT != unix.S_IFREG:
		err = errors.New("not a regular file: refused")
	case !dir && st.Nlink != 1:
		err = fmt.Errorf("has %d hard links: refused", st.Nlink)
	case int(st.Uid) != u.uid && st.Uid != 0:
		err = fmt.Errorf("owned by uid %d, not %s (%d): refused", st.Uid, u.name, u.uid)
	}
	if err == nil && created {
		mode := uint32(0o600)
		if dir {
			mode = 0o700
		}
		if err = unix.Fchown(fd, u.uid, u.gid); err == nil {
			err = unix.Fchmod(fd, mode)
		}
	}
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}
