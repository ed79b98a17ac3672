// Command banger is the CLI of banger, a manager of disposable Linux microVMs.
package main

import (
	"os"

	"github.com/bangerdev/banger/internal/cli"
)

func main() {
	os.Exit(cli.Main(os.Args))
}
