package guestagent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
)

// This file holds the pure logic of init mode (the agent started by the
// kernel as rdinit=/banger/init). The system calls live in init_linux.go.

// Init modes, reported in agentproto.Info.InitMode and passed to the agent
// child in the BANGER_INIT_MODE environment variable.
const (
	// InitModeSystemd: PID 1 was handed to systemd.
	InitModeSystemd = "systemd"
	// InitModeOther: PID 1 was handed to another init (busybox, sysvinit...).
	InitModeOther = "init"
	// InitModeAgent: the agent stayed PID 1 (no init in the image, or
	// Config.Init "none").
	InitModeAgent = "agent"
)

// Environment variables the init passes to the agent server child.
const (
	envInitMode = "BANGER_INIT_MODE"
	envInit     = "BANGER_INIT"
	// envNetworkError carries init's network setup error to the agent
	// (agentproto.Info.Network.Error).
	envNetworkError = "BANGER_NETWORK_ERROR"
)

// Defaults for agentproto.Config fields.
const (
	defaultRootDevice = "/dev/vda"
	defaultRootFSType = "ext4"
	defaultInit       = "/sbin/init"
	// rootWaitTimeout bounds the wait for the root block device to appear.
	rootWaitTimeout = 10 * time.Second
	// minGrowBytes: the root filesystem is grown only when the device is at
	// least this much larger, so a few stray bytes past the last block do
	// not cause a resize at every boot.
	minGrowBytes = 1 << 20
)

// withDefaults fills the defaults of the fields init mode uses.
func withDefaults(cfg agentproto.Config) agentproto.Config {
	if cfg.RootDevice == "" {
		cfg.RootDevice = defaultRootDevice
	}
	if cfg.RootFSType == "" {
		cfg.RootFSType = defaultRootFSType
	}
	return cfg
}

// parseCmdline splits the kernel command line into key=value pairs (a bare
// word maps to ""). Double quotes group words, as the kernel does.
func parseCmdline(s string) map[string]string {
	out := map[string]string{}
	var words []string
	var cur strings.Builder
	inQuote, inWord := false, false
	for _, r := range s {
		switch {
		case r == '"':
			inQuote = !inQuote
			inWord = true
		case !inQuote && (r == ' ' || r == '\t' || r == '\n'):
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	for _, w := range words {
		k, v, _ := strings.Cut(w, "=")
		out[k] = v
	}
	return out
}

// applyCmdline lets the kernel command line override the init choice
// (banger.init=none|auto|/path), for debugging an image by hand.
func applyCmdline(cfg agentproto.Config, cmdline map[string]string) agentproto.Config {
	if v, ok := cmdline["banger.init"]; ok && v != "" {
		cfg.Init = v
	}
	return cfg
}

// errNoInit is returned by an init lookup when the file is missing or not
// an executable regular file.
var errNoInit = errors.New("no executable init")

// initLookup resolves an init path inside the (new) root: it follows
// symlinks and returns the final path, or an error when it is not an
// executable regular file.
type initLookup func(p string) (resolved string, err error)

// decideInit chooses what PID 1 becomes after the root switch. It returns
// the path to exec (empty: the agent stays PID 1), the resolved path and
// the init mode. An explicit init that cannot be used is an error; the
// caller then stays PID 1 so the VM remains reachable.
func decideInit(cfgInit string, lookup initLookup) (initPath, resolved, mode string, err error) {
	switch cfgInit {
	case "none":
		return "", "", InitModeAgent, nil
	case "", "auto":
		r, err := lookup(defaultInit)
		if err != nil {
			return "", "", InitModeAgent, nil
		}
		return defaultInit, r, initModeFor(r), nil
	}
	if !path.IsAbs(cfgInit) {
		return "", "", InitModeAgent, fmt.Errorf("init %q: not an absolute path (want \"auto\", \"none\" or a path)", cfgInit)
	}
	r, err := lookup(cfgInit)
	if err != nil {
		return "", "", InitModeAgent, fmt.Errorf("init %s: %w", cfgInit, err)
	}
	return cfgInit, r, initModeFor(r), nil
}

func initModeFor(resolved string) string {
	if path.Base(resolved) == "systemd" {
		return InitModeSystemd
	}
	return InitModeOther
}

// checkInitFile accepts an executable regular file.
func checkInitFile(fi fs.FileInfo) error {
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return errNoInit
	}
	return nil
}

// agentEnv is the environment of the agent server child; netErr is
// init's network setup error ("" when none).
func agentEnv(mode, initPath, netErr string) []string {
	env := []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root",
		"TERM=linux",
		"LANG=C.UTF-8",
		envInitMode + "=" + mode,
		envInit + "=" + initPath,
	}
	if netErr != "" {
		env = append(env, envNetworkError+"="+netErr)
	}
	return env
}

// restartDelay is the wait before restarting the agent child after its
// n-th consecutive failure (n >= 1): 500ms doubling up to 10s.
func restartDelay(n int) time.Duration {
	d := 500 * time.Millisecond
	for i := 1; i < n && d < 10*time.Second; i++ {
		d *= 2
	}
	return min(d, 10*time.Second)
}

// ext2/3/4 superblock fields (offsets in the 1024-byte superblock found
// 1024 bytes into the device).
const (
	ext4SuperblockOffset = 1024
	ext4SuperblockSize   = 1024
	ext4Magic            = 0xEF53
	ext4Incompat64Bit    = 0x80
)

// parseExt4Superblock returns the block count and block size of an
// ext2/3/4 filesystem from its superblock.
func parseExt4Superblock(sb []byte) (blocks, blockSize uint64, err error) {
	if len(sb) < ext4SuperblockSize {
		return 0, 0, fmt.Errorf("ext4 superblock: short read (%d bytes)", len(sb))
	}
	le := binary.LittleEndian
	if le.Uint16(sb[0x38:]) != ext4Magic {
		return 0, 0, errors.New("ext4 superblock: bad magic")
	}
	logBS := le.Uint32(sb[0x18:])
	if logBS > 6 { // 1 KiB << 6 = 64 KiB, the largest ext4 block size
		return 0, 0, fmt.Errorf("ext4 superblock: bad block size exponent %d", logBS)
	}
	blockSize = 1024 << logBS
	blocks = uint64(le.Uint32(sb[0x4:]))
	if le.Uint32(sb[0x60:])&ext4Incompat64Bit != 0 {
		blocks |= uint64(le.Uint32(sb[0x150:])) << 32
	}
	return blocks, blockSize, nil
}

// growTarget returns the block count a filesystem should be grown to so it
// fills a device of devBytes, and whether growing is worth it.
func growTarget(devBytes, blockSize, curBlocks uint64) (newBlocks uint64, grow bool) {
	if blockSize == 0 {
		return curBlocks, false
	}
	newBlocks = devBytes / blockSize
	if newBlocks <= curBlocks || (newBlocks-curBlocks)*blockSize < minGrowBytes {
		return curBlocks, false
	}
	return newBlocks, true
}

// humanBytes formats a size in binary units, concisely (1.5GiB).
func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// isInitInvocation tells whether Main was started as the initramfs's init:
// by path (rdinit=/banger/init), or as PID 1 without one of the agent's
// subcommands (kernel arguments may follow the program name).
func isInitInvocation(args []string, pid int) bool {
	if len(args) > 0 && args[0] == agentproto.InitPath {
		return true
	}
	if pid != 1 {
		return false
	}
	if len(args) > 1 {
		switch args[1] {
		case "serve", "serve-fd", "supervise-fd", "version":
			return false
		}
	}
	return true
}

// modulesProblem says why the kernel modules the guest was given can't
// serve it, or "" when they can. wantRelease is the release the host packed
// modules for (agentproto.Config.ModulesRelease, "" when it packed none),
// release the running kernel's, haveDep whether a modules.dep was found
// for it, and failed the modules that could not be loaded ("name: reason").
func modulesProblem(wantRelease, release string, haveDep bool, failed []string) string {
	switch {
	case wantRelease != "" && wantRelease != release:
		return fmt.Sprintf("the initramfs holds modules for kernel %s but this kernel is %s", wantRelease, release)
	case wantRelease != "" && !haveDep:
		return fmt.Sprintf("no modules.dep for kernel %s in the initramfs", release)
	case len(failed) > 0:
		return fmt.Sprintf("kernel %s could not load %s", release, strings.Join(failed, "; "))
	}
	return ""
}

// modulesFailedLine is the console line reporting a modules problem; the
// host recognises it by agentproto.ModulesFailedMarker.
func modulesFailedLine(problem string) string {
	return "error: " + agentproto.ModulesFailedMarker + " " + problem
}
