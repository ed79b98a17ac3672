package netns

import (
	"net"
	"strings"
	"testing"
)

func TestNamespaces(t *testing.T) {
	a := New(t, "bgt-a")
	b := New(t, "bgt-b")
	Veth(t, a, "va", "192.0.2.1/24", b, "vb", "192.0.2.2/24")
	if out := a.Run(t, "ip", "-o", "addr", "show", "dev", "va"); !strings.Contains(out, "192.0.2.1/24") {
		t.Fatalf("va in %s: %s", a.Name, out)
	}
	// A listener made inside b is reachable from a, and not from this
	// (the host's) namespace, which has no such address.
	var ln net.Listener
	if err := b.Do(func() (err error) { ln, err = net.Listen("tcp", "192.0.2.2:0"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			_, _ = c.Write([]byte("hi"))
			c.Close()
		}
	}()
	var got []byte
	if err := a.Do(func() error {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return err
		}
		defer c.Close()
		got = make([]byte, 2)
		_, err = c.Read(got)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if string(got) != "hi" {
		t.Fatalf("read %q", got)
	}
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range ifs {
		if i.Name == "va" || i.Name == "vb" {
			t.Fatalf("%s leaked into the host namespace", i.Name)
		}
	}
}
