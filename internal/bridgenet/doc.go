// Package bridgenet builds the host side of banger's bridged network: the
// bridge the VMs share (EnsureBridge), a TAP device per VM (OpenTAP),
// IPv4 forwarding, and what the daemon and doctor need to know about the
// host's routes (RouteConflicts, LANPrefixes). It speaks netlink
// (vishvananda/netlink) and writes sysctl files; it runs no programs.
//
// Every function works in the network namespace of the calling thread,
// which is the daemon's. Names of links are at most 15 bytes (IFNAMSIZ-1);
// TAPName and MAC derive a VM's TAP name and MAC address from its id.
//
// TAP devices are not persistent: a TAP lives as long as a descriptor of it
// is open (the daemon's until it hands it to the VMM, then the VMM's), so a
// VM that exits, however it exits, takes its TAP with it. DeleteLink and
// Links serve reconciliation and cleanup of links a crash left behind.
package bridgenet
