// Package initramfs builds the initramfs banger boots every VM with: the
// static guest agent as rdinit, the kernel modules the agent needs before it
// can mount the root disk, and the per-VM agent configuration. An image's own
// initrd, if any, is placed first (the kernel unpacks concatenated archives
// in order, later files win), so banger never needs images to be prepared.
package initramfs
