//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/test/harness"
)

// TestNetCrash kills bangerd (SIGKILL) in the middle of a create and in
// the middle of a start of bridged VMs with forwarded ports, restarts it,
// and checks that what banger made in the lab matches what runs: a VM the
// restarted daemon reports running has its TAP and rules; every other VM
// has none, and once every VM is removed no TAP, per-VM rule or forwarded
// port's listener is left.
func TestNetCrash(t *testing.T) {
	e := newNetEnv(t, "")
	registerNetImages(t, e)

	t.Run("mid-create", func(t *testing.T) {
		e.T = t
		// Creates make nothing on the host; kill while a batch runs.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		var cmds []func() error
		for i := 0; i < 8; i++ {
			cmd := e.Command(ctx, "vm", "create", "--name", "mc"+string(rune('a'+i)), "--image", "tiny", "-p", "127.0.0.1:1860"+string(rune('0'+i))+":80")
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			cmds = append(cmds, cmd.Wait)
		}
		// Kill once some creates are in flight (a VM directory exists).
		harness.WaitFor(t, 30*time.Second, "a create in flight", func() bool { return len(e.VMDirs()) > 0 })
		e.KillDaemon()
		for _, w := range cmds {
			_ = w()
		}
		e.StartDaemon()
		names := strings.Fields(e.Must("vm", "ls", "-q"))
		t.Logf("%d of 8 creates survived the crash", len(names))
		// Every VM that survived is whole: it has an address and inspects.
		for _, n := range names {
			checkBridged(t, e, n)
		}
		if d := e.VMDirs(); len(d) != len(names) {
			t.Errorf("%d VM directories for %d VMs after a crash mid-create: %v", len(d), len(names), d)
		}
		var ports []string
		for i := 0; i < 8; i++ {
			ports = append(ports, "1860"+string(rune('0'+i)))
		}
		for _, n := range names {
			id := e.Inspect(n).ID
			e.Must("vm", "rm", n)
			if l := leftovers(e, id, ports...); len(l) != 0 {
				t.Errorf("vm %s after rm: %v", n, l)
			}
		}
		// Nothing of any VM, surviving or not: no TAP, no per-VM chain or
		// element, no listener on the creates' ports.
		if l := e.Lab.Links(bridgeName); len(l) > 1 || (len(l) == 1 && l[0] != bridgeName) {
			t.Errorf("links after creates only: %v", l)
		}
		for _, r := range e.Lab.NFT() {
			if strings.Contains(r, " vm-") || strings.Contains(r, " element ") {
				t.Errorf("per-VM nftables state after creates only: %s", r)
			}
		}
		for _, l := range e.Lab.Listeners() {
			for _, p := range ports {
				if strings.HasSuffix(l, ":"+p) {
					t.Errorf("listener after creates only: %s", l)
				}
			}
		}
	})

	t.Run("mid-start", func(t *testing.T) {
		e.T = t
		e.Must("vm", "create", "--name", "ms", "--image", "tiny", "--memory", "256", "-p", "18700:8080")
		id := e.Inspect("ms").ID
		tap := "bg-" + id[:12]
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		start := e.Command(ctx, "vm", "start", "ms")
		if err := start.Start(); err != nil {
			t.Fatal(err)
		}
		// Kill the daemon once the boot made the VM's TAP.
		harness.WaitFor(t, 2*time.Minute, "the VM's TAP", func() bool { return contains(e.Lab.Links(bridgeName), tap) })
		e.KillDaemon()
		_ = start.Wait()
		e.StartDaemon()
		vm := e.Inspect("ms")
		t.Logf("after the crash mid-start and a restart the VM is %s", vm.State)
		switch vm.State {
		case "running":
			// Adopted: it has its TAP, its rules (chain and elements), and
			// its forwarded port answers.
			if !contains(e.Lab.Links(bridgeName), tap) {
				t.Errorf("adopted running VM has no TAP %s", tap)
			}
			checkRules(t, e, id)
			e.InstallGuestTool("ms")
			guestOK(t, e, "ms", tool("serve", "-d", "tcp", "8080")...)
			e.Lab.WaitExchange("tcp", "127.0.0.1:18700", "adopted", "tcp:adopted", 30*time.Second)
		case "stopped":
			if l := leftovers(e, id, "18700"); len(l) != 0 {
				t.Errorf("stopped VM after a crash mid-start has %v", l)
			}
		default:
			t.Errorf("after a crash mid-start and a restart, state %q", vm.State)
		}
		e.Must("vm", "rm", "-f", "ms")
		if l := leftovers(e, id, "18700"); len(l) != 0 {
			t.Fatalf("after vm rm: %v", l)
		}
		// Killed once QEMU runs (the guest still booting): the restarted
		// daemon adopts the VM with everything its network needs (TAP,
		// rules, forwarded port), or leaves nothing.
		e.Must("vm", "create", "--name", "mb", "--image", "tiny", "--memory", "256", "-p", "18701:8080")
		idB := e.Inspect("mb").ID
		start = e.Command(ctx, "vm", "start", "mb")
		if err := start.Start(); err != nil {
			t.Fatal(err)
		}
		harness.WaitFor(t, 2*time.Minute, "the VM's QEMU", func() bool { return len(harness.ProcessesMentioning("banger-"+idB)) > 0 })
		e.KillDaemon()
		_ = start.Wait()
		e.StartDaemon()
		vm = e.Inspect("mb")
		t.Logf("after a crash with QEMU running and a restart the VM is %s", vm.State)
		if vm.State == "running" {
			checkRules(t, e, idB)
			e.InstallGuestTool("mb")
			guestOK(t, e, "mb", tool("serve", "-d", "tcp", "8080")...)
			e.Lab.WaitExchange("tcp", "127.0.0.1:18701", "adopted", "tcp:adopted", 30*time.Second)
			if out := waitGuest(t, e, "mb", 30*time.Second, tool("get", harness.InternetIP+":80")...); out != harness.InternetBody {
				t.Errorf("NAT from the adopted VM = %q", out)
			}
		} else if l := leftovers(e, idB, "18701"); len(l) != 0 {
			t.Errorf("stopped VM after a crash with QEMU running has %v", l)
		}
		e.Must("vm", "rm", "-f", "mb")
		if l := leftovers(e, idB, "18701"); len(l) != 0 {
			t.Fatalf("after vm rm: %v", l)
		}
		// The restarted daemon still boots VMs with a network.
		e.Must("vm", "create", "--name", "ms2", "--image", "tiny", "--memory", "256", "--start")
		e.InstallGuestTool("ms2")
		if out := waitGuest(t, e, "ms2", 30*time.Second, tool("get", harness.InternetIP+":80")...); out != harness.InternetBody {
			t.Errorf("NAT after the crash = %q", out)
		}
		id2 := e.Inspect("ms2").ID
		e.Must("vm", "rm", "-f", "ms2")
		if l := leftovers(e, id2); len(l) != 0 {
			t.Fatalf("after vm rm: %v", l)
		}
	})
}

// checkRules fails t unless the VM id has its rules in the lab: its chain
// and the set elements carrying its id.
func checkRules(t *testing.T, e *harness.Env, id string) {
	t.Helper()
	var chain, elems bool
	for _, r := range e.Lab.NFT() {
		chain = chain || strings.HasSuffix(r, " vm-"+id)
		elems = elems || strings.HasSuffix(r, " element "+id)
	}
	if !chain || !elems {
		t.Errorf("adopted running VM %s: its chain %v, its set elements %v; want both: %v", id, chain, elems, e.Lab.NFT())
	}
}
