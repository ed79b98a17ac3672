package sshcfg

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/errdefs"
)

// PublicKey returns the user's public key (an authorized_keys line) for
// VMCreateParams.SSHKeys. The default key is made first when missing;
// a configured key (ssh_key_path) must exist.
func (f Files) PublicKey() (string, error) {
	if err := f.EnsureKey(); err != nil {
		return "", err
	}
	b, err := os.ReadFile(f.Key + ".pub")
	if err != nil {
		return "", fmt.Errorf("read the public key: %w", err)
	}
	line := strings.TrimSpace(string(b))
	if _, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line)); err != nil {
		return "", fmt.Errorf("public key %s.pub: %w: %w", f.Key, err, errdefs.ErrInvalid)
	}
	return line, nil
}

// EnsureKey makes the default key pair (ed25519, OpenSSH format, 0600, the
// user's) when it is missing, and the public key of an existing private
// key that has none. A configured key (ssh_key_path) is never made.
func (f Files) EnsureKey() error {
	if _, err := os.Stat(f.Key); err == nil {
		if _, err := os.Stat(f.Key + ".pub"); err == nil {
			return nil
		}
	} else if f.KeyConfigured {
		return fmt.Errorf("ssh_key_path %s: %w; make it (ssh-keygen -t ed25519 -f %s) or remove ssh_key_path from the config to let banger make one: %w",
			f.Key, err, f.Key, errdefs.ErrFailedPrecondition)
	}
	unlock, err := f.lock()
	if err != nil {
		return err
	}
	defer unlock()
	priv, err := os.ReadFile(f.Key)
	switch {
	case err == nil:
		// A private key without its .pub.
		return f.writePublic(priv)
	case !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("read %s: %w", f.Key, err)
	case f.KeyConfigured:
		return fmt.Errorf("ssh_key_path %s does not exist: %w", f.Key, errdefs.ErrFailedPrecondition)
	}
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("generate an ssh key: %w", err)
	}
	blk, err := ssh.MarshalPrivateKey(key, f.comment())
	if err != nil {
		return fmt.Errorf("encode the ssh key: %w", err)
	}
	pemBytes := pem.EncodeToMemory(blk)
	// The public key first: a private key is only ever there with it.
	if err := f.writePublic(pemBytes); err != nil {
		return err
	}
	return f.write(f.Key, pemBytes)
}

// KeyInfo describes the user's key for doctor: its fingerprint, or that
// it will be made, or an error saying what is wrong (a missing configured
// key, a private key others can read, which ssh refuses).
func (f Files) KeyInfo() (string, error) {
	fi, err := os.Stat(f.Key)
	switch {
	case errors.Is(err, fs.ErrNotExist) && !f.KeyConfigured:
		return fmt.Sprintf("%s: made at the first vm create", f.Key), nil
	case errors.Is(err, fs.ErrNotExist):
		return "", fmt.Errorf("ssh_key_path %s does not exist: %w", f.Key, errdefs.ErrFailedPrecondition)
	case err != nil:
		return "", err
	case fi.Mode().Perm()&0o077 != 0:
		return "", fmt.Errorf("%s has mode %04o: ssh refuses a private key others can read: %w", f.Key, fi.Mode().Perm(), errdefs.ErrFailedPrecondition)
	}
	b, err := os.ReadFile(f.Key + ".pub")
	if err != nil {
		return fmt.Sprintf("%s (its .pub is made at the first vm create)", f.Key), nil
	}
	pk, _, _, _, err := ssh.ParseAuthorizedKey(b)
	if err != nil {
		return "", fmt.Errorf("%s.pub: %w: %w", f.Key, err, errdefs.ErrInvalid)
	}
	return fmt.Sprintf("%s (%s %s)", f.Key, pk.Type(), ssh.FingerprintSHA256(pk)), nil
}

func (f Files) comment() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("banger %s@%s", f.User.Name, host)
}

// writePublic writes Key.pub for the private key privPEM.
func (f Files) writePublic(privPEM []byte) error {
	signer, err := ssh.ParsePrivateKey(privPEM)
	if err != nil {
		return fmt.Errorf("%s has no %s.pub and banger can't read it (%w): write the public key there (ssh-keygen -y -f %s > %s.pub)",
			f.Key, f.Key, err, f.Key, f.Key)
	}
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(signer.PublicKey()))) + " " + f.comment() + "\n"
	var owner *[2]int
	if f.User.Chown {
		owner = &[2]int{f.User.UID, f.User.GID}
	}
	return writeAtomic(f.Key+".pub", []byte(line), 0o644, owner, true)
}
