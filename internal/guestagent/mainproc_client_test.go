package guestagent

import (
	"context"
	"io"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
)

// Helpers of the package's internal tests that need the host's client.

var errAgentNoMain = agent.ErrNoMainProcess

func agentAttachOptions(stdout, stderr io.Writer) agent.AttachOptions {
	return agent.AttachOptions{Stdout: stdout, Stderr: stderr}
}

type testClient struct{ *agent.Client }

func (c testClient) infoForTest(t *testing.T, ctx context.Context) agentproto.Info {
	t.Helper()
	inf, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return inf
}

// dialTestAgent serves an agent with hooks (config edited by edit) over a
// socket pair and returns a connected client.
func dialTestAgent(t *testing.T, ctx context.Context, hooks Hooks, edit func(*agentproto.Config)) testClient {
	t.Helper()
	km, err := agent.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	var cfg agentproto.Config
	km.ApplyTo(&cfg)
	if edit != nil {
		edit(&cfg)
	}
	keys, err := km.Keys()
	if err != nil {
		t.Fatal(err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); ServeConn(sctx, conns[0], cfg, hooks, nil) }()
	dialed := false
	c, err := agent.Dial(ctx, func(context.Context) (net.Conn, error) {
		if dialed {
			return nil, net.ErrClosed
		}
		dialed = true
		return conns[1], nil
	}, keys, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); cancel(); <-done })
	return testClient{c}
}

func agentExecOptions(env []string, dir, user string, stdout, stderr io.Writer) agent.ExecOptions {
	return agent.ExecOptions{Argv: []string{"sh", "-c", `echo "$FOO $BAR $(pwd) $(id -u)"`}, Env: env, Dir: dir, User: user, Stdout: stdout, Stderr: stderr}
}
