package agentproto

import (
	"bytes"
	"errors"
	"testing"

	"golang.org/x/crypto/ssh"
)

func TestPayloadIsJSONInSSHString(t *testing.T) {
	req := ExecRequest{Argv: []string{"echo", "hi"}, Env: []string{"A=b"}, Dir: "/tmp"}
	b, err := MarshalPayload(req)
	if err != nil {
		t.Fatal(err)
	}
	var wire struct{ S string }
	if err := ssh.Unmarshal(b, &wire); err != nil {
		t.Fatalf("not an SSH string: %v", err)
	}
	if want := `{"argv":["echo","hi"],"env":["A=b"],"dir":"/tmp"}`; wire.S != want {
		t.Errorf("json = %s, want %s", wire.S, want)
	}
	if !bytes.Equal(b, ssh.Marshal(wire)) {
		t.Errorf("encoding differs from ssh.Marshal")
	}
	var got ExecRequest
	if err := UnmarshalPayload(b, &got); err != nil || got.Dir != "/tmp" || len(got.Argv) != 2 {
		t.Errorf("round trip: %+v, %v", got, err)
	}
	for name, bad := range map[string][]byte{
		"short":    {0, 0},
		"trailing": append(append([]byte{}, b...), 'x'),
		"not json": ssh.Marshal(struct{ S string }{"nope"}),
	} {
		if err := UnmarshalPayload(bad, &got); !errors.Is(err, ErrBadPayload) {
			t.Errorf("%s: %v, want ErrBadPayload", name, err)
		}
	}
}
