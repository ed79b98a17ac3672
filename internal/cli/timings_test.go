package cli

import (
	"bytes"
	"regexp"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/api"
)

func TestPrintTimings(t *testing.T) {
	var b bytes.Buffer
	printTimings(&b, "box", &api.BootTimeline{Phases: []api.BootPhase{
		{Name: api.PhaseInitramfs, DurationMS: 0.5},
		{Name: api.PhaseVMMStart, DurationMS: 42},
		{Name: api.PhaseKernelToAgent, DurationMS: 3000},
		{Name: api.PhaseEarlyBoot, DurationMS: 1957.5},
		{Name: api.PhaseFullBoot, DurationMS: 500, Running: true},
	}})
	out := b.String()
	want := []string{
		`(?m)^  initramfs\s+500µs\s+500µs$`,
		`(?m)^  vmm start\s+42ms\s+43ms$`,
		`(?m)^  kernel to agent\s+3s\s+3.04s$`,
		`(?m)^  early boot\s+1.96s\s+5s$`,
		`(?m)^  full boot\s+500ms \(so far, running\)\s+5.5s$`,
	}
	for _, re := range want {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("timings lack %s:\n%s", re, out)
		}
	}
	if strings.Index(out, "initramfs") > strings.Index(out, "early boot") {
		t.Errorf("phases out of order:\n%s", out)
	}
}
