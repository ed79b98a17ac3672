package rpc

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"syscall"
	"testing"
)

// dialEnv makes the test binary a client: it calls v1.who on the socket
// named by the variable and exits (see TestMain).
const dialEnv = "BANGER_RPC_TEST_DIAL"

func TestMain(m *testing.M) {
	if sock := os.Getenv(dialEnv); sock != "" {
		if err := Do(context.Background(), sock, "v1.who", nil, nil, nil); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// The server reports the peer's supplementary groups, read with
// SO_PEERGROUPS from the connection (not from /proc, which a peer can race
// by exiting).
func TestPeerGroups(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to start a client with other supplementary groups")
	}
	peers := make(chan Peer, 1)
	sock := serve(t, nil, func(s *Server) {
		s.Handle("v1.who", PermRead, func(ctx context.Context, c *Call) (any, error) {
			peers <- c.Peer
			return nil, nil
		})
	})
	groups := []uint32{61234, 61240, 61299}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), dialEnv+"="+sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 0, Gid: 0, Groups: groups}}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("client: %v\n%s", err, out)
	}
	p := <-peers
	got := slices.Clone(p.Groups)
	slices.Sort(got)
	if !slices.Equal(got, groups) {
		t.Errorf("peer groups = %v, want %v", p.Groups, groups)
	}
	for _, g := range groups {
		if !p.InGroup(g) {
			t.Errorf("InGroup(%d) = false", g)
		}
	}
	if p.InGroup(61235) {
		t.Error("InGroup(61235) = true for a group the peer is not in")
	}
	if !p.InGroup(0) {
		t.Error("InGroup(0) = false for the peer's primary group")
	}
}
