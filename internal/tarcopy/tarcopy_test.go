package tarcopy

import (
	"errors"
	"testing"
)

func TestEntryName(t *testing.T) {
	ok := map[string]string{
		"a":          "a",
		"./a":        "a",
		"a/b/":       "a/b",
		"./":         ".",
		"a//b/./c":   "a/b/c",
		"..a/b..":    "..a/b..",
		"dir/...":    "dir/...",
		"x/.hidden/": "x/.hidden",
	}
	for in, want := range ok {
		got, err := entryName(in)
		if err != nil || got != want {
			t.Errorf("entryName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "..", "../a", "a/../../b", "a/..", "/etc/passwd", "/", "a\x00b"} {
		if _, err := entryName(bad); !errors.Is(err, ErrUnsafePath) {
			t.Errorf("entryName(%q): %v, want ErrUnsafePath", bad, err)
		}
	}
}
