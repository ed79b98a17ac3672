package cli

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"

	"github.com/bangerdev/banger/internal/api"
)

// progress shows long operations' progress frames on stderr: on a
// terminal, a phase with a total (a download, a copy) is a progress bar
// with its bytes, rate and ETA (mpb), other phases a "==> phase" line;
// elsewhere, a line per phase and one per 25% of a phase's total. One
// renderer serves every command: vm create/run (and the pulls they
// start), vm start/stop, image promote, image and kernel pull.
type progress struct {
	w     io.Writer
	tty   bool
	phase string
	last  int // plain mode: the last percentage printed

	// Terminal mode: the bar of the current phase, in a container of its
	// own (so that lines printed between bars never cross a redraw).
	bars  *mpb.Progress
	bar   *mpb.Bar
	total int64
}

func (a *app) progress() *progress {
	f, ok := a.stderr.(*os.File)
	return &progress{w: a.stderr, tty: ok && term.IsTerminal(int(f.Fd()))}
}

func (p *progress) update(pr api.Progress) {
	if pr.Phase != p.phase {
		p.done()
		p.phase, p.last = pr.Phase, -1
		if !p.tty || pr.Total <= 0 {
			fmt.Fprintf(p.w, "==> %s\n", pr.Phase)
		}
	}
	if pr.Total <= 0 {
		return
	}
	if p.tty {
		p.updateBar(pr)
		return
	}
	pct := int(min(pr.Done, pr.Total) * 100 / pr.Total)
	// Not a terminal: a line per 25%.
	if pct != p.last && (p.last < 0 || pct/25 != p.last/25 || pr.Done == pr.Total) {
		fmt.Fprintf(p.w, "    %s / %s (%d%%)\n", amount(pr.Done, pr.Unit), amount(pr.Total, pr.Unit), pct)
		p.last = pct
	}
}

// amount formats a count of unit ("" or "bytes": bytes).
func amount(n int64, unit string) string {
	if unit == "" || unit == "bytes" {
		return humanBytes(n)
	}
	return fmt.Sprintf("%d %s", n, unit)
}

func (p *progress) updateBar(pr api.Progress) {
	if p.bar == nil {
		p.bars = mpb.New(mpb.WithOutput(p.w), mpb.ForceTTY(), mpb.WithAutoRefresh(), mpb.WithWidth(100), mpb.WithRefreshRate(200*time.Millisecond))
		counters := decor.Counters(decor.SizeB1024(0), "% .1f / % .1f", decor.WCSyncSpace)
		// Rate and ETA over the whole phase: frames come in bursts (a
		// bundle's frame, a layer), which a moving average of the gaps
		// turns into nonsense.
		speed := decor.AverageSpeed(decor.SizeB1024(0), "% .1f", decor.WCSyncSpace)
		if pr.Unit != "" && pr.Unit != "bytes" {
			counters = decor.CountersNoUnit("%d / %d "+pr.Unit, decor.WCSyncSpace)
			speed = decor.AverageSpeed(nil, "%.0f/s", decor.WCSyncSpace)
		}
		p.bar = p.bars.AddBar(pr.Total,
			mpb.PrependDecorators(decor.Name("==> "+pr.Phase, decor.WCSyncSpaceR), counters),
			mpb.AppendDecorators(
				decor.Percentage(decor.WCSyncSpace),
				speed,
				decor.OnComplete(decor.AverageETA(decor.ET_STYLE_GO, decor.WCSyncSpace), "done"),
			),
		)
		p.total = pr.Total
	}
	if pr.Total != p.total {
		p.bar.SetTotal(pr.Total, false)
		p.total = pr.Total
	}
	p.bar.SetCurrent(min(pr.Done, pr.Total))
}

// done ends the current phase's bar or line; calling it again is
// harmless.
func (p *progress) done() {
	if p.bar != nil {
		if !p.bar.Completed() {
			// Stopped short (an error, or the next phase came first):
			// keep the bar where it stopped.
			p.bar.Abort(false)
		}
		p.bars.Wait()
		p.bar, p.bars = nil, nil
	}
	p.phase = ""
}
