package vmname

import (
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
)

func TestValidateAccepts(t *testing.T) {
	for _, name := range []string{"a", "dev", "brave-otter", "web-01", "a1", "x-y-z", "a--b", strings.Repeat("a", 63)} {
		if err := Validate(name); err != nil {
			t.Errorf("Validate(%q) = %v", name, err)
		}
	}
}

func TestValidateRejects(t *testing.T) {
	cases := map[string]string{
		"Foo_1":                 `invalid VM name "Foo_1": use lowercase letters, digits and '-', start with a letter, at most 63 characters`,
		"":                      `invalid VM name "": empty name; use lowercase letters, digits and '-', start with a letter, at most 63 characters`,
		"1abc":                  `invalid VM name "1abc": use lowercase letters, digits and '-', start with a letter, at most 63 characters`,
		"-abc":                  `invalid VM name "-abc": use lowercase letters, digits and '-', start with a letter, at most 63 characters`,
		"abc-":                  `invalid VM name "abc-": must not end with '-'; use lowercase letters, digits and '-', start with a letter, at most 63 characters`,
		strings.Repeat("a", 64): `invalid VM name "` + strings.Repeat("a", 64) + `": 64 characters long; use lowercase letters, digits and '-', start with a letter, at most 63 characters`,
	}
	for name, want := range cases {
		err := Validate(name)
		if err == nil {
			t.Errorf("Validate(%q) = nil", name)
			continue
		}
		if err.Error() != want {
			t.Errorf("Validate(%q) = %q\n                 want %q", name, err, want)
		}
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("Validate(%q): errors.Is(err, ErrInvalid) = false", name)
		}
	}
	for _, name := range []string{"a.b", "a b", "a_b", "ABC", "abc\n", "héllo", "a/b", "..", "a:b", "ａbc"} {
		if Validate(name) == nil {
			t.Errorf("Validate(%q) = nil, want an error", name)
		}
	}
}

func TestValidateKind(t *testing.T) {
	err := ValidateKind(KindImage, "Debian 12")
	if err == nil || !strings.HasPrefix(err.Error(), `invalid image name "Debian 12": `) {
		t.Errorf("ValidateKind = %v", err)
	}
	var ne *InvalidNameError
	if !errors.As(err, &ne) || ne.Kind != KindImage || ne.Name != "Debian 12" {
		t.Errorf("errors.As: %+v", ne)
	}
}

func TestGenerateDeterministic(t *testing.T) {
	a := NewGenerator(rand.NewPCG(1, 2))
	b := NewGenerator(rand.NewPCG(1, 2))
	for range 20 {
		x, y := a.Generate(nil), b.Generate(nil)
		if x != y {
			t.Fatalf("same seed, different names: %q, %q", x, y)
		}
		if err := Validate(x); err != nil {
			t.Fatal(err)
		}
		if parts := strings.Split(x, "-"); len(parts) != 2 {
			t.Errorf("%q is not adjective-noun", x)
		}
	}
}

func TestGenerateAvoidsTaken(t *testing.T) {
	g := NewGenerator(rand.NewPCG(7, 7))
	taken := map[string]bool{}
	for range 500 {
		name := g.Generate(func(s string) bool { return taken[s] })
		if taken[name] {
			t.Fatalf("%q generated twice", name)
		}
		if err := Validate(name); err != nil {
			t.Fatal(err)
		}
		taken[name] = true
	}
}

func TestGenerateSuffixOnCollision(t *testing.T) {
	// Everything without a suffix is taken, and so is the first suffix.
	taken := func(s string) bool {
		parts := strings.Split(s, "-")
		return len(parts) == 2 || (len(parts) == 3 && parts[2] == "2")
	}
	first := NewGenerator(rand.NewPCG(3, 4)).Generate(func(string) bool { return false })
	got := NewGenerator(rand.NewPCG(3, 4)).Generate(taken)
	if got != first+"-3" {
		t.Errorf("Generate = %q, want %q", got, first+"-3")
	}
}

func TestWordsMakeValidNames(t *testing.T) {
	seen := map[string]bool{}
	longest := 0
	for _, w := range append(append([]string{}, adjectives...), nouns...) {
		if err := ValidateKind("word", w); err != nil || strings.Contains(w, "-") {
			t.Errorf("word %q: %v", w, err)
		}
		if seen[w] {
			t.Errorf("duplicate word %q", w)
		}
		seen[w] = true
		longest = max(longest, len(w))
	}
	// Two words, two dashes and a generous suffix still fit in a label.
	if 2*longest+2+10 > MaxLen {
		t.Errorf("words too long: %d", longest)
	}
}

func TestGenerateConcurrent(t *testing.T) {
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				if err := Validate(Generate(nil)); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
}
