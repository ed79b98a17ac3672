// Package portfwd forwards host ports to a VM's ports in bridge mode.
//
// Parse reads a -p spec (`[HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp]`,
// Docker's syntax) into one Rule per port; Check tells, before anything is
// made, whether rules can be served (ports free, not privileged for a
// caller who isn't root, no duplicates). Proxy is a userland forwarder: per
// VM, a listener per rule on the host address, relaying TCP connections
// (spliced by the kernel, half-close kept) and UDP flows (one socket to the
// guest per client address, closed after an idle timeout) to the guest's
// address. The daemon starts a VM's forwarders once it is ready and stops
// them with it; in user-mode networking QEMU's hostfwd forwards instead.
//
// A Proxy works in the network namespace its goroutines run in: the
// daemon's.
package portfwd
