package guestagent

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// installEarlyBootUnit prepares the early boot signal of a systemd guest
// (see earlyboot.go), in the new root, before PID 1 is handed to systemd.
// The unit goes under /run (mountRun), so it lives only for this boot and
// the image's disk is not touched.
func installEarlyBootUnit() error {
	if err := mountRun(); err != nil {
		return err
	}
	wants := filepath.Join(systemdRuntimeUnits, "sysinit.target.wants")
	for _, d := range []string{earlyBootDir, wants} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	unit := filepath.Join(systemdRuntimeUnits, earlyBootUnitName)
	if err := os.WriteFile(unit, []byte(earlyBootUnit()), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", unit, err)
	}
	link := filepath.Join(wants, earlyBootUnitName)
	if err := os.Symlink("../"+earlyBootUnitName, link); err != nil && !os.IsExist(err) {
		return fmt.Errorf("enable %s: %w", earlyBootUnitName, err)
	}
	return nil
}

// mountRun makes /run a tmpfs unless it is a mount point already (as
// initramfs-tools does; systemd keeps a /run that is already mounted), so
// what init puts there before systemd starts (the early boot unit, the
// network managers' runtime files) survives into the boot and never
// reaches the image's disk.
func mountRun() error {
	var root, run unix.Stat_t
	if err := unix.Stat("/", &root); err != nil {
		return fmt.Errorf("stat /: %w", err)
	}
	if err := os.MkdirAll("/run", 0o755); err != nil {
		return fmt.Errorf("create /run: %w", err)
	}
	if err := unix.Stat("/run", &run); err != nil {
		return fmt.Errorf("stat /run: %w", err)
	}
	if run.Dev == root.Dev {
		if err := unix.Mount("tmpfs", "/run", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755,size=20%,nr_inodes=800k"); err != nil {
			return fmt.Errorf("mount tmpfs on /run: %w", err)
		}
	}
	return nil
}
