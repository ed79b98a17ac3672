package config

import (
	"github.com/bangerdev/banger/internal/bridgenet"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func write(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDaemonDefaultsWhenMissing(t *testing.T) {
	c, err := LoadDaemon(filepath.Join(t.TempDir(), "none.toml"), false)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c, DefaultDaemon()) {
		t.Fatalf("got %+v", c)
	}
	if _, err := LoadDaemon(filepath.Join(t.TempDir(), "none.toml"), true); err == nil {
		t.Fatal("missing explicit config accepted")
	}
}

func TestDaemonOverrides(t *testing.T) {
	c, err := LoadDaemon(write(t, "state_dir = \"/srv/banger\"\naccel = \"tcg\"\nstop_timeout = \"5s\"\n"), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.StateDir != "/srv/banger" || c.Accel != "tcg" || c.StopTimeout.Duration != 5*time.Second || c.DefaultCPUs != 2 {
		t.Fatalf("got %+v", c)
	}
}

func TestDaemonBadConfig(t *testing.T) {
	for body, want := range map[string]string{
		"acel = \"tcg\"\n":          "unknown key(s) acel",
		"accel = \"hvf\"\n":         "accel \"hvf\"",
		"state_dir = \"rel/dir\"\n": "must be an absolute path",
		"stop_timeout = \"soon\"\n": "soon",
		"default_memory_mib = 10\n": "default_memory_mib 10",
		"log_level = \"chatty\"\n":  "log_level",
		"default_cpus = \"two\"\n":  "default_cpus",
		"image_headroom_mib = -1\n": "image_headroom_mib -1",
	} {
		_, err := LoadDaemon(write(t, body), true)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: err = %v, want mention of %q", body, err, want)
		}
	}
}

func TestCLIEnvOverride(t *testing.T) {
	t.Setenv("BANGER_SOCKET", "/tmp/x.sock")
	c, err := LoadCLI(write(t, "socket_path = \"/a.sock\"\ndefault_image = \"deb\"\n"), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.SocketPath != "/tmp/x.sock" || c.DefaultImageName != "deb" {
		t.Fatalf("got %+v", c)
	}
	if _, err := LoadCLI(write(t, "colour = true\n"), true); err == nil {
		t.Fatal("unknown CLI key accepted")
	}
}

func TestCLISSHKeyPathForms(t *testing.T) {
	for _, k := range []string{"/keys/id", "~/.ssh/id_ed25519"} {
		c, err := LoadCLI(write(t, "ssh_key_path = \""+k+"\"\n"), true)
		if err != nil || c.SSHKeyPath != k {
			t.Errorf("ssh_key_path %q: %+v, %v", k, c, err)
		}
	}
	if _, err := LoadCLI(write(t, "ssh_key_path = \"keys/id\"\n"), true); err == nil || !strings.Contains(err.Error(), "ssh_key_path") {
		t.Errorf("a relative ssh_key_path: %v, want an error naming the key", err)
	}
}

// The shipped example config states exactly the defaults.
func TestShippedDaemonConfigIsTheDefaults(t *testing.T) {
	c, err := LoadDaemon(filepath.Join("..", "..", "packaging", "bangerd.toml"), true)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c, DefaultDaemon()) {
		t.Fatalf("packaging/bangerd.toml = %+v\nwant the defaults %+v", c, DefaultDaemon())
	}
}

func TestDaemonConfinementKeys(t *testing.T) {
	c, err := LoadDaemon(write(t, "vmm_confine = false\nvmm_user = \"qemu\"\nvmm_cgroup_parent = \"a/b\"\nvmm_memory_overhead_mib = 64\n"), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.VMMConfine || c.VMMUser != "qemu" || c.VMMCgroupParent != "a/b" || c.VMMMemoryOverheadMiB != 64 {
		t.Fatalf("got %+v", c)
	}
	r, err := LoadDaemon(write(t, "vmm_uid_range = \"900000-900999\"\n"), true)
	if err != nil {
		t.Fatal(err)
	}
	if first, last, err := r.UIDRange(); first != 900000 || last != 900999 || err != nil {
		t.Errorf("UIDRange = %d, %d, %v", first, last, err)
	}
	if d := DefaultDaemon(); !d.VMMConfine || d.VMMUser != "banger-vmm" {
		t.Fatalf("confinement is not on by default: %+v", d)
	}
	for body, want := range map[string]string{
		"vmm_user = \"root\"\n":          "vmm_user",
		"vmm_user = \"\"\n":              "vmm_user",
		"vmm_cgroup_parent = \"/abs\"\n": "vmm_cgroup_parent",
		"vmm_cgroup_parent = \"../x\"\n": "vmm_cgroup_parent",
		"vmm_memory_overhead_mib = -1\n": "vmm_memory_overhead_mib",
	} {
		if _, err := LoadDaemon(write(t, body), true); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: err = %v, want mention of %q", body, err, want)
		}
	}
}

func TestDaemonNetworkKeys(t *testing.T) {
	d := DefaultDaemon()
	wantMode := "user"
	if os.Geteuid() == 0 {
		wantMode = "bridge"
	}
	if d.Network != wantMode || d.BridgeName != "banger0" || d.Subnet != "10.77.0.0/24" || d.MTU != 1500 ||
		d.AllowHost || d.AllowVMToVM || d.AllowLAN || d.AllowLinkLocal || len(d.DNSServers) != 0 {
		t.Fatalf("network defaults: %+v", d)
	}
	if g := d.Gateway().String(); g != "10.77.0.1/24" {
		t.Errorf("gateway = %s, want 10.77.0.1/24", g)
	}
	c, err := LoadDaemon(write(t, "network = \"none\"\nsubnet = \"172.30.8.0/22\"\nbridge_name = \"br-test\"\nmtu = 9000\nallow_lan = true\ndns_servers = [\"192.0.2.53\"]\n"), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.Network != "none" || c.BridgeName != "br-test" || c.MTU != 9000 || !c.AllowLAN || c.Gateway().String() != "172.30.8.1/22" || len(c.DNSServers) != 1 {
		t.Fatalf("got %+v", c)
	}
	for body, want := range map[string]string{
		"network = \"nat\"\n":                    "network \"nat\": want bridge, user or none",
		"subnet = \"10.77.0.0\"\n":               "want an IPv4 network",
		"subnet = \"fd00::/64\"\n":               "only IPv4",
		"subnet = \"10.0.0.0/8\"\n":              "prefix length of 16 to 29",
		"subnet = \"10.77.0.0/30\"\n":            "prefix length of 16 to 29",
		"subnet = \"10.77.0.5/24\"\n":            "did you mean 10.77.0.0/24",
		"bridge_name = \"a-very-long-bridge\"\n": "bridge_name",
		"bridge_name = \"\"\n":                   "bridge_name",
		"bridge_name = \"a/b\"\n":                "bridge_name",
		"bridge_name = \"bg-br\"\n":              "starts with \"bg-\"",
		"mtu = 100\n":                            "mtu 100",
		"dns_servers = [\"dns.example\"]\n":      "dns_servers",
	} {
		if _, err := LoadDaemon(write(t, body), true); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: err = %v, want mention of %q", body, err, want)
		}
	}
}

func TestCLISSHKeyPath(t *testing.T) {
	c, err := LoadCLI(write(t, "ssh_key_path = \"/home/u/.ssh/id_ed25519\"\n"), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.SSHKeyPath != "/home/u/.ssh/id_ed25519" {
		t.Fatalf("got %+v", c)
	}
}

// config refuses bridge names that banger's TAP names start with (a
// daemon start would take such a bridge for a stale TAP).
func TestTAPPrefix(t *testing.T) {
	if tapPrefix != bridgenet.TAPPrefix {
		t.Fatalf("config's tapPrefix %q, bridgenet.TAPPrefix %q", tapPrefix, bridgenet.TAPPrefix)
	}
}

func TestDaemonImageKeys(t *testing.T) {
	c, err := LoadDaemon(write(t, ""), true)
	if err != nil || c.DefaultImageName != "debian-bookworm" || c.DefaultKernelName != "generic-6.1" || len(c.CatalogURLs) != 0 {
		t.Fatalf("defaults: %+v, %v", c, err)
	}
	// The older key is an alias.
	c, err = LoadDaemon(write(t, "default_image = \"old\"\n"), true)
	if err != nil || c.DefaultImageName != "old" {
		t.Fatalf("default_image alias: %q, %v", c.DefaultImageName, err)
	}
	c, err = LoadDaemon(write(t, "default_image = \"same\"\ndefault_image_name = \"same\"\n"), true)
	if err != nil || c.DefaultImageName != "same" {
		t.Fatalf("both keys, same value: %q, %v", c.DefaultImageName, err)
	}
	if _, err := LoadDaemon(write(t, "default_image = \"a\"\ndefault_image_name = \"b\"\n"), true); err == nil || !strings.Contains(err.Error(), "differ") {
		t.Fatalf("both keys, different values: %v", err)
	}
	c, err = LoadDaemon(write(t, `catalog_urls = ["/srv/cat.json", "file:///srv/c.json", "https://example.com/c.json", "http://127.0.0.1:8080/c.json", "http://localhost/c", "http://[::1]/c"]`+"\n"), true)
	if err != nil || len(c.CatalogURLs) != 6 {
		t.Fatalf("catalog_urls: %v, %v", c.CatalogURLs, err)
	}
	for _, bad := range []string{"http://example.com/c.json", "http://10.0.0.1/c", "c.json", "ftp://x/c", "file://host/c", "https:///c"} {
		if _, err := LoadDaemon(write(t, `catalog_urls = ["`+bad+`"]`+"\n"), true); err == nil || !strings.Contains(err.Error(), "catalog_urls") {
			t.Errorf("catalog_urls %q accepted: %v", bad, err)
		}
	}
	for _, body := range []string{"default_image_name = \"\"\n", "default_kernel_name = \"\"\n"} {
		if _, err := LoadDaemon(write(t, body), true); err == nil {
			t.Errorf("%q accepted", body)
		}
	}
	cl, err := LoadCLI(write(t, "default_image_name = \"x\"\n"), true)
	if err != nil || cl.DefaultImageName != "x" {
		t.Fatalf("CLI default_image_name: %+v, %v", cl, err)
	}
}

// embedded_catalogs, local_builds and registry_fallback default to true
// and can be turned off (the test harnesses do, with a default kernel no
// catalog has).
func TestDaemonPullSafetySwitches(t *testing.T) {
	d := DefaultDaemon()
	if !d.EmbeddedCatalogs || !d.LocalBuilds || !d.RegistryFallback {
		t.Fatalf("defaults: embedded_catalogs %v local_builds %v registry_fallback %v", d.EmbeddedCatalogs, d.LocalBuilds, d.RegistryFallback)
	}
	c, err := LoadDaemon(write(t, "embedded_catalogs = false\nlocal_builds = false\nregistry_fallback = false\ndefault_kernel_name = \"test-no-such-kernel\"\n"), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.EmbeddedCatalogs || c.LocalBuilds || c.RegistryFallback || c.DefaultKernelName != "test-no-such-kernel" {
		t.Fatalf("got %+v", c)
	}
}
