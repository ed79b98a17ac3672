// Package netns gives tests network namespaces of their own. The project's
// network rules (docs/dev/testing-networks.md) say every test that creates
// links, addresses or firewall rules, or talks to a guest address, does so
// inside namespaces the test made: this package makes them, runs code and
// commands inside them, and deletes them when the test ends. Only tests
// import it.
package netns

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/testenv"
)

// runDir is where named namespaces are bind-mounted, as iproute2 does, so
// that `ip netns exec NAME` reaches them too.
const runDir = "/run/netns"

// NS is a named network namespace made by a test.
type NS struct {
	Name string
	Path string // the bind mount under /run/netns
}

// New makes a network namespace named after prefix and a random suffix,
// with its loopback up, and deletes it when tb ends. It skips (fails under
// CI) when the test isn't root.
func New(tb testing.TB, prefix string) *NS {
	tb.Helper()
	if os.Geteuid() != 0 {
		testenv.Missing(tb, "network namespaces need root")
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := prefix + "-" + hex.EncodeToString(b)
	n, err := Create(name)
	if err != nil {
		tb.Fatalf("create netns: %v", err)
	}
	tb.Cleanup(func() {
		if err := n.Delete(); err != nil {
			tb.Errorf("delete netns %s: %v", n.Name, err)
		}
	})
	return n
}

// Create makes the named namespace (like `ip netns add NAME`) and brings
// its loopback up.
func Create(name string) (*NS, error) {
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return nil, err
	}
	p := filepath.Join(runDir, name)
	f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", p, err)
	}
	_ = f.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open the current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		err = unix.Mount("/proc/thread-self/ns/net", p, "none", unix.MS_BIND, "")
		leave(orig)
		if err != nil {
			errc <- fmt.Errorf("bind-mount the namespace: %w", err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		_ = os.Remove(p)
		return nil, err
	}
	n := &NS{Name: name, Path: p}
	if out, err := n.Command(context.Background(), "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		_ = n.Delete()
		return nil, fmt.Errorf("bring lo up: %w: %s", err, out)
	}
	return n, nil
}

// Delete unmounts and removes the namespace. Processes still in it keep it
// alive until they exit.
func (n *NS) Delete() error {
	if err := unix.Unmount(n.Path, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unmount %s: %w", n.Path, err)
	}
	if err := os.Remove(n.Path); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// Do runs fn on an OS thread inside the namespace: sockets fn opens
// (netlink, nftables, TCP) belong to it and stay in it after Do returns.
// fn must not start goroutines that need the namespace.
func (n *NS) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open the current netns: %w", err)
			return
		}
		defer orig.Close()
		h, err := netns.GetFromPath(n.Path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open netns %s: %w", n.Name, err)
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			leave(orig)
			errc <- fmt.Errorf("enter netns %s: %w", n.Name, err)
			return
		}
		err = fn()
		leave(orig)
		errc <- err
	}()
	return <-errc
}

// leave ends a locked thread's stay in another namespace: back in orig, it
// is unlocked and serves other goroutines again. If it can't go back it
// stays locked, so the runtime ends it with its goroutine; the process's
// main thread can't end (the runtime parks it forever), and a main thread
// left in a test's namespace would make /proc/self/net (/proc/net/tcp...)
// show that namespace to the whole test binary.
func leave(orig netns.NsHandle) {
	if netns.Set(orig) == nil {
		runtime.UnlockOSThread()
	}
}

// Command returns a command that runs inside the namespace (through
// `ip netns exec`, which also gives it the namespace's /etc/netns files).
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Run runs a command inside the namespace and fails tb with its output if
// it fails; it returns the combined output.
func (n *NS) Run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	out, err := n.Command(context.Background(), name, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("in netns %s: %s %v: %v\n%s", n.Name, name, args, err, out)
	}
	return string(out)
}

// Veth joins two namespaces with a veth pair named aName (in a) and bName
// (in b), each end up and given its address (CIDR, may be empty).
func Veth(tb testing.TB, a *NS, aName, aAddr string, b *NS, bName, bAddr string) {
	tb.Helper()
	a.Run(tb, "ip", "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", b.Name)
	for _, e := range []struct {
		ns         *NS
		name, addr string
	}{{a, aName, aAddr}, {b, bName, bAddr}} {
		if e.addr != "" {
			e.ns.Run(tb, "ip", "addr", "add", e.addr, "dev", e.name)
		}
		e.ns.Run(tb, "ip", "link", "set", e.name, "up")
	}
}
