package kernelcat

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
	e, err := c.Resolve("generic-6.1")
	if err != nil {
		t.Fatal(err)
	}
	if e.Build != "debian-cloud" {
		t.Errorf("generic-6.1: %+v", e)
	}
}
