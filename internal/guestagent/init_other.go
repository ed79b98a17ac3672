//go:build !linux

package guestagent

import (
	"fmt"
	"os"
)

func runInit(args []string) int {
	fmt.Fprintln(os.Stderr, "banger-init: init mode needs Linux")
	return 1
}

func supervise(cfgJSON []byte) int {
	fmt.Fprintln(os.Stderr, "banger-agent: supervise needs Linux")
	return 1
}
