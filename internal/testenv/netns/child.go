package netns

import (
	"context"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// childEnv marks a test binary that RunTest started inside a namespace.
const childEnv = "BANGER_NETNS_CHILD"

// InChild reports whether this test binary is the child RunTest started
// inside a namespace. Tests whose code starts goroutines that open sockets
// (servers, proxies) can't run through Do, since only Do's own thread is in
// the namespace; they run whole inside it instead:
//
//	func TestX(t *testing.T) {
//		if !netns.InChild() {
//			ns := netns.New(t, "bgx")
//			ns.Run(t, "ip", "addr", "add", ...) // set-up
//			ns.RunTest(t)
//			return
//		}
//		// the test's body, every thread inside the namespace
//	}
func InChild() bool { return os.Getenv(childEnv) != "" }

// RunTest runs t again, alone, in a child process of the test binary inside
// n (through `ip netns exec`) with env added to its environment, and ends t
// as the child's test ended: failed with its output, skipped, or passed.
func (n *NS) RunTest(t *testing.T, env ...string) {
	t.Helper()
	parts := strings.Split(t.Name(), "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	timeout := 2 * time.Minute
	if d, ok := t.Deadline(); ok {
		timeout = time.Until(d) - 5*time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := n.Command(ctx, os.Args[0], "-test.run="+strings.Join(parts, "/"), "-test.count=1", "-test.v",
		"-test.timeout="+timeout.String())
	cmd.Env = append(append(os.Environ(), childEnv+"="+n.Name), env...)
	out, err := cmd.CombinedOutput()
	switch {
	case err != nil:
		t.Fatalf("%s inside netns %s: %v\n%s", t.Name(), n.Name, err, out)
	case strings.Contains(string(out), "--- SKIP: "+t.Name()):
		t.Skipf("inside netns %s:\n%s", n.Name, out)
	case !strings.Contains(string(out), "--- PASS: "+t.Name()):
		t.Fatalf("%s didn't run inside netns %s:\n%s", t.Name(), n.Name, out)
	case testing.Verbose():
		t.Logf("inside netns %s:\n%s", n.Name, out)
	}
}
