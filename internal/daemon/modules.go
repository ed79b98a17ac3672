package daemon

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/kernelimage"
	"github.com/bangerdev/banger/internal/kmod"
)

// initramfsErr gives an initramfs build error its kind: an image whose
// modules directory no longer serves its kernel (its files changed since
// image register checked them) is a failed precondition.
func initramfsErr(err error) error {
	if errors.Is(err, kmod.ErrWrongRelease) || errors.Is(err, kernelimage.ErrNoRelease) {
		return fmt.Errorf("%w (the image's kernel or modules changed since it was registered: register it again with the modules of its kernel): %w",
			err, errdefs.ErrFailedPrecondition)
	}
	return err
}

// consoleScanBytes is how much of the end of a console log is searched for
// the guest's module report.
const consoleScanBytes = 256 << 10

// guestModulesFailure returns what the guest's init reported about kernel
// modules it could not load (the text after agentproto.ModulesFailedMarker
// on the last console line carrying it), or "".
func guestModulesFailure(console string) string {
	f, err := os.Open(console)
	if err != nil {
		return ""
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > consoleScanBytes {
		if _, err := f.Seek(st.Size()-consoleScanBytes, io.SeekStart); err != nil {
			return ""
		}
	}
	b, err := io.ReadAll(io.LimitReader(f, consoleScanBytes))
	if err != nil {
		return ""
	}
	s := string(b)
	i := strings.LastIndex(s, agentproto.ModulesFailedMarker)
	if i < 0 {
		return ""
	}
	line := s[i+len(agentproto.ModulesFailedMarker):]
	if j := strings.IndexAny(line, "\r\n"); j >= 0 {
		line = line[:j]
	}
	const maxLen = 400
	line = strings.TrimSpace(line)
	if len(line) > maxLen {
		line = line[:maxLen] + "..."
	}
	return line
}

// modulesHint is the part of a readiness error that says the guest could
// not load its kernel modules, or "".
func modulesHint(console string) string {
	if m := guestModulesFailure(console); m != "" {
		return "; kernel module loading failed in the guest (" + m + "): check that the image's modules directory holds the modules of its kernel"
	}
	return ""
}
