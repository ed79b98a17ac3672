package agent_test

import (
	"errors"
	"io"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
)

// Empty frames after the channel closed would re-arm the bound on a
// silent stream forever: the first one fails the exec.
func TestFakeGuestEmptyFrames(t *testing.T) {
	defer agent.SetDataDrainGrace(50 * time.Millisecond)()
	c, _ := fakeDataGuest(t, 1, func(g *guestTransfer) {
		g.ack(t)
		g.frame(agentproto.DataFrameData, []byte("x"))
		g.ch.SendRequest("exit-status", false, ssh.Marshal(agentproto.ExitStatusMsg{}))
		g.ch.Close()
		// Until the host disconnects (bounded: 20 s at most).
		for range 1000 {
			if g.frame(agentproto.DataFrameData, nil) != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		g.port.Close()
	})
	_, err := c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"cat"}, Stdout: io.Discard})
	if !errors.Is(err, agentproto.ErrDataFrame) || !errors.Is(err, agent.ErrDataStream) {
		t.Errorf("exec: %v, want a bad frame", err)
	}
}
