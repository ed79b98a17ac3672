package sshcfg

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Files are the invoking user's banger SSH files.
type Files struct {
	User User
	// Dir is ~/.config/banger/ssh (always under the passwd home, which
	// the Include line's "~" names for ssh).
	Dir string
	// Key is the private key; its public key is Key + ".pub". Default
	// Dir/id_ed25519, made when missing.
	Key string
	// KeyConfigured: Key comes from ssh_key_path (never generated).
	KeyConfigured bool
	// KnownHosts is Dir/known_hosts, Config is Dir/config.
	KnownHosts, Config string
	// Banger is the absolute path of the banger executable that
	// ProxyCommand runs.
	Banger string
}

// IncludeLine is what Install adds to ~/.ssh/config (see Files.IncludeLine).
const IncludeLine = "Include ~/.config/banger/ssh/config"

// New returns u's files. keyPath is the CLI config's ssh_key_path ("":
// the default key; "~/" names u's home); banger is the absolute path of
// the banger executable.
func New(u User, keyPath, banger string) Files {
	dir := filepath.Join(u.Home, ".config", "banger", "ssh")
	f := Files{User: u, Dir: dir, Key: filepath.Join(dir, "id_ed25519"),
		KnownHosts: filepath.Join(dir, "known_hosts"), Config: filepath.Join(dir, "config"), Banger: banger}
	if keyPath != "" {
		if rest, ok := strings.CutPrefix(keyPath, "~/"); ok {
			keyPath = filepath.Join(u.Home, rest)
		}
		f.Key, f.KeyConfigured = keyPath, true
	}
	return f
}

// lock takes banger's lock on the ssh directory (made if missing) for a
// read-modify-write of one of its files: concurrent bangers (two proxies
// writing known_hosts) don't lose each other's changes.
func (f Files) lock() (unlock func(), err error) {
	if err := f.mkdirAll(f.Dir); err != nil {
		return nil, err
	}
	p := filepath.Join(f.Dir, ".lock")
	fd, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", p, err)
	}
	if err := f.chown(p); err != nil {
		fd.Close()
		return nil, err
	}
	if err := syscall.Flock(int(fd.Fd()), syscall.LOCK_EX); err != nil {
		fd.Close()
		return nil, fmt.Errorf("lock %s: %w", p, err)
	}
	return func() { fd.Close() }, nil
}

// chown gives path to the user when banger runs for them as root.
func (f Files) chown(path string) error {
	if !f.User.Chown {
		return nil
	}
	if err := os.Lchown(path, f.User.UID, f.User.GID); err != nil {
		return fmt.Errorf("give %s to uid %d: %w", path, f.User.UID, err)
	}
	return nil
}

// mkdirAll makes dir and its missing parents with mode 0700, each owned
// by the user.
func (f Files) mkdirAll(dir string) error {
	fi, err := os.Stat(dir)
	if err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%s is not a directory", dir)
		}
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if parent := filepath.Dir(dir); parent != dir {
		if err := f.mkdirAll(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("make %s: %w", dir, err)
	}
	return f.chown(dir)
}

// writeAtomic replaces path with data: a temporary file in the same
// directory with mode, given to uid:gid when owner is set, synced when
// sync is set, and renamed over path. Readers see the old or the new file,
// never a part.
func writeAtomic(path string, data []byte, mode fs.FileMode, owner *[2]int, sync bool) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	name := tmp.Name()
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(name)
		}
	}()
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		return fmt.Errorf("chmod %s: %w", name, err)
	}
	if owner != nil {
		if err := tmp.Chown(owner[0], owner[1]); err != nil {
			return fmt.Errorf("chown %s: %w", name, err)
		}
	}
	if sync {
		if err := tmp.Sync(); err != nil {
			return fmt.Errorf("sync %s: %w", name, err)
		}
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := os.Rename(name, path); err != nil {
		return fmt.Errorf("replace %s: %w", path, err)
	}
	ok = true
	return nil
}

// write replaces one of the user's files (mode 0600, theirs), synced.
func (f Files) write(path string, data []byte) error {
	return writeAtomic(path, data, 0o600, f.owner(), true)
}

// writeRegenerated replaces one of the user's files that banger rewrites
// from the daemon's answers (its ssh config and known_hosts: every vm
// create, run, ssh and ssh-proxy refreshes the VM's entries), without
// waiting for the disk: a crash loses at most the last refresh, and the
// rename still shows readers a whole file. Syncing held the lock that
// concurrent bangers share for a journal commit each (tens of ms on a busy
// disk), which serialised parallel creates.
func (f Files) writeRegenerated(path string, data []byte) error {
	return writeAtomic(path, data, 0o600, f.owner(), false)
}

func (f Files) owner() *[2]int {
	if f.User.Chown {
		return &[2]int{f.User.UID, f.User.GID}
	}
	return nil
}
