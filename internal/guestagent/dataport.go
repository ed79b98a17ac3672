package guestagent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
)

// Data ports (agentproto's datastream.go): bulk streams beside the SSH
// connection, one transfer at a time per port.

const (
	// dataHelloTimeout bounds the wait for the host's preamble on a data
	// port once the request named it.
	dataHelloTimeout = 10 * time.Second
	// dataReadBuffer is the read buffer in front of a data port: frame
	// headers and small frames cost no read of their own.
	dataReadBuffer = 64 << 10
	// dataPollMax is the longest pause between two reads of a data port
	// whose host side is not connected yet (the pauses start at 1 ms).
	dataPollMax = 20 * time.Millisecond
)

// dataPorts are the agent's data ports: their discovery, and which are in
// a transfer.
type dataPorts struct {
	// hooked: Hooks.OpenDataPort is set, Hooks.DataPorts is the count.
	hooked bool
	fixed  int
	open   func(ctx context.Context, port int) (io.ReadWriteCloser, error)
	sysfs  string // "/sys"
	dev    string // "/dev"

	mu   sync.Mutex
	devs []string // device names of ports 0..n-1 (last scan)
	busy [agentproto.MaxDataPorts]bool
}

func newDataPorts(hooks Hooks) *dataPorts {
	d := &dataPorts{sysfs: "/sys", dev: "/dev"}
	if hooks.OpenDataPort != nil {
		d.hooked, d.open = true, hooks.OpenDataPort
		d.fixed = min(max(hooks.DataPorts, 0), agentproto.MaxDataPorts)
	} else {
		d.open = d.openDevice
	}
	return d
}

// count is the number of data ports (agentproto.Info.DataPorts). Without
// hooks it looks them up under /sys each time (the ports may appear after
// the agent started; a few small reads, asked for by Info only).
func (d *dataPorts) count() int {
	if d.hooked {
		return d.fixed
	}
	devs := scanDataPorts(d.sysfs)
	d.mu.Lock()
	d.devs = devs
	d.mu.Unlock()
	return len(devs)
}

// scanDataPorts returns the device names of the consecutive data ports
// DataPortName(0), (1), ... found under sysfs/class/virtio-ports/*/name.
func scanDataPorts(sysfs string) []string {
	matches, _ := filepath.Glob(filepath.Join(sysfs, "class", "virtio-ports", "*", "name"))
	var found [agentproto.MaxDataPorts]string
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err != nil {
			continue
		}
		rest, ok := strings.CutPrefix(strings.TrimSpace(string(b)), agentproto.DataPortPrefix)
		if !ok {
			continue
		}
		i, err := strconv.Atoi(rest)
		if err != nil || i < 0 || i >= len(found) || agentproto.DataPortName(i) != agentproto.DataPortPrefix+rest {
			continue
		}
		found[i] = filepath.Base(filepath.Dir(m))
	}
	var devs []string
	for _, dev := range found {
		if dev == "" {
			break
		}
		devs = append(devs, dev)
	}
	return devs
}

// device returns the device path of data port i, looking the ports up
// again when i is not known yet.
func (d *dataPorts) device(i int) (string, error) {
	d.mu.Lock()
	n := len(d.devs)
	d.mu.Unlock()
	if i >= n {
		d.count()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if i < 0 || i >= len(d.devs) {
		return "", fmt.Errorf("data port %d (%s): %w", i, agentproto.DataPortName(i), errPortNotFound)
	}
	return filepath.Join(d.dev, d.devs[i]), nil
}

// openDevice opens the virtio-serial data port i and waits for the host's
// first bytes. The file goes through Go's poller (a virtio port supports
// poll), so Close interrupts a blocked Read or Write. A virtio port's
// reads return 0 bytes while its host side is not connected: they are
// retried, with pauses, until data comes or ctx ends.
func (d *dataPorts) openDevice(ctx context.Context, i int) (io.ReadWriteCloser, error) {
	dev, err := d.device(i)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open data port %d: %w", i, err)
	}
	stop := context.AfterFunc(ctx, func() { f.Close() })
	first, err := waitForData(ctx, f)
	if !stop() || err != nil {
		f.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("wait for the host on data port %d: %w", i, context.Cause(ctx))
		}
		return nil, fmt.Errorf("wait for the host on data port %d: %w", i, err)
	}
	return &replayPort{File: f, pending: first}, nil
}

// waitForData reads r until it yields data, pausing after each empty read
// (0 bytes or EOF: the host side is not connected), 1 ms at first, up to
// dataPollMax. It returns the data read.
func waitForData(ctx context.Context, r io.Reader) ([]byte, error) {
	buf := make([]byte, 4096)
	pause := time.Millisecond
	for {
		n, err := r.Read(buf)
		if n > 0 {
			return buf[:n], nil
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		if err := sleepCtx(ctx, pause); err != nil {
			return nil, err
		}
		pause = min(2*pause, dataPollMax)
	}
}

// replayPort is an opened data port whose reads first return the bytes
// read while waiting for the host.
type replayPort struct {
	*os.File
	pending []byte
}

func (p *replayPort) Read(b []byte) (int, error) {
	if len(p.pending) > 0 {
		n := copy(b, p.pending)
		p.pending = p.pending[n:]
		return n, nil
	}
	return p.File.Read(b)
}

// errDataPortBusy: the port named by a request is in another transfer.
var errDataPortBusy = errors.New("data port busy")

// acquire sets up one transfer on the port ds names: it checks the
// request, opens the port, reads the host's preamble and checks its token,
// then answers. The wait for the host is bounded by ctx and
// dataHelloTimeout. Close the returned transfer when done (before the
// request's outcome is reported on SSH).
func (d *dataPorts) acquire(ctx context.Context, ds *agentproto.DataStream) (*dataConn, error) {
	ports := d.fixed
	if !d.hooked {
		d.mu.Lock()
		ports = len(d.devs)
		d.mu.Unlock()
		if ds.Port >= ports {
			ports = d.count()
		}
	}
	if err := ds.Validate(ports); err != nil {
		return nil, err
	}
	i := ds.Port
	d.mu.Lock()
	if d.busy[i] {
		d.mu.Unlock()
		return nil, fmt.Errorf("data port %d: %w", i, errDataPortBusy)
	}
	d.busy[i] = true
	d.mu.Unlock()
	release := func() {
		d.mu.Lock()
		d.busy[i] = false
		d.mu.Unlock()
	}

	hctx, cancel := context.WithTimeoutCause(ctx, dataHelloTimeout,
		fmt.Errorf("no host on data port %d after %s", i, dataHelloTimeout))
	defer cancel()
	rwc, err := d.open(hctx, i)
	if err != nil {
		release()
		return nil, err
	}
	dc := &dataConn{port: i, rwc: rwc, release: release}
	dc.r = bufio.NewReaderSize(rwc, dataReadBuffer)
	dc.w = agentproto.NewDataWriter(rwc)
	// The handshake is bounded too: a host that connects and stalls.
	stop := context.AfterFunc(hctx, func() { rwc.Close() })
	err = agentproto.ReadDataHello(dc.r, ds.Token)
	if err == nil {
		err = agentproto.WriteDataAck(rwc, ds.Token)
	}
	if !stop() && err == nil {
		err = context.Cause(hctx)
	}
	if err != nil {
		if hctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", err, context.Cause(hctx))
		}
		dc.Close()
		return nil, fmt.Errorf("data port %d: %w", i, err)
	}
	return dc, nil
}

// dataConn is one transfer on a data port.
type dataConn struct {
	port    int
	rwc     io.ReadWriteCloser
	r       *bufio.Reader
	w       *agentproto.DataWriter
	release func()

	closed    atomic.Bool
	closeOnce sync.Once
}

// Close closes the port (interrupting a blocked read or write) and frees
// it for the next transfer.
func (dc *dataConn) Close() {
	dc.closeOnce.Do(func() {
		dc.closed.Store(true)
		dc.rwc.Close()
		dc.release()
	})
}

// isClosed tells whether Close was called (errors after it are ours).
func (dc *dataConn) isClosed() bool { return dc.closed.Load() }
