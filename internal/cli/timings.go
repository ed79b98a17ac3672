package cli

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/bangerdev/banger/internal/api"
)

const timingsHelp = "print the boot timeline (time spent in each phase) on stderr"

// printTimings writes a VM's boot timeline: each phase, its duration and
// the running total.
func printTimings(w io.Writer, name string, tl *api.BootTimeline) {
	if tl == nil {
		fmt.Fprintf(w, "%s: no boot timeline\n", name)
		return
	}
	fmt.Fprintf(w, "boot timeline of %s:\n", name)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  PHASE\tDURATION\tTOTAL")
	var total float64
	for _, p := range tl.Phases {
		total += p.DurationMS
		dur := fmtMS(p.DurationMS)
		if p.Running {
			dur += " (so far, running)"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", p.Name, dur, fmtMS(total))
	}
	tw.Flush()
	if tl.Error != "" {
		fmt.Fprintf(w, "  failed: %s\n", tl.Error)
	}
}

// fmtMS formats milliseconds concisely: 850µs, 42ms, 3.21s.
func fmtMS(ms float64) string {
	d := time.Duration(ms * float64(time.Millisecond))
	switch {
	case d < time.Millisecond:
		return d.Round(10 * time.Microsecond).String()
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	}
	return d.Round(10 * time.Millisecond).String()
}

// timingsAfter prints the timeline of a start that returned vm (or, when
// the start failed, the timeline the daemon recorded for name).
func (a *app) timingsAfter(ctx context.Context, name string, vm api.VM, startErr error) {
	if startErr != nil {
		var err error
		if vm, err = a.client().VMInspect(ctx, name); err != nil {
			return
		}
	}
	printTimings(a.stderr, name, vm.BootTimeline)
}
