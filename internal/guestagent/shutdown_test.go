package guestagent

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"syscall"
	"testing"
)

type fakeSystem struct {
	paths   map[string]string
	runErr  error
	ran     []string
	signals []syscall.Signal
	systemd bool
}

func (f *fakeSystem) shutdowner(mode string) *shutdowner {
	return &shutdowner{
		mode: mode,
		log:  slog.New(slog.DiscardHandler),
		lookPath: func(file string) (string, error) {
			if p, ok := f.paths[file]; ok {
				return p, nil
			}
			return "", errors.New("not found")
		},
		run: func(ctx context.Context, argv []string) ([]byte, error) {
			f.ran = append(f.ran, strings.Join(argv, " "))
			return nil, f.runErr
		},
		signalInit: func(sig syscall.Signal) error {
			f.signals = append(f.signals, sig)
			return nil
		},
		systemdRunning: func() bool { return f.systemd },
	}
}

func TestShutdownMethods(t *testing.T) {
	systemctl := map[string]string{"systemctl": "/usr/bin/systemctl", "poweroff": "/usr/sbin/poweroff", "reboot": "/usr/sbin/reboot"}
	busybox := map[string]string{"poweroff": "/bin/poweroff", "reboot": "/bin/reboot"}
	for _, tc := range []struct {
		name    string
		mode    string
		paths   map[string]string
		systemd bool
		runErr  error
		reboot  bool
		ran     string
		signal  syscall.Signal
	}{
		{name: "agent poweroff", mode: InitModeAgent, paths: systemctl, signal: syscall.SIGTERM},
		{name: "agent reboot", mode: InitModeAgent, paths: systemctl, reboot: true, signal: syscall.SIGINT},
		{name: "systemd poweroff", mode: InitModeSystemd, paths: systemctl, ran: "/usr/bin/systemctl --no-block poweroff"},
		{name: "systemd reboot", mode: InitModeSystemd, paths: systemctl, reboot: true, ran: "/usr/bin/systemctl --no-block reboot"},
		{name: "systemd bus not up", mode: InitModeSystemd, paths: systemctl, runErr: errors.New("exit status 1"), ran: "/usr/bin/systemctl --no-block poweroff", signal: sigRTMin4},
		{name: "systemd reboot fallback", mode: InitModeSystemd, paths: systemctl, runErr: errors.New("x"), reboot: true, ran: "/usr/bin/systemctl --no-block reboot", signal: syscall.SIGINT},
		{name: "systemd no systemctl", mode: InitModeSystemd, paths: nil, signal: sigRTMin4},
		{name: "other init", mode: InitModeOther, paths: busybox, ran: "/bin/poweroff"},
		{name: "other init reboot", mode: InitModeOther, paths: busybox, reboot: true, ran: "/bin/reboot"},
		{name: "by hand under systemd", mode: "", paths: systemctl, systemd: true, ran: "/usr/bin/systemctl --no-block poweroff"},
		{name: "by hand no systemd", mode: "", paths: systemctl, ran: "/usr/sbin/poweroff"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeSystem{paths: tc.paths, runErr: tc.runErr, systemd: tc.systemd}
			if err := f.shutdowner(tc.mode).shutdown(tc.reboot); err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(f.ran, ";"); got != tc.ran {
				t.Errorf("ran %q, want %q", got, tc.ran)
			}
			var want []syscall.Signal
			if tc.signal != 0 {
				want = []syscall.Signal{tc.signal}
			}
			if len(f.signals) != len(want) || (len(want) == 1 && f.signals[0] != want[0]) {
				t.Errorf("signals %v, want %v", f.signals, want)
			}
		})
	}
}
