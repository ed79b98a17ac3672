package cgroup

import (
	"reflect"
	"testing"
	"time"
)

func TestScopeProperties(t *testing.T) {
	l := Limits{MemoryBytes: 1 << 30, PIDs: 256, CPUWeight: 200}
	want := map[string]any{
		"Description": "d", "Slice": "banger.slice", "PIDs": []uint32{42}, "Delegate": true,
		"CollectMode": "inactive-or-failed", "TasksMax": uint64(256),
	}
	check := func(mode Mode, extra map[string]any) {
		t.Helper()
		got := map[string]any{}
		for _, p := range ScopeProperties(mode, "banger.slice", "d", 42, l) {
			if _, dup := got[p.Name]; dup {
				t.Errorf("%s: property %s twice", mode, p.Name)
			}
			got[p.Name] = p.Value.Value()
		}
		w := map[string]any{}
		for k, v := range want {
			w[k] = v
		}
		for k, v := range extra {
			w[k] = v
		}
		if !reflect.DeepEqual(got, w) {
			t.Errorf("%s: properties\n got %#v\nwant %#v", mode, got, w)
		}
	}
	check(ModeV2, map[string]any{"MemoryMax": uint64(1 << 30), "MemorySwapMax": uint64(0), "CPUWeight": uint64(200)})
	check(ModeV1, map[string]any{"MemoryLimit": uint64(1 << 30), "CPUShares": uint64(2048)})
}

func TestSliceAndScopeNames(t *testing.T) {
	for in, want := range map[string]string{"banger": "banger.slice", "a/b": "a-b.slice", "/x/": "x.slice"} {
		if got, err := SliceName(in); err != nil || got != want {
			t.Errorf("SliceName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"..", "a b", "é"} {
		if got, err := SliceName(bad); err == nil {
			t.Errorf("SliceName(%q) = %q; want an error", bad, got)
		}
	}
	if got := ScopeName("vm-ab c"); got != "banger-vm-ab_c.scope" {
		t.Errorf("ScopeName = %q", got)
	}
}

// The placeholder ends by itself once its holder (bangerd) is gone.
func TestPlaceholderEndsWithHolder(t *testing.T) {
	cmd, hold, err := startPlaceholder()
	if err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		t.Fatalf("placeholder exited while held: %v", err)
	default:
	}
	hold.Close()
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("placeholder: %v", err)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Fatal("placeholder still runs after its holder closed the pipe")
	}
}
