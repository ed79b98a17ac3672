package errdefs

import (
	"fmt"
	"strconv"
	"unicode/utf8"
)

// QuoteMax is how many bytes of a user's input an error message quotes.
const QuoteMax = 64

// Quote returns s quoted (as %q does) for an error message, cut to its
// first QuoteMax bytes (at a rune boundary) with its full length noted:
// a 10 MB name doesn't make a 10 MB error.
func Quote(s string) string {
	if len(s) <= QuoteMax {
		return strconv.Quote(s)
	}
	cut := QuoteMax
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%s... (%d bytes)", strconv.Quote(s[:cut]), len(s))
}
