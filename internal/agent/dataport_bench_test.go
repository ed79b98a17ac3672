package agent_test

import (
	"io"
	"strconv"
	"testing"

	"github.com/bangerdev/banger/internal/agent"
)

// execBenchPaths are the paths the exec benchmarks compare: SSH with
// each cipher, and a data port.
var execBenchPaths = []struct {
	name    string
	ports   int
	ciphers []string
}{
	{"ssh-aes128gcm", 0, agent.CiphersAESNI},
	{"ssh-chacha20", 0, agent.CiphersSoftware},
	{"dataport", 1, agent.CiphersSoftware},
}

// BenchmarkExecStdout: a command's stdout to the host through the real
// guest agent (in this process, over socket pairs), over SSH with each
// cipher and over a data port. The guest's CPU is the host's here: the
// figures show the costs on the host, not a TCG guest's.
func BenchmarkExecStdout(b *testing.B) {
	const size = 64 << 20
	for _, bc := range execBenchPaths {
		b.Run(bc.name, func(b *testing.B) {
			c := serveBench(b, bc.ports, bc.ciphers)
			b.SetBytes(size)
			for b.Loop() {
				var n int64
				code, err := c.Exec(b.Context(), agent.ExecOptions{
					Argv:   []string{"head", "-c", strconv.Itoa(size), "/dev/zero"},
					Stdout: countingWriter{io.Discard, &n},
				})
				if err != nil || code != 0 || n != size {
					b.Fatalf("exec: %d, %v, %d bytes", code, err, n)
				}
			}
		})
	}
}

// BenchmarkExecStdin: the host's bytes into a command's stdin (sh -c
// 'cat > /dev/null'), as BenchmarkExecStdout.
func BenchmarkExecStdin(b *testing.B) {
	const size = 64 << 20
	for _, bc := range execBenchPaths {
		b.Run(bc.name, func(b *testing.B) {
			c := serveBench(b, bc.ports, bc.ciphers)
			b.SetBytes(size)
			for b.Loop() {
				code, err := c.Exec(b.Context(), agent.ExecOptions{
					Argv:  []string{"sh", "-c", "cat > /dev/null"},
					Stdin: io.LimitReader(zeroReader{}, size),
				})
				if err != nil || code != 0 {
					b.Fatalf("exec: %d, %v", code, err)
				}
			}
		})
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
