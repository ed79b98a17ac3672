package guestagent

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/bangerdev/banger/internal/agentproto"
)

// The files the agent's init writes into the new root before the image's
// init runs, so that the image's own network managers keep banger's
// network configuration (applied through netlink, netconf_linux.go) and
// its resolvers use banger's DNS:
//
//   - /etc/resolv.conf (or, when it is a symlink into systemd-resolved's
//     runtime directory, a resolved drop-in under /run);
//   - /etc/hosts: the hostname resolves (sudo and others want it);
//   - systemd-networkd: a runtime .network file per card, matched by MAC,
//     with the static address and KeepConfiguration=yes, named so that it
//     sorts before the image's own files (networkd uses the first match):
//     a DHCP configuration of the image never applies to banger's card;
//   - NetworkManager: a conf.d drop-in marking banger's cards unmanaged
//     and leaving /etc/resolv.conf alone;
//   - ifupdown and other DHCP clients: nothing; banger's DHCP server on
//     the bridge answers them with the same address.
//
// Files for a manager are written only when the image has that manager.
// Runtime files go under /run, a tmpfs mounted by init before it hands
// PID 1 to systemd (earlyboot_linux.go), which keeps it; with another init,
// /run may be remounted, so NetworkManager's drop-in goes under /etc.

// guestRoot is the root filesystem being prepared: "/" in the guest, a
// temporary directory in tests.
type guestRoot struct {
	dir string
	// mode is the init mode (InitModeSystemd, InitModeOther,
	// InitModeAgent).
	mode string
	logf func(format string, args ...any)
}

func (r guestRoot) path(p string) string { return filepath.Join(r.dir, p) }

func (r guestRoot) exists(p string) bool {
	_, err := os.Stat(r.path(p))
	return err == nil
}

func (r guestRoot) anyExists(ps ...string) bool {
	return slices.ContainsFunc(ps, r.exists)
}

func (r guestRoot) log(format string, args ...any) {
	if r.logf != nil {
		r.logf(format, args...)
	}
}

// Paths of the network files (relative to the root).
const (
	resolvConfPath     = "/etc/resolv.conf"
	hostsPath          = "/etc/hosts"
	resolvedDropInPath = "/run/systemd/resolved.conf.d/50-banger.conf"
	networkdRuntimeDir = "/run/systemd/network"
	nmDropInName       = "00-banger.conf"
)

var (
	networkdBinaries = []string{"/lib/systemd/systemd-networkd", "/usr/lib/systemd/systemd-networkd"}
	resolvedBinaries = []string{"/lib/systemd/systemd-resolved", "/usr/lib/systemd/systemd-resolved"}
	nmBinaries       = []string{"/usr/sbin/NetworkManager", "/usr/bin/NetworkManager", "/sbin/NetworkManager"}
)

// writeNetworkFiles writes the files described above for cfg. It returns
// every failure, joined; each file is independent of the others.
func (r guestRoot) writeNetworkFiles(nc *agentproto.NetworkConfig) error {
	if nc == nil {
		return nil
	}
	var errs []error
	if err := r.writeResolvConf(nc); err != nil {
		errs = append(errs, err)
	}
	if r.mode == InitModeSystemd && r.anyExists(networkdBinaries...) {
		if err := r.writeNetworkd(nc); err != nil {
			errs = append(errs, err)
		}
	}
	if r.anyExists(nmBinaries...) {
		dir := "/etc/NetworkManager/conf.d"
		if r.mode == InitModeSystemd {
			dir = "/run/NetworkManager/conf.d"
		}
		if err := r.writeFile(path.Join(dir, nmDropInName), []byte(nmDropIn(nc)), 0o644); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// writeResolvConf points the guest's resolver at nc's servers. A
// /etc/resolv.conf that is a symlink into systemd-resolved's runtime
// directory stays: resolved gets a drop-in instead. Another symlink (a
// resolvconf or NetworkManager file) stays too, its manager fed by
// banger's DHCP, except when the agent is PID 1: nothing would write its
// target. A symlink to resolved's files without resolved is replaced.
func (r guestRoot) writeResolvConf(nc *agentproto.NetworkConfig) error {
	if len(nc.DNS) == 0 && len(nc.Search) == 0 {
		return nil
	}
	if !r.exists("/etc") {
		return nil
	}
	if target, err := os.Readlink(r.path(resolvConfPath)); err == nil {
		resolved := strings.Contains(target, "run/systemd/resolve/")
		switch {
		case resolved && r.mode == InitModeSystemd && r.anyExists(resolvedBinaries...):
			r.log("%s links to %s: DNS through a systemd-resolved drop-in", resolvConfPath, target)
			return r.writeFile(resolvedDropInPath, []byte(resolvedDropIn(nc)), 0o644)
		case !resolved && r.mode != InitModeAgent:
			r.log("%s links to %s: left to the image's resolver manager", resolvConfPath, target)
			return nil
		}
	}
	return r.writeFile(resolvConfPath, []byte(resolvConf(nc)), 0o644)
}

// writeNetworkd writes one runtime .network file per card with an address.
func (r guestRoot) writeNetworkd(nc *agentproto.NetworkConfig) error {
	var errs []error
	for _, ifc := range nc.Interfaces {
		if ifc.Address == "" {
			continue
		}
		mac, err := net.ParseMAC(ifc.MAC)
		if err != nil {
			errs = append(errs, fmt.Errorf("networkd file: interface MAC %q: %w", ifc.MAC, err))
			continue
		}
		name := "00-banger-" + strings.ReplaceAll(mac.String(), ":", "") + ".network"
		if err := r.writeFile(path.Join(networkdRuntimeDir, name), []byte(networkdFile(ifc, nc)), 0o644); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// writeHosts makes hostname resolve through /etc/hosts: a line already
// naming it stays; otherwise the 127.0.1.1 line (Debian's convention for
// the machine's name) names it, or one is added.
func (r guestRoot) writeHosts(hostname string) error {
	if hostname == "" || !r.exists("/etc") {
		return nil
	}
	old, err := os.ReadFile(r.path(hostsPath))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("read %s: %w", hostsPath, err)
	}
	if errors.Is(err, fs.ErrNotExist) {
		old = []byte("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	}
	updated, changed := hostsWithName(old, hostname)
	if !changed {
		return nil
	}
	return r.writeFile(hostsPath, updated, 0o644)
}

// writeFile replaces the file at p (relative to the root) atomically: a
// temporary file in the same directory renamed over it, so a symlink at p
// is replaced, never followed. Missing directories are made (0755).
func (r guestRoot) writeFile(p string, data []byte, perm fs.FileMode) error {
	full := r.path(p)
	dir := filepath.Dir(full)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(full)+".banger-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // fails harmlessly after the rename
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", p, err)
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", p, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", p, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	if err := os.Rename(tmp, full); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	return nil
}

const writtenBy = "# Written by banger's agent at boot (https://github.com/bangerdev/banger/blob/main/docs/agent.md).\n"

// resolvConf renders /etc/resolv.conf.
func resolvConf(nc *agentproto.NetworkConfig) string {
	var b strings.Builder
	b.WriteString(writtenBy)
	for _, s := range nc.DNS {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	if len(nc.Search) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(nc.Search, " "))
	}
	return b.String()
}

// resolvedDropIn renders a systemd-resolved configuration drop-in.
func resolvedDropIn(nc *agentproto.NetworkConfig) string {
	var b strings.Builder
	b.WriteString(writtenBy)
	b.WriteString("[Resolve]\n")
	if len(nc.DNS) > 0 {
		fmt.Fprintf(&b, "DNS=%s\n", strings.Join(nc.DNS, " "))
	}
	if len(nc.Search) > 0 {
		fmt.Fprintf(&b, "Domains=%s\n", strings.Join(nc.Search, " "))
	}
	return b.String()
}

// networkdFile renders a systemd-networkd .network file that gives a card
// the configuration banger already applied, and keeps it.
func networkdFile(ifc agentproto.Interface, nc *agentproto.NetworkConfig) string {
	var b strings.Builder
	b.WriteString(writtenBy)
	b.WriteString("# The address banger gave this card; it sorts before the image's own\n# files, so their DHCP never applies to it.\n")
	fmt.Fprintf(&b, "[Match]\nMACAddress=%s\n\n", strings.ToLower(ifc.MAC))
	b.WriteString("[Link]\n")
	if ifc.MTU > 0 {
		fmt.Fprintf(&b, "MTUBytes=%d\n", ifc.MTU)
	}
	b.WriteString("RequiredForOnline=yes\n\n")
	b.WriteString("[Network]\n")
	fmt.Fprintf(&b, "Address=%s\n", ifc.Address)
	if ifc.Gateway != "" {
		fmt.Fprintf(&b, "Gateway=%s\n", ifc.Gateway)
	}
	for _, s := range nc.DNS {
		fmt.Fprintf(&b, "DNS=%s\n", s)
	}
	if len(nc.Search) > 0 {
		fmt.Fprintf(&b, "Domains=%s\n", strings.Join(nc.Search, " "))
	}
	b.WriteString("DHCP=no\nIPv6AcceptRA=no\nKeepConfiguration=yes\n")
	return b.String()
}

// nmDropIn renders a NetworkManager conf.d drop-in: banger's cards are
// unmanaged, and NetworkManager leaves /etc/resolv.conf to banger.
func nmDropIn(nc *agentproto.NetworkConfig) string {
	var macs []string
	for _, ifc := range nc.Interfaces {
		macs = append(macs, "mac:"+strings.ToLower(ifc.MAC))
	}
	var b strings.Builder
	b.WriteString(writtenBy)
	b.WriteString("[main]\ndns=none\n\n[keyfile]\n")
	fmt.Fprintf(&b, "unmanaged-devices+=%s\n", strings.Join(macs, ";"))
	return b.String()
}

// hostsWithName returns hosts with a line naming hostname, and whether it
// had to change.
func hostsWithName(hosts []byte, hostname string) ([]byte, bool) {
	lines := strings.SplitAfter(string(hosts), "\n")
	loopback := -1
	for i, l := range lines {
		fields := strings.Fields(strings.SplitN(l, "#", 2)[0])
		if len(fields) < 2 {
			continue
		}
		if slices.Contains(fields[1:], hostname) {
			return hosts, false
		}
		if fields[0] == "127.0.1.1" && loopback < 0 {
			loopback = i
		}
	}
	entry := "127.0.1.1\t" + hostname + "\n"
	if loopback >= 0 {
		lines[loopback] = entry
		return []byte(strings.Join(lines, "")), true
	}
	out := bytes.Clone(hosts)
	if len(out) > 0 && out[len(out)-1] != '\n' {
		out = append(out, '\n')
	}
	return append(out, entry...), true
}
