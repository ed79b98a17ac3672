package guestagent

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/pkg/sftp"
)

// serveSFTP serves the sftp protocol on stdin and stdout (the hidden
// sftp-server subcommand, run by the built-in SSH server as the session's
// user for the "sftp" subsystem). Relative paths are relative to the
// working directory (the user's home).
func serveSFTP() int {
	srv, err := sftp.NewServer(struct {
		io.Reader
		io.WriteCloser
	}{os.Stdin, os.Stdout})
	if err != nil {
		fmt.Fprintf(os.Stderr, "banger-agent: sftp server: %v\n", err)
		return 1
	}
	if err := srv.Serve(); err != nil && !errors.Is(err, io.EOF) {
		fmt.Fprintf(os.Stderr, "banger-agent: sftp server: %v\n", err)
		return 1
	}
	return 0
}
