package cli

import (
	"errors"
	"os"
	"testing"

	"github.com/bangerdev/banger/internal/errdefs"
)

func TestGuestBase(t *testing.T) {
	for in, want := range map[string]string{"/var/log/": "log", "/etc/os-release": "os-release", "/": ".", "//": ".", "/a/./b/..": "a"} {
		if got := guestBase(in); got != want {
			t.Errorf("guestBase(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestInvokingUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the sudo owner applies to root only")
	}
	t.Setenv("SUDO_UID", "1234")
	t.Setenv("SUDO_GID", "5678")
	o, err := invokingUser()
	if err != nil || o == nil || o.UID != 1234 || o.GID != 5678 {
		t.Errorf("invokingUser() = %+v, %v; want 1234:5678", o, err)
	}
	t.Setenv("SUDO_GID", "staff")
	if _, err := invokingUser(); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("invokingUser() with a non-numeric SUDO_GID: %v, want ErrInvalid", err)
	}
	os.Unsetenv("SUDO_UID")
	if o, err := invokingUser(); o != nil || err != nil {
		t.Errorf("invokingUser() without sudo = %+v, %v; want nil (root owns)", o, err)
	}
}
