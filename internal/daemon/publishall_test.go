package daemon

import (
	"bufio"
	"errors"
	"net"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
)

// freeLoopbackPort returns a port free on 127.0.0.1 and a listener on
// another loopback address (127.0.0.2) with that port: the fake guest's
// server (the fake guest shares the test's network namespace, so its
// server can't take the host port the daemon forwards from).
func freeLoopbackPort(t *testing.T) (int, net.Listener) {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp4", "127.0.0.2:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		probe, err := net.Listen("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err == nil {
			probe.Close()
			t.Cleanup(func() { l.Close() })
			return port, l
		}
		l.Close()
	}
	t.Fatal("no port free on both 127.0.0.1 and 127.0.0.2")
	return 0, nil
}

// echo answers each line it reads on l's connections with "echo: LINE".
func echo(t *testing.T, l net.Listener) {
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	t.Cleanup(func() { l.Close() })
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					if _, err := c.Write([]byte("echo: " + sc.Text() + "\n")); err != nil {
						return
					}
				}
			})
		}
	})
}

func autoPortsOf(v api.VM) []int {
	var out []int
	if v.Network == nil {
		return nil
	}
	for _, p := range v.Network.Ports {
		if p.Auto {
			out = append(out, p.HostPort)
		}
	}
	return out
}

// A --publish-all VM's listening guest port is forwarded from the same
// port on 127.0.0.1 (through the agent), shown in inspect with Auto, and
// no longer once the guest stops listening or the VM stops; privileged
// ports, ports taken on the host and ports of -p rules are skipped.
func TestPublishAll(t *testing.T) {
	t.Parallel()
	e, d := setup(t, func(c *config.Daemon) { c.Network = api.NetworkUser })
	ctx := testCtx(t)

	port, srv := freeLoopbackPort(t)
	echo(t, srv)
	taken, err := net.Listen("tcp4", "127.0.0.1:0") // a host service on the guest's port
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	takenPort := uint16(taken.Addr().(*net.TCPAddr).Port)
	fixed, _ := freeLoopbackPort(t) // forwarded with -p

	var mu sync.Mutex
	listening := []agentproto.PortListen{
		{Proto: "tcp", Addr: "0.0.0.0", Port: 80},
		{Proto: "tcp", Addr: "0.0.0.0", Port: takenPort},
		{Proto: "tcp", Addr: "::", Port: uint16(fixed)},
		{Proto: "tcp", Addr: "127.0.0.2", Port: uint16(port)},
	}
	e.fake.setBehaviour("pub", fakeBehaviour{Listening: func() []agentproto.PortListen {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(listening)
	}})
	p := strconv.Itoa(fixed)
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "pub", Start: true, MemoryMiB: 128, CPUs: 1, PublishAll: true, Ports: []string{p + ":" + p}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if vm.Network == nil || !vm.Network.PublishAll {
		t.Fatalf("network %+v, want publish-all", vm.Network)
	}
	waitFor(ctx, t, "the guest's port in inspect", func() bool {
		return slices.Equal(autoPortsOf(inspect(t, d, "pub")), []int{port})
	})
	for _, pf := range inspect(t, d, "pub").Network.Ports {
		if pf.Auto && (pf.HostIP != "127.0.0.1" || pf.GuestPort != port || pf.Proto != "tcp") {
			t.Errorf("auto port %+v", pf)
		}
	}

	c, err := net.DialTimeout("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "echo: hello\n" {
		t.Fatalf("through the forward: %q, %v", line, err)
	}
	c.Close()

	// The guest stops listening: the forward goes.
	mu.Lock()
	listening = listening[:3]
	mu.Unlock()
	waitFor(ctx, t, "the forward to go", func() bool { return len(autoPortsOf(inspect(t, d, "pub"))) == 0 })
	refused := func() bool {
		c, err := net.DialTimeout("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
		if err == nil {
			c.Close()
		}
		return errors.Is(err, syscall.ECONNREFUSED)
	}
	if !refused() {
		t.Fatalf("127.0.0.1:%d still accepts after the guest stopped listening", port)
	}

	// It listens again, then the VM stops: the forward goes with it.
	mu.Lock()
	listening = append(listening, agentproto.PortListen{Proto: "tcp", Addr: "127.0.0.2", Port: uint16(port)})
	mu.Unlock()
	waitFor(ctx, t, "the forward again", func() bool { return slices.Equal(autoPortsOf(inspect(t, d, "pub")), []int{port}) })
	if _, err := d.c.VMStop(ctx, api.VMStopParams{Name: "pub"}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "the forward to go with the VM", refused)
	if got := autoPortsOf(inspect(t, d, "pub")); len(got) != 0 {
		t.Errorf("stopped VM shows auto ports %v", got)
	}
}

// --publish-all needs a network.
func TestPublishAllNeedsNetwork(t *testing.T) {
	t.Parallel()
	_, d := setup(t, func(c *config.Daemon) { c.Network = api.NetworkUser })
	_, err := d.c.VMCreate(testCtx(t), api.VMCreateParams{Name: "x", Network: api.NetworkNone, PublishAll: true}, nil)
	wireErr(t, "publish-all with network none", err, errdefs.ErrInvalid)
	if vms, err := d.c.VMList(testCtx(t)); err != nil || len(vms) != 0 {
		t.Fatalf("a refused create left %d VMs (err %v)", len(vms), err)
	}
}

func TestGuestTarget(t *testing.T) {
	for in, want := range map[string]string{"0.0.0.0": "127.0.0.1", "::": "::1", "10.77.0.5": "10.77.0.5", "fd00::5": "fd00::5", "": "127.0.0.1"} {
		if got := guestTarget(in); got != want {
			t.Errorf("guestTarget(%q) = %q, want %q", in, got, want)
		}
	}
}

// A port another (stopped) VM forwards with -p is left to it; the
// forwards come back after a daemon restart while the VM kept running.
func TestPublishAllReservedPortsAndRestart(t *testing.T) {
	t.Parallel()
	e, d := setup(t, func(c *config.Daemon) { c.Network = api.NetworkUser })
	ctx := testCtx(t)
	port, srv := freeLoopbackPort(t)
	echo(t, srv)
	reserved, _ := freeLoopbackPort(t)
	r := strconv.Itoa(reserved)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "other", Ports: []string{r + ":" + r}}, nil); err != nil {
		t.Fatal(err)
	}
	e.fake.setBehaviour("pub", fakeBehaviour{Listening: func() []agentproto.PortListen {
		return []agentproto.PortListen{{Proto: "tcp", Addr: "0.0.0.0", Port: uint16(reserved)}, {Proto: "tcp", Addr: "127.0.0.2", Port: uint16(port)}}
	}})
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "pub", Start: true, MemoryMiB: 128, CPUs: 1, PublishAll: true}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "the guest's port in inspect", func() bool {
		return slices.Equal(autoPortsOf(inspect(t, d, "pub")), []int{port})
	})
	exchange := func() string {
		c, err := net.DialTimeout("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 5*time.Second)
		if err != nil {
			return err.Error()
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte("again\n")); err != nil {
			return err.Error()
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return err.Error()
		}
		return line
	}
	if got := exchange(); got != "echo: again\n" {
		t.Fatalf("through the forward: %q", got)
	}
	d.close()
	d = e.start()
	waitFor(ctx, t, "the forward after a daemon restart", func() bool {
		return slices.Equal(autoPortsOf(inspect(t, d, "pub")), []int{port})
	})
	if got := exchange(); got != "echo: again\n" {
		t.Fatalf("through the forward after a restart: %q", got)
	}
}
