//go:build e2e

// Package bench measures banger against its goals (run with make bench):
//
//	(a) boot to agent-ready through banger vs a bare qemu-system-x86_64 command
//	    line booting the same kernel, initrd and root disk to the same readiness
//	    signal (the guest agent's SSH handshake and info reply), same run;
//	    goal: ratio <= 1.10
//	(b) vm create for a 1 GiB image vs a 20 GiB image; goal: ratio <= 1.2
//	(c) bangerd's resident memory idle and with 20 VMs recorded; goal < 40 MiB
package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/client"
	"github.com/bangerdev/banger/test/harness"
)

const samples = 5

func setup(b *testing.B) (*harness.Env, string) {
	binDir, imageDir, err := harness.Locate()
	if err != nil {
		b.Fatal(err)
	}
	return harness.New(b, binDir, imageDir), imageDir
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// BenchmarkBootToReady is goal (a).
func BenchmarkBootToReady(b *testing.B) {
	e, imageDir := setup(b)
	e.Must("image", "register", "debian", "--rootfs", filepath.Join(imageDir, "rootfs.ext4"),
		"--kernel", filepath.Join(imageDir, "vmlinuz"), "--initrd", filepath.Join(imageDir, "initrd.img"))
	c := client.New(e.Socket())
	ctx := context.Background()
	vm, err := c.VMCreate(ctx, api.VMCreateParams{Name: "bench", Image: "debian"}, nil)
	if err != nil {
		b.Fatal(err)
	}
	var viaBanger, bare []time.Duration
	for i := 0; i < samples; i++ {
		start := time.Now()
		if _, err := c.VMStart(ctx, api.VMStartParams{Name: "bench"}, nil); err != nil {
			b.Fatal(err)
		}
		viaBanger = append(viaBanger, time.Since(start))
		cmdline := appendArg(b, vm.Dir)
		// Keep the initrd banger built for this boot for the bare run.
		initrd := filepath.Join(b.TempDir(), "initrd.img")
		if err := exec.Command("cp", filepath.Join(vm.Dir, "initrd.img"), initrd).Run(); err != nil {
			b.Fatal(err)
		}
		if _, err := c.VMKill(ctx, "bench"); err != nil {
			b.Fatal(err)
		}
		bare = append(bare, bareBoot(b, imageDir, vm.Dir, initrd, cmdline))
	}
	mb, mq := median(viaBanger), median(bare)
	b.ReportMetric(float64(mb.Milliseconds()), "banger-ms")
	b.ReportMetric(float64(mq.Milliseconds()), "bare-qemu-ms")
	b.ReportMetric(float64(mb)/float64(mq), "ratio")
	fmt.Printf("boot-to-ready: banger %v (samples %v), bare qemu %v (samples %v), ratio %.3f (goal <= 1.10)\n",
		mb, viaBanger, mq, bare, float64(mb)/float64(mq))
}

// appendArg returns the kernel command line of the QEMU running in vmDir
// (the bare run must boot with the same one: it carries tsc_early_khz, which
// TCG boots need on a busy host).
func appendArg(b *testing.B, vmDir string) string {
	pid, err := os.ReadFile(filepath.Join(vmDir, "qemu.pid"))
	if err != nil {
		b.Fatal(err)
	}
	raw, err := os.ReadFile("/proc/" + strings.TrimSpace(string(pid)) + "/cmdline")
	if err != nil {
		b.Fatal(err)
	}
	args := strings.Split(string(raw), "\x00")
	for i, a := range args {
		if a == "-append" && i+1 < len(args) {
			if !strings.Contains(args[i+1], "rdinit="+agentproto.InitPath) {
				b.Fatalf("unexpected kernel command line %q", args[i+1])
			}
			return args[i+1]
		}
	}
	b.Fatal("no -append in qemu's command line")
	return ""
}

// bareBoot boots QEMU by hand with the same kernel, initrd, disk and
// devices, and waits for the same signal: the agent's SSH handshake and
// its info reply.
func bareBoot(b *testing.B, imageDir, vmDir, initrd, cmdline string) time.Duration {
	dir, err := os.MkdirTemp("/tmp", "bare")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	overlay := filepath.Join(dir, "root.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
		filepath.Join(imageDir, "rootfs.ext4"), overlay).CombinedOutput(); err != nil {
		b.Fatalf("qemu-img: %v: %s", err, out)
	}
	sock := filepath.Join(dir, "agent.sock")
	hostPub, _ := os.ReadFile(filepath.Join(vmDir, "agent-host-key.pub"))
	clientKey, _ := os.ReadFile(filepath.Join(vmDir, "agent-client-key"))
	keys, err := agent.ParseKeys(string(hostPub), string(clientKey))
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	cmd := exec.Command("qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-kernel", filepath.Join(imageDir, "vmlinuz"), "-initrd", initrd,
		"-append", cmdline,
		"-chardev", "file,id=console,path="+filepath.Join(dir, "console.log"), "-serial", "chardev:console",
		"-drive", "id=root,file="+overlay+",format=qcow2,if=none", "-device", "virtio-blk-device,drive=root",
		"-device", "virtio-serial-device", "-chardev", "socket,id=agent,path="+sock+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name="+agentproto.VirtioPortName)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dial := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}
	ac, err := agent.WaitReady(ctx, dial, keys, nil)
	if err != nil {
		b.Fatalf("bare boot: %v", err)
	}
	defer ac.Close()
	if _, err := ac.Info(ctx); err != nil {
		b.Fatal(err)
	}
	return time.Since(start)
}

// makeImage makes a sparse ext4 image of the given size.
func makeImage(b *testing.B, path string, size int64) {
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		b.Fatal(err)
	}
	f.Close()
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", path).CombinedOutput(); err != nil {
		b.Fatalf("mkfs: %v: %s", err, out)
	}
}

// BenchmarkCreate is goal (b), followed by goal (c) on the same daemon.
func BenchmarkCreate(b *testing.B) {
	e, imageDir := setup(b)
	dir := b.TempDir()
	c := client.New(e.Socket())
	ctx := context.Background()
	rss := func() int64 {
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", e.DaemonPID()))
		if err != nil {
			b.Fatal(err)
		}
		for _, l := range strings.Split(string(st), "\n") {
			if strings.HasPrefix(l, "VmRSS:") {
				var kb int64
				fmt.Sscan(strings.Fields(l)[1], &kb)
				return kb * 1024
			}
		}
		return 0
	}
	idle := rss()
	for _, sz := range []struct {
		name string
		size int64
	}{{"small", 1 << 30}, {"large", 20 << 30}} {
		p := filepath.Join(dir, sz.name+".ext4")
		makeImage(b, p, sz.size)
		e.Must("image", "register", sz.name, "--rootfs", p, "--kernel", filepath.Join(imageDir, "vmlinuz"))
	}
	times := map[string][]time.Duration{}
	for i := 0; i < 5; i++ {
		for _, im := range []string{"small", "large"} {
			start := time.Now()
			vm, err := c.VMCreate(ctx, api.VMCreateParams{Image: im}, nil)
			if err != nil {
				b.Fatal(err)
			}
			times[im] = append(times[im], time.Since(start))
			if err := c.VMRemove(ctx, api.VMRemoveParams{Name: vm.Name}); err != nil {
				b.Fatal(err)
			}
		}
	}
	ms, ml := median(times["small"]), median(times["large"])
	ratio := float64(ml) / float64(ms)
	b.ReportMetric(float64(ms.Microseconds())/1000, "create-1GiB-ms")
	b.ReportMetric(float64(ml.Microseconds())/1000, "create-20GiB-ms")
	b.ReportMetric(ratio, "ratio")
	fmt.Printf("vm create: 1 GiB image %v, 20 GiB image %v, ratio %.3f (goal <= 1.2)\n", ms, ml, ratio)

	for i := 0; i < 20; i++ {
		if _, err := c.VMCreate(ctx, api.VMCreateParams{Image: "small"}, nil); err != nil {
			b.Fatal(err)
		}
	}
	if vms, err := c.VMList(ctx); err != nil || len(vms) != 20 {
		b.Fatalf("vm list: %d, %v", len(vms), err)
	}
	with20 := rss()
	b.ReportMetric(float64(idle)/(1<<20), "rss-idle-MiB")
	b.ReportMetric(float64(with20)/(1<<20), "rss-20vms-MiB")
	fmt.Printf("bangerd RSS: idle %.1f MiB, with 20 VMs recorded %.1f MiB (goal < 40 MiB)\n",
		float64(idle)/(1<<20), float64(with20)/(1<<20))
}
