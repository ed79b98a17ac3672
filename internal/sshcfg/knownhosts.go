package sshcfg

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/errdefs"
)

// HostSuffix ends the host name of every VM for ssh: NAME.banger.
const HostSuffix = ".banger"

// SetHostKeys makes keys (authorized_keys lines, api.SSHInfo.HostKeys)
// the only known host keys of VM name in banger's known_hosts: its
// NAME.banger lines are replaced, every other line is kept. The file is
// rewritten atomically, and not at all when nothing changes. No keys
// leaves the VM with none: ssh then refuses it rather than trusting a key
// on first use.
func (f Files) SetHostKeys(name string, keys []string) error {
	host := name + HostSuffix
	var add bytes.Buffer
	for i, k := range keys {
		pk, _, _, _, err := ssh.ParseAuthorizedKey([]byte(k))
		if err != nil {
			return fmt.Errorf("host key %d of vm %s: %w: %w", i+1, name, err, errdefs.ErrInvalid)
		}
		fmt.Fprintf(&add, "%s %s %s\n", host, pk.Type(), base64.StdEncoding.EncodeToString(pk.Marshal()))
	}
	unlock, err := f.lock()
	if err != nil {
		return err
	}
	defer unlock()
	old, err := os.ReadFile(f.KnownHosts)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("read %s: %w", f.KnownHosts, err)
	}
	var out bytes.Buffer
	for _, line := range strings.SplitAfter(string(old), "\n") {
		if line == "" || namesHost(line, host) {
			continue
		}
		out.WriteString(line)
		if !strings.HasSuffix(line, "\n") {
			out.WriteByte('\n')
		}
	}
	out.Write(add.Bytes())
	if bytes.Equal(out.Bytes(), old) {
		return nil
	}
	return f.writeRegenerated(f.KnownHosts, out.Bytes())
}

// namesHost reports whether a known_hosts line is about host (its host
// field, a comma-separated list, names it exactly).
func namesHost(line, host string) bool {
	fields := strings.Fields(line)
	if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
		return false
	}
	hosts := fields[0]
	if strings.HasPrefix(hosts, "@") { // @cert-authority, @revoked
		if len(fields) < 2 {
			return false
		}
		hosts = fields[1]
	}
	for _, h := range strings.Split(hosts, ",") {
		if h == host {
			return true
		}
	}
	return false
}
