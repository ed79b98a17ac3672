// Package sshcfg keeps the invoking user's side of SSH to banger's VMs:
// the key banger authorises in new VMs, the known_hosts file that pins
// the VMs' host keys (learned by the daemon through the agent, so never
// trusted on first use), and the ssh_config block that makes
// `ssh NAME.banger` reach a VM through `banger vm ssh-proxy`, included
// from ~/.ssh/config. Under sudo every file is the invoking user's
// (SUDO_USER), so `sudo banger vm run` followed by a plain `ssh NAME.banger`
// works. See docs/ssh.md.
package sshcfg

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"

	"github.com/bangerdev/banger/internal/errdefs"
)

// User is the user banger acts for: the one whose key, known_hosts and
// ssh config it keeps.
type User struct {
	Name     string
	UID, GID int
	// Home is where banger keeps their files: $HOME for the process's
	// own user, the passwd entry's home for a sudo user (sudo may keep
	// the caller's HOME or set root's).
	Home string
	// Chown: banger runs as root for this user (sudo) and gives them
	// every file and directory it creates.
	Chown bool
}

// InvokingUser returns the user banger runs for: SUDO_USER when banger
// runs as root under sudo (SUDO_UID, SUDO_GID; home from the passwd
// entry), else the process's user (home $HOME, else their passwd entry's).
func InvokingUser() (User, error) {
	if su := os.Getenv("SUDO_UID"); su != "" && os.Geteuid() == 0 {
		sg := os.Getenv("SUDO_GID")
		uid, err1 := strconv.Atoi(su)
		gid, err2 := strconv.Atoi(sg)
		if err1 != nil || err2 != nil || uid < 0 || gid < 0 {
			return User{}, fmt.Errorf("SUDO_UID=%q SUDO_GID=%q: not numeric ids; unset them to act as root: %w", su, sg, errdefs.ErrInvalid)
		}
		u := User{Name: os.Getenv("SUDO_USER"), UID: uid, GID: gid, Chown: uid != 0}
		pw, err := user.LookupId(su)
		if err != nil {
			return User{}, fmt.Errorf("find the home of the sudo user (uid %d): %w", uid, err)
		}
		u.Home = pw.HomeDir
		if u.Name == "" {
			u.Name = pw.Username
		}
		return u, nil
	}
	pw, err := user.Current()
	if err != nil {
		return User{}, fmt.Errorf("find the current user: %w", err)
	}
	uid, _ := strconv.Atoi(pw.Uid)
	gid, _ := strconv.Atoi(pw.Gid)
	u := User{Name: pw.Username, UID: uid, GID: gid, Home: os.Getenv("HOME")}
	if !filepath.IsAbs(u.Home) {
		u.Home = pw.HomeDir
	}
	if u.Home == "" {
		return User{}, fmt.Errorf("user %s has no home directory for banger's ssh files", u.Name)
	}
	return u, nil
}
