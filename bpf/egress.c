/* egress.c - TC egress guard: drop kernel-made RST/ACK of rsockd's connections.
 *
 * With steering working the kernel never sees a segment of rsockd's connections, so it has
 * nothing to answer and guard_dropped stays 0; the counter is the proof `rsockctl status`
 * shows.  Our own fake-TCP segments carry SO_MARK = config.mark and pass.  Everything else
 * passes too: every forwarded segment (on a router, other hosts' connections on these ports
 * are theirs), and every kernel segment of another connection on a tunnel port (port sharing:
 * a real service's SYN-ACK, the kernel's RST for a port with nothing bound).
 *
 * Match, mirrored from ingress.c (docs/design.md): server  ports[sport] & PORT_SERVER;
 *                                                  client  ports[sport] & PORT_LOCAL and
 *                                                          ports[dport] & PORT_PEER;
 * then the reversed 4-tuple (the peer as the source) must be in conns.
 * Headers are read relative to the network header, so the guard works on any link type.
 * Attached with cls_bpf in direct-action mode on the clsact egress hook.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>

#include "rsockd.h"

int rsockd_guard(struct __sk_buff *skb)
{
	struct rsockd_config *cfg;
	struct rsockd_conn key = {};
	struct tcphdr th;
	__u32 l4off, sflags;
	int zero = 0;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes_relative(skb, 0, &ip, sizeof(ip), BPF_HDR_START_NET))
			return TC_ACT_OK;
		if (ip.protocol != IPPROTO_TCP || (ip.frag_off & bpf_htons(0x1fff)))
			return TC_ACT_OK;
		l4off = ip.ihl * 4;
		rsockd_map4(key.saddr, ip.daddr);  /* reversed: as the peer's segments carry it */
		rsockd_map4(key.daddr, ip.saddr);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		/* the kernel's RST/ACK carry no extension headers */
		if (bpf_skb_load_bytes_relative(skb, 0, &ip6, sizeof(ip6), BPF_HDR_START_NET))
			return TC_ACT_OK;
		if (ip6.nexthdr != IPPROTO_TCP)
			return TC_ACT_OK;
		l4off = sizeof(ip6);
		__builtin_memcpy(key.saddr, &ip6.daddr, sizeof(key.saddr));
		__builtin_memcpy(key.daddr, &ip6.saddr, sizeof(key.daddr));
	} else {
		return TC_ACT_OK;
	}

	if (bpf_skb_load_bytes_relative(skb, l4off, &th, sizeof(th), BPF_HDR_START_NET))
		return TC_ACT_OK;
	if (!th.rst && !th.ack)
		return TC_ACT_OK;
	/* Forwarded, not made here: another host's connection routed through this one (the
	 * kernel's own answers are new packets, received on no interface). */
	if (skb->ingress_ifindex)
		return TC_ACT_OK;
	sflags = rsockd_port_flags(th.source);
	if (!(sflags & RSOCKD_PORT_SERVER) &&
	    !((sflags & RSOCKD_PORT_LOCAL) && (rsockd_port_flags(th.dest) & RSOCKD_PORT_PEER)))
		return TC_ACT_OK;
	cfg = config.lookup(&zero);
	if (!cfg || skb->mark == cfg->mark)
		return TC_ACT_OK;
	key.sport = th.dest;
	key.dport = th.source;
	if (!conns.lookup(&key))
		return TC_ACT_OK;  /* not one of ours: the kernel's own connection, or its answer to a probe */
	rsockd_count(RSOCKD_STAT_GUARD_DROPPED);
	return TC_ACT_SHOT;
}
