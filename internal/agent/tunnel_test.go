package agent_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
)

// oldAgent serves an agent of protocol 1.2 that knows no tunnel channel:
// it answers info and refuses every channel.
func oldAgent(t *testing.T, km agent.KeyMaterial) agent.DialFunc {
	t.Helper()
	guest, host := socketPair(t)
	signer, err := ssh.ParsePrivateKey([]byte(km.HostPrivatePEM))
	if err != nil {
		t.Fatal(err)
	}
	cfg := &ssh.ServerConfig{NoClientAuth: true}
	cfg.AddHostKey(signer)
	go func() {
		_, chans, reqs, err := ssh.NewServerConn(guest, cfg)
		if err != nil {
			return
		}
		go func() {
			for nc := range chans {
				nc.Reject(ssh.UnknownChannelType, "unknown channel type "+nc.ChannelType())
			}
		}()
		for req := range reqs {
			if req.Type == agentproto.GlobalInfo {
				p, _ := agentproto.MarshalPayload(agentproto.Info{ProtoVersion: "1.2", EarlyBootDone: true})
				req.Reply(true, p)
				continue
			}
			req.Reply(false, nil)
		}
	}()
	return func(context.Context) (net.Conn, error) { return host, nil }
}

func TestTunnelsOfAnOldAgent(t *testing.T) {
	km, err := agent.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	keys, err := km.Keys()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, oldAgent(t, km), keys, nil)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	if _, err := c.OpenSSH(ctx); !errors.Is(err, agent.ErrUnsupported) || !strings.Contains(err.Error(), "restart the VM") {
		t.Errorf("OpenSSH: %v, want ErrUnsupported telling to restart the VM", err)
	}
	if _, err := c.DialGuest(ctx, "127.0.0.1", 80); !errors.Is(err, agent.ErrUnsupported) {
		t.Errorf("DialGuest: %v, want ErrUnsupported", err)
	}
	done, cancelled := context.WithCancel(ctx)
	cancelled()
	if _, err := c.OpenSSH(done); !errors.Is(err, context.Canceled) {
		t.Errorf("OpenSSH with a cancelled context: %v", err)
	}
}
