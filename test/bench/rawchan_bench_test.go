//go:build e2e

package bench

import (
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/client"
)

// BenchmarkRawChannel measures the raw virtio-serial channel of a bare QEMU
// (200 MiB out and in, three runs).
func BenchmarkRawChannel(b *testing.B) {
	e, imageDir := setup(b)
	e.RegisterImages()
	c := client.New(e.Socket())
	ctx := context.Background()
	vm, err := c.VMCreate(ctx, api.VMCreateParams{Name: "raw", Image: "debian", Start: true}, nil)
	if err != nil {
		b.Fatal(err)
	}
	cmdline := appendArg(b, vm.Dir)
	initrd := filepath.Join(b.TempDir(), "initrd.img")
	if err := exec.Command("cp", filepath.Join(vm.Dir, "initrd.img"), initrd).Run(); err != nil {
		b.Fatal(err)
	}
	if _, err := c.VMKill(ctx, "raw"); err != nil {
		b.Fatal(err)
	}
	bv := bootBare(b, imageDir, vm.Dir, initrd, cmdline)
	const size = 200 << 20
	for i := 0; i < 3; i++ {
		d := bv.rawOut(b, "dd if=/dev/zero of=$PORT bs=1M count=200 2>/dev/null", size)
		fmt.Printf("raw out: %v %.1f MB/s\n", d, size/1e6/d.Seconds())
		d = bv.rawIn(b, "dd if=$PORT of=/dev/null bs=1M count=200 iflag=fullblock 2>/dev/null", func(w io.Writer) error {
			_, err := io.CopyN(w, zeroReader{}, size)
			return err
		})
		fmt.Printf("raw in: %v %.1f MB/s\n", d, size/1e6/d.Seconds())
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }
