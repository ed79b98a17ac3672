package guestagent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/agentproto"
)

func testNetwork() *agentproto.NetworkConfig {
	return &agentproto.NetworkConfig{
		Interfaces: []agentproto.Interface{{MAC: "02:AB:cd:00:00:05", Address: "10.77.0.5/24", Gateway: "10.77.0.1", MTU: 1400}},
		DNS:        []string{"10.77.0.1"},
		Search:     []string{"banger.internal"},
	}
}

// makeRoot makes a root filesystem in a temporary directory with the given
// files ("path": content; a content starting with "->" makes a symlink).
func makeRoot(t *testing.T, mode string, files map[string]string) guestRoot {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{"etc", "run"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for p, content := range files {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		var err error
		if target, ok := strings.CutPrefix(content, "->"); ok {
			err = os.Symlink(target, full)
		} else {
			err = os.WriteFile(full, []byte(content), 0o755)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return guestRoot{dir: dir, mode: mode, logf: t.Logf}
}

func readFile(t *testing.T, r guestRoot, p string) string {
	t.Helper()
	b, err := os.ReadFile(r.path(p))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestResolvConf(t *testing.T) {
	const stub = "../run/systemd/resolve/stub-resolv.conf"
	const wantConf = "nameserver 10.77.0.1\nsearch banger.internal\n"
	for _, tc := range []struct {
		name  string
		mode  string
		files map[string]string
		// wantFile: /etc/resolv.conf becomes a regular file with banger's
		// servers; wantLink: it stays a symlink to this; wantDropIn:
		// resolved gets the drop-in.
		wantFile   bool
		wantLink   string
		wantDropIn bool
	}{
		{name: "missing", mode: InitModeSystemd, wantFile: true},
		{name: "regular file", mode: InitModeSystemd, files: map[string]string{"/etc/resolv.conf": "nameserver 192.0.2.53\n"}, wantFile: true},
		{name: "resolved stub", mode: InitModeSystemd, files: map[string]string{"/etc/resolv.conf": "->" + stub, "/usr/lib/systemd/systemd-resolved": ""}, wantLink: stub, wantDropIn: true},
		{name: "resolved link without resolved", mode: InitModeSystemd, files: map[string]string{"/etc/resolv.conf": "->" + stub}, wantFile: true},
		{name: "resolved link, agent PID 1", mode: InitModeAgent, files: map[string]string{"/etc/resolv.conf": "->" + stub, "/usr/lib/systemd/systemd-resolved": ""}, wantFile: true},
		{name: "resolvconf link", mode: InitModeSystemd, files: map[string]string{"/etc/resolv.conf": "->/run/resolvconf/resolv.conf"}, wantLink: "/run/resolvconf/resolv.conf"},
		{name: "resolvconf link, other init", mode: InitModeOther, files: map[string]string{"/etc/resolv.conf": "->/run/resolvconf/resolv.conf"}, wantLink: "/run/resolvconf/resolv.conf"},
		{name: "resolvconf link, agent PID 1", mode: InitModeAgent, files: map[string]string{"/etc/resolv.conf": "->/run/resolvconf/resolv.conf"}, wantFile: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := makeRoot(t, tc.mode, tc.files)
			if err := r.writeResolvConf(testNetwork()); err != nil {
				t.Fatal(err)
			}
			fi, err := os.Lstat(r.path(resolvConfPath))
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantFile {
				if !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o644 {
					t.Errorf("resolv.conf mode %v, want a regular file 0644", fi.Mode())
				}
				if got := readFile(t, r, resolvConfPath); !strings.HasSuffix(got, wantConf) || strings.Contains(got, "192.0.2.53") {
					t.Errorf("resolv.conf:\n%s\nwant it to end with\n%s", got, wantConf)
				}
			}
			if tc.wantLink != "" {
				if target, err := os.Readlink(r.path(resolvConfPath)); err != nil || target != tc.wantLink {
					t.Errorf("resolv.conf link %q (%v), want it kept as %q", target, err, tc.wantLink)
				}
			}
			_, err = os.Stat(r.path(resolvedDropInPath))
			if tc.wantDropIn {
				if got := readFile(t, r, resolvedDropInPath); !strings.Contains(got, "[Resolve]\nDNS=10.77.0.1\nDomains=banger.internal\n") {
					t.Errorf("resolved drop-in:\n%s", got)
				}
			} else if err == nil {
				t.Errorf("resolved drop-in written, want none")
			}
		})
	}
	t.Run("no dns", func(t *testing.T) {
		r := makeRoot(t, InitModeSystemd, nil)
		if err := r.writeResolvConf(&agentproto.NetworkConfig{}); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Lstat(r.path(resolvConfPath)); err == nil {
			t.Errorf("resolv.conf written without DNS servers")
		}
	})
}

func TestNetworkManagerFiles(t *testing.T) {
	networkdFile := "/run/systemd/network/00-banger-02abcd000005.network"
	for _, tc := range []struct {
		name         string
		mode         string
		files        map[string]string
		wantNetworkd bool
		wantNM       string
	}{
		{name: "networkd", mode: InitModeSystemd, files: map[string]string{"/lib/systemd/systemd-networkd": ""}, wantNetworkd: true},
		{name: "no manager", mode: InitModeSystemd},
		{name: "networkd without systemd", mode: InitModeOther, files: map[string]string{"/lib/systemd/systemd-networkd": ""}},
		{name: "NetworkManager", mode: InitModeSystemd, files: map[string]string{"/usr/sbin/NetworkManager": ""}, wantNM: "/run/NetworkManager/conf.d/00-banger.conf"},
		{name: "NetworkManager, other init", mode: InitModeOther, files: map[string]string{"/usr/sbin/NetworkManager": ""}, wantNM: "/etc/NetworkManager/conf.d/00-banger.conf"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := makeRoot(t, tc.mode, tc.files)
			if err := r.writeNetworkFiles(testNetwork()); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(r.path(networkdFile)); (err == nil) != tc.wantNetworkd {
				t.Errorf("networkd file exists: %v, want %v", err == nil, tc.wantNetworkd)
			}
			if tc.wantNetworkd {
				got := readFile(t, r, networkdFile)
				for _, want := range []string{
					"[Match]\nMACAddress=02:ab:cd:00:00:05\n",
					"MTUBytes=1400\n", "RequiredForOnline=yes\n",
					"[Network]\nAddress=10.77.0.5/24\nGateway=10.77.0.1\nDNS=10.77.0.1\nDomains=banger.internal\n",
					"DHCP=no\n", "KeepConfiguration=yes\n",
				} {
					if !strings.Contains(got, want) {
						t.Errorf("networkd file lacks %q:\n%s", want, got)
					}
				}
			}
			for _, p := range []string{"/run/NetworkManager/conf.d/00-banger.conf", "/etc/NetworkManager/conf.d/00-banger.conf"} {
				_, err := os.Stat(r.path(p))
				if (err == nil) != (p == tc.wantNM) {
					t.Errorf("%s exists: %v, want %v", p, err == nil, p == tc.wantNM)
				}
			}
			if tc.wantNM != "" {
				got := readFile(t, r, tc.wantNM)
				if !strings.Contains(got, "[main]\ndns=none\n") || !strings.Contains(got, "[keyfile]\nunmanaged-devices+=mac:02:ab:cd:00:00:05\n") {
					t.Errorf("NetworkManager drop-in:\n%s", got)
				}
			}
		})
	}
}

func TestHostsWithName(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
	}{
		{"replaces 127.0.1.1", "127.0.0.1\tlocalhost\n127.0.1.1\timage-name\n::1\tlocalhost\n", "127.0.0.1\tlocalhost\n127.0.1.1\tvm1\n::1\tlocalhost\n"},
		{"already named", "127.0.0.1 localhost vm1\n", "127.0.0.1 localhost vm1\n"},
		{"named in a comment only", "127.0.0.1 localhost # vm1\n", "127.0.0.1 localhost # vm1\n127.0.1.1\tvm1\n"},
		{"appended", "127.0.0.1 localhost", "127.0.0.1 localhost\n127.0.1.1\tvm1\n"},
		{"empty", "", "127.0.1.1\tvm1\n"},
	} {
		got, changed := hostsWithName([]byte(tc.in), "vm1")
		if string(got) != tc.want || changed != (tc.in != tc.want) {
			t.Errorf("%s: hostsWithName(%q) = %q, %v; want %q", tc.name, tc.in, got, changed, tc.want)
		}
	}
	r := makeRoot(t, InitModeAgent, nil)
	if err := r.writeHosts("vm1"); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, r, hostsPath); !strings.Contains(got, "localhost") || !strings.HasSuffix(got, "127.0.1.1\tvm1\n") {
		t.Errorf("new /etc/hosts:\n%s", got)
	}
}

// TestWriteFileReplacesSymlink: a file the agent writes replaces a symlink
// rather than writing through it.
func TestWriteFileReplacesSymlink(t *testing.T) {
	r := makeRoot(t, InitModeAgent, map[string]string{"/target": "precious\n", "/etc/hosts": "->/target"})
	if err := r.writeHosts("vm1"); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, r, "/target"); got != "precious\n" {
		t.Errorf("symlink target changed: %q", got)
	}
	if fi, err := os.Lstat(r.path(hostsPath)); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("/etc/hosts is %v (%v), want a regular file", fi.Mode(), err)
	}
}
