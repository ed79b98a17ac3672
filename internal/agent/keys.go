package agent

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
)

// Keys is what a Client needs to reach one VM's agent: the host's client
// key and the guest's pinned host public key.
type Keys struct {
	// ClientSigner authenticates the host to the agent.
	ClientSigner ssh.Signer
	// HostPublic is the only host key the client accepts from the agent.
	HostPublic ssh.PublicKey
}

// KeyMaterial is a freshly generated pair of ed25519 key pairs for one VM,
// all in text form so the daemon can persist it.
//
// Where each field goes:
//   - HostPrivatePEM: the guest only, as agentproto.Config.HostKey.
//   - HostPublic: kept by the host, to pin the agent's identity.
//   - ClientPrivatePEM: kept by the host only (treat as a secret, mode 0600).
//   - ClientPublic: the guest, as agentproto.Config.AuthorizedKey.
//
// The host persists HostPublic and ClientPrivatePEM and later rebuilds Keys
// with ParseKeys(HostPublic, ClientPrivatePEM). HostPrivatePEM is only needed
// to build the guest's boot configuration (the daemon may keep it to rebuild
// the initramfs).
type KeyMaterial struct {
	HostPrivatePEM   string // OpenSSH PEM private key
	HostPublic       string // authorized_keys format, one line, no newline
	ClientPrivatePEM string // OpenSSH PEM private key
	ClientPublic     string // authorized_keys format, one line, no newline
}

// GenerateKeys creates a new host key pair and client key pair (ed25519).
func GenerateKeys() (KeyMaterial, error) {
	hostPriv, hostPub, err := generateKeyPair("banger-agent-host")
	if err != nil {
		return KeyMaterial{}, fmt.Errorf("generate agent host key: %w", err)
	}
	clientPriv, clientPub, err := generateKeyPair("banger-agent-client")
	if err != nil {
		return KeyMaterial{}, fmt.Errorf("generate agent client key: %w", err)
	}
	return KeyMaterial{
		HostPrivatePEM:   hostPriv,
		HostPublic:       hostPub,
		ClientPrivatePEM: clientPriv,
		ClientPublic:     clientPub,
	}, nil
}

// ApplyTo fills the key fields of the guest configuration (HostKey,
// AuthorizedKey).
func (m KeyMaterial) ApplyTo(cfg *agentproto.Config) {
	cfg.HostKey = m.HostPrivatePEM
	cfg.AuthorizedKey = m.ClientPublic
}

// Keys parses the host-side half of m, like ParseKeys.
func (m KeyMaterial) Keys() (Keys, error) {
	return ParseKeys(m.HostPublic, m.ClientPrivatePEM)
}

// ParseKeys rebuilds Keys from the persisted host public key
// (authorized_keys format) and client private key (OpenSSH PEM, not
// passphrase-protected).
func ParseKeys(hostPublicAuthorized, clientPrivatePEM string) (Keys, error) {
	if strings.TrimSpace(hostPublicAuthorized) == "" {
		return Keys{}, errors.New("parse agent keys: host public key missing")
	}
	hostPub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(hostPublicAuthorized))
	if err != nil {
		return Keys{}, fmt.Errorf("parse agent host public key: %w", err)
	}
	if strings.TrimSpace(clientPrivatePEM) == "" {
		return Keys{}, errors.New("parse agent keys: client private key missing")
	}
	signer, err := ssh.ParsePrivateKey([]byte(clientPrivatePEM))
	if err != nil {
		return Keys{}, fmt.Errorf("parse agent client private key: %w", err)
	}
	return Keys{ClientSigner: signer, HostPublic: hostPub}, nil
}

func generateKeyPair(comment string) (privatePEM, publicAuthorized string, err error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", "", err
	}
	block, err := ssh.MarshalPrivateKey(priv, comment)
	if err != nil {
		return "", "", fmt.Errorf("marshal private key: %w", err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		return "", "", fmt.Errorf("marshal public key: %w", err)
	}
	authorized := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub)))
	return string(pem.EncodeToMemory(block)), authorized, nil
}
