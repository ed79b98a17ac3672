package guestagent

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// account is the guest user a login session of the built-in SSH server
// runs as.
type account struct {
	name     string
	uid, gid uint32
	groups   []uint32 // supplementary groups (from the group file)
	home     string
	shell    string
	ttyGID   uint32 // group of the session's terminal: "tty" when it exists, else gid
}

// defaultShell is the shell of accounts whose passwd entry names none, and
// of root in an image without a passwd file.
const defaultShell = "/bin/sh"

// lookupAccount finds name ("" means root) in etcDir/passwd and its
// supplementary groups in etcDir/group, without NSS (the agent is static),
// as the guest's files say now. An image without a passwd file (busybox
// rootfs) has only root, with /bin/sh and home /root.
func lookupAccount(etcDir, name string) (account, error) {
	if name == "" {
		name = "root"
	}
	acct, err := findPasswd(filepath.Join(etcDir, "passwd"), name)
	if errors.Is(err, fs.ErrNotExist) && name == "root" {
		acct, err = account{name: "root", home: "/root", shell: defaultShell}, nil
	}
	if err != nil {
		return account{}, err
	}
	acct.ttyGID = acct.gid
	if err := readGroups(filepath.Join(etcDir, "group"), &acct); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return account{}, err
	}
	return acct, nil
}

func findPasswd(path, name string) (account, error) {
	f, err := os.Open(path)
	if err != nil {
		return account{}, fmt.Errorf("look up user %q: %w", name, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// name:password:uid:gid:gecos:home:shell
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 7 || fields[0] != name {
			continue
		}
		uid, err1 := strconv.ParseUint(fields[2], 10, 32)
		gid, err2 := strconv.ParseUint(fields[3], 10, 32)
		if err1 != nil || err2 != nil {
			return account{}, fmt.Errorf("look up user %q: malformed entry in %s", name, path)
		}
		a := account{name: name, uid: uint32(uid), gid: uint32(gid), home: fields[5], shell: fields[6]}
		if a.home == "" {
			a.home = "/"
		}
		if a.shell == "" {
			a.shell = defaultShell
		}
		return a, nil
	}
	if err := sc.Err(); err != nil {
		return account{}, fmt.Errorf("look up user %q: read %s: %w", name, path, err)
	}
	return account{}, fmt.Errorf("look up user %q: no such user in %s", name, path)
}

// readGroups adds the groups listing a.name as a member, and finds "tty".
func readGroups(path string, a *account) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("read groups of %q: %w", a.name, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// name:password:gid:member,member
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 4 {
			continue
		}
		gid, err := strconv.ParseUint(fields[2], 10, 32)
		if err != nil {
			continue
		}
		if fields[0] == "tty" {
			a.ttyGID = uint32(gid)
		}
		if slices.Contains(strings.Split(fields[3], ","), a.name) && !slices.Contains(a.groups, uint32(gid)) {
			a.groups = append(a.groups, uint32(gid))
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read groups of %q: %w", a.name, err)
	}
	return nil
}

// credential is what a process of the account runs with.
func (a *account) credential() *syscall.Credential {
	groups := []uint32{a.gid}
	for _, g := range a.groups {
		if g != a.gid {
			groups = append(groups, g)
		}
	}
	return &syscall.Credential{Uid: a.uid, Gid: a.gid, Groups: groups}
}
