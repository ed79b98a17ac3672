//go:build e2e

package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/sockbuf"
)

// rawPortName is the extra virtio-serial port of the bare QEMU that
// measures the raw channel.
const rawPortName = "org.banger.bench.raw"

// bareVM is a QEMU started by hand with banger's kernel, initrd and
// command line, its agent reachable (for running the guest side of a
// measurement) and one more virtio-serial port whose host side is a unix
// socket: the raw channel.
type bareVM struct {
	agent   *agent.Client
	rawSock string
	rawDev  string // the raw port's device in the guest
	stop    func() // kills the VM (also at the benchmark's end)
	pid     int    // QEMU's
}

// bootBare boots a bare QEMU like bareBoot, with the raw port added, and
// returns once its agent answers.
func bootBare(b *testing.B, imageDir, vmDir, initrd, cmdline string) *bareVM {
	dir, err := os.MkdirTemp("/tmp", "bare")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	overlay := filepath.Join(dir, "root.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
		filepath.Join(imageDir, "rootfs.ext4"), overlay, "4G").CombinedOutput(); err != nil {
		b.Fatalf("qemu-img: %v: %s", err, out)
	}
	sock := filepath.Join(dir, "agent.sock")
	raw := filepath.Join(dir, "raw.sock")
	hostPub, _ := os.ReadFile(filepath.Join(vmDir, "agent-host-key.pub"))
	clientKey, _ := os.ReadFile(filepath.Join(vmDir, "agent-client-key"))
	keys, err := agent.ParseKeys(string(hostPub), string(clientKey))
	if err != nil {
		b.Fatal(err)
	}
	cmd := bareQEMU(imageDir, initrd, cmdline, dir, overlay, sock,
		"-chardev", "socket,id=raw,path="+raw+",server=on,wait=off",
		"-device", "virtserialport,chardev=raw,name="+rawPortName)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	var once sync.Once
	stop := func() { once.Do(func() { cmd.Process.Kill(); cmd.Wait() }) }
	b.Cleanup(stop)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dial := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}
	ac, err := agent.WaitReady(ctx, dial, keys, nil)
	if err != nil {
		b.Fatalf("bare boot: %v", err)
	}
	b.Cleanup(func() { ac.Close() })
	vm := &bareVM{agent: ac, rawSock: raw, stop: func() { ac.Close(); stop() }, pid: cmd.Process.Pid}
	vm.rawDev = strings.TrimSpace(vm.sh(b, `for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name)" = `+rawPortName+` ] && echo /dev/${p##*/}; done`))
	if vm.rawDev == "" {
		b.Fatal("bare boot: the raw port is not in the guest")
	}
	// Measure once the guest has booted, as banger's VM is (vm start
	// --wait-boot): systemd starting its services takes the guest's CPU.
	// The agent answers before systemd runs (banger's init starts it
	// first), so wait for systemd's socket before asking it.
	if st := strings.TrimSpace(vm.sh(b, `for i in $(seq 600); do [ -S /run/systemd/private ] && break; sleep 0.1; done; systemctl is-system-running --wait || true`)); st != "running" && st != "degraded" {
		b.Fatalf("bare boot: systemd is %q, want running (or degraded)", st)
	}
	return vm
}

// sh runs a shell command in the bare guest and returns its output.
func (vm *bareVM) sh(b *testing.B, script string) string {
	var out, errOut strings.Builder
	code, err := vm.agent.Exec(context.Background(), agent.ExecOptions{Argv: []string{"sh", "-c", script}, Stdout: &out, Stderr: &errOut})
	if err != nil || code != 0 {
		b.Fatalf("bare guest: %s: %d %v: %s", script, code, err, errOut.String())
	}
	return out.String()
}

// rawOut runs script in the guest, which writes size bytes into the raw
// port (script sees the port's device as $PORT), reads them from the
// socket, and returns how long the bytes took to arrive, from the
// command's start.
func (vm *bareVM) rawOut(b *testing.B, script string, size int64) time.Duration {
	conn, err := net.Dial("unix", vm.rawSock)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	got := make(chan error, 1)
	start := time.Now()
	go func() {
		// Large reads, so that the host side is never what slows the
		// guest (io.Discard reads 8 KiB at a time).
		buf := make([]byte, 1<<20)
		var n int64
		var err error
		for n < size && err == nil {
			var m int
			m, err = conn.Read(buf[:min(int64(len(buf)), size-n)])
			n += int64(m)
		}
		if n == size {
			err = nil
		} else if err == nil || errors.Is(err, io.EOF) {
			err = fmt.Errorf("read %d of %d bytes", n, size)
		}
		got <- err
	}()
	vm.sh(b, "PORT="+vm.rawDev+"; "+script)
	if err := <-got; err != nil {
		b.Fatalf("raw channel out: %v", err)
	}
	return time.Since(start)
}

// rawIn writes src into the raw port's socket while script reads it in the
// guest (from $PORT), and returns how long until the script ended.
func (vm *bareVM) rawIn(b *testing.B, script string, src func(w io.Writer) error) time.Duration {
	conn, err := net.Dial("unix", vm.rawSock)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	// The send buffer banger's own sockets get (sockbuf.Stream), so that
	// the host side is never what slows the guest.
	if _, err := sockbuf.GrowSend(conn, sockbuf.Stream); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	sent := make(chan error, 1)
	go func() { sent <- src(conn) }()
	vm.sh(b, "PORT="+vm.rawDev+"; "+script)
	if err := <-sent; err != nil {
		b.Fatalf("raw channel in: %v", err)
	}
	return time.Since(start)
}
