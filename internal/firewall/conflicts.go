package firewall

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/google/nftables"
)

// Probe checks that nf_tables answers a netlink query (the kernel has it
// and the caller may use it).
func Probe() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("open nftables: %w", err)
	}
	if _, err := c.ListTables(); err != nil {
		return fmt.Errorf("list nftables tables: %w", err)
	}
	return nil
}

// Host files Conflicts reads, under its root.
const (
	ipTablesNames = "proc/net/ip_tables_names"
	ufwConf       = "etc/ufw/ufw.conf"
)

// Conflicts returns what on this host may break banger's network rules,
// each a sentence that says what to do: nf_tables unavailable, iptables
// rules loaded through the legacy x_tables interface (banger can't see or
// add to them: a legacy FORWARD policy of DROP, as Docker with
// iptables-legacy sets, blocks the VMs' traffic), an active ufw or
// firewalld. Other firewall users that coexist with banger are in
// Neighbours. bridge is banger's bridge, which the fixes name.
func Conflicts(bridge string) []string { return conflicts("/", bridge) }

func conflicts(root, bridge string) []string {
	var out []string
	if err := Probe(); err != nil {
		out = append(out, fmt.Sprintf("nf_tables is unavailable (%v): bridged networking can't work; use a kernel with nf_tables (CONFIG_NF_TABLES, Linux 5.x) and run bangerd as root, or use network = \"user\"", err))
	} else if firewalldActive() {
		out = append(out, fmt.Sprintf("firewalld is active: its zones reject what they don't allow, so the VMs' DHCP, DNS and NAT through an interface in no zone; put banger's bridge in the trusted zone (banger's own tables still filter): sudo firewall-cmd --permanent --zone=trusted --add-interface=%[1]s && sudo firewall-cmd --reload", bridge))
	}
	if b, err := os.ReadFile(filepath.Join(root, ipTablesNames)); err == nil && strings.TrimSpace(string(b)) != "" {
		tables := strings.Fields(string(b))
		out = append(out, fmt.Sprintf("iptables-legacy tables are loaded (%s): their rules also filter the VMs' traffic and banger can't add to them; switch to iptables-nft (sudo update-alternatives --set iptables /usr/sbin/iptables-nft, then reload the tools that own those rules), or accept banger's bridge there: iptables-legacy -I FORWARD -i %[2]s -j ACCEPT; iptables-legacy -I FORWARD -o %[2]s -j ACCEPT", strings.Join(tables, ", "), bridge))
	}
	if ufwActive(filepath.Join(root, ufwConf)) {
		out = append(out, fmt.Sprintf("ufw is active: it may drop the VMs' DHCP, DNS and forwarded traffic and remove the rules banger adds to iptables' INPUT and FORWARD when it reloads; allow banger's bridge: sudo ufw allow in on %[1]s to any port 53,67 proto udp; sudo ufw route allow in on %[1]s; sudo ufw route allow out on %[1]s", bridge))
	}
	return out
}

var ufwEnabledRE = regexp.MustCompile(`(?m)^\s*ENABLED\s*=\s*"?yes"?\s*$`)

func ufwActive(conf string) bool {
	b, err := os.ReadFile(conf)
	return err == nil && ufwEnabledRE.Match(b)
}

// firewalldActive reports firewalld's table (inet firewalld).
func firewalldActive() bool {
	c, err := nftables.New()
	if err != nil {
		return false
	}
	_, err = c.ListTableOfFamily("firewalld", nftables.TableFamilyINet)
	return err == nil
}

// Neighbours returns the other firewall users found in nf_tables (Docker,
// libvirt), for information: banger coexists with them.
func Neighbours() []string {
	c, err := nftables.New()
	if err != nil {
		return nil
	}
	chains, err := c.ListChains()
	if err != nil {
		return nil
	}
	found := map[string]bool{}
	for _, ch := range chains {
		t, n := ch.Table.Name, ch.Name
		switch {
		case strings.HasPrefix(n, "DOCKER") || strings.HasPrefix(t, "docker"):
			found["Docker"] = true
		case strings.HasPrefix(n, "LIBVIRT") || strings.HasPrefix(t, "libvirt"):
			found["libvirt"] = true
		case strings.HasPrefix(n, "ufw"):
			found["ufw"] = true
		}
	}
	var out []string
	for name := range found {
		out = append(out, fmt.Sprintf("%s's rules are present: banger keeps to its own tables (and accepts its bridge in iptables' FORWARD or DOCKER-USER when their policy drops)", name))
	}
	slices.Sort(out)
	return out
}
