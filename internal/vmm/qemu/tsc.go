package qemu

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// HostTSCKHz returns the host's TSC frequency in kHz. Under TCG, QEMU's
// guest TSC counts at this rate, so it is what a guest kernel should be
// told (see TCGCmdline).
//
// It reads /sys/devices/system/cpu/cpu0/tsc_freq_khz where the kernel has
// it, and otherwise measures the TSC against the monotonic clock for about
// 60 ms.
func HostTSCKHz() (uint64, error) {
	if b, err := os.ReadFile("/sys/devices/system/cpu/cpu0/tsc_freq_khz"); err == nil {
		if khz, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && khz > 0 {
			return khz, nil
		}
	}
	return measureTSCKHz(3, 20*time.Millisecond)
}

// measureTSCKHz counts TSC ticks over interval, n times, and returns the
// median rate.
func measureTSCKHz(n int, interval time.Duration) (uint64, error) {
	if !haveTSC {
		return 0, errors.New("measure tsc: no time stamp counter on this architecture")
	}
	var rates []uint64
	for range n {
		t0, c0 := bracket()
		time.Sleep(interval)
		t1, c1 := bracket()
		ns := t1.Sub(t0).Nanoseconds()
		if ns <= 0 || c1 <= c0 {
			continue
		}
		rates = append(rates, (c1-c0)*1_000_000/uint64(ns))
	}
	if len(rates) == 0 {
		return 0, errors.New("measure tsc: counter did not advance")
	}
	slices.Sort(rates)
	khz := rates[len(rates)/2]
	if khz < 100_000 || khz > 20_000_000 {
		return 0, fmt.Errorf("measure tsc: implausible rate %d kHz", khz)
	}
	return khz, nil
}

// bracket reads the clock and the TSC as close together as it can: the TSC
// read between two clock reads taken the shortest time apart out of a few
// tries.
func bracket() (time.Time, uint64) {
	var (
		best    time.Duration = -1
		bestT   time.Time
		bestTSC uint64
	)
	for range 5 {
		a := time.Now()
		c := rdtsc()
		b := time.Now()
		if d := b.Sub(a); best < 0 || d < best {
			best, bestT, bestTSC = d, a.Add(d/2), c
		}
	}
	return bestT, bestTSC
}
