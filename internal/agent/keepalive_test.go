package agent_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
)

// freezable stops delivering bytes once frozen, like a virtio-serial socket
// whose guest agent died: open, but silent.
type freezable struct {
	net.Conn
	frozen atomic.Bool
}

func (f *freezable) Read(p []byte) (int, error) {
	for {
		n, err := f.Conn.Read(p)
		if err != nil || !f.frozen.Load() {
			return n, err
		}
		// Frozen: the bytes are lost.
	}
}

func TestKeepaliveClosesSilentConnection(t *testing.T) {
	defer agent.SetKeepalive(50*time.Millisecond, 200*time.Millisecond)()
	km, err := agent.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	keys, err := km.Keys()
	if err != nil {
		t.Fatal(err)
	}
	conn := &freezable{Conn: serve(t, km)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, func(context.Context) (net.Conn, error) { return conn, nil }, keys, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Answered keepalives keep the connection up.
	select {
	case <-c.Done():
		t.Fatal("connection closed while the agent answers")
	case <-time.After(500 * time.Millisecond):
	}
	conn.frozen.Store(true)
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("silent agent not detected")
	}
}
