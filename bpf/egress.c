/* egress.c - TC egress guard: drop kernel-made RST/ACK leaving from a tunnel port.
 *
 * With steering working the kernel never sees a tunnel segment, so it has nothing to answer
 * and guard_dropped stays 0; the counter is the proof `rsockctl status` shows.  Our own
 * fake-TCP segments carry SO_MARK = config.mark and pass.  Everything else passes too, and so
 * does every forwarded segment: on a router, other hosts' connections on these ports are theirs.
 *
 * Match, mirrored from ingress.c (docs/design.md): server  ports[sport] & PORT_SERVER;
 *                                                  client  ports[sport] & PORT_LOCAL and
 *                                                          ports[dport] & PORT_PEER.
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
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		/* the kernel's RST/ACK carry no extension headers */
		if (bpf_skb_load_bytes_relative(skb, 0, &ip6, sizeof(ip6), BPF_HDR_START_NET))
			return TC_ACT_OK;
		if (ip6.nexthdr != IPPROTO_TCP)
			return TC_ACT_OK;
		l4off = sizeof(ip6);
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
	rsockd_count(RSOCKD_STAT_GUARD_DROPPED);
	return TC_ACT_SHOT;
}
