package imagefile

import (
	"errors"
	"path/filepath"

	"github.com/bangerdev/banger/internal/hostfile"
	"github.com/bangerdev/banger/internal/initramfs"
	"github.com/bangerdev/banger/internal/kernelimage"
)

// checkModules checks that the modules directory can serve the kernel: the
// kernel's release is read from the kernel image itself (bzImage header,
// ELF linux_banner), and the modules directory must hold the modules of
// that release (see kmod.FindRelease), whatever the directory is called,
// and every module a VM gets from it must be there and built for it.
func checkModules(kernel, modulesDir string) error {
	kernel, modulesDir = filepath.Clean(kernel), filepath.Clean(modulesDir)
	rel, err := KernelRelease(kernel)
	if err != nil {
		reason := "can't tell which modules it needs: " + errReason(err)
		if errors.Is(err, kernelimage.ErrNoRelease) {
			return &ArtifactError{Field: FieldModules, Path: modulesDir, Reason: "the kernel " + kernel + " does not say its release, so its modules can't be matched: " + errReason(err), Err: ErrInvalid}
		}
		return &ArtifactError{Field: FieldModules, Path: modulesDir, Reason: reason, Err: err}
	}
	// The modules a VM's initramfs gets, as startVM packs them.
	if _, err := initramfs.ResolveModules(modulesDir, rel, initramfs.DefaultModules); err != nil {
		return &ArtifactError{Field: FieldModules, Path: modulesDir, Reason: err.Error(), Err: errors.Join(ErrInvalid, err)}
	}
	return nil
}

// KernelRelease returns the release (uname -r) of the kernel image at p,
// read from the image (see package kernelimage).
func KernelRelease(p string) (string, error) {
	f, err := hostfile.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", err
	}
	return kernelimage.Release(f, st.Size())
}
