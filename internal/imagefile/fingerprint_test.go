package imagefile

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// Promote's copy is checked by content: a copy that differs in one byte,
// in a file or in the modules tree, is caught even with the same size.
func TestSameContent(t *testing.T) {
	f := newFixture(t)
	ctx := t.Context()
	dest := filepath.Join(f.dir, "copy")
	out, err := Promote(ctx, f.a, dest, nil)
	if err != nil {
		t.Fatal(err)
	}
	src, err := Fingerprint(ctx, f.a, true)
	if err != nil {
		t.Fatal(err)
	}
	cp, err := Fingerprint(ctx, out, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := SameContent(src, cp); err != nil {
		t.Fatalf("a faithful copy: %v", err)
	}
	if err := Verify(src); err != nil {
		t.Fatalf("unchanged source: %v", err)
	}
	for _, p := range []string{out.Kernel, filepath.Join(out.ModulesDir, "modules.dep")} {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)-1] ^= 1
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		bad, err := Fingerprint(ctx, out, true)
		if err != nil {
			t.Fatal(err)
		}
		if err := SameContent(src, bad); !errors.Is(err, ErrChanged) {
			t.Errorf("copy with %s altered: %v, want ErrChanged", p, err)
		}
		b[len(b)-1] ^= 1
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Verify notices what stat can see.
	if err := os.Truncate(f.a.Initrd, 10); err != nil {
		t.Fatal(err)
	}
	var ce *ChangedError
	if err := Verify(src); !errors.As(err, &ce) || ce.Stamp.Role != FieldInitrd {
		t.Errorf("truncated initrd: %v", err)
	}
}
