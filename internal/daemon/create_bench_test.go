package daemon

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/vmm"
)

// BenchmarkCreate10 makes 10 bridged VMs (fake VMM taking qcow2 disks as
// QEMU does, real store, cloner and address allocation) one after the
// other and 10 at once, and reports
// the parallel run's time over the sequential one's (goal: at most 0.3 on
// a machine with the cores for it; creates no longer serialise beyond the
// store's transactions).
func BenchmarkCreate10(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("bridged VMs need bangerd to run as root")
	}
	var seq, par time.Duration
	for i := 0; i < b.N; i++ {
		e := newEnv(b, bridged)
		e.fake.formats = []string{vmm.FormatQcow2, vmm.FormatRaw}
		d := e.start()
		ctx := testCtx(e.t)
		if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd}); err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		for j := range 10 {
			if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: fmt.Sprintf("s%d", j)}, nil); err != nil {
				b.Fatal(err)
			}
		}
		seq += time.Since(start)
		start = time.Now()
		var wg sync.WaitGroup
		errs := make([]error, 10)
		for j := range 10 {
			wg.Go(func() { _, errs[j] = d.c.VMCreate(ctx, api.VMCreateParams{Name: fmt.Sprintf("p%d", j)}, nil) })
		}
		wg.Wait()
		par += time.Since(start)
		for _, err := range errs {
			if err != nil {
				b.Fatal(err)
			}
		}
		d.close()
	}
	b.ReportMetric(float64(seq.Milliseconds())/float64(b.N), "seq-ms")
	b.ReportMetric(float64(par.Milliseconds())/float64(b.N), "par-ms")
	b.ReportMetric(float64(par)/float64(seq), "par/seq")
}
