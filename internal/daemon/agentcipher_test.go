package daemon

import (
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/vmm"
)

// TestAgentCiphers: AES-GCM first only where the guest has AES
// instructions (KVM); ChaCha20-Poly1305 first under TCG, or when the
// accelerator isn't known.
func TestAgentCiphers(t *testing.T) {
	for accel, want := range map[string]string{
		vmm.AccelKVM:  ssh.CipherAES128GCM,
		vmm.AccelTCG:  ssh.CipherChaCha20Poly1305,
		vmm.AccelAuto: ssh.CipherChaCha20Poly1305,
		"":            ssh.CipherChaCha20Poly1305,
	} {
		if got := agentCiphers(accel); len(got) == 0 || got[0] != want {
			t.Errorf("accel %q: ciphers %v, want %s first", accel, got, want)
		}
	}
}
