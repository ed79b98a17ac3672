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
// 34): systemd's "power off" signal, also honoured by the agent as PID 1.
const sigRTMin4 = syscall.Signal(38)

// shutdownCommandTimeout bounds systemctl/poweroff before falling back to
// a signal.
const shutdownCommandTimeout = 20 * time.Second

// shutdowner implements Hooks.Shutdown for the agent server. Its fields are
// the system interactions, replaced in tests.
type shutdowner struct {
	mode           string
	log            *slog.Logger
	lookPath       func(file string) (string, error)
	run            func(ctx context.Context, argv []string) ([]byte, error)
	signalInit     func(sig syscall.Signal) error
	systemdRunning func() bool
}

// shutdownHook returns the Hooks.Shutdown of an agent server running under
// init mode `mode`:
//   - agent (the agent's init is PID 1): SIGTERM (power off) or SIGINT
//     (reboot) to PID 1;
//   - systemd: systemctl --no-block poweroff|reboot, falling back to
//     SIGRTMIN+4 or SIGINT to PID 1 (systemctl fails while systemd's bus
//     is not up yet, early in the boot);
//   - another init, or unknown (the agent started by hand): systemctl when
//     systemd runs, else the poweroff or reboot command, falling back to
//     the systemd signals.
func shutdownHook(mode string, log *slog.Logger) func(reboot bool) error {
	s := &shutdowner{
		mode:     mode,
		log:      log,
		lookPath: exec.LookPath,
		run: func(ctx context.Context, argv []string) ([]byte, error) {
			return exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
		},
		signalInit: func(sig syscall.Signal) error {
			if err := syscall.Kill(1, sig); err != nil {
				return fmt.Errorf("signal PID 1 (%v): %w", sig, err)
			}
			return nil
		},
		systemdRunning: runningSystemd,
	}
	return s.shutdown
}

func (s *shutdowner) shutdown(reboot bool) error {
	verb := "poweroff"
	if reboot {
		verb = "reboot"
	}
	if s.mode == InitModeAgent {
		sig := syscall.SIGTERM
		if reboot {
			sig = syscall.SIGINT
		}
		return s.signalInit(sig)
	}
	var argv []string
	if p, err := s.lookPath("systemctl"); err == nil && (s.mode == InitModeSystemd || s.systemdRunning()) {
		argv = []string{p, "--no-block", verb}
	} else if p, err := s.lookPath(verb); err == nil {
		argv = []string{p}
	}
	if argv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), shutdownCommandTimeout)
		defer cancel()
		out, err := s.run(ctx, argv)
		if err == nil {
			return nil
		}
		s.log.Warn("shutdown command failed; signalling PID 1", "argv", argv, "err", err, "output", string(out))
	}
	sig := sigRTMin4
	if reboot {
		sig = syscall.SIGINT
	}
	return s.signalInit(sig)
}

// runningSystemd reports whether systemd is the running init (the test
// sd_booted(3) uses).
func runningSystemd() bool {
	st, err := os.Stat("/run/systemd/system")
	return err == nil && st.IsDir() || errors.Is(err, os.ErrPermission)
}
