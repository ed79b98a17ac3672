//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/bangerdev/banger/test/harness"
)

// TestNetRunShell: `vm run --rm` without a command is an SSH session in
// the new VM on the user's terminal (a pty here): the shell has a
// terminal, its exit code is banger's, and the VM is gone afterwards. With
// the Debian image (sshd, user dev) and the busybox one (no sshd: the
// agent's SSH server, root).
func TestNetRunShell(t *testing.T) {
	if _, err := exec.LookPath("ssh"); err != nil {
		t.Skip("no ssh client")
	}
	e := newNetEnv(t, "")
	registerNetImages(t, e)
	for _, c := range []struct{ image, user string }{{"tiny", "0"}, {"debian", "dev"}} {
		t.Run(c.image, func(t *testing.T) {
			e.T = t
			name := uniq("run")
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
			defer cancel()
			cmd := e.Command(ctx, "vm", "run", "--rm", "--name", name, "--image", c.image)
			ptmx, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 40, Cols: 120})
			if err != nil {
				t.Fatal(err)
			}
			defer ptmx.Close()
			var out syncBuf
			copied := make(chan struct{})
			go func() { io.Copy(&out, ptmx); close(copied) }()
			// Wait for the shell, then ask who and where it is, and leave
			// with a code of its own.
			harness.WaitFor(t, 3*time.Minute, "the VM's shell prompt", func() bool {
				s := out.String()
				return strings.Contains(s, "$ ") || strings.Contains(s, "# ")
			})
			id := "id -un"
			if c.image == "tiny" {
				id = "id -u"
			}
			io.WriteString(ptmx, "echo user=$("+id+") tty=$(tty) sum=$((6*7)); exit 7\n")
			err = cmd.Wait()
			ptmx.Close()
			<-copied
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 7 {
				t.Errorf("vm run's exit: %v, want code 7\n%s", err, out.String())
			}
			s := out.String()
			for _, want := range []string{"user=" + c.user, "tty=/dev/pts/", "sum=42"} {
				if !strings.Contains(s, want) {
					t.Errorf("session output lacks %q:\n%s", want, s)
				}
			}
			harness.WaitFor(t, 30*time.Second, "the --rm VM removed", func() bool {
				ls, _, _ := e.Banger("vm", "ls", "-q")
				return !strings.Contains(ls, name)
			})
		})
	}
}

// syncBuf is a bytes.Buffer safe for one writer and concurrent readers.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
