package qemu

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// procStat is the part of /proc/<pid>/stat the driver needs.
type procStat struct {
	State     byte   // field 3: R, S, D, Z, X, ...
	StartTime uint64 // field 22: start time in clock ticks after boot
}

// readProcStat reads /proc/<pid>/stat under procRoot (normally "/proc").
func readProcStat(procRoot string, pid int) (procStat, error) {
	b, err := os.ReadFile(procRoot + "/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, fmt.Errorf("read stat of pid %d: %w", pid, err)
	}
	return parseProcStat(b)
}

// parseProcStat parses the contents of /proc/<pid>/stat. The command name
// (field 2) is in parentheses and may itself contain spaces and
// parentheses, so fields are counted from the last ')'.
func parseProcStat(b []byte) (procStat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("parse proc stat: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); field 22 (starttime) is f[19].
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, fmt.Errorf("parse proc stat: %d fields after command name", len(f))
	}
	st, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("parse proc stat start time %q: %w", f[19], err)
	}
	return procStat{State: f[0][0], StartTime: st}, nil
}

// exited reports whether a process in this state has finished running: a
// zombie (Z) or dead (X) process counts as exited, because the parent that
// should reap it (PID 1 of a sandbox, for a daemonized QEMU) may never do so.
func (s procStat) exited() bool { return s.State == 'Z' || s.State == 'X' }

// readPIDFile reads a pid file written by QEMU.
func readPIDFile(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("parse pid file %s: bad pid %q", path, strings.TrimSpace(string(b)))
	}
	return pid, nil
}
