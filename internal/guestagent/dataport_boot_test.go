package guestagent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
)

// TestBootDataPorts boots a VM with data ports (real virtio-serial ports,
// chardev sockets on the host) and drives transfers on them with the
// host's side of the protocol written here: the count in Info, an exec
// through a port, the port used again, the host going away mid-stream.
func TestBootDataPorts(t *testing.T) {
	img := findTestImage(t)
	const ports = 2
	dir := t.TempDir()
	var args []string
	sock := func(i int) string { return filepath.Join(dir, fmt.Sprintf("data%d.sock", i)) }
	for i := range ports {
		args = append(args,
			"-chardev", fmt.Sprintf("socket,id=data%d,path=%s,server=on,wait=off", i, sock(i)),
			"-device", fmt.Sprintf("virtserialport,chardev=data%d,name=%s", i, agentproto.DataPortName(i)))
	}
	v, _, keys := bootVM(t, img, bootSpec{rootfs: "busybox-rootfs.ext4", useModulesDir: true, qemuArgs: args})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	// A plain SSH client, which sends the requests with data ports (the
	// agent's port serves one connection at a time).
	var conn net.Conn
	for {
		var err error
		if conn, err = v.dial(ctx); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("dial the agent: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	hctx, hcancel := context.WithTimeout(ctx, 2*time.Minute)
	stop := context.AfterFunc(hctx, func() { conn.Close() })
	sc := rawSSH(t, conn, keys)
	stop()
	hcancel()
	ok, payload, err := sc.SendRequest(agentproto.GlobalInfo, true, nil)
	var info agentproto.Info
	if err == nil && ok {
		err = agentproto.UnmarshalPayload(payload, &info)
	}
	if err != nil || !ok {
		t.Fatalf("info: %v %v", ok, err)
	}
	if info.DataPorts != ports {
		t.Errorf("Info.DataPorts = %d, want %d", info.DataPorts, ports)
	}
	dial := func(i int) func() net.Conn {
		return func() net.Conn {
			conn, err := net.Dial("unix", sock(i))
			if err != nil {
				t.Fatalf("dial data port %d: %v", i, err)
			}
			t.Cleanup(func() { conn.Close() })
			return conn
		}
	}

	// An exec through port 1: stdin, stdout, stderr, exit status.
	in := make([]byte, 1<<20+333)
	rand.Read(in)
	stdout, stderr, res := runDataExecOn(t, sc, dial(1), 1,
		[]string{"sh", "-c", "cat; head -c 3000000 /dev/zero; echo err >&2; exit 5"}, in, false)
	if res.status != 5 || res.stderr != "" {
		t.Errorf("exit %+v, want 5", res)
	}
	if len(stdout) != len(in)+3000000 || !bytes.Equal(stdout[:len(in)], in) || strings.Trim(string(stdout[len(in):]), "\x00") != "" {
		t.Errorf("stdout: %d bytes, want stdin (%d) then 3000000 zeros", len(stdout), len(in))
	}
	if string(stderr) != "err\n" {
		t.Errorf("stderr %q", stderr)
	}

	// The host connected and sent its preamble before the request: QEMU
	// takes the connection while the guest has the port closed, and
	// passes the bytes on once the guest opens it.
	tok0 := newToken(t)
	early := dial(0)()
	if err := agentproto.WriteDataHello(early, tok0); err != nil {
		t.Fatal(err)
	}
	e0 := startDataExec(t, sc, []string{"echo", "early"}, &agentproto.DataStream{Port: 0, Token: tok0})
	early.SetDeadline(time.Now().Add(time.Minute))
	if err := agentproto.ReadDataAck(early, tok0); err != nil {
		t.Fatalf("ack after an early preamble: %v (exit %+v)", err, e0.wait(t))
	}
	go sendFrames(early, nil, 0)
	var eout bytes.Buffer
	if err := readFrames(early, &eout, io.Discard); err != nil || eout.String() != "early\n" {
		t.Errorf("early preamble: %q, %v", eout.String(), err)
	}
	e0.wait(t)
	early.Close()

	// Throughput out of the guest (a figure, not a check).
	start := time.Now()
	stdout, _, res = runDataExecOn(t, sc, dial(1), 1, []string{"dd", "if=/dev/zero", "bs=128k", "count=763"}, nil, false)
	if res.status != 0 || len(stdout) != 763*128<<10 {
		t.Errorf("100 MB out: %d bytes, exit %+v", len(stdout), res)
	}
	d := time.Since(start)
	t.Logf("100 MB out through a data port in %s: %.1f MB/s", d.Round(time.Millisecond), float64(len(stdout))/1e6/d.Seconds())
	big := bytes.Repeat([]byte{'y'}, 50000000)
	start = time.Now()
	stdout, _, res = runDataExecOn(t, sc, dial(1), 1, []string{"wc", "-c"}, big, false)
	d = time.Since(start)
	if res.status != 0 || strings.TrimSpace(string(stdout)) != "50000000" {
		t.Errorf("50 MB in: wc says %q, exit %+v", stdout, res)
	}
	t.Logf("50 MB in through a data port in %s: %.1f MB/s", d.Round(time.Millisecond), 50/d.Seconds())

	// The host going away mid-stream: the guest reads end of file on the
	// port, kills the command and closes the port, though its write was
	// blocked (nobody reads).
	tok := newToken(t)
	e := startDataExec(t, sc, []string{"cat", "/dev/zero"}, &agentproto.DataStream{Port: 0, Token: tok})
	conn = dial(0)()
	if err := handshakeOn(conn, tok); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if _, err := io.ReadFull(conn, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if res := e.wait(t); res.signal != "KILL" {
		t.Errorf("host gone: exit %+v, want the command killed", res)
	}
	// The same port again.
	stdout, _, res = runDataExecOn(t, sc, dial(0), 0, []string{"echo", "again"}, nil, false)
	if string(stdout) != "again\n" || res.status != 0 {
		t.Errorf("after the host went away: %q, %+v", stdout, res)
	}

	// The session closed while the guest's write is blocked: the port's
	// Close interrupts it, and the port serves the next transfer.
	tok = newToken(t)
	e = startDataExec(t, sc, []string{"cat", "/dev/zero"}, &agentproto.DataStream{Port: 0, Token: tok})
	conn = dial(0)()
	if err := handshakeOn(conn, tok); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if _, err := io.ReadFull(conn, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	e.ch.Close()
	e.wait(t)
	conn.Close()
	stdout, _, res = runDataExecOn(t, sc, dial(0), 0, []string{"echo", "again"}, nil, false)
	if string(stdout) != "again\n" || res.status != 0 {
		t.Errorf("after the session closed: %q, %+v", stdout, res)
	}
}
