package daemon

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/client"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/kmod/kmodtest"
)

// clientEnv makes the test binary a banger client (see TestMain): it runs
// the calls of memberCalls against the socket named by the variable and
// prints one JSON outcome per call.
const clientEnv = "BANGER_DAEMON_TEST_CLIENT"

func TestMain(m *testing.M) {
	if sock := os.Getenv(clientEnv); sock != "" {
		os.Exit(runMemberCalls(sock, os.Args[len(os.Args)-1], os.Stdout))
	}
	os.Exit(m.Run())
}

// callOutcome is what the client process reports for one call.
type callOutcome struct {
	Call string `json:"call"`
	Code string `json:"code"` // errdefs code, "" for success
	Err  string `json:"err"`
}

// runMemberCalls runs, as whoever this process is, the calls a member of
// socket_group might try. rootfs is a host file to register.
func runMemberCalls(sock, rootfs string, out io.Writer) int {
	ctx := context.Background()
	c := client.New(sock)
	enc := json.NewEncoder(out)
	report := func(call string, err error) {
		o := callOutcome{Call: call}
		if err != nil {
			o.Code, o.Err = errdefs.Code(err), err.Error()
		}
		_ = enc.Encode(o)
	}
	_, err := c.ImageList(ctx)
	report("image ls", err)
	_, err = c.ImageRegister(ctx, api.ImageRegisterParams{Name: "mine", Rootfs: rootfs, Kernel: "/etc/shadow"})
	report("image register", err)
	_, err = c.ImagePromote(ctx, "default", nil)
	report("image promote", err)
	report("image rm", c.ImageRemove(ctx, "default"))
	_, err = c.VMCreate(ctx, api.VMCreateParams{Name: "members-vm", Start: true}, nil)
	report("vm create --start", err)
	_, err = c.VMStop(ctx, api.VMStopParams{Name: "members-vm"}, nil)
	report("vm stop", err)
	_, err = c.VMStart(ctx, api.VMStartParams{Name: "members-vm"}, nil)
	report("vm start", err)
	report("vm rm -f", c.VMRemove(ctx, api.VMRemoveParams{Name: "members-vm", Force: true}))
	return 0
}

// A member of socket_group (a supplementary group, as login sessions
// have it) may create, start, stop and remove VMs, but not register,
// promote or remove images: those read host paths with the daemon's
// privileges, or change images other users' VMs are made from.
func TestSocketGroupMemberCannotManageImages(t *testing.T) {
	t.Parallel()
	if os.Getuid() != 0 {
		t.Skip("needs root to run a client as another user")
	}
	g, err := user.LookupGroup("daemon")
	if err != nil {
		t.Skip("no group named daemon on this host")
	}
	gid, _ := strconv.Atoi(g.Gid)
	e, _ := setup(t, func(c *config.Daemon) { c.SocketGroup = "daemon" })
	// The member reaches the socket (0660, group daemon) through the
	// test's directory, and runs a copy of this test binary.
	if err := os.Chmod(e.dir, 0o711); err != nil {
		t.Fatal(err)
	}
	// The copy is written by another process: a file this process had open
	// for writing could be inherited by a concurrent test's fork, and then
	// exec would fail with "text file busy".
	bin := filepath.Join(e.dir, "client.test")
	if out, err := exec.Command("install", "-m", "0755", os.Args[0], bin).CombinedOutput(); err != nil {
		t.Fatalf("copy the test binary: %v: %s", err, out)
	}
	const uid = 61234
	cmd := exec.Command(bin, "-test.run=^$", e.rootfs)
	cmd.Env = append(os.Environ(), clientEnv+"="+e.cfg.SocketPath)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid, Groups: []uint32{uint32(gid)}}}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("client as uid %d: %v\n%s", uid, err, stderr.String())
	}
	got := map[string]callOutcome{}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var o callOutcome
		if err := dec.Decode(&o); err != nil {
			t.Fatalf("client output %q: %v", out, err)
		}
		got[o.Call] = o
	}
	want := map[string]string{
		"image ls": "", "image register": api.CodePermissionDenied, "image promote": api.CodePermissionDenied,
		"image rm": api.CodePermissionDenied, "vm create --start": "", "vm stop": "", "vm start": "", "vm rm -f": "",
	}
	for call, code := range want {
		o, ok := got[call]
		switch {
		case !ok:
			t.Errorf("%s: no outcome reported", call)
		case o.Code != code:
			t.Errorf("%s by a socket_group member: code %q (%s), want %q", call, o.Code, o.Err, code)
		case code == api.CodePermissionDenied && !strings.Contains(o.Err, "sudo"):
			t.Errorf("%s refused without saying to use sudo: %s", call, o.Err)
		}
	}
	ctx := testCtx(t)
	d := client.New(e.cfg.SocketPath)
	ims, err := d.ImageList(ctx)
	if err != nil || len(ims) != 1 || ims[0].Name != "default" || ims[0].Managed {
		t.Errorf("images after the member's calls: %+v, %v; want only the unmanaged default", ims, err)
	}
}

// image register refuses a modules tree whose module is a symlink out of
// the tree (here to a root-only file): the file would be packed into a
// guest's initramfs.
func TestRegisterRefusesModuleSymlinkOut(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	secret := writeFile(t, filepath.Join(e.dir, "secret", "shadow"), []byte("root:$y$SECRET:19000::::::"))
	if err := os.Chmod(secret, 0o600); err != nil {
		t.Fatal(err)
	}
	mods := filepath.Join(e.dir, "src", "modules")
	kmodtest.WriteRelease(t, mods, "6.1.0-test")
	ko := filepath.Join(mods, "kernel", "drivers", "block", "virtio_blk.ko")
	if err := os.Remove(ko); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, ko); err != nil {
		t.Fatal(err)
	}
	kernel := writeFile(t, filepath.Join(e.dir, "src", "vmlinuz"), kmodtest.Kernel("6.1.0-test"))
	_, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "leaky", Rootfs: e.rootfs, Kernel: kernel, ModulesDir: mods})
	wireErr(t, "register with a module linking out of the tree", err, errdefs.ErrInvalid)
	if !strings.Contains(err.Error(), "virtio_blk.ko") || !strings.Contains(err.Error(), "symlink leads outside") {
		t.Errorf("error %q does not name the module and the symlink", err)
	}
}
