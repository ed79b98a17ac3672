// Command bangerd is banger's root daemon: it owns VMs, images and their
// storage, and serves the RPC the banger CLI talks to.
package main

import (
	"os"

	"github.com/bangerdev/banger/internal/daemon"
)

func main() {
	os.Exit(daemon.Main(os.Args, os.Stderr))
}
