//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"sync"
	"testing"
)

// TestParallelRuns boots several VMs at once through one daemon.
func TestParallelRuns(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	const n = 3
	var wg sync.WaitGroup
	errs := make([]string, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, errOut, code := e.Banger("vm", "run", "--rm", "--image", "tiny", "--name", fmt.Sprintf("par%d", i), "--", "hostname")
			if code != 0 || strings.TrimSpace(out) != fmt.Sprintf("par%d", i) {
				errs[i] = fmt.Sprintf("run %d: code %d stdout %q stderr %q", i, code, out, errOut)
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != "" {
			t.Error(err)
		}
	}
	if out := e.Must("vm", "ls", "-q"); strings.TrimSpace(out) != "" {
		t.Fatalf("VMs left: %q", out)
	}
	if d := e.VMDirs(); len(d) != 0 {
		t.Fatalf("VM dirs left: %v", d)
	}
}
