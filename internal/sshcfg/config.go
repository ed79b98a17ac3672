package sshcfg

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/bangerdev/banger/internal/errdefs"
)

// Host is one VM's block in banger's ssh config.
type Host struct {
	// Name is the VM's name (the block is for NAME.banger).
	Name string
	// User is the image's default user (api.SSHInfo.User): OpenSSH has no
	// per-host user chosen at connect time, so each VM gets a block.
	User string
	// Direct is the VM's sshd address (api.SSHInfo.Direct), passed to the
	// proxy as a hint it uses when the daemon can't be asked (a user
	// without access to bangerd's socket, after `sudo banger vm run`).
	Direct string
}

// check refuses what would not be a VM name, a user name or an address
// in the config file (a newline would add options of its own).
func (h Host) check() error {
	ok := func(s, extra string) bool {
		return strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."+extra) == ""
	}
	switch {
	case h.Name == "" || !ok(h.Name, ""):
		return fmt.Errorf("vm name %q: not a host name: %w", h.Name, errdefs.ErrInvalid)
	case !ok(h.User, "$"):
		return fmt.Errorf("user %q of vm %s: not a user name: %w", h.User, h.Name, errdefs.ErrInvalid)
	case h.Direct != "":
		if _, err := netip.ParseAddrPort(h.Direct); err != nil {
			return fmt.Errorf("address %q of vm %s: %w: %w", h.Direct, h.Name, err, errdefs.ErrInvalid)
		}
	}
	return nil
}

// ProxyCommand is the ssh ProxyCommand that reaches VMs (%h: NAME.banger),
// with extra arguments before the host (a --direct hint).
func (f Files) ProxyCommand(extra ...string) string {
	parts := []string{shellQuote(f.Banger), "vm", "ssh-proxy"}
	for _, e := range extra {
		parts = append(parts, shellQuote(e))
	}
	return percentEscape(strings.Join(parts, " ")) + " %h"
}

// Options are the ssh options that reach VMs, as "Key value" pairs: the
// catch-all block's lines, and `banger vm ssh`'s -o options.
func (f Files) Options() [][2]string {
	return [][2]string{
		{"ProxyCommand", f.ProxyCommand()},
		{"UserKnownHostsFile", configQuote(f.KnownHosts)},
		{"StrictHostKeyChecking", "yes"},
		{"UpdateHostKeys", "no"},
		{"IdentityFile", configQuote(f.Key)},
		{"IdentitiesOnly", "yes"},
	}
}

const configHeader = `# banger's ssh configuration, for ssh NAME.banger (and scp, rsync, editors).
# Written by banger: rewritten by banger ssh-config and on vm create, run and ssh.
# Included from ~/.ssh/config by: banger ssh-config --install. Do not edit.
`

// ConfigText is banger's ssh config: one block per VM (its user) and
// the "Host *.banger" catch-all. OpenSSH keeps the first value it finds
// for each option, so a VM's block only adds what differs.
func (f Files) ConfigText(hosts []Host) string {
	var b strings.Builder
	b.WriteString(configHeader)
	hosts = slices.Clone(hosts)
	slices.SortFunc(hosts, func(a, b Host) int { return strings.Compare(a.Name, b.Name) })
	for _, h := range hosts {
		if h.check() != nil {
			continue
		}
		fmt.Fprintf(&b, "\nHost %s%s\n", h.Name, HostSuffix)
		if h.User != "" {
			fmt.Fprintf(&b, "    User %s\n", h.User)
		}
		if h.Direct != "" {
			fmt.Fprintf(&b, "    ProxyCommand %s\n", f.ProxyCommand("--direct", h.Direct))
		}
	}
	fmt.Fprintf(&b, "\nHost *%s\n", HostSuffix)
	for _, o := range f.Options() {
		fmt.Fprintf(&b, "    %s %s\n", o[0], o[1])
	}
	return b.String()
}

// WriteConfig rewrites banger's ssh config with exactly hosts.
func (f Files) WriteConfig(hosts []Host) error {
	unlock, err := f.lock()
	if err != nil {
		return err
	}
	defer unlock()
	return f.writeConfig(hosts)
}

func (f Files) writeConfig(hosts []Host) error {
	for _, h := range hosts {
		if err := h.check(); err != nil {
			return err
		}
	}
	text := f.ConfigText(hosts)
	if old, err := os.ReadFile(f.Config); err == nil && string(old) == text {
		return nil
	}
	return f.writeRegenerated(f.Config, []byte(text))
}

// SetHost adds or replaces one VM's block, keeping the others.
func (f Files) SetHost(h Host) error {
	return f.editHosts(func(hosts []Host) []Host {
		hosts = slices.DeleteFunc(hosts, func(o Host) bool { return o.Name == h.Name })
		return append(hosts, h)
	})
}

// RemoveHost removes VM name's block (vm rm).
func (f Files) RemoveHost(name string) error {
	return f.editHosts(func(hosts []Host) []Host {
		return slices.DeleteFunc(hosts, func(o Host) bool { return o.Name == name })
	})
}

func (f Files) editHosts(edit func([]Host) []Host) error {
	unlock, err := f.lock()
	if err != nil {
		return err
	}
	defer unlock()
	hosts, err := f.Hosts()
	if err != nil {
		return err
	}
	// An edited block banger can't read back is dropped, not kept forever.
	hosts = slices.DeleteFunc(hosts, func(h Host) bool { return h.check() != nil })
	return f.writeConfig(edit(hosts))
}

// Hosts reads the VM blocks of banger's ssh config (none when it is
// missing).
func (f Files) Hosts() ([]Host, error) {
	b, err := os.ReadFile(f.Config)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", f.Config, err)
	}
	var hosts []Host
	var cur *Host
	for _, line := range strings.Split(string(b), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 2 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		switch strings.ToLower(fields[0]) {
		case "host":
			cur = nil
			if name, ok := strings.CutSuffix(fields[1], HostSuffix); ok && len(fields) == 2 && !strings.ContainsAny(name, "*?!") {
				hosts = append(hosts, Host{Name: name})
				cur = &hosts[len(hosts)-1]
			}
		case "user":
			if cur != nil {
				cur.User = strings.Trim(fields[1], `"`)
			}
		case "proxycommand":
			if i := slices.Index(fields, "--direct"); cur != nil && i > 0 && i+1 < len(fields) {
				cur.Direct = strings.Trim(fields[i+1], `'`)
			}
		}
	}
	return hosts, nil
}

// Install makes ~/.ssh/config include banger's ssh config: IncludeLine
// at its top (an Include after a Host line would only apply to that
// host), once. The file is made (0600, the user's) when missing, else
// edited atomically keeping its mode and owner; a symlinked config is
// edited where it points. It reports whether the file changed.
func (f Files) Install() (bool, error) {
	sshDir := filepath.Join(f.User.Home, ".ssh")
	if err := f.mkdirAll(sshDir); err != nil {
		return false, err
	}
	path := filepath.Join(sshDir, "config")
	if real, err := filepath.EvalSymlinks(path); err == nil {
		path = real
	}
	mode := fs.FileMode(0o600)
	var owner *[2]int
	if f.User.Chown {
		owner = &[2]int{f.User.UID, f.User.GID}
	}
	old, err := os.ReadFile(path)
	switch {
	case err == nil:
		fi, err := os.Stat(path)
		if err != nil {
			return false, err
		}
		mode = fi.Mode().Perm()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && os.Geteuid() == 0 {
			owner = &[2]int{int(st.Uid), int(st.Gid)}
		}
	case !errors.Is(err, fs.ErrNotExist):
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	lines := strings.SplitAfter(string(old), "\n")
	first := -1 // the first directive
	var ours []int
	for i, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		if first < 0 {
			first = i
		}
		if f.isOurInclude(t) {
			ours = append(ours, i)
		}
	}
	if len(ours) == 1 && ours[0] == first {
		return false, nil
	}
	var b strings.Builder
	b.WriteString("# banger's VMs as NAME.banger (banger ssh-config; docs/ssh.md)\n" + f.IncludeLine() + "\n")
	if len(old) > 0 {
		b.WriteString("\n")
	}
	for i, l := range lines {
		if slices.Contains(ours, i) {
			continue
		}
		b.WriteString(l)
	}
	if err := writeAtomic(path, []byte(b.String()), mode, owner, true); err != nil {
		return false, err
	}
	return true, nil
}

// IncludeLine is the line Install puts in ~/.ssh/config: IncludeLine
// when the user's home is their passwd entry's (ssh expands "~" to that),
// else one naming banger's config file by its path.
func (f Files) IncludeLine() string {
	if pw, err := user.LookupId(strconv.Itoa(f.User.UID)); err == nil && pw.HomeDir == f.User.Home {
		return IncludeLine
	}
	return "Include " + configQuote(f.Config)
}

// Installed reports whether ~/.ssh/config includes banger's ssh config
// (anywhere: Install moves it to the top).
func (f Files) Installed() bool {
	b, err := os.ReadFile(filepath.Join(f.User.Home, ".ssh", "config"))
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f.isOurInclude(strings.TrimSpace(l)) {
			return true
		}
	}
	return false
}

func (f Files) isOurInclude(directive string) bool {
	fields := strings.Fields(strings.ReplaceAll(directive, "=", " "))
	if len(fields) != 2 || !strings.EqualFold(fields[0], "include") {
		return false
	}
	arg := strings.ReplaceAll(strings.Trim(fields[1], `"`), "%%", "%")
	return arg == "~/.config/banger/ssh/config" || arg == f.Config
}

// shellQuote quotes s for /bin/sh (ProxyCommand runs through it).
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:@,+=") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// configQuote quotes an ssh_config argument (double quotes, backslash
// escapes) and escapes ssh's % tokens.
func configQuote(s string) string {
	s = percentEscape(s)
	if s != "" && !strings.ContainsAny(s, " \t\"'\\#") {
		return s
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}

func percentEscape(s string) string { return strings.ReplaceAll(s, "%", "%%") }
