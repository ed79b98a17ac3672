// Package tarcopy moves files and directory trees as tar streams: Write
// packs a path (sparse files as GNU sparse entries), Extract unpacks a
// stream under a directory, treating it as hostile. The guest agent and the
// CLI's vm cp share it.
package tarcopy

import (
	"fmt"
	"log/slog"
	"path"
	"slices"
	"strings"
)

func logger(log *slog.Logger) *slog.Logger {
	if log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return log
}

// entryName validates a tar entry name and returns it cleaned and relative
// ("." for the destination itself). Absolute names and names with a ".."
// component are refused.
func entryName(name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("tar entry with empty name: %w", ErrUnsafePath)
	}
	if strings.HasPrefix(name, "/") || strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("tar entry %s: absolute name: %w", quote(name), ErrUnsafePath)
	}
	if slices.Contains(strings.Split(name, "/"), "..") {
		return "", fmt.Errorf("tar entry %s: \"..\" in name: %w", quote(name), ErrUnsafePath)
	}
	return path.Clean(name), nil
}
