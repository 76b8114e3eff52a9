/* ingress.c - XDP: rewrite tunnel TCP segments in place into UDP datagrams.
 *
 * A matching segment's 20-byte TCP header becomes an 8-byte UDP header followed by 12 bytes of
 * metadata, exactly as rsockd.packet.steer_rewrite() states it (docs/design.md, "Steered segment
 * layout"):
 *
 *   TCP  sport dport seq(4)       ack(4)       offflags window csum urgent | options payload
 *   UDP  sport dport len  csum    offflags window seq(4)      ack(4)       | options payload
 *
 * The packet length does not change; the kernel then delivers the datagram to the daemon's UDP
 * socket on the same port, so TCP never sees it and never answers.  Every word keeps its 16-bit
 * alignment, so moving seq/ack/offflags/window leaves the one's-complement sum unchanged: the UDP
 * checksum follows from the TCP checksum by RFC 1624 (pseudo-header protocol 6 -> 17, words
 * {checksum, urgent} -> {length, checksum}), and is valid exactly when the TCP checksum was.
 *
 * Match (docs/design.md): server  ports[dport] & PORT_SERVER;
 *                        client  ports[dport] & PORT_LOCAL, ports[sport] & PORT_PEER, source in peers.
 * Only segments addressed to this host match: on a host that forwards (a router, a VM or
 * container host), a segment routed through it to another host's port in the range is left to
 * the kernel and counted passed_transit.  The kernel's own routing decides (bpf_fib_lookup).
 * Matching segments the program will not rewrite go to the kernel unchanged and are counted:
 * IPv4 options / IPv6 extension headers, first fragments, a data offset below 5 or past the end.
 * Non-first fragments carry no ports and pass uncounted.  Ethernet links only.
 *
 * Port sharing (docs/security.md, "What an active prober sees"): of the segments that match,
 * only rsockd's own connections are rewritten; every other one goes to the kernel unchanged
 * (counted passed_probe), which answers it as it answers any port: a real service bound there
 * (nginx on 443) gets its connections, a port with nothing bound answers RST.
 *   server  a SYN (ACK clear) is rsockd's when its TSval is the SYN tag of its ISN under
 *           syntag[0]'s key for one of the slots beside syntag[0].slot (rsockd_syn_tag_ok;
 *           rsockd/core/syntag.py) and no other 4-tuple sent that tag first (the seen map);
 *           its 4-tuple then goes into conns.  Any other segment is rsockd's when its 4-tuple
 *           is in conns.
 *   client  a segment is rsockd's when its 4-tuple is in conns (the daemon puts each of its
 *           connections there before sending the SYN).
 *
 * SYN admission (server role): a tagged SYN passes only within a token bucket of
 * config.syn_rate per second and config.syn_burst deep; the rest are dropped here and counted
 * syn_limited.  Without it a SYN flood shares the daemon's UDP socket queue with the
 * established sessions and the daemon spends its time refusing SYNs (backlog_full).  Untagged
 * SYNs are the kernel's (its SYN cookies handle a flood of them) and take no token.
 * Every other segment is untouched.  docs/design.md, "SYN admission".
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>

#include "rsockd.h"

#define RSOCKD_IP_MF 0x2000
#define RSOCKD_IP_OFFSET 0x1fff
#define RSOCKD_IP6_OFFSET 0xfff8
#define RSOCKD_IP6_EXT_MAX 6  /* extension headers walked before giving up (passes uncounted) */
#define RSOCKD_NSEC_PER_SEC 1000000000ULL

struct rsockd_ip6_ext {   /* hop-by-hop, routing, destination options, AH: the first two bytes */
	__u8 nexthdr;
	__u8 hdrlen;
};

struct rsockd_ip6_frag {  /* RFC 8200 §4.5 */
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

enum rsockd_match { MATCH_NONE, MATCH_SERVER, MATCH_CLIENT };

/* The port half of the rule; MATCH_CLIENT still needs the source address checked. */
static __always_inline enum rsockd_match rsockd_match_ports(struct tcphdr *th)
{
	__u32 dflags = rsockd_port_flags(th->dest);

	if (dflags & RSOCKD_PORT_SERVER)
		return MATCH_SERVER;
	if ((dflags & RSOCKD_PORT_LOCAL) && (rsockd_port_flags(th->source) & RSOCKD_PORT_PEER))
		return MATCH_CLIENT;
	return MATCH_NONE;
}

static __always_inline enum rsockd_match rsockd_match4(struct tcphdr *th, __be32 saddr)
{
	enum rsockd_match m = rsockd_match_ports(th);

	if (m == MATCH_CLIENT && !peers4.lookup(&saddr))
		return MATCH_NONE;
	return m;
}

static __always_inline enum rsockd_match rsockd_match6(struct tcphdr *th, struct in6_addr *saddr)
{
	enum rsockd_match m = rsockd_match_ports(th);
	struct rsockd_addr6 key;

	if (m == MATCH_CLIENT) {
		__builtin_memcpy(&key, saddr, sizeof(key));
		if (!peers6.lookup(&key))
			return MATCH_NONE;
	}
	return m;
}

/* ---- SYN admission --------------------------------------------------------------------
 *
 * One token bucket per CPU, each with rate/cpus and burst/cpus of the configured budget, so
 * the machine admits at most syn_rate per second plus syn_burst.  Per-CPU, not shared: a shared
 * bucket would need an atomic fetch-and-add with a return value (bcc 0.26 / LLVM 14 emit none)
 * or a lock, and would bounce its cache line between CPUs at the flood's rate; a per-CPU one
 * needs no lock, since XDP runs in softirq, which does not nest on a CPU.  The cost: a flood
 * landing on one CPU only gets that CPU's share.  docs/design.md, "SYN admission".
 *
 * Tokens are nanoseconds of refill time: a SYN costs NSEC * cpus / rate, the bucket holds
 * NSEC * burst / rate (at least one SYN's worth).  A fresh bucket (last_ns 0) starts full. */
struct rsockd_syn_bucket {
	__u64 credit_ns;  /* refill time banked, at most the capacity */
	__u64 last_ns;    /* bpf_ktime_get_ns() at the last SYN this CPU looked at */
};

BPF_PERCPU_ARRAY(syn_bucket, struct rsockd_syn_bucket, 1);

/* 1 when a SYN may go on to userspace, 0 when it is over the limit. */
static __always_inline int rsockd_syn_admit(struct rsockd_config *cfg)
{
	struct rsockd_syn_bucket *b;
	__u64 rate = cfg->syn_rate;
	__u64 cpus = cfg->syn_cpus ? cfg->syn_cpus : 1;
	__u64 now, cost, cap, credit;
	int zero = 0;

	if (!rate)
		return 1;  /* no limit configured */
	b = syn_bucket.lookup(&zero);
	if (!b)
		return 1;  /* cannot happen: an array always has its entry */
	cost = RSOCKD_NSEC_PER_SEC * cpus / rate;
	cap = RSOCKD_NSEC_PER_SEC * cfg->syn_burst / rate;
	if (cap < cost)
		cap = cost;
	now = bpf_ktime_get_ns();
	credit = b->credit_ns + (now - b->last_ns);
	if (credit > cap)
		credit = cap;  /* also when the rate was lowered: the bucket shrinks at once */
	b->last_ns = now;
	if (credit < cost) {
		b->credit_ns = credit;
		return 0;
	}
	b->credit_ns = credit - cost;
	return 1;
}

/* A segment opening a connection to us: SYN set, ACK clear (RFC 9293 §3.5). */
static __always_inline int rsockd_is_syn(struct tcphdr *th)
{
	return th->syn && !th->ack;
}

/* ---- The SYN tag --------------------------------------------------------------------------
 *
 * rsockd/core/syntag.py: a client's SYN carries as its TSval the low 32 bits of SipHash-2-4
 * (Aumasson & Bernstein) of one little-endian 64-bit word, isn | slot << 32, then the final
 * block, which holds only the length (8 << 56).  Neither address nor port is in it (NAT
 * rewrites them); the seen map binds a tag to the 4-tuple it first came from instead. */
#define RSOCKD_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define RSOCKD_SIPROUND(v0, v1, v2, v3)                                                   \
	do {                                                                              \
		v0 += v1; v1 = RSOCKD_ROTL(v1, 13); v1 ^= v0; v0 = RSOCKD_ROTL(v0, 32);   \
		v2 += v3; v3 = RSOCKD_ROTL(v3, 16); v3 ^= v2;                             \
		v0 += v3; v3 = RSOCKD_ROTL(v3, 21); v3 ^= v0;                             \
		v2 += v1; v1 = RSOCKD_ROTL(v1, 17); v1 ^= v2; v2 = RSOCKD_ROTL(v2, 32);   \
	} while (0)
#define RSOCKD_SIPBLOCK(v0, v1, v2, v3, m)                                                \
	do {                                                                              \
		v3 ^= (m);                                                                \
		RSOCKD_SIPROUND(v0, v1, v2, v3);                                          \
		RSOCKD_SIPROUND(v0, v1, v2, v3);                                          \
		v0 ^= (m);                                                                \
	} while (0)

#define RSOCKD_OPT_ENTRIES 16  /* options looked at for the timestamp (a SYN of Linux's has 5) */

/* The TSval of a SYN (host order) into *tsval: 1, or 0 without a well-formed timestamp option.
 * Unrolled like everything here: bcc loads only the program's own section. */
static __always_inline int rsockd_syn_tsval(struct tcphdr *th, void *end, __u32 *tsval)
{
	__u8 *p = (__u8 *)(th + 1);
	__u8 *stop = (__u8 *)th + th->doff * 4;

#pragma unroll
	for (int i = 0; i < RSOCKD_OPT_ENTRIES; i++) {
		__u8 kind, len;

		if (p + 1 > stop || (void *)(p + 1) > end)
			return 0;
		kind = p[0];
		if (kind == 0)  /* end of options */
			return 0;
		if (kind == 1) {  /* NOP */
			p += 1;
			continue;
		}
		if (p + 2 > stop || (void *)(p + 2) > end)
			return 0;
		len = p[1];
		if (len < 2)
			return 0;
		if (kind == 8 && len == 10) {
			if (p + 10 > stop || (void *)(p + 10) > end)
				return 0;
			*tsval = (__u32)p[2] << 24 | (__u32)p[3] << 16 | (__u32)p[4] << 8 | (__u32)p[5];
			return 1;
		}
		p += len;
	}
	return 0;
}

/* 1 when tsval is the tag of isn for one of the slots beside the daemon's. */
static __always_inline int rsockd_syn_tag_ok(struct rsockd_syntag *st, __u32 isn, __u32 tsval)
{
#pragma unroll
	for (int d = -1; d <= 1; d++) {
		__u64 v0 = st->k0 ^ 0x736f6d6570736575ULL;
		__u64 v1 = st->k1 ^ 0x646f72616e646f6dULL;
		__u64 v2 = st->k0 ^ 0x6c7967656e657261ULL;
		__u64 v3 = st->k1 ^ 0x7465646279746573ULL;
		__u64 m = (__u64)isn | (__u64)(__u32)(st->slot + d) << 32;

		RSOCKD_SIPBLOCK(v0, v1, v2, v3, m);
		RSOCKD_SIPBLOCK(v0, v1, v2, v3, 8ULL << 56);
		v2 ^= 0xff;
		RSOCKD_SIPROUND(v0, v1, v2, v3);
		RSOCKD_SIPROUND(v0, v1, v2, v3);
		RSOCKD_SIPROUND(v0, v1, v2, v3);
		RSOCKD_SIPROUND(v0, v1, v2, v3);
		if ((__u32)(v0 ^ v1 ^ v2 ^ v3) == tsval)
			return 1;
	}
	return 0;
}

static __always_inline int rsockd_same_conn(struct rsockd_conn *a, struct rsockd_conn *b)
{
	__u64 *x = (__u64 *)a, *y = (__u64 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] &&
	       a->sport == b->sport && a->dport == b->dport;
}

/* Whether a SYN is rsockd's: it carries the tag of the key and slot the daemon wrote, and the
 * tag is new or came from this 4-tuple before (a retransmitted SYN), not from another (a
 * replay).  A new tag is remembered with its 4-tuple. */
static __always_inline int rsockd_syn_tagged(struct tcphdr *th, void *end, struct rsockd_conn *key)
{
	struct rsockd_syntag *st;
	struct rsockd_seen_key sk = {};
	struct rsockd_conn *owner;
	__u32 tsval = 0;
	int zero = 0;

	st = syntag.lookup(&zero);
	if (!st || !rsockd_syn_tsval(th, end, &tsval))
		return 0;
	sk.isn = bpf_ntohl(th->seq);
	sk.tsval = tsval;
	if (!rsockd_syn_tag_ok(st, sk.isn, tsval))
		return 0;
	owner = seen.lookup(&sk);
	if (owner)
		return rsockd_same_conn(owner, key);
	seen.update(&sk, key);
	return 1;
}

/* Checks common to both families; returns the stat to count for a segment left to the kernel,
 * or -1 when the segment may be rewritten.  l4len is the L4 length the IP header states. */
static __always_inline int rsockd_check_tcp(struct tcphdr *th, void *end, __u32 l4len)
{
	__u32 hlen;

	/* l4len comes from a 16-bit field, but through a byte swap, whose result verifiers before
	 * Linux 6.3 do not bound: without the mask, "th + l4len" is rejected there (Debian 12's 6.1).
	 * LLVM knows the mask is a no-op and would drop it; the empty asm (libbpf's barrier_var)
	 * hides what it knows, so the AND stays in the program for the verifier to see. */
	asm volatile("" : "+r"(l4len));
	l4len &= 0xffff;
	if ((void *)(th + 1) > end || l4len < sizeof(*th) || (void *)th + l4len > end)
		return RSOCKD_STAT_PASSED_MALFORMED;
	hlen = th->doff * 4;
	if (hlen < sizeof(*th) || hlen > l4len)
		return RSOCKD_STAT_PASSED_MALFORMED;
	return -1;
}

#define RSOCKD_REWRITE (-1)

/* Whether a matching segment is addressed to this host rather than routed through it, asked of
 * the kernel's routing (the rules and tables it would use for this packet).  A local
 * destination is "not forwarded"; so is every packet on an interface that does not forward at
 * all, which is the common case and costs no route lookup.  Anything the kernel would forward
 * (or refuse to: blackhole, unreachable) is not ours to take. */
static __always_inline int rsockd_for_us(struct xdp_md *ctx, struct bpf_fib_lookup *fib)
{
	int rc;

	fib->l4_protocol = IPPROTO_TCP;
	fib->ifindex = ctx->ingress_ifindex;
	rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED || rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
		return 1;
	rsockd_count(RSOCKD_STAT_PASSED_TRANSIT);
	return 0;
}

/* Whether a matching segment is rewritten: RSOCKD_REWRITE, or the verdict for one that is not
 * (counted under its reason): malformed ones and those of no connection of ours go to the
 * kernel, tagged SYNs over the limit are dropped.  ``key``: the segment's 4-tuple. */
static __always_inline int rsockd_admit(struct tcphdr *th, void *end, __u32 l4len, enum rsockd_match m,
					struct rsockd_config *cfg, struct rsockd_conn *key)
{
	int stat = rsockd_check_tcp(th, end, l4len);
	__u32 one = 1;

	if (stat >= 0) {
		rsockd_count(stat);
		return XDP_PASS;
	}
	if (m == MATCH_SERVER && rsockd_is_syn(th)) {
		if (!rsockd_syn_tagged(th, end, key)) {
			rsockd_count(RSOCKD_STAT_PASSED_PROBE);
			return XDP_PASS;
		}
		if (!rsockd_syn_admit(cfg)) {
			rsockd_count(RSOCKD_STAT_SYN_LIMITED);
			return XDP_DROP;
		}
		conns.update(key, &one);
		return RSOCKD_REWRITE;
	}
	if (!conns.lookup(key)) {
		rsockd_count(RSOCKD_STAT_PASSED_PROBE);
		return XDP_PASS;
	}
	return RSOCKD_REWRITE;
}

/* The rewrite itself.  The caller has checked that the 20 header bytes are in the packet. */
static __always_inline void rsockd_tcp_to_udp(struct tcphdr *th, __u32 l4len)
{
	__u16 *w = (__u16 *)th;
	__u32 seq = th->seq;
	__u32 ack = th->ack_seq;
	__u16 offflags = w[6];
	__u16 window = th->window;
	__u16 tcsum = th->check;
	__u16 urgent = th->urg_ptr;
	__u16 ulen = bpf_htons((__u16)l4len);
	__u16 ucsum;

	/* RFC 1624: add the complement of what leaves the sum and what enters.  The sum of raw
	 * (network order) words is the byte swap of the sum of their values, so no swaps needed. */
	ucsum = rsockd_fold((__u32)tcsum + urgent + bpf_htons(IPPROTO_TCP) +
			    (__u16)~bpf_htons(IPPROTO_UDP) + (__u16)~ulen);
	if (!ucsum)
		ucsum = 0xffff;  /* 0 means "no checksum" in UDP (RFC 768); cannot occur, kept for safety */
	w[2] = ulen;
	w[3] = ucsum;
	w[4] = offflags;
	w[5] = window;
	*(__u32 *)(w + 6) = seq;
	*(__u32 *)(w + 8) = ack;
}

static __always_inline int rsockd_ipv4(struct xdp_md *ctx, struct rsockd_config *cfg, struct iphdr *ip,
				       void *end)
{
	struct bpf_fib_lookup fib = {};
	struct rsockd_conn key = {};
	enum rsockd_match m;
	struct tcphdr *th;
	__u32 ihl, l4len, tot;
	int verdict;

	if ((void *)(ip + 1) > end || ip->version != 4 || ip->protocol != IPPROTO_TCP)
		return XDP_PASS;
	if (ip->frag_off & bpf_htons(RSOCKD_IP_OFFSET))
		return XDP_PASS;  /* not the first fragment: no ports to match */
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return XDP_PASS;
	th = (void *)ip + ihl;
	if ((void *)th + 4 > end)
		return XDP_PASS;  /* not even the ports */
	m = rsockd_match4(th, ip->saddr);
	if (m == MATCH_NONE)
		return XDP_PASS;
	fib.family = AF_INET;
	fib.sport = th->source;
	fib.dport = th->dest;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.tos = ip->tos;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	if (!rsockd_for_us(ctx, &fib))
		return XDP_PASS;

	if (ihl != sizeof(*ip)) {
		rsockd_count(RSOCKD_STAT_PASSED_IP_OPTIONS);
		return XDP_PASS;
	}
	if (ip->frag_off & bpf_htons(RSOCKD_IP_MF)) {
		rsockd_count(RSOCKD_STAT_PASSED_FRAGMENT);
		return XDP_PASS;
	}
	tot = bpf_ntohs(ip->tot_len);
	l4len = tot > sizeof(*ip) ? tot - sizeof(*ip) : 0;
	rsockd_map4(key.saddr, ip->saddr);
	rsockd_map4(key.daddr, ip->daddr);
	key.sport = th->source;
	key.dport = th->dest;
	verdict = rsockd_admit(th, end, l4len, m, cfg, &key);
	if (verdict != RSOCKD_REWRITE)
		return verdict;

	rsockd_tcp_to_udp(th, l4len);
	/* RFC 1624 eqn. 3 on the header checksum: the word [ttl, protocol] changes 6 -> 17. */
	ip->check = ~rsockd_fold((__u32)(__u16)~ip->check + (__u16)~bpf_htons(IPPROTO_TCP) +
				 bpf_htons(IPPROTO_UDP));
	ip->protocol = IPPROTO_UDP;
	rsockd_count(RSOCKD_STAT_STEERED_V4);
	return XDP_PASS;
}

static __always_inline int rsockd_ipv6(struct xdp_md *ctx, struct rsockd_config *cfg, struct ipv6hdr *ip6,
				       void *end)
{
	struct bpf_fib_lookup fib = {};
	struct rsockd_conn key = {};
	enum rsockd_match m;
	struct tcphdr *th;
	__u32 off = sizeof(*ip6);
	__u8 nexthdr;
	int fragment = 0, extension = 0, verdict;

	if ((void *)(ip6 + 1) > end || ip6->version != 6)
		return XDP_PASS;
	nexthdr = ip6->nexthdr;

	/* Walk extension headers only to find the ports: a tunnel segment behind them is left to
	 * the kernel, but counted. */
#pragma unroll
	for (int i = 0; i < RSOCKD_IP6_EXT_MAX; i++) {
		if (nexthdr == IPPROTO_TCP)
			break;
		if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
		    nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_AH) {
			struct rsockd_ip6_ext *ext = (void *)ip6 + off;

			if ((void *)(ext + 1) > end)
				return XDP_PASS;
			/* length: RFC 8200 §4.3, 8-octet units not counting the first 8;
			 * AH (RFC 4302 §2.2), 4-octet units minus 2 */
			if (nexthdr == IPPROTO_AH)
				off += ((__u32)ext->hdrlen + 2) * 4;
			else
				off += ((__u32)ext->hdrlen + 1) * 8;
			nexthdr = ext->nexthdr;
			extension = 1;
		} else if (nexthdr == IPPROTO_FRAGMENT) {
			struct rsockd_ip6_frag *frag = (void *)ip6 + off;

			if ((void *)(frag + 1) > end)
				return XDP_PASS;
			if (frag->frag_off & bpf_htons(RSOCKD_IP6_OFFSET))
				return XDP_PASS;  /* not the first fragment */
			nexthdr = frag->nexthdr;
			off += sizeof(*frag);
			fragment = 1;
		} else {
			return XDP_PASS;
		}
	}
	if (nexthdr != IPPROTO_TCP)
		return XDP_PASS;

	th = (void *)ip6 + off;
	if ((void *)th + 4 > end)
		return XDP_PASS;
	m = rsockd_match6(th, &ip6->saddr);
	if (m == MATCH_NONE)
		return XDP_PASS;
	fib.family = AF_INET6;
	fib.sport = th->source;
	fib.dport = th->dest;
	fib.tot_len = bpf_ntohs(ip6->payload_len);
	fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0fffffff);
	__builtin_memcpy(fib.ipv6_src, &ip6->saddr, sizeof(fib.ipv6_src));
	__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, sizeof(fib.ipv6_dst));
	if (!rsockd_for_us(ctx, &fib))
		return XDP_PASS;
	if (fragment) {
		rsockd_count(RSOCKD_STAT_PASSED_FRAGMENT);
		return XDP_PASS;
	}
	if (extension) {
		rsockd_count(RSOCKD_STAT_PASSED_IP_OPTIONS);
		return XDP_PASS;
	}
	__builtin_memcpy(key.saddr, &ip6->saddr, sizeof(key.saddr));
	__builtin_memcpy(key.daddr, &ip6->daddr, sizeof(key.daddr));
	key.sport = th->source;
	key.dport = th->dest;
	/* payload_len 0 is a jumbogram (RFC 2675): left to the kernel as malformed */
	verdict = rsockd_admit(th, end, bpf_ntohs(ip6->payload_len), m, cfg, &key);
	if (verdict != RSOCKD_REWRITE)
		return verdict;

	rsockd_tcp_to_udp(th, bpf_ntohs(ip6->payload_len));
	ip6->nexthdr = IPPROTO_UDP;  /* IPv6 has no header checksum */
	rsockd_count(RSOCKD_STAT_STEERED_V6);
	return XDP_PASS;
}

int rsockd_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct rsockd_config *cfg;
	int zero = 0;

	/* Not configured yet: do nothing.  The lookup also makes `config` one of this program's
	 * maps, which is how rsockd finds the owner of an attached program (docs/design.md). */
	cfg = config.lookup(&zero);
	if (!cfg || !cfg->instance_tag)
		return XDP_PASS;
	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return rsockd_ipv4(ctx, cfg, (void *)(eth + 1), end);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return rsockd_ipv6(ctx, cfg, (void *)(eth + 1), end);
	return XDP_PASS;
}
