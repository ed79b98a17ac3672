package guestagent

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// The ACPI power button (QEMU's system_powerdown) reaches the guest as a key
// press on an input device named "Power Button". Images often have nothing
// that acts on it (no systemd-logind, no acpid, or no init at all), so the
// agent does: a press powers the guest off through the same hook as the
// host's shutdown request.

const (
	evKey      = 0x01
	keyPower   = 116
	eventSize  = 24 // struct input_event on 64-bit: timeval (16), type, code (u16), value (s32)
	buttonName = "Power Button"
)

// findPowerButtons returns the /dev paths of the input devices named
// "Power Button", from sysfs under sysRoot.
func findPowerButtons(sysRoot, devRoot string) []string {
	names, _ := filepath.Glob(filepath.Join(sysRoot, "class", "input", "event*", "device", "name"))
	var out []string
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil || strings.TrimSpace(string(b)) != buttonName {
			continue
		}
		ev := filepath.Base(filepath.Dir(filepath.Dir(n)))
		out = append(out, filepath.Join(devRoot, "input", ev))
	}
	return out
}

// readPowerPress reads input events from r until a power key press, EOF or
// an error. It reports whether a press was seen.
func readPowerPress(r io.Reader) (bool, error) {
	buf := make([]byte, eventSize)
	for {
		if _, err := io.ReadFull(r, buf); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return false, nil
			}
			return false, err
		}
		typ := binary.NativeEndian.Uint16(buf[16:])
		code := binary.NativeEndian.Uint16(buf[18:])
		value := int32(binary.NativeEndian.Uint32(buf[20:]))
		if typ == evKey && code == keyPower && value == 1 {
			return true, nil
		}
	}
}

// watchPowerButton calls onPress for each power button press until ctx
// ends. The button's driver may load late (udev), so it looks for the
// device every scanEvery until it finds one.
func watchPowerButton(ctx context.Context, sysRoot, devRoot string, scanEvery time.Duration, onPress func(), log *slog.Logger) {
	watching := map[string]bool{}
	done := make(chan string)
	for {
		for _, dev := range findPowerButtons(sysRoot, devRoot) {
			if watching[dev] {
				continue
			}
			f, err := os.Open(dev)
			if err != nil {
				log.Debug("open power button", "dev", dev, "err", err)
				continue
			}
			watching[dev] = true
			log.Info("watching the ACPI power button", "dev", dev)
			go func() {
				defer func() { done <- dev }()
				stop := context.AfterFunc(ctx, func() { f.Close() })
				defer stop()
				defer f.Close()
				for {
					pressed, err := readPowerPress(f)
					if !pressed || err != nil {
						return
					}
					log.Info("power button pressed: powering off")
					onPress()
				}
			}()
		}
		select {
		case <-ctx.Done():
			return
		case dev := <-done:
			delete(watching, dev)
		case <-time.After(scanEvery):
		}
	}
}
