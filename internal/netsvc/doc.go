// Package netsvc runs the services banger's bridge offers its VMs: a
// DHCPv4 server that answers each VM's MAC with the fixed lease the daemon
// allocated (the same address the agent configures at boot, so a DHCP
// client in the image, ifupdown's or NetworkManager's, keeps it), and a DNS
// forwarder on the bridge's address that relays the guests' queries to the
// host's resolvers, which may be a loopback stub such as systemd-resolved's
// 127.0.0.53 that guests couldn't reach.
//
// StartDHCP and StartDNS bind their sockets before they return (an error
// then means nothing runs) and serve until their context is cancelled;
// Service.Wait waits for them to have stopped. The DHCP codec (Packet,
// RFC 2131 and 2132) is written here on the standard library.
package netsvc
