package initramfs

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/hostfile"
	"github.com/bangerdev/banger/internal/kernelimage"
)

// DefaultModules are the kernel modules loaded before the root disk is
// mounted when Config.Modules is empty: the virtio-mmio bus (QEMU microvm,
// Firecracker), the root disk, the agent's transports (virtio-serial,
// vsock), the network (virtio_net, configured by the agent at boot;
// af_packet for the image's DHCP clients, built into most kernels) and the
// root filesystem. Names not present as modules are assumed built into the
// kernel.
var DefaultModules = []string{"virtio_mmio", "virtio_blk", "virtio_console", "virtio_net", "af_packet", "ext4", "vmw_vsock_virtio_transport",
	"button", "evdev"} // the ACPI power button, watched by the agent

// Options describes one initramfs.
type Options struct {
	// AgentBinary is the host path of the static guest agent; it becomes
	// /banger/init. Required.
	AgentBinary string
	// BaseInitrd is the image's own initrd (optional). Its bytes are copied
	// first, verbatim (compressed or not); banger's archive follows, so its
	// files win.
	BaseInitrd string
	// ModulesDir (optional) holds the kernel's modules: a release directory
	// with modules.dep (whatever its name), or a directory containing
	// <release>/, lib/modules/<release> or usr/lib/modules/<release> (see
	// ReleaseDir). When set, the wanted modules and their dependencies are
	// packed under lib/modules/<release>/, where <release> is the kernel's,
	// with a modules.dep covering exactly them, and Config.ModulesRelease
	// is set. When empty, the guest uses whatever modules the base initrd
	// holds, or treats the modules as built in.
	ModulesDir string
	// Kernel is the host path of the kernel image; with ModulesDir, its
	// release (read from the image, package kernelimage) picks and checks
	// the modules. Not needed when KernelRelease is given.
	Kernel string
	// KernelRelease is the kernel's release when known (uname -r); it
	// overrides reading it from Kernel.
	KernelRelease string
	// Config is written to /banger/agent.json. Modules defaults to
	// DefaultModules.
	Config agentproto.Config
}

// Build writes the initramfs to dst atomically (through dst+".tmp").
func Build(ctx context.Context, dst string, opts Options) (err error) {
	tmp := dst + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("create initramfs: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	bw := bufio.NewWriterSize(ctxWriter{ctx, f}, 1<<20)
	if opts.BaseInitrd != "" {
		if err := copyFile(bw, opts.BaseInitrd); err != nil {
			return err
		}
	}
	if err := Write(bw, opts); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write initramfs %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync initramfs %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close initramfs %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("install initramfs: %w", err)
	}
	return nil
}

// ctxWriter fails writes once ctx ended, so a cancelled build stops at
// its next write.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (w ctxWriter) Write(p []byte) (int, error) {
	if err := w.ctx.Err(); err != nil {
		return 0, fmt.Errorf("build initramfs: %w", err)
	}
	return w.w.Write(p)
}

func copyFile(w io.Writer, name string) error {
	f, err := hostfile.Open(name)
	if err != nil {
		return fmt.Errorf("open base initrd: %w", err)
	}
	defer f.Close()
	n, err := io.Copy(w, f)
	if err != nil {
		return fmt.Errorf("copy base initrd %s: %w", name, err)
	}
	// The kernel only recognises an uncompressed archive that follows
	// another one at a 4-byte boundary; it skips the zero padding.
	if pad := (4 - n%4) % 4; pad > 0 {
		if _, err := w.Write(make([]byte, pad)); err != nil {
			return fmt.Errorf("pad base initrd: %w", err)
		}
	}
	return nil
}

// Write writes banger's own archive (without BaseInitrd) to w.
func Write(w io.Writer, opts Options) error {
	if opts.AgentBinary == "" {
		return errors.New("initramfs: no agent binary given")
	}
	cfg := opts.Config
	if len(cfg.Modules) == 0 {
		cfg.Modules = append([]string(nil), DefaultModules...)
	}
	var mods *ModuleSet
	if opts.ModulesDir != "" {
		release := opts.KernelRelease
		if release == "" {
			if opts.Kernel == "" {
				return errors.New("initramfs: a modules dir needs the kernel (Options.Kernel) to know its release")
			}
			var err error
			if release, err = KernelReleaseOf(opts.Kernel); err != nil {
				return fmt.Errorf("initramfs: %w", err)
			}
		}
		var err error
		mods, err = ResolveModules(opts.ModulesDir, release, cfg.Modules)
		if err != nil {
			return fmt.Errorf("initramfs: resolve modules: %w", err)
		}
		cfg.ModulesRelease = mods.Release
	}
	cfgJSON, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return fmt.Errorf("initramfs: encode agent config: %w", err)
	}

	cw := NewWriter(w)
	for _, d := range []string{"banger", "dev", "proc", "sys", "newroot", "root"} {
		mode := os.FileMode(0o755)
		if d == "root" || d == "banger" {
			mode = 0o700
		}
		if err := cw.WriteDir(d, mode); err != nil {
			return err
		}
	}
	// PID 1 gets /dev/console as stdin/stdout/stderr only if the node
	// exists in the initramfs (devtmpfs is mounted later, by the agent).
	if err := cw.WriteCharDevice("dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	if err := writeHostFile(cw, path.Clean(agentproto.InitPath), 0o755, opts.AgentBinary); err != nil {
		return err
	}
	if err := cw.WriteFile(path.Clean(agentproto.ConfigPath), 0o600, cfgJSON); err != nil {
		return err
	}
	if mods != nil {
		base := "lib/modules/" + mods.Release
		for _, rel := range mods.Files {
			if err := writeBeneath(cw, base+"/"+rel, 0o644, mods.ReleaseDir, filepath.FromSlash(rel)); err != nil {
				return err
			}
		}
		if err := cw.WriteFile(base+"/modules.dep", 0o644, FormatModulesDep(mods.Files, mods.Deps)); err != nil {
			return err
		}
		if b := filepath.Join(mods.ReleaseDir, "modules.builtin"); fileExists(b) {
			if err := writeBeneath(cw, base+"/modules.builtin", 0o644, mods.ReleaseDir, "modules.builtin"); err != nil {
				return err
			}
		}
	}
	return cw.Close()
}

func writeHostFile(cw *Writer, name string, mode os.FileMode, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	return writeOpened(cw, name, mode, f)
}

// writeBeneath packs the file rel of the image's tree dir, refusing a
// symlink that leads out of dir (package hostfile): bangerd reads as root,
// and the guest must get only the image's own files.
func writeBeneath(cw *Writer, name string, mode os.FileMode, dir, rel string) error {
	f, err := hostfile.OpenBeneath(dir, rel)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	return writeOpened(cw, name, mode, f)
}

func writeOpened(cw *Writer, name string, mode os.FileMode, f *os.File) error {
	defer f.Close()
	src := f.Name()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("initramfs: %s is not a regular file", src)
	}
	return cw.WriteFileFrom(name, mode, st.Size(), f)
}

// KernelReleaseOf reads the release of the kernel image at path (see
// package kernelimage).
func KernelReleaseOf(path string) (string, error) {
	f, err := hostfile.Open(path)
	if err != nil {
		return "", fmt.Errorf("read kernel release: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("read kernel release: %w", err)
	}
	rel, err := kernelimage.Release(f, st.Size())
	if err != nil {
		return "", fmt.Errorf("read kernel release of %s: %w", path, err)
	}
	return rel, nil
}
