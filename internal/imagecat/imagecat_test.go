package imagecat

import (
	"runtime"
	"testing"
)

func TestEmbedded(t *testing.T) {
	c, err := Builtin().Embedded()
	if err != nil {
		t.Fatal(err)
	}
	if runtime.GOARCH != "amd64" {
		t.Skip("the embedded catalog lists amd64 only")
	}
	e, err := c.Resolve("debian-bookworm")
	if err != nil {
		t.Fatal(err)
	}
	if e.Build != "golden" || e.Kernel != "generic-6.1" || e.User != "dev" {
		t.Errorf("debian-bookworm: %+v", e)
	}
}
