// Package vmname validates and generates the names of VMs and images.
//
// A name is a DNS label (RFC 1123, restricted to lowercase): 1 to 63
// characters among a-z, 0-9 and '-', starting with a letter and not ending
// with '-'. It can then serve as a hostname, a directory name and part of a
// network interface or unit name.
package vmname

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"

	"github.com/bangerdev/banger/internal/errdefs"
)

// MaxLen is the longest name allowed (a DNS label).
const MaxLen = 63

// Kinds of names, for messages.
const (
	KindVM    = "VM"
	KindImage = "image"
)

// rule is the hint every error message ends with.
const rule = "use lowercase letters, digits and '-', start with a letter, at most 63 characters"

// ErrInvalid is matched (errors.Is) by every error Validate returns.
var ErrInvalid = errors.New("invalid name")

// InvalidNameError describes why a name was refused.
type InvalidNameError struct {
	Kind   string // KindVM, KindImage, ...
	Name   string
	Reason string // empty when the general rule says it all
}

func (e *InvalidNameError) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("invalid %s name %s: %s", e.Kind, errdefs.Quote(e.Name), rule)
	}
	return fmt.Sprintf("invalid %s name %s: %s; %s", e.Kind, errdefs.Quote(e.Name), e.Reason, rule)
}

// Is makes errors.Is(err, ErrInvalid) true.
func (e *InvalidNameError) Is(target error) bool { return target == ErrInvalid }

// Validate checks a VM name.
func Validate(name string) error { return ValidateKind(KindVM, name) }

// ValidateKind checks a name of the given kind (KindVM, KindImage, ...);
// kind only appears in the error message.
func ValidateKind(kind, name string) error {
	fail := func(reason string) error { return &InvalidNameError{Kind: kind, Name: name, Reason: reason} }
	switch {
	case name == "":
		return fail("empty name")
	case len(name) > MaxLen:
		return fail(fmt.Sprintf("%d characters long", len(name)))
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !isLower(c) && !isDigit(c) && c != '-' {
			return fail("")
		}
	}
	switch {
	case !isLower(name[0]):
		return fail("")
	case name[len(name)-1] == '-':
		return fail("must not end with '-'")
	}
	return nil
}

func isLower(c byte) bool { return 'a' <= c && c <= 'z' }
func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// Generator makes random adjective-noun names.
type Generator struct {
	rand *rand.Rand // nil: the auto-seeded global source
}

// NewGenerator returns a Generator that draws from src; the same source
// state yields the same names (for tests). A nil src uses the global,
// randomly seeded source.
func NewGenerator(src rand.Source) *Generator {
	if src == nil {
		return &Generator{}
	}
	return &Generator{rand: rand.New(src)}
}

func (g *Generator) intN(n int) int {
	if g.rand == nil {
		return rand.IntN(n)
	}
	return g.rand.IntN(n)
}

// freshTries is how many random pairs Generate tries before it settles for
// a numeric suffix.
const freshTries = 8

// Generate returns a valid name such as "brave-otter" for which taken
// reports false (a nil taken accepts anything). It tries a few random pairs;
// if all are taken it appends "-2", "-3", ... to the first one. taken must
// describe a finite set. A Generator is not safe for concurrent use unless
// it uses the global source.
func (g *Generator) Generate(taken func(string) bool) string {
	if taken == nil {
		taken = func(string) bool { return false }
	}
	first := ""
	for i := 0; i < freshTries; i++ {
		name := adjectives[g.intN(len(adjectives))] + "-" + nouns[g.intN(len(nouns))]
		if !taken(name) {
			return name
		}
		if first == "" {
			first = name
		}
	}
	for n := 2; ; n++ {
		name := first + "-" + strconv.Itoa(n)
		if !taken(name) {
			return name
		}
	}
}

var global = NewGenerator(nil)

// Generate returns a random, valid name that taken reports as free; see
// Generator.Generate. It is safe for concurrent use.
func Generate(taken func(string) bool) string { return global.Generate(taken) }

var adjectives = []string{
	"able", "agile", "amber", "ample", "azure", "bold", "brave", "breezy",
	"bright", "brisk", "calm", "clever", "cosmic", "crisp", "curious", "daring",
	"deft", "eager", "fancy", "fast", "fierce", "fond", "frosty", "gentle",
	"glad", "golden", "grand", "happy", "hardy", "honest", "humble", "jolly",
	"keen", "kind", "lively", "lucky", "mellow", "merry", "mighty", "misty",
	"modest", "nimble", "noble", "proud", "quick", "quiet", "rapid", "ready",
	"silent", "sleek", "snowy", "solar", "spry", "steady", "sturdy", "sunny",
	"swift", "tidy", "vivid", "warm", "wild", "wise", "witty", "zesty",
}

var nouns = []string{
	"badger", "bear", "beaver", "bison", "cedar", "comet", "condor", "coral",
	"crane", "delta", "dune", "eagle", "falcon", "fern", "finch", "fjord",
	"fox", "gecko", "glacier", "hare", "hawk", "heron", "ibis", "jaguar",
	"koala", "lark", "lemur", "lynx", "maple", "marten", "meadow", "mesa",
	"moose", "newt", "oak", "orca", "osprey", "otter", "owl", "panda",
	"pine", "puffin", "quail", "raven", "reef", "river", "robin", "salmon",
	"seal", "sparrow", "spruce", "stork", "summit", "swan", "tapir", "tern",
	"tiger", "trout", "tundra", "walrus", "willow", "wolf", "wren", "yak",
}
