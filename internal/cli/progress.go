package cli

import (
	"fmt"
	"io"
	"os"
	"sync"
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
	return &progress{w: a.stderr, tty: ok && drawable(f)}
}

// drawable reports whether f is a terminal mpb can draw bars on: one with
// a size. mpb draws nothing on a terminal of 0 rows (a pseudo-terminal
// nobody sized, some serial consoles), where plain lines are better.
func drawable(f *os.File) bool {
	cols, rows, err := term.GetSize(int(f.Fd()))
	return err == nil && cols > 0 && rows > 0
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
		var speed decor.Decorator = &finalSpeed{Decorator: decor.AverageSpeed(decor.SizeB1024(0), "% .1f", decor.WCSyncSpace)}
		if pr.Unit != "" && pr.Unit != "bytes" {
			counters = decor.CountersNoUnit("%d / %d "+pr.Unit, decor.WCSyncSpace)
			speed = &finalSpeed{Decorator: decor.AverageSpeed(nil, "%.0f/s", decor.WCSyncSpace)}
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

// finalSpeed is an average speed decorator that shows the rate over the
// whole phase, frozen when the bar completes: mpb's keeps the rate of the
// last redraw before completion, none for a bar completed before its
// first redraw (a fast copy).
type finalSpeed struct {
	decor.Decorator
	final bool // str and width hold the rate at completion
	str   string
	width int
}

func (d *finalSpeed) Decor(s decor.Statistics) (string, int) {
	if !s.Completed {
		return d.Decorator.Decor(s)
	}
	if !d.final {
		s.Completed = false // the rate up to now: the end
		d.str, d.width = d.Decorator.Decor(s)
		d.final = true
	}
	return d.str, d.width
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

// copyBarMin is the smallest transfer `vm cp` shows a progress bar for.
const copyBarMin = 4 << 20

// showCopyBar decides whether `vm cp` shows a transfer of total bytes:
// only on a terminal, without --quiet, from copyBarMin up.
func showCopyBar(tty, quiet bool, total int64) bool {
	return tty && !quiet && total >= copyBarMin
}

// copyMeter shows a `vm cp` transfer on a progress bar: start sets its
// size (the tar stream's: announced by the guest before the first byte,
// counted on the host beside the stream), count adds the bytes as they
// pass (before start too), finish ends the bar. A meter made with a nil
// progress, or started under copyBarMin or after finish, shows nothing.
// Its methods may be called from different goroutines.
type copyMeter struct {
	mu       sync.Mutex
	p        *progress // nil: show nothing
	label    string
	quiet    bool
	total    int64 // 0: not started, or not shown
	done     int64
	last     int64 // done at the last update of the bar
	finished bool
}

// newCopyMeter returns a meter for a copy named label ("copy syslog") on
// p's terminal; on anything but a terminal, or with quiet, it shows
// nothing.
func newCopyMeter(p *progress, label string, quiet bool) *copyMeter {
	if !p.tty || quiet {
		p = nil
	}
	return &copyMeter{p: p, label: label, quiet: quiet}
}

// active reports whether the meter may show a bar: worth counting the
// stream's size for.
func (m *copyMeter) active() bool { return m.p != nil }

func (m *copyMeter) start(total int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.p == nil || m.finished || !showCopyBar(m.p.tty, m.quiet, total) {
		return
	}
	m.total, m.last = total, m.done
	m.p.update(api.Progress{Phase: m.label, Done: m.done, Total: max(total, m.done), Unit: "bytes"})
}

// copyBarStep is how many bytes pass between two updates of the bar
// (and at the end of the stream).
const copyBarStep = 256 << 10

func (m *copyMeter) count(n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.done += int64(n)
	if m.total > 0 && m.done != m.last && (m.done-m.last >= copyBarStep || m.done >= m.total) {
		m.last = m.done
		m.p.update(api.Progress{Phase: m.label, Done: m.done, Total: max(m.total, m.done), Unit: "bytes"})
	}
}

// finish ends the bar: complete when every byte passed, else kept where
// it stopped. Bytes counted afterwards show nothing.
func (m *copyMeter) finish() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.p != nil {
		m.p.done()
	}
	m.total, m.finished = 0, true
}

// Writer counts what passes through it to w.
func (m *copyMeter) Writer(w io.Writer) io.Writer { return meterWriter{w, m} }

// Reader counts what is read through it from r.
func (m *copyMeter) Reader(r io.Reader) io.Reader { return meterReader{r, m} }

type meterWriter struct {
	w io.Writer
	m *copyMeter
}

func (w meterWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	w.m.count(n)
	return n, err
}

type meterReader struct {
	r io.Reader
	m *copyMeter
}

func (r meterReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.m.count(n)
	return n, err
}
