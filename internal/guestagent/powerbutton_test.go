package guestagent

import (
	"bytes"
	"context"
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func inputEvent(typ, code uint16, value int32) []byte {
	b := make([]byte, eventSize)
	binary.NativeEndian.PutUint16(b[16:], typ)
	binary.NativeEndian.PutUint16(b[18:], code)
	binary.NativeEndian.PutUint32(b[20:], uint32(value))
	return b
}

func TestReadPowerPress(t *testing.T) {
	var stream bytes.Buffer
	stream.Write(inputEvent(evKey, 30, 1))       // another key
	stream.Write(inputEvent(evKey, keyPower, 0)) // a release
	stream.Write(inputEvent(0, 0, 0))            // a sync
	if pressed, err := readPowerPress(bytes.NewReader(stream.Bytes())); pressed || err != nil {
		t.Fatalf("no press: got %v, %v", pressed, err)
	}
	stream.Write(inputEvent(evKey, keyPower, 1))
	if pressed, err := readPowerPress(bytes.NewReader(stream.Bytes())); !pressed || err != nil {
		t.Fatalf("press: got %v, %v", pressed, err)
	}
}

func TestWatchPowerButton(t *testing.T) {
	root := t.TempDir()
	sys, dev := filepath.Join(root, "sys"), filepath.Join(root, "dev")
	for ev, name := range map[string]string{"event0": "AT Translated Set 2 keyboard", "event1": "Power Button"} {
		d := filepath.Join(sys, "class", "input", ev, "device")
		os.MkdirAll(d, 0o755)
		os.WriteFile(filepath.Join(d, "name"), []byte(name+"\n"), 0o644)
	}
	os.MkdirAll(filepath.Join(dev, "input"), 0o755)
	// The keyboard "device" holds a power key press too: it must be ignored.
	os.WriteFile(filepath.Join(dev, "input", "event0"), inputEvent(evKey, keyPower, 1), 0o644)
	if got := findPowerButtons(sys, dev); len(got) != 1 || got[0] != filepath.Join(dev, "input", "event1") {
		t.Fatalf("findPowerButtons = %v", got)
	}
	pressed := make(chan struct{}, 4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go watchPowerButton(ctx, sys, dev, 20*time.Millisecond, func() { pressed <- struct{}{} }, slog.New(slog.DiscardHandler))
	select {
	case <-pressed:
		t.Fatal("pressed before any event")
	case <-time.After(100 * time.Millisecond):
	}
	os.WriteFile(filepath.Join(dev, "input", "event1"), inputEvent(evKey, keyPower, 1), 0o644)
	select {
	case <-pressed:
	case <-time.After(5 * time.Second):
		t.Fatal("power button press not seen")
	}
}
