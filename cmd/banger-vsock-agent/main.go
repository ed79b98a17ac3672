// Command banger-vsock-agent is banger's guest agent. It runs inside every
// VM, either as the initramfs's rdinit (then it mounts the root disk, hands
// PID 1 to the image's init or stays PID 1 itself) or as the agent server.
package main

import (
	"os"

	"github.com/bangerdev/banger/internal/guestagent"
)

func main() {
	os.Exit(guestagent.Main(os.Args))
}
