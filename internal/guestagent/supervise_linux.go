package guestagent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// supervise keeps an agent server running when PID 1 belongs to the
// image's init (which knows nothing of the agent): it starts
// `serve-fd` children with cfgJSON and restarts any that exits, with the
// same backoff PID 1 uses in agent mode, until SIGTERM or SIGINT.
func supervise(cfgJSON []byte) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	mode, initPath, netErr := os.Getenv(envInitMode), os.Getenv(envInit), os.Getenv(envNetworkError)
	failures := 0
	for {
		started := time.Now()
		pid, err := startAgent(cfgJSON, agentEnv(mode, initPath, netErr), "serve-fd")
		if err != nil {
			fmt.Fprintf(os.Stderr, "banger-agent: supervisor: %v\n", err)
		} else {
			exited := make(chan error, 1)
			go func() {
				var ws unix.WaitStatus
				_, err := unix.Wait4(pid, &ws, 0, nil)
				for errors.Is(err, unix.EINTR) {
					_, err = unix.Wait4(pid, &ws, 0, nil)
				}
				if err == nil && !(ws.Exited() && ws.ExitStatus() == 0) {
					err = fmt.Errorf("agent exited (%s)", describeWait(ws))
				}
				exited <- err
			}()
			select {
			case <-ctx.Done():
				_ = unix.Kill(pid, unix.SIGTERM)
				<-exited
				return 0
			case err := <-exited:
				fmt.Fprintf(os.Stderr, "banger-agent: supervisor: %v; restarting it\n", err)
			}
		}
		if time.Since(started) > agentHealthy {
			failures = 0
		}
		failures++
		select {
		case <-ctx.Done():
			return 0
		case <-time.After(restartDelay(failures)):
		}
	}
}
