// Package config loads banger's two TOML configuration files: the daemon's
// (/etc/banger/bangerd.toml) and the CLI user's (~/.config/banger/config.toml).
// Every key, with its default, is documented on the struct fields and in
// docs/config.md. Unknown keys are an error, so a typo never goes unnoticed.
package config

import (
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// Defaults.
const (
	DefaultDaemonConfigPath = "/etc/banger/bangerd.toml"
	DefaultSocketPath       = "/run/banger/bangerd.sock"
	DefaultStateDir         = "/var/lib/banger"
)

// Duration is a time.Duration written as a Go duration string ("30s").
type Duration struct{ time.Duration }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Daemon is bangerd's configuration.
type Daemon struct {
	// SocketPath is the RPC socket. Default /run/banger/bangerd.sock.
	SocketPath string `toml:"socket_path"`
	// SocketGroup owns the socket (mode 0660), so its members can use banger
	// without sudo. Default "" (root's group only).
	SocketGroup string `toml:"socket_group"`
	// StateDir holds the database, images and VM disks. Default /var/lib/banger.
	StateDir string `toml:"state_dir"`
	// QEMUBinary is the QEMU system emulator. Default qemu-system-x86_64 (PATH).
	QEMUBinary string `toml:"qemu_binary"`
	// QEMUImgBinary is qemu-img. Default qemu-img (PATH).
	QEMUImgBinary string `toml:"qemu_img_binary"`
	// AgentBinary is the static guest agent put into every VM's initramfs.
	// Default: banger-vsock-agent next to the bangerd executable, else
	// /usr/lib/banger/banger-vsock-agent.
	AgentBinary string `toml:"agent_binary"`
	// Accel is the default accelerator: auto, kvm or tcg. Default auto (KVM
	// when it can really run guests, else TCG with a warning).
	Accel string `toml:"accel"`
	// VMMConfine runs every QEMU confined: as VMMUser, under a seccomp
	// sandbox, in its own cgroup, reaching only the files the daemon
	// passes it (docs/security.md). Default true. When confinement can't be
	// set up, vm start fails with the reason; false is for debugging only.
	VMMConfine bool `toml:"vmm_confine"`
	// VMMUser is the unprivileged user QEMU runs as; created (a system user
	// with no home and no login shell) when missing. Default banger-vmm.
	VMMUser string `toml:"vmm_user"`
	// VMMUIDRange, "FIRST-LAST", gives each VM's QEMU its own uid (and gid)
	// from this range instead of VMMUser, so that one compromised QEMU
	// can't signal or trace another. The uids need no passwd entry; pick a
	// range no one else uses. Default "" (every QEMU runs as VMMUser).
	VMMUIDRange string `toml:"vmm_uid_range"`
	// VMMCgroupParent holds one cgroup per VM (on v1, under each
	// controller's hierarchy). Default banger.
	VMMCgroupParent string `toml:"vmm_cgroup_parent"`
	// VMMMemoryOverheadMiB is added to a VM's memory for its cgroup's memory
	// limit (plus 1 GiB under TCG for QEMU's translation cache). Default 256.
	VMMMemoryOverheadMiB int `toml:"vmm_memory_overhead_mib"`
	// DefaultImageName is the image vm create/run uses when none is named;
	// when it is not local but in an image catalog, it is pulled first.
	// Default debian-bookworm (the golden image).
	DefaultImageName string `toml:"default_image_name"`
	// DefaultImage is the older name of default_image_name, still
	// accepted (LoadDaemon copies it over; naming both differently is an
	// error). Default "".
	DefaultImage string `toml:"default_image"`
	// DefaultKernelName is the kernel of images that name none (OCI
	// images), pulled from the kernel catalog when not local. Default
	// generic-6.1.
	DefaultKernelName string `toml:"default_kernel_name"`
	// CatalogURLs are image and kernel catalogs read after the embedded
	// ones (a later catalog's entry of the same name and version wins):
	// absolute file paths, file:// URLs, https:// URLs, or http:// URLs of
	// a loopback host. Default none.
	CatalogURLs []string `toml:"catalog_urls"`
	// EmbeddedCatalogs: the image and kernel catalogs compiled into
	// banger are read before catalog_urls. false: only catalog_urls are
	// (test set-ups, machines that must only pull from their own
	// catalogs). Default true.
	EmbeddedCatalogs bool `toml:"embedded_catalogs"`
	// LocalBuilds: a catalog entry whose bundle can't be fetched (or that
	// has none) and that names a build recipe is built on this machine
	// (debootstrap, Debian's archive, npm). false: such a pull fails
	// instead. Default true.
	LocalBuilds bool `toml:"local_builds"`
	// RegistryFallback: vm create/run of a bare image name (nginx) that is
	// neither local nor in a catalog pulls it from Docker Hub
	// (docker.io/library/nginx:latest), as docker run does. false: such a
	// name is not found. Default true.
	RegistryFallback bool `toml:"registry_fallback"`
	// DefaultCPUs for new VMs. Default 2.
	DefaultCPUs int `toml:"default_cpus"`
	// DefaultMemoryMiB for new VMs. Default 1024.
	DefaultMemoryMiB int `toml:"default_memory_mib"`
	// ReadyTimeout bounds the wait until a started VM is ready (agent answers,
	// early boot over; with WaitBoot, the full boot too). Default 120s
	// (TCG boots are slow).
	ReadyTimeout Duration `toml:"ready_timeout"`
	// StopTimeout bounds a graceful stop before the VM is killed. Default 30s.
	StopTimeout Duration `toml:"stop_timeout"`
	// ConsoleLogMaxMiB caps each VM's serial console log: a guest that
	// writes more only keeps its most recent output. Default 16.
	ConsoleLogMaxMiB int `toml:"console_log_max_mib"`
	// ImageHeadroomMiB is the free space an image pulled from an OCI
	// registry gets on top of its content (its ext4 root file system; a
	// VM's disk may be larger still). Default 512.
	ImageHeadroomMiB int `toml:"image_headroom_mib"`
	// LogLevel is debug, info, warn or error. Default info.
	LogLevel string `toml:"log_level"`
	// LogFormat is text or json. Default text.
	LogFormat string `toml:"log_format"`

	// Network is the default network mode of new VMs: "bridge" (a TAP on
	// banger's bridge, NAT to the outside; needs root), "user" (QEMU's
	// user-mode network) or "none". Default "bridge" when bangerd runs as
	// root, else "user".
	Network string `toml:"network"`
	// BridgeName is banger's bridge. Default banger0.
	BridgeName string `toml:"bridge_name"`
	// Subnet is the bridge's IPv4 subnet; its first host address is the
	// gateway (the bridge's address), VMs get the others. Prefix 16 to 29.
	// Default 10.77.0.0/24.
	Subnet string `toml:"subnet"`
	// MTU of the bridge, the TAPs and the guests' cards. Default 1500.
	MTU int `toml:"mtu"`
	// AllowHost lets VMs reach the host's own services. Default false.
	AllowHost bool `toml:"allow_host"`
	// AllowVMToVM lets VMs reach each other. Default false.
	AllowVMToVM bool `toml:"allow_vm_to_vm"`
	// AllowLAN lets VMs reach the host's LAN ranges. Default false.
	AllowLAN bool `toml:"allow_lan"`
	// AllowLinkLocal lets VMs reach 169.254.0.0/16 (cloud metadata
	// endpoints). Default false.
	AllowLinkLocal bool `toml:"allow_link_local"`
	// DNSServers are the upstreams of banger's DNS forwarder on the
	// gateway. Default none: the host's, from /etc/resolv.conf.
	DNSServers []string `toml:"dns_servers"`
}

// Image defaults.
const (
	DefaultImageName  = "debian-bookworm"
	DefaultKernelName = "generic-6.1"
)

// Network defaults.
const (
	DefaultBridgeName = "banger0"
	DefaultSubnet     = "10.77.0.0/24"
	DefaultMTU        = 1500
)

// DefaultNetwork is the default network mode: bridge when the process runs
// as root (it can make a bridge and TAPs), else user.
func DefaultNetwork() string {
	if os.Geteuid() == 0 {
		return "bridge"
	}
	return "user"
}

// DefaultDaemon returns the daemon defaults.
func DefaultDaemon() Daemon {
	return Daemon{
		SocketPath:           DefaultSocketPath,
		StateDir:             DefaultStateDir,
		QEMUBinary:           "qemu-system-x86_64",
		QEMUImgBinary:        "qemu-img",
		Accel:                "auto",
		VMMConfine:           true,
		VMMUser:              "banger-vmm",
		VMMCgroupParent:      "banger",
		VMMMemoryOverheadMiB: 256,
		DefaultImageName:     DefaultImageName,
		DefaultKernelName:    DefaultKernelName,
		CatalogURLs:          []string{},
		EmbeddedCatalogs:     true,
		LocalBuilds:          true,
		RegistryFallback:     true,
		DefaultCPUs:          2,
		DefaultMemoryMiB:     1024,
		ReadyTimeout:         Duration{120 * time.Second},
		StopTimeout:          Duration{30 * time.Second},
		ConsoleLogMaxMiB:     16,
		ImageHeadroomMiB:     512,
		LogLevel:             "info",
		LogFormat:            "text",
		Network:              DefaultNetwork(),
		BridgeName:           DefaultBridgeName,
		Subnet:               DefaultSubnet,
		MTU:                  DefaultMTU,
		DNSServers:           []string{},
	}
}

// LoadDaemon reads path over the defaults. A missing file is fine when
// mustExist is false (the default path is optional).
func LoadDaemon(path string, mustExist bool) (Daemon, error) {
	c := DefaultDaemon()
	md, err := decodeFile(path, &c, mustExist)
	if err != nil {
		return Daemon{}, err
	}
	if c.DefaultImage != "" {
		if md.IsDefined("default_image_name") && c.DefaultImageName != c.DefaultImage {
			return Daemon{}, fmt.Errorf("config %s: default_image %q and default_image_name %q differ: keep default_image_name only", path, c.DefaultImage, c.DefaultImageName)
		}
		c.DefaultImageName = c.DefaultImage
	}
	return c, c.Validate()
}

// Validate checks values.
func (c Daemon) Validate() error {
	var errs []error
	switch c.Accel {
	case "auto", "kvm", "tcg":
	default:
		errs = append(errs, fmt.Errorf("accel %q: want auto, kvm or tcg", c.Accel))
	}
	if !filepath.IsAbs(c.StateDir) {
		errs = append(errs, fmt.Errorf("state_dir %q: must be an absolute path", c.StateDir))
	}
	if !filepath.IsAbs(c.SocketPath) {
		errs = append(errs, fmt.Errorf("socket_path %q: must be an absolute path", c.SocketPath))
	}
	if c.VMMUser == "" || c.VMMUser == "root" {
		errs = append(errs, fmt.Errorf("vmm_user %q: want an unprivileged user such as banger-vmm", c.VMMUser))
	}
	if _, _, err := c.UIDRange(); err != nil {
		errs = append(errs, err)
	}
	if p := filepath.Clean(c.VMMCgroupParent); c.VMMCgroupParent == "" || filepath.IsAbs(p) || p == "." || p == ".." || strings.HasPrefix(p, "../") {
		errs = append(errs, fmt.Errorf("vmm_cgroup_parent %q: want a relative path such as banger", c.VMMCgroupParent))
	}
	if c.VMMMemoryOverheadMiB < 0 {
		errs = append(errs, fmt.Errorf("vmm_memory_overhead_mib %d: must not be negative", c.VMMMemoryOverheadMiB))
	}
	if c.DefaultCPUs < 1 {
		errs = append(errs, fmt.Errorf("default_cpus %d: must be at least 1", c.DefaultCPUs))
	}
	if c.DefaultMemoryMiB < 64 {
		errs = append(errs, fmt.Errorf("default_memory_mib %d: must be at least 64", c.DefaultMemoryMiB))
	}
	if c.DefaultImageName == "" {
		errs = append(errs, errors.New("default_image_name is empty: name the image vm create uses by default (such as debian-bookworm)"))
	}
	if c.DefaultKernelName == "" {
		errs = append(errs, errors.New("default_kernel_name is empty: name the kernel of images that name none (such as generic-6.1)"))
	}
	for _, u := range c.CatalogURLs {
		if err := CheckCatalogURL(u); err != nil {
			errs = append(errs, fmt.Errorf("catalog_urls: %w", err))
		}
	}
	if c.ConsoleLogMaxMiB < 1 {
		errs = append(errs, fmt.Errorf("console_log_max_mib %d: must be at least 1", c.ConsoleLogMaxMiB))
	}
	if c.ImageHeadroomMiB < 0 {
		errs = append(errs, fmt.Errorf("image_headroom_mib %d: must not be negative", c.ImageHeadroomMiB))
	}
	if c.ReadyTimeout.Duration <= 0 || c.StopTimeout.Duration <= 0 {
		errs = append(errs, errors.New("ready_timeout and stop_timeout must be positive"))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log_level %q: want debug, info, warn or error", c.LogLevel))
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		errs = append(errs, fmt.Errorf("log_format %q: want text or json", c.LogFormat))
	}
	errs = append(errs, c.validateNetwork()...)
	return errors.Join(errs...)
}

func (c Daemon) validateNetwork() []error {
	var errs []error
	switch c.Network {
	case "bridge", "user", "none":
	default:
		errs = append(errs, fmt.Errorf("network %q: want bridge, user or none", c.Network))
	}
	if err := validLinkName(c.BridgeName); err != nil {
		errs = append(errs, fmt.Errorf("bridge_name %q: %w", c.BridgeName, err))
	} else if strings.HasPrefix(c.BridgeName, tapPrefix) {
		errs = append(errs, fmt.Errorf("bridge_name %q starts with %q, which names banger's TAP devices: choose another name", c.BridgeName, tapPrefix))
	}
	if _, err := c.SubnetPrefix(); err != nil {
		errs = append(errs, err)
	}
	if c.MTU < 576 || c.MTU > 65535 {
		errs = append(errs, fmt.Errorf("mtu %d: want 576 to 65535 (usually 1500)", c.MTU))
	}
	for _, s := range c.DNSServers {
		if _, err := netip.ParseAddr(s); err != nil {
			errs = append(errs, fmt.Errorf("dns_servers: %q is not an IP address", s))
		}
	}
	return errs
}

// CheckCatalogURL checks one catalog_urls entry: an absolute file path, a
// file:// URL, an https:// URL, or an http:// URL of a loopback host
// (localhost, 127.0.0.0/8, ::1).
func CheckCatalogURL(s string) error {
	if strings.HasPrefix(s, "/") {
		return nil
	}
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("%q: %w", s, err)
	}
	switch u.Scheme {
	case "file":
		if (u.Host == "" || u.Host == "localhost") && strings.HasPrefix(u.Path, "/") {
			return nil
		}
		return fmt.Errorf("%q: want file:///ABSOLUTE/PATH", s)
	case "https":
		if u.Host != "" {
			return nil
		}
	case "http":
		h := u.Hostname()
		if a, err := netip.ParseAddr(h); strings.EqualFold(h, "localhost") || (err == nil && a.Unmap().IsLoopback()) {
			return nil
		}
		return fmt.Errorf("%q: plain http only to a loopback host (localhost, 127.0.0.1, ::1): use https", s)
	}
	return fmt.Errorf("%q: want an absolute path, file://, https:// or http:// to a loopback host", s)
}

// tapPrefix starts the names of banger's TAP devices (bridgenet.TAPPrefix;
// config doesn't import the netlink side).
const tapPrefix = "bg-"

// validLinkName checks a Linux interface name: 1 to 15 bytes, no '/',
// ':' or white space.
func validLinkName(n string) error {
	if n == "" || len(n) > 15 || n == "." || n == ".." {
		return errors.New("want a Linux interface name of 1 to 15 characters")
	}
	if strings.ContainsAny(n, "/: \t\n") {
		return errors.New("an interface name may not contain '/', ':' or spaces")
	}
	return nil
}

// SubnetPrefix parses Subnet: an IPv4 network address with a prefix
// length of 16 to 29 ("10.77.0.0/24").
func (c Daemon) SubnetPrefix() (netip.Prefix, error) {
	p, err := netip.ParsePrefix(c.Subnet)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("subnet %q: want an IPv4 network such as 10.77.0.0/24", c.Subnet)
	}
	if !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("subnet %q: only IPv4 subnets are supported (such as 10.77.0.0/24)", c.Subnet)
	}
	if p.Bits() < 16 || p.Bits() > 29 {
		return netip.Prefix{}, fmt.Errorf("subnet %q: want a prefix length of 16 to 29", c.Subnet)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("subnet %q: host bits are set: did you mean %s?", c.Subnet, p.Masked())
	}
	return p, nil
}

// Gateway is the bridge's address, the subnet's first host address, with
// the subnet's prefix length ("10.77.0.1/24"). Subnet must be valid.
func (c Daemon) Gateway() netip.Prefix {
	p, err := c.SubnetPrefix()
	if err != nil {
		return netip.Prefix{}
	}
	return netip.PrefixFrom(p.Addr().Next(), p.Bits())
}

// UIDRange parses VMMUIDRange; 0, 0 when it is empty.
func (c Daemon) UIDRange() (first, last int, err error) {
	if c.VMMUIDRange == "" {
		return 0, 0, nil
	}
	a, b, ok := strings.Cut(c.VMMUIDRange, "-")
	first, err1 := strconv.Atoi(strings.TrimSpace(a))
	last, err2 := strconv.Atoi(strings.TrimSpace(b))
	if !ok || err1 != nil || err2 != nil || first < 1000 || last < first || last > 1<<31-2 {
		return 0, 0, fmt.Errorf("vmm_uid_range %q: want FIRST-LAST with 1000 <= FIRST <= LAST, such as 900000-900999", c.VMMUIDRange)
	}
	return first, last, nil
}

// CLI is the user's CLI configuration.
type CLI struct {
	// SocketPath is bangerd's socket. Default /run/banger/bangerd.sock; the
	// BANGER_SOCKET environment variable overrides it.
	SocketPath string `toml:"socket_path"`
	// DefaultImageName for vm create/run when --image is not given.
	// Default "" (the daemon's default_image_name).
	DefaultImageName string `toml:"default_image_name"`
	// DefaultImage is the older name of default_image_name, still
	// accepted.
	DefaultImage string `toml:"default_image"`
	// DefaultCPUs for vm create/run. Default 0 (the daemon's default).
	DefaultCPUs int `toml:"default_cpus"`
	// DefaultMemoryMiB for vm create/run. Default 0 (the daemon's default).
	DefaultMemoryMiB int `toml:"default_memory_mib"`
	// SSHKeyPath is the private key banger authorises in new VMs and
	// that `vm ssh` and `ssh NAME.banger` log in with (its public key is
	// SSHKeyPath + ".pub"); absolute, or "~/" for the invoking user's home.
	// Default "" (banger makes ~/.config/banger/ssh/id_ed25519).
	SSHKeyPath string `toml:"ssh_key_path"`
}

// DefaultCLIPath returns ~/.config/banger/config.toml (honouring
// XDG_CONFIG_HOME).
func DefaultCLIPath() string {
	dir, err := os.UserConfigDir()
	if err != nil {
		return ""
	}
	return filepath.Join(dir, "banger", "config.toml")
}

// LoadCLI reads path over the defaults; a missing file is fine unless
// mustExist.
func LoadCLI(path string, mustExist bool) (CLI, error) {
	c := CLI{SocketPath: DefaultSocketPath}
	if path != "" {
		md, err := decodeFile(path, &c, mustExist)
		if err != nil {
			return CLI{}, err
		}
		if c.DefaultImage != "" {
			if md.IsDefined("default_image_name") && c.DefaultImageName != c.DefaultImage {
				return CLI{}, fmt.Errorf("config %s: default_image %q and default_image_name %q differ: keep default_image_name only", path, c.DefaultImage, c.DefaultImageName)
			}
			c.DefaultImageName = c.DefaultImage
		}
	}
	if s := os.Getenv("BANGER_SOCKET"); s != "" {
		c.SocketPath = s
	}
	if c.DefaultCPUs < 0 || c.DefaultMemoryMiB < 0 {
		return CLI{}, fmt.Errorf("config %s: default_cpus and default_memory_mib must not be negative", path)
	}
	if k := c.SSHKeyPath; k != "" && !filepath.IsAbs(k) && !strings.HasPrefix(k, "~/") {
		return CLI{}, fmt.Errorf("config %s: ssh_key_path %q: want an absolute path or one starting with ~/", path, k)
	}
	return c, nil
}

func decodeFile(path string, v any, mustExist bool) (toml.MetaData, error) {
	md, err := toml.DecodeFile(path, v)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) && !mustExist {
			return md, nil
		}
		return md, fmt.Errorf("config %s: %w", path, err)
	}
	if undec := md.Undecoded(); len(undec) > 0 {
		keys := make([]string, len(undec))
		for i, k := range undec {
			keys[i] = k.String()
		}
		return md, fmt.Errorf("config %s: unknown key(s) %s", path, strings.Join(keys, ", "))
	}
	return md, nil
}
