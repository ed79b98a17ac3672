//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
)

// TestNetBadInput: invalid -p specs, a taken host port, a host port
// another VM holds, unknown --allow and --network values, and malformed
// or overlapping subnets are each a clear error, with nothing made.
func TestNetBadInput(t *testing.T) {
	e := newNetEnv(t, "")
	e.RegisterImages()
	taken := e.Lab.ListenHost("taken", "127.0.0.1:0")
	for _, c := range []struct {
		want string
		args []string
	}{
		{`"abc"`, []string{"-p", "abc"}},
		{`"1:2:3:4"`, []string{"-p", "1:2:3:4"}},
		{`"70000:80"`, []string{"-p", "70000:80"}},
		{`"0:80"`, []string{"-p", "0:80"}},
		{"sctp", []string{"-p", "8080:80/sctp"}},
		{`"8080-8082:80-81"`, []string{"-p", "8080-8082:80-81"}},
		{"range", []string{"-p", "8080-8079:80-79"}},
		{`"300.1.1.1:8080:80"`, []string{"-p", "300.1.1.1:8080:80"}},
		{"not an address of this host", []string{"-p", "10.9.9.9:18600:80"}},
		{"already in use", []string{"-p", fmt.Sprintf("%d:80", taken)}},
		{"twice", []string{"-p", "18601:80", "-p", "18601:81"}},
		{"allow", []string{"--allow", "everything"}},
		{"network", []string{"--network", "wifi"}},
	} {
		args := append([]string{"vm", "create", "--name", "bad", "--image", "tiny"}, c.args...)
		out, errOut, code := e.Banger(args...)
		if code == 0 {
			t.Errorf("vm create %v succeeded, want an error", c.args)
			e.Banger("vm", "rm", "-f", "bad")
			continue
		}
		if !strings.Contains(errOut, c.want) || strings.Contains(errOut, "not available") {
			t.Errorf("vm create %v: stderr %q does not mention %q (stdout %q)", c.args, errOut, c.want, out)
		}
	}
	// Two VMs can't hold one host port.
	e.Must("vm", "create", "--name", "holder", "--image", "tiny", "-p", "127.0.0.1:18500:80")
	e.Fails("18500", "vm", "create", "--name", "second", "--image", "tiny", "-p", "18500:81")
	e.Must("vm", "rm", "holder")
	if ls := strings.TrimSpace(e.Must("vm", "ls", "-q")); ls != "" {
		t.Fatalf("bad creates left VMs: %q", ls)
	}
	if d := e.VMDirs(); len(d) != 0 {
		t.Fatalf("bad creates left VM directories: %v", d)
	}
	if l := e.Lab.Links(bridgeName); len(l) != 0 {
		t.Fatalf("bad creates left links: %v", l)
	}

	// Malformed subnets stop the daemon at start with an error naming the
	// setting, and nothing is made.
	e.StopDaemon()
	for _, s := range []string{"10.77.0.0/33", "10.77.0.0", "fe80::/64", "10.77.0.0/30"} {
		e.SetConfig(netConfig + fmt.Sprintf("subnet = %q\n", s))
		err := e.TryStartDaemon()
		if err == nil {
			e.StopDaemon()
			t.Errorf("bangerd started with subnet %q", s)
		} else if !strings.Contains(err.Error(), "subnet") {
			t.Errorf("bangerd with subnet %q: output does not mention subnet: %v", s, err)
		}
	}
	if l := e.Lab.Links(bridgeName); len(l) != 0 {
		t.Errorf("a refused subnet left links: %v", l)
	}
	if r := e.Lab.NFT(); len(r) != 0 {
		t.Errorf("a refused subnet left nftables tables: %v", r)
	}
}
