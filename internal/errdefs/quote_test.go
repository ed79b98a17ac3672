package errdefs

import (
	"strings"
	"testing"
)

func TestQuote(t *testing.T) {
	if got := Quote("box"); got != `"box"` {
		t.Errorf("Quote(box) = %s", got)
	}
	long := strings.Repeat("é", 1<<20) // 2 MiB
	got := Quote(long)
	if len(got) > QuoteMax+40 {
		t.Errorf("Quote of 2 MiB is %d bytes long", len(got))
	}
	if !strings.Contains(got, "(2097152 bytes)") || strings.Contains(got, `\x`) {
		t.Errorf("Quote(long) = %s: want the length noted and no cut rune", got)
	}
}
