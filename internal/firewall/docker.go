package firewall

import (
	"bytes"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// Coexistence with iptables-nft (Docker, ufw, firewalld's iptables mode).
//
// A packet must be accepted by every base chain on its hook: banger's
// accept doesn't override a drop in another table. Docker sets the policy
// of iptables' FORWARD chain (table `ip filter`) to DROP, and ufw those of
// INPUT and FORWARD, which would drop the VMs' traffic. banger then adds
// accept rules for its bridge to that table, in exactly the form
// `iptables -I CHAIN -i BRIDGE -j ACCEPT` writes them (so iptables still
// lists the chain): in DOCKER-USER when it exists (Docker's place for the
// user's rules), else at the head of FORWARD when its policy is drop; and
// `-i BRIDGE` at the head of INPUT when its policy is drop. banger's own
// tables still do the filtering. No other rule or policy is touched;
// Teardown removes these rules.

const (
	iptFilter     = "filter"
	iptForward    = "FORWARD"
	iptInput      = "INPUT"
	iptDockerUser = "DOCKER-USER"
)

var ipFilter = &nftables.Table{Name: iptFilter, Family: nftables.TableFamilyIPv4}

// compatPlan is the rules Ensure inserts into iptables-nft's chains.
type compatPlan struct {
	rules []*nftables.Rule
}

func (p compatPlan) apply(c *nftables.Conn) {
	for _, r := range p.rules {
		c.InsertRule(r)
	}
}

// iptAccept is `-i NAME -j ACCEPT` (in) or `-o NAME -j ACCEPT` as
// iptables-nft 1.8 writes it: iifname "NAME" counter accept.
func iptAccept(ch *nftables.Chain, name string, in bool) *nftables.Rule {
	key := expr.MetaKeyOIFNAME
	if in {
		key = expr.MetaKeyIIFNAME
	}
	return &nftables.Rule{Table: ipFilter, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: append([]byte(name), 0)},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}}
}

// isIPTAccept reports whether r is iptAccept(_, name, in).
func isIPTAccept(r *nftables.Rule, name string, in bool) bool {
	if len(r.Exprs) != 4 {
		return false
	}
	key := expr.MetaKeyOIFNAME
	if in {
		key = expr.MetaKeyIIFNAME
	}
	m, ok1 := r.Exprs[0].(*expr.Meta)
	c, ok2 := r.Exprs[1].(*expr.Cmp)
	_, ok3 := r.Exprs[2].(*expr.Counter)
	v, ok4 := r.Exprs[3].(*expr.Verdict)
	return ok1 && ok2 && ok3 && ok4 && m.Key == key && m.Register == 1 &&
		c.Op == expr.CmpOpEq && c.Register == 1 && bytes.Equal(c.Data, append([]byte(name), 0)) &&
		v.Kind == expr.VerdictAccept
}

// filterChains returns iptables-nft's chains of table ip filter by name
// (none when the table doesn't exist).
func filterChains(c *nftables.Conn) (map[string]*nftables.Chain, error) {
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil && !isNotExist(err) {
		return nil, fmt.Errorf("firewall: list ip chains: %w", err)
	}
	m := map[string]*nftables.Chain{}
	for _, ch := range chains {
		if ch.Table.Name == iptFilter {
			m[ch.Name] = ch
		}
	}
	return m, nil
}

func dropPolicy(ch *nftables.Chain) bool {
	return ch != nil && ch.Policy != nil && *ch.Policy == nftables.ChainPolicyDrop
}

// planCompat decides which accept rules Ensure adds (the ones already
// there are not added again).
func (f *Firewall) planCompat(c *nftables.Conn) (compatPlan, error) {
	chains, err := filterChains(c)
	if err != nil {
		return compatPlan{}, err
	}
	var p compatPlan
	rulesOf := map[string][]*nftables.Rule{}
	for _, name := range []string{iptForward, iptDockerUser, iptInput} {
		if ch := chains[name]; ch != nil {
			rs, err := c.GetRules(ipFilter, ch)
			if err != nil {
				return compatPlan{}, fmt.Errorf("firewall: list ip filter %s: %w", name, err)
			}
			rulesOf[name] = rs
		}
	}
	has := func(in bool, names ...string) bool {
		for _, n := range names {
			for _, r := range rulesOf[n] {
				if isIPTAccept(r, f.cfg.Bridge, in) {
					return true
				}
			}
		}
		return false
	}
	var fwd *nftables.Chain
	switch {
	case chains[iptDockerUser] != nil:
		fwd = chains[iptDockerUser]
	case dropPolicy(chains[iptForward]):
		fwd = chains[iptForward]
	}
	if fwd != nil {
		// Inserted at the head in this order: the chain reads -i, then -o.
		for _, in := range []bool{false, true} {
			if !has(in, iptForward, iptDockerUser) {
				p.rules = append(p.rules, iptAccept(fwd, f.cfg.Bridge, in))
			}
		}
	}
	if ch := chains[iptInput]; dropPolicy(ch) && !has(true, iptInput) {
		p.rules = append(p.rules, iptAccept(ch, f.cfg.Bridge, true))
	}
	return p, nil
}

// compatRules returns the accept rules banger added for its bridge.
func (f *Firewall) compatRules(c *nftables.Conn) ([]*nftables.Rule, error) {
	chains, err := filterChains(c)
	if err != nil {
		return nil, err
	}
	var own []*nftables.Rule
	for _, name := range []string{iptForward, iptDockerUser, iptInput} {
		ch := chains[name]
		if ch == nil {
			continue
		}
		rs, err := c.GetRules(ipFilter, ch)
		if err != nil {
			return nil, fmt.Errorf("firewall: list ip filter %s: %w", name, err)
		}
		for _, r := range rs {
			if isIPTAccept(r, f.cfg.Bridge, true) || (name != iptInput && isIPTAccept(r, f.cfg.Bridge, false)) {
				own = append(own, r)
			}
		}
	}
	return own, nil
}
