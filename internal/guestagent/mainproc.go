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
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
)

// This file holds the pure logic of the main process (agentproto.Process):
// its user, environment, restart policy and stop signal. PID 1 runs it
// (mainproc_linux.go); the agent server serves attach requests
// (attach.go).

// envMainFD names, in the agent server's environment, the descriptor of
// its link to PID 1's main process supervisor.
const envMainFD = "BANGER_MAIN_FD"

// mainFD is that descriptor in the agent server.
const mainFD = 4

// Timings of the main process.
const (
	// mainHealthy: a run that lasted this long resets the restart backoff.
	mainHealthy = 10 * time.Second
	// defaultStopGrace is how long the main process has to exit after its
	// stop signal before the guest stops everything.
	defaultStopGrace = 10 * time.Second
	// exitLinger bounds how long PID 1 waits, after the main process
	// finally exited, for its exit status to reach an attached client
	// before powering off.
	exitLinger = 5 * time.Second
)

// procUser is who a process runs as.
type procUser struct {
	name     string // "" when the uid has no passwd entry
	uid, gid uint32
	groups   []uint32 // supplementary groups
	home     string
}

// credential is what the process runs with.
func (u procUser) credential() *syscall.Credential {
	groups := []uint32{u.gid}
	for _, g := range u.groups {
		if g != u.gid {
			groups = append(groups, g)
		}
	}
	return &syscall.Credential{Uid: u.uid, Gid: u.gid, Groups: groups}
}

// pwEntry is a line of /etc/passwd.
type pwEntry struct {
	name     string
	uid, gid uint32
	home     string
}

// grEntry is a line of /etc/group.
type grEntry struct {
	name    string
	gid     uint32
	members []string
}

func readPasswd(path string) ([]pwEntry, error) {
	var out []pwEntry
	err := scanColonFile(path, func(f []string) {
		if len(f) < 7 {
			return
		}
		uid, err1 := strconv.ParseUint(f[2], 10, 32)
		gid, err2 := strconv.ParseUint(f[3], 10, 32)
		if err1 != nil || err2 != nil {
			return
		}
		out = append(out, pwEntry{name: f[0], uid: uint32(uid), gid: uint32(gid), home: f[5]})
	})
	return out, err
}

func readGroupFile(path string) ([]grEntry, error) {
	var out []grEntry
	err := scanColonFile(path, func(f []string) {
		if len(f) < 4 {
			return
		}
		gid, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			return
		}
		var members []string
		if f[3] != "" {
			members = strings.Split(f[3], ",")
		}
		out = append(out, grEntry{name: f[0], gid: uint32(gid), members: members})
	})
	return out, err
}

func scanColonFile(path string, fn func([]string)) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fn(strings.Split(line, ":"))
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	return nil
}

// resolveUser resolves an OCI image's user ("", NAME, UID, with an
// optional ":GROUP" or ":GID") in etcDir's passwd and group files, the
// way container runtimes do: a name must exist; a numeric uid works
// without an entry (gid 0, home /); "" is root. Supplementary groups are
// those listing the user by name (none when a group is given).
func resolveUser(etcDir, spec string) (procUser, error) {
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	if userPart == "" {
		userPart = "0"
	}
	passwd, err := readPasswd(filepath.Join(etcDir, "passwd"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return procUser{}, fmt.Errorf("user %q: %w", spec, err)
	}
	u := procUser{home: "/"}
	if n, nerr := strconv.ParseUint(userPart, 10, 32); nerr == nil {
		u.uid = uint32(n)
		if i := slices.IndexFunc(passwd, func(e pwEntry) bool { return e.uid == u.uid }); i >= 0 {
			u.name, u.gid, u.home = passwd[i].name, passwd[i].gid, passwd[i].home
		} else if u.uid == 0 {
			u.name, u.home = "root", "/root"
		}
	} else {
		i := slices.IndexFunc(passwd, func(e pwEntry) bool { return e.name == userPart })
		if i < 0 {
			return procUser{}, fmt.Errorf("user %q: no such user in %s", userPart, filepath.Join(etcDir, "passwd"))
		}
		u.name, u.uid, u.gid, u.home = passwd[i].name, passwd[i].uid, passwd[i].gid, passwd[i].home
	}
	if u.home == "" {
		u.home = "/"
	}
	groups, err := readGroupFile(filepath.Join(etcDir, "group"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return procUser{}, fmt.Errorf("user %q: %w", spec, err)
	}
	if hasGroup {
		if groupPart == "" {
			return procUser{}, fmt.Errorf("user %q: empty group", spec)
		}
		if n, nerr := strconv.ParseUint(groupPart, 10, 32); nerr == nil {
			u.gid = uint32(n)
		} else {
			i := slices.IndexFunc(groups, func(g grEntry) bool { return g.name == groupPart })
			if i < 0 {
				return procUser{}, fmt.Errorf("user %q: no such group %q in %s", spec, groupPart, filepath.Join(etcDir, "group"))
			}
			u.gid = groups[i].gid
		}
		return u, nil
	}
	if u.name != "" {
		for _, g := range groups {
			if slices.Contains(g.members, u.name) && !slices.Contains(u.groups, g.gid) {
				u.groups = append(u.groups, g.gid)
			}
		}
	}
	return u, nil
}

// processEnv is the main process's environment: the image's env, then
// PATH when it has none, HOSTNAME and HOME (unless the image sets them),
// as container runtimes give it.
func processEnv(imageEnv []string, hostname string, u procUser) []string {
	env := append([]string(nil), imageEnv...)
	has := func(k string) bool {
		return slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, k+"=") })
	}
	if !has("PATH") {
		env = append(env, "PATH="+defaultPath)
	}
	if !has("HOSTNAME") && hostname != "" {
		env = append(env, "HOSTNAME="+hostname)
	}
	if !has("HOME") {
		env = append(env, "HOME="+u.home)
	}
	return env
}

// shouldRestart applies the restart policy to a run that ended with code.
// stopping: the guest is powering off, nothing restarts.
func shouldRestart(policy string, code int, stopping bool) bool {
	if stopping {
		return false
	}
	switch policy {
	case agentproto.RestartAlways:
		return true
	case agentproto.RestartOnFailure:
		return code != 0
	}
	return false
}

// validRestart reports whether policy is one the agent knows ("" is "no").
func validRestart(policy string) bool {
	switch policy {
	case "", agentproto.RestartNo, agentproto.RestartOnFailure, agentproto.RestartAlways:
		return true
	}
	return false
}

// parseSignal parses a stop signal: "SIGTERM", "TERM", "term" or "15";
// "" is SIGTERM.
func parseSignal(s string) (syscall.Signal, error) {
	if s == "" {
		return syscall.SIGTERM, nil
	}
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, fmt.Errorf("signal %q: out of range", s)
		}
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("signal %q: unknown", s)
}

// exitCode is a run's exit code as a shell reports it: the status, or
// 128+N for a process killed by signal N.
func exitCode(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// stopGraceOf is the process's stop grace period.
func stopGraceOf(p *agentproto.Process) time.Duration {
	if p.StopGraceSec > 0 {
		return time.Duration(p.StopGraceSec) * time.Second
	}
	return defaultStopGrace
}
