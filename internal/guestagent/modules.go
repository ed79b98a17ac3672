package guestagent

import "path"

// Kernel module resolution inside the initramfs uses package kmod (shared
// with the host, standard library only); only the mapping of modules.dep
// entries to files in the guest is here.

// modulePath turns a modules.dep entry into an absolute path: relative
// entries are relative to the release directory.
func modulePath(releaseDir, p string) string {
	if path.IsAbs(p) {
		return p
	}
	return path.Join(releaseDir, p)
}
