package guestagent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// sigRTMin4 is SIGRTMIN+4 as user space numbers it (glibc's SIGRTMIN is
// 34): systemd's "power off" signal, sent by systemctl and by banger's own
// shutdown hook.
const sigRTMin4 = syscall.Signal(38)

// shutdownHook returns the Hooks.Shutdown of an agent server running under
// init mode `mode`:
//   - agent (the agent's init is PID 1): SIGTERM (power off) or SIGINT
//     (reboot) to PID 1;
//   - systemd: systemctl poweroff|reboot, falling back to SIGRTMIN+4 or
//     SIGINT to PID 1;
//   - another init, or unknown (the agent started by hand): the poweroff or
//     reboot command, falling back to the systemd signals.
func shutdownHook(mode string, log *slog.Logger) func(reboot bool) error {
	return func(reboot bool) error {
		verb := "poweroff"
		if reboot {
			verb = "reboot"
		}
		if mode == InitModeAgent {
			sig := syscall.SIGTERM
			if reboot {
				sig = syscall.SIGINT
			}
			return signalInit(sig)
		}
		var argv []string
		if p, err := exec.LookPath("systemctl"); err == nil && (mode == InitModeSystemd || runningSystemd()) {
			argv = []string{p, "--no-block", verb}
		} else if p, err := exec.LookPath(verb); err == nil {
			argv = []string{p}
		}
		if argv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
			if err == nil {
				return nil
			}
			log.Warn("shutdown command failed; signalling PID 1", "argv", argv, "err", err, "output", string(out))
		}
		sig := sigRTMin4
		if reboot {
			sig = syscall.SIGINT
		}
		return signalInit(sig)
	}
}

func signalInit(sig syscall.Signal) error {
	if err := syscall.Kill(1, sig); err != nil {
		return fmt.Errorf("signal PID 1 (%v): %w", sig, err)
	}
	return nil
}

// runningSystemd reports whether systemd is the running init (the test
// sd_booted(3) uses).
func runningSystemd() bool {
	st, err := os.Stat("/run/systemd/system")
	return err == nil && st.IsDir() || errors.Is(err, os.ErrPermission)
}
