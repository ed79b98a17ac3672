//go:build e2e

// Package bench measures banger against its goals (run with make bench):
//
//	(a) boot to ready through banger vs a bare qemu-system-x86_64 command
//	    line booting the same kernel, initrd and root disk to the same readiness
//	    signal (the guest agent's SSH handshake, then its info reporting early
//	    boot done), same run; goal: ratio <= 1.10. The same run also reports
//	    what waiting for early boot costs: the time to the agent's first
//	    answer against the time to ready, from banger's boot timeline and from
//	    the bare boot.
//	(b) vm create for a 1 GiB image vs a 20 GiB image; goal: ratio <= 1.2
//	(c) bangerd's resident memory idle and with 20 VMs recorded; goal < 40 MiB
//	(d) boot to ready with QEMU confined (the default) vs unconfined
//	    (vmm_confine = false), two daemons in the same run, boots
//	    alternating; goal: ratio <= 1.02
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
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/qemu"
	"github.com/bangerdev/banger/test/harness"
)

const samples = 5

func setup(b *testing.B) (*harness.Env, string) {
	binDir, imageDir, err := harness.Locate()
	if err != nil {
		b.Fatal(err)
	}
	// The benchmarks measure boots, they do not test timeouts: a busy
	// host (TCG) must not end a sample at the default ready_timeout.
	return harness.NewWithConfig(b, binDir, imageDir, "ready_timeout = \"10m\"\n"), imageDir
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
	var viaBanger, bare, bangerAgent, bangerReady, bareAgent []time.Duration
	for i := 0; i < samples; i++ {
		start := time.Now()
		started, err := c.VMStart(ctx, api.VMStartParams{Name: "bench"}, nil)
		if err != nil {
			b.Fatal(err)
		}
		viaBanger = append(viaBanger, time.Since(start))
		agentAt, readyAt := timelineMarks(b, started.BootTimeline)
		bangerAgent, bangerReady = append(bangerAgent, agentAt), append(bangerReady, readyAt)
		cmdline := appendArg(b, vm.Dir)
		// Keep the initrd banger built for this boot for the bare run.
		initrd := filepath.Join(b.TempDir(), "initrd.img")
		if err := exec.Command("cp", filepath.Join(vm.Dir, "initrd.img"), initrd).Run(); err != nil {
			b.Fatal(err)
		}
		if _, err := c.VMKill(ctx, "bench"); err != nil {
			b.Fatal(err)
		}
		agentAt, readyAt = bareBoot(b, imageDir, vm.Dir, initrd, cmdline)
		bare, bareAgent = append(bare, readyAt), append(bareAgent, agentAt)
	}
	mb, mq := median(viaBanger), median(bare)
	b.ReportMetric(float64(mb.Milliseconds()), "banger-ms")
	b.ReportMetric(float64(mq.Milliseconds()), "bare-qemu-ms")
	b.ReportMetric(float64(mb)/float64(mq), "ratio")
	fmt.Printf("boot-to-ready: banger %v (samples %v), bare qemu %v (samples %v), ratio %.3f (goal <= 1.10)\n",
		mb, viaBanger, mq, bare, float64(mb)/float64(mq))
	ma, mr, mba := median(bangerAgent), median(bangerReady), median(bareAgent)
	b.ReportMetric(float64(ma.Milliseconds()), "banger-agent-answers-ms")
	b.ReportMetric(float64(mr.Milliseconds()), "banger-early-boot-done-ms")
	b.ReportMetric(float64(mr)/float64(ma), "early-boot-wait-ratio")
	b.ReportMetric(float64(mba.Milliseconds()), "bare-agent-answers-ms")
	fmt.Printf("early boot wait (systemd image): banger start to agent answers %v (samples %v), to early boot done %v (samples %v): +%v, ratio %.3f; bare qemu: agent answers %v, early boot done %v\n",
		ma, bangerAgent, mr, bangerReady, mr-ma, float64(mr)/float64(ma), mba, mq)
}

// timelineMarks returns when, in a start's boot timeline (clone excluded),
// the agent first answered and when early boot was done.
func timelineMarks(b *testing.B, tl *api.BootTimeline) (agentAt, readyAt time.Duration) {
	if tl == nil {
		b.Fatal("vm start returned no boot timeline")
	}
	var sum float64
	for _, p := range tl.Phases {
		if p.Name == api.PhaseClone {
			continue
		}
		sum += p.DurationMS
		switch p.Name {
		case api.PhaseKernelToAgent:
			agentAt = time.Duration(sum * float64(time.Millisecond))
		case api.PhaseEarlyBoot:
			readyAt = time.Duration(sum * float64(time.Millisecond))
		}
	}
	if agentAt == 0 || readyAt == 0 {
		b.Fatalf("boot timeline without the agent or early boot phases: %+v", tl.Phases)
	}
	return agentAt, readyAt
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
// devices, and waits for the same signal: the agent's SSH handshake, then
// its info reporting early boot done. It returns when the agent first
// answered and when early boot was done.
func bareBoot(b *testing.B, imageDir, vmDir, initrd, cmdline string) (agentAt, readyAt time.Duration) {
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
	cmd := bareQEMU(imageDir, initrd, cmdline, dir, overlay, sock)
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
	agentAt = time.Since(start)
	for {
		info, err := ac.Info(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if info.EarlyBootDone {
			return agentAt, time.Since(start)
		}
		select {
		case <-ctx.Done():
			b.Fatalf("bare boot: early boot not done: %v", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// bareQEMU is the command line of a bare QEMU booting banger's kernel,
// initrd and command line with the same devices as banger's VMs: console
// log in dir, overlay as the root disk, the agent's virtio-serial port on
// sock; extra adds arguments (more ports).
func bareQEMU(imageDir, initrd, cmdline, dir, overlay, sock string, extra ...string) *exec.Cmd {
	args := []string{"-M", "microvm", "-accel", "tcg", "-cpu", qemu.CPUModel(vmm.AccelTCG), "-smp", "2", "-m", "1024",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-kernel", filepath.Join(imageDir, "vmlinuz"), "-initrd", initrd,
		"-append", cmdline,
		"-chardev", "file,id=console,path=" + filepath.Join(dir, "console.log"), "-serial", "chardev:console",
		"-drive", "id=root,file=" + overlay + ",format=qcow2,if=none", "-device", "virtio-blk-device,drive=root",
		"-device", "virtio-serial-device", "-chardev", "socket,id=agent,path=" + sock + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=" + agentproto.VirtioPortName}
	return exec.Command("qemu-system-x86_64", append(args, extra...)...)
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

// BenchmarkConfinement is goal (d): what confining QEMU (another user,
// seccomp, a cgroup, descriptors) costs a boot to ready.
func BenchmarkConfinement(b *testing.B) {
	binDir, imageDir, err := harness.Locate()
	if err != nil {
		b.Fatal(err)
	}
	confined := harness.New(b, binDir, imageDir)
	unconfined := harness.NewWithConfig(b, binDir, imageDir, "vmm_confine = false\n")
	ctx := context.Background()
	var clients []*client.Client
	for _, e := range []*harness.Env{confined, unconfined} {
		e.Must("image", "register", "debian", "--rootfs", filepath.Join(imageDir, "rootfs.ext4"),
			"--kernel", filepath.Join(imageDir, "vmlinuz"), "--initrd", filepath.Join(imageDir, "initrd.img"))
		c := client.New(e.Socket())
		if _, err := c.VMCreate(ctx, api.VMCreateParams{Name: "bench", Image: "debian"}, nil); err != nil {
			b.Fatal(err)
		}
		clients = append(clients, c)
	}
	times := make([][]time.Duration, 2)
	for i := 0; i < samples; i++ {
		// Alternate which goes first, so that neither always boots
		// right after the other.
		order := []int{0, 1}
		if i%2 == 1 {
			order = []int{1, 0}
		}
		for _, k := range order {
			start := time.Now()
			vm, err := clients[k].VMStart(ctx, api.VMStartParams{Name: "bench"}, nil)
			if err != nil {
				b.Fatal(err)
			}
			times[k] = append(times[k], time.Since(start))
			if (vm.Confinement != nil) != (k == 0) {
				b.Fatalf("daemon %d: confinement %+v", k, vm.Confinement)
			}
			if _, err := clients[k].VMKill(ctx, "bench"); err != nil {
				b.Fatal(err)
			}
		}
	}
	mc, mu := median(times[0]), median(times[1])
	b.ReportMetric(float64(mc.Milliseconds()), "confined-ms")
	b.ReportMetric(float64(mu.Milliseconds()), "unconfined-ms")
	b.ReportMetric(float64(mc)/float64(mu), "ratio")
	fmt.Printf("boot-to-ready confined %v (samples %v), unconfined %v (samples %v), ratio %.3f (goal <= 1.02)\n",
		mc, times[0], mu, times[1], float64(mc)/float64(mu))
}
