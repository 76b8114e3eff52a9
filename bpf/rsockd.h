/* rsockd.h - the single definition of everything shared by the BPF programs and Python.
 *
 * bcc compiles this header, ingress.c and egress.c as ONE text, in that order
 * (rsockd/steer/bcc_loader.py), so the two programs share the maps below.  It has to be one
 * text, not #includes: bcc rewrites map accesses (`stats.lookup()`) only in its main text, and
 * loads only functions defined there.  ingress.c and egress.c still #include this file, which
 * is then a no-op, so each reads on its own.
 *
 * In userspace the layout test compiles it with plain gcc and checks the Python mirror in
 * rsockd/steer/bpfsys.py against it.  The part under __KERNEL__ (bcc defines it) is BPF only.
 *
 * Maps and match rules: docs/design.md, "Data plane decisions".
 */
#ifndef RSOCKD_H
#define RSOCKD_H

#include <linux/types.h>

/* config[0]: what the programs need to know about the instance that loaded them.
 * instance_tag stays at offset 8 in every version: rsockd finds the owner of an attached
 * program by it, even of a program an older rsockd loaded. */
struct rsockd_config {
	__u32 mark;          /* SO_MARK of our raw sends: the guard lets these through */
	__u32 flags;         /* reserved, 0 */
	__u64 instance_tag;  /* first 8 bytes of BLAKE2s(instance name), big-endian, as a u64 */
	/* Server SYN admission (ingress.c): SYNs to a tunnel port reach userspace at most at
	 * syn_rate per second after a burst of syn_burst; the rest are dropped in XDP. */
	__u32 syn_rate;      /* SYNs per second, all CPUs together; 0: no limit */
	__u32 syn_burst;     /* SYNs a full bucket holds, all CPUs together */
	__u32 syn_cpus;      /* CPUs the budget is split across (each gets rate/cpus, burst/cpus) */
	__u32 reserved;      /* 0; keeps the size a multiple of 8 */
};

/* peers6 key: an IPv6 address as it appears on the wire. */
struct rsockd_addr6 {
	__u8 addr[16];
};

/* syntag[0]: the SYN tag (rsockd/core/syntag.py) the server's XDP program checks on every SYN
 * to a tunnel port.  Written by the daemon: the key at attach and on every reload, the slot
 * (floor(unix time / 64) mod 2^32, the daemon's wall clock) whenever it changes (the daemon
 * looks once a second).  The program accepts slot - 1, slot and slot + 1. */
struct rsockd_syntag {
	__u64 k0;            /* the 16-byte tag key as two little-endian words (syntag.key_words) */
	__u64 k1;
	__u32 slot;
	__u32 flags;         /* reserved, 0 */
};

/* seen key: a SYN's tag as it arrived (ISN and TSval, host order); the value is the 4-tuple
 * (struct rsockd_conn) it first came from.  The same tag from another 4-tuple is a replay and
 * goes to the kernel.  Least recently used entries make room; a tag outlives its slots there
 * at most until then, and its slots alone refuse it afterwards. */
struct rsockd_seen_key {
	__u32 isn;
	__u32 tsval;
};

/* conns key: one of rsockd's connections, as a segment FROM the peer carries it: the peer's
 * address and port are the source.  Addresses as on the wire, IPv4 as IPv4-mapped IPv6
 * (::ffff:a.b.c.d); ports in network byte order.  The value is a u32, 1.
 * Server: the XDP program adds the tuple of every SYN with a good tag; client: the daemon adds
 * each connection's before sending its SYN.  Segments to a tunnel port whose tuple is not here
 * are the kernel's (port sharing, docs/security.md), and the guard drops only kernel segments
 * whose reversed tuple is here. */
struct rsockd_conn {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
};

/* ports[port]: bit set. */
#define RSOCKD_PORT_SERVER 1U  /* server: a tunnel port we serve (match on dport) */
#define RSOCKD_PORT_LOCAL  2U  /* client: one of our local ports (match on dport) */
#define RSOCKD_PORT_PEER   4U  /* client: a server tunnel port (match on sport) */

/* stats[index]: names and order are STEER_COUNTERS in rsockd/steer/__init__.py. */
enum rsockd_stat {
	RSOCKD_STAT_STEERED_V4 = 0,
	RSOCKD_STAT_STEERED_V6 = 1,
	RSOCKD_STAT_PASSED_MALFORMED = 2,
	RSOCKD_STAT_PASSED_FRAGMENT = 3,
	RSOCKD_STAT_PASSED_IP_OPTIONS = 4,
	RSOCKD_STAT_GUARD_DROPPED = 5,
	RSOCKD_STAT_SYN_LIMITED = 6,
	RSOCKD_STAT_PASSED_TRANSIT = 7,
	RSOCKD_STAT_PASSED_PROBE = 8,  /* on a tunnel port, not one of our connections: left to the kernel */
	RSOCKD_STAT_COUNT = 9,
};

#define RSOCKD_PORTS_MAX 65536  /* ports: one entry per port number */
#define RSOCKD_PEERS_MAX 256    /* peers4, peers6 */
#define RSOCKD_CONNS_MAX 65536  /* conns: least recently used entries make room for new ones */

#ifdef __KERNEL__
/* ---- BPF side (bcc) ----------------------------------------------------------------- */

BPF_ARRAY(config, struct rsockd_config, 1);
BPF_ARRAY(ports, __u32, RSOCKD_PORTS_MAX);
BPF_HASH(peers4, __u32, __u32, RSOCKD_PEERS_MAX);  /* IPv4 address, network order -> 1 */
BPF_HASH(peers6, struct rsockd_addr6, __u32, RSOCKD_PEERS_MAX);
BPF_PERCPU_ARRAY(stats, __u64, RSOCKD_STAT_COUNT);
BPF_ARRAY(syntag, struct rsockd_syntag, 1);
BPF_TABLE("lru_hash", struct rsockd_seen_key, struct rsockd_conn, seen, RSOCKD_CONNS_MAX);
BPF_TABLE("lru_hash", struct rsockd_conn, __u32, conns, RSOCKD_CONNS_MAX);

static __always_inline void rsockd_count(int index)
{
	__u64 *v = stats.lookup(&index);

	/* per-CPU slot: a plain increment is enough (and bcc 0.26 has no XADD return value) */
	if (v)
		*v += 1;
}

/* ports[] bits of a port in network byte order (0 when out of range: cannot happen). */
static __always_inline __u32 rsockd_port_flags(__be16 port)
{
	int key = bpf_ntohs(port);
	__u32 *v = ports.lookup(&key);

	return v ? *v : 0;
}

static __always_inline __u16 rsockd_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* An IPv4 address (network order) as the 16 bytes of its IPv4-mapped IPv6 form. */
static __always_inline void rsockd_map4(__u8 *out, __be32 addr)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &addr, 4);
}

#endif /* __KERNEL__ */
#endif /* RSOCKD_H */
