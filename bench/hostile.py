"""Hostile traffic for a running rsockd pair (issue 8): crafted segments fired at a server and a client.

    python -m bench.hostile --server-ns NS --server-dev DEV --server-control SOCK \\
                            --client-ns NS --client-dev DEV --client-control SOCK \\
                            [--count 1000000] [--rate 40000] [--seed 1] [--json]

Both daemons run in network namespaces joined by a veth (``tests.netns.NetnsPair``), every
connection established.  The storm leaves as Ethernet frames from ``AF_PACKET`` sockets, so
sources, checksums and lengths can be anything: segments for the server go out of the client's
end of the veth, segments for the client out of the server's end, with ``PACKET_QDISC_BYPASS`` so
that neither the sending namespace's IP stack nor its egress guard or netfilter sees them -- as if
they came off the wire.  The frames are built once per category (a pool of distinct packets each)
and sent with ``sendmmsg(2)``, so a million segments cost the tool a few seconds; ``--rate`` paces
them (0: flat out; the daemons' queues then overflow, which the kernel counts).

The categories (``CATEGORIES``) are issue 8's: random flags, bad checksums, malformed options, bad
data offsets, wrong ports, spoofed peers, valid-looking records with a bad tag or a replayed
counter, RSTs inside and outside the window, oversized and zero-length payloads, IP lengths that
lie, and plain UDP junk at the tunnel ports; IPv4 and IPv6 (segments for the server come from both
families; the client has local ports in the tunnel's family only).

Spoofed clients have addresses in the link's prefixes that no host holds, with static neighbour
entries on the server leading to the client's end, which drops the server's answers as not its
own; their source ports are never the client's local ports (a capture backend on the client would
take answers to those).  Spoofed servers have off-link addresses (RFC 5737/3849): the client has no
route to them, so its kernel's RSTs from its reserved TCP ports die in the client namespace.

Segments aimed at *live* connections take the real 4-tuple from ``rsockctl --json ports`` (``ack``
is the receiver's next expected sequence number, re-read before each category) and are placed
where they cannot move it: records ride at sequence numbers already received; out-of-window RSTs
lie up to 1 MiB behind ``ack`` or 2^30 ahead; in-window RSTs lie in ``ack + [W/2, W)`` (W, the
receive window: 65535 << 7) from a view of ``ack`` at most 0.25 s old.  In-window RSTs are not put
*just* past ``ack``: the data that keeps arriving advances ``ack`` through the values right after
it -- on an idle connection a keepalive record is 21 bytes -- and an RST that meets ``ack`` exactly
legitimately resets the connection (RFC 5961 §3.2).  ``exact_rst()`` sends such an RST on purpose;
the storm never does.

Each category is one phase.  After a phase the storm waits until the counters it moves stop
moving, then records what each counter gained: rsockd's drops by reason and steering counters
(control socket) and the kernel MIBs of each namespace (``/proc/<daemon pid>/net/snmp``).  With
the xdp backend a bad TCP checksum becomes a bad UDP checksum that the kernel drops
(``UdpInCsumErrors``) before rsockd sees it; wrong ports and spoofed peers are never rsockd's
business (the kernel's TCP takes them).  Every frame says whether the receiver is *meant* to take
it without a drop (a duplicate ACK on a live connection), and good SYNs to the server that neither
the SYN limit nor the full backlog refused opened a half-open connection, so ``summarize()`` can
account for what was sent.  (A SYN frame sent again from its pool meets the half-open connection
its first copy opened, where its other flags may count -- an RST bit as ``rst_ignored`` -- so a
SYN-bearing category can be covered a little over 100 %.)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.mmsg import _Iovec, _Mmsghdr, _sendmmsg
from rsockd.core import framing
from rsockd.core.packet import (
    ACK,
    FIN,
    PROTO_TCP,
    PROTO_UDP,
    PSH,
    RST,
    SYN,
    TCP_HEADER,
    URG,
    build_options,
    ipv4_header,
    ipv6_header,
    pack_address,
    pseudo_sum,
    transport_checksum,
)
from rsockd.service.control import request

MASK32 = 0xFFFFFFFF
# Inside every rsockd connection's receive window, by which it judges RSTs: the window starts as
# the kernel's (about 64 KiB) and never shrinks.
WINDOW = 64000
SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
CLONE_NEWNET = 0x40000000
BATCH = 64  # frames per sendmmsg call
POOL = 2048  # distinct frames per category and lane
REFRESH = 0.25  # seconds between reads of the live sequence numbers (in-window RSTs)
SPOOF_HOSTS = range(100, 116)  # host numbers of spoofed "clients" in the link's prefixes
#: Spoofed "servers": off-link documentation prefixes (RFC 5737, RFC 3849).  The client has no route
#: to them, so its kernel's answers (RSTs from its reserved TCP ports) die in the client namespace.
OFF_LINK = {4: [bytes([198, 51, 100, h]) for h in SPOOF_HOSTS],
            6: [bytes.fromhex("20010db8000500000000000000000000")[:14] + h.to_bytes(2, "big") for h in SPOOF_HOSTS]}

_libc = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------------------------------------
# Namespaces and sockets


@contextlib.contextmanager
def netns(name: str | None) -> Iterator[None]:
    """Run the block in network namespace ``name`` (``ip netns`` name); sockets made there stay there."""
    if name is None:
        yield
        return
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        yield
    finally:
        os.close(fd)
        _libc.setns(back, CLONE_NEWNET)
        os.close(back)


class Lane:
    """An ``AF_PACKET`` socket on one end of the veth: frames sent here arrive at the other end."""

    def __init__(self, ns: str | None, dev: str) -> None:
        with netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing
            self.sock.bind((dev, 0))
        # Straight to the driver: no qdisc, so no egress guard of the sending namespace on the way.
        self.sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.mac: bytes = self.sock.getsockname()[4]
        self.peer_mac = b"\xff" * 6
        self.ns, self.dev = ns, dev
        self.errors = 0

    def ether(self, packet: bytes) -> bytes:
        return self.peer_mac + self.mac + struct.pack("!H", ETH_P_IPV6 if packet[0] >> 4 == 6 else ETH_P_IP) + packet

    def close(self) -> None:
        self.sock.close()


class FramePool:
    """Frames laid out once in one buffer with their ``mmsghdr`` array: sending is one call per batch."""

    def __init__(self, frames: Sequence[bytes], kinds: Sequence[str] = ()) -> None:
        self.n = len(frames)
        self.kinds = list(kinds) or [""] * self.n
        blob = b"".join(frames)
        self.buf = ctypes.create_string_buffer(blob, len(blob) or 1)
        self.iov = (_Iovec * self.n)()
        self.hdrs = (_Mmsghdr * self.n)()
        base, iov_base = ctypes.addressof(self.buf), ctypes.addressof(self.iov)
        off = 0
        for i, f in enumerate(frames):
            self.iov[i].iov_base = base + off
            self.iov[i].iov_len = len(f)
            off += len(f)
            self.hdrs[i].msg_hdr.msg_iov = ctypes.cast(iov_base + i * ctypes.sizeof(_Iovec), ctypes.POINTER(_Iovec))
            self.hdrs[i].msg_hdr.msg_iovlen = 1
        self.pos = 0

    def send(self, lane: Lane, count: int, kinds: dict[str, int]) -> int:
        """Send the next ``count`` frames (cycling); returns how many went, adds them up by kind in ``kinds``."""
        sent = 0
        while sent < count:
            n = min(count - sent, self.n - self.pos, BATCH)
            ptr = ctypes.cast(ctypes.addressof(self.hdrs) + self.pos * ctypes.sizeof(_Mmsghdr),
                              ctypes.POINTER(_Mmsghdr))
            r = _sendmmsg(lane.sock.fileno(), ptr, n, 0)
            if r < 0:  # ENOBUFS and friends: the frame at pos failed; skip it, count it
                lane.errors += 1
                r = 1
            for k in self.kinds[self.pos : self.pos + r]:
                kinds[k] = kinds.get(k, 0) + 1
            sent += r
            self.pos = (self.pos + r) % self.n
        return sent


# ---------------------------------------------------------------------------------------------
# What the tool knows about the pair


@dataclass
class Tuple4:
    """A live connection as the attacker aims at it: from the peer's address and port to the victim's."""

    src: bytes
    sport: int
    dst: bytes
    dport: int
    rcv_nxt: int  # the victim's next expected sequence number
    snd_nxt: int


@dataclass
class Victim:
    """One daemon under attack and the addresses around it."""

    role: str
    control: str
    family: int  # the tunnel's address family, 4 or 6
    addrs: dict[int, bytes]  # family -> the victim's address
    peer_addrs: dict[int, bytes]  # family -> the legitimate other end
    spoof: dict[int, list[bytes]]  # family -> addresses assigned nowhere
    tunnel_ports: list[int]
    local_ports: list[int]  # client: its local ports
    avoid_ports: list[int]  # server: the client's local ports, never a spoofed source port (see setup())
    mtu: int = 1500
    live: list[Tuple4] = field(default_factory=list)

    def refresh(self, peer_control: str) -> None:
        """Re-read the live connections and their sequence numbers (``ports``) of victim and peer."""
        mine = request(self.control, "ports")["data"]["connections"]
        live: list[Tuple4] = []
        for c in mine:
            if c["state"] != "established" or c["transport"] != "tcp":
                continue
            peer_ip, peer_port = c["peer"].rsplit(":", 1)
            src = pack_address(peer_ip.strip("[]"))
            if self.role == "server":
                live.append(Tuple4(src, int(peer_port), self.addrs[_fam(src)], int(c["local_port"]),
                                   int(c["ack"]), int(c["seq"])))
            else:
                live.append(Tuple4(src, int(c["port"]), self.addrs[self.family], int(c["local_port"]),
                                   int(c["ack"]), int(c["seq"])))
        self.live = live


def _fam(addr: bytes) -> int:
    return 4 if len(addr) == 4 else 6


# ---------------------------------------------------------------------------------------------
# Building packets


def _ip(src: bytes, dst: bytes, l4: bytes, proto: int = PROTO_TCP, extra: int = 0) -> bytes:
    """IP header + ``l4``; ``extra`` makes the header claim that many bytes more than there are."""
    if len(src) == 4:
        return ipv4_header(src, dst, len(l4) + extra, proto=proto) + l4
    return ipv6_header(src, dst, len(l4) + extra, proto=proto) + l4


def tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, *,
        options: bytes = b"", payload: bytes = b"", window: int = 0xFFFF, doff: int | None = None,
        bad_checksum: int = 0, ip_extra: int = 0) -> bytes:
    """One IP packet carrying a TCP segment, checksum right unless ``bad_checksum`` (a bit to flip).

    ``doff`` overrides the data offset the options imply (bad offsets).  Flipping one bit changes
    the checksum by a power of two, never by a multiple of 0xffff, so it stays wrong in
    one's-complement arithmetic too.
    """
    off = (20 + len(options)) // 4 if doff is None else doff
    seg = TCP_HEADER.pack(sport, dport, seq & MASK32, ack & MASK32, (off & 0xF) << 12 | (flags & 0x1FF),
                          window, 0, 0) + options + payload
    c = transport_checksum(pseudo_sum(src, dst), seg) ^ bad_checksum
    return _ip(src, dst, seg[:16] + struct.pack("!H", c) + seg[18:], extra=ip_extra)


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    dgram = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = transport_checksum(pseudo_sum(src, dst, PROTO_UDP), dgram) or 0xFFFF  # 0 means "none" in UDP
    return _ip(src, dst, dgram[:6] + struct.pack("!H", c) + dgram[8:], PROTO_UDP)


def record(frames: bytes, counter: int, tag: bytes, length: int | None = None) -> bytes:
    """A record with the given counter and tag (``length``: what the length field claims)."""
    return struct.pack("!HQ", 16 + len(frames) if length is None else length, counter) + tag + frames


def _ts(rng: random.Random) -> bytes:
    return build_options(timestamps=(rng.getrandbits(32), rng.getrandbits(32)))


def _bad_options(rng: random.Random) -> bytes:
    """A malformed option list (RFC 9293 §3.2 broken one way or another), padded to 4n bytes."""
    kind = rng.randrange(8)
    if kind == 0:
        opts = bytes((2, 0, 5, 0xB4))  # length 0
    elif kind == 1:
        opts = bytes((8, 1)) + rng.randbytes(8)  # length 1
    elif kind == 2:
        opts = bytes((1, 1, 8, 40)) + rng.randbytes(8)  # timestamps running past the header
    elif kind == 3:
        opts = bytes((2, 3, 5, 1, 1, 1, 1, 1))  # MSS of length 3
    elif kind == 4:
        opts = bytes((1, 1, 1, 5, 11)) + rng.randbytes(9)  # SACK not 2 + 8n
    elif kind == 5:
        opts = bytes((1, 1, 1, 3))  # window scale without its length byte: truncated
    elif kind == 6:
        opts = bytes((4, 2, 8, 10)) + rng.randbytes(6)  # timestamps cut short by the header's end
    else:
        opts = rng.randbytes(4 * rng.randrange(1, 11))  # anything, up to 40 bytes
    return (opts + bytes(-len(opts) % 4))[:40]


def _behind(t: Tuple4, length: int, rng: random.Random) -> int:
    """A sequence number whose segment ends before ``rcv_nxt``: it cannot advance it, and an RST or
    FIN there is not at the expected number."""
    return (t.rcv_nxt - length - rng.randrange(1, 4096)) & MASK32


#: An IP packet and what it is besides hostile: "" (refused and counted, or the kernel's), "dup_ack"
#: (a duplicate ACK a live connection takes without a drop) or "syn" (a SYN with a good checksum to
#: the server: it opens a half-open connection unless the SYN limit or the full backlog refuses it).
Built = tuple[bytes, str]
Builder = Callable[[Victim, random.Random], Built]


def _spoofed(v: Victim, rng: random.Random) -> tuple[bytes, int, bytes, int]:
    """Server victim: a source assigned nowhere (either family) to a tunnel port."""
    fam = rng.choice(sorted(v.spoof))
    sport = rng.randrange(1024, 65536)
    while sport in v.avoid_ports:
        sport = rng.randrange(1024, 65536)
    return rng.choice(v.spoof[fam]), sport, v.addrs[fam], rng.choice(v.tunnel_ports)


def _real(v: Victim, rng: random.Random) -> Tuple4:
    if not v.live:
        raise RuntimeError(f"no established connection on the {v.role} to aim at")
    return rng.choice(v.live)


def _junk(rng: random.Random, lo: int = 1, hi: int = 40) -> bytes:
    return rng.randbytes(rng.randrange(lo, hi + 1))


def b_random_flags(v: Victim, rng: random.Random) -> Built:
    """Any of the 9 flags.  Server: from spoofed sources.  Client: on a live tuple, behind ``ack``."""
    flags = rng.getrandbits(9)
    opts = _ts(rng) if rng.random() < 0.5 else b""
    if v.role == "server":
        src, sport, dst, dport = _spoofed(v, rng)
        kind = "syn" if flags & SYN and not flags & ACK else ""
        return tcp(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), flags, options=opts,
                   payload=_junk(rng, 0)), kind
    t = _real(v, rng)
    # One drop per segment: a FIN carries nothing (else a bad record *and* a misplaced FIN count), and
    # a bare ACK carries something (else it is a duplicate ACK, taken without a drop).
    payload = b"" if flags & (FIN | RST | SYN) or not flags & ACK else _junk(rng)
    return tcp(t.src, t.dst, t.sport, t.dport, _behind(t, len(payload), rng), t.snd_nxt, flags, options=opts,
               payload=payload), ""


def b_syn_flood(v: Victim, rng: random.Random) -> Built:
    """Linux-looking SYNs from spoofed sources: the backlog must stay bounded."""
    src, sport, dst, dport = _spoofed(v, rng)
    opts = build_options(mss=1460, sack_permitted=True, timestamps=(rng.getrandbits(32), 0), wscale=7)
    return tcp(src, dst, sport, dport, rng.getrandbits(32), 0, SYN, options=opts, window=64240), "syn"


def b_bad_checksum(v: Victim, rng: random.Random) -> Built:
    pkt, _ = b_random_flags(v, rng)
    l4 = 20 if pkt[0] >> 4 == 4 else 40
    c = struct.unpack_from("!H", pkt, l4 + 16)[0] ^ (1 << rng.randrange(16))
    return pkt[: l4 + 16] + struct.pack("!H", c) + pkt[l4 + 18 :], ""


def _bad_tag_record(rng: random.Random, counter: int, datagram: int = 200) -> bytes:
    frames = framing.data_frame(rng.randrange(1, 1 << 32), rng.randbytes(rng.randrange(0, datagram)))
    return record(frames, counter, rng.randbytes(8))


def b_bad_options(v: Victim, rng: random.Random) -> Built:
    """Malformed options.  Server: on spoofed SYNs and ACKs.  Client: on a live tuple, with a bad record."""
    opts = _bad_options(rng)
    if v.role == "server":
        src, sport, dst, dport = _spoofed(v, rng)
        flags = SYN if rng.random() < 0.5 else ACK | PSH
        return tcp(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), flags, options=opts,
                   payload=b"" if flags == SYN else _junk(rng)), "syn" if flags == SYN else ""
    t = _real(v, rng)
    payload = _bad_tag_record(rng, rng.randrange(1 << 40, 1 << 63))
    return tcp(t.src, t.dst, t.sport, t.dport, _behind(t, len(payload), rng), t.snd_nxt, ACK | PSH, options=opts,
               payload=payload), ""


def b_bad_offset(v: Victim, rng: random.Random) -> Built:
    """A data offset below 5, or one running past the segment."""
    payload = _junk(rng, 0, 16)
    doff = rng.randrange(0, 5) if rng.random() < 0.5 else rng.randrange((20 + len(payload)) // 4 + 1, 16)
    if v.role == "server":
        src, sport, dst, dport = _spoofed(v, rng)
        return tcp(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(9),
                   payload=payload, doff=doff), ""
    t = _real(v, rng)
    return tcp(t.src, t.dst, t.sport, t.dport, _behind(t, len(payload), rng), t.snd_nxt, ACK | PSH,
               payload=payload, doff=doff), ""


def b_wrong_port(v: Victim, rng: random.Random) -> Built:
    """Server: to a port that is not a tunnel port.  Client: from a server port that is not one."""
    flags = rng.choice((ACK, ACK | PSH, SYN, RST, FIN | ACK))
    if v.role == "server":
        src, sport, dst, _ = _spoofed(v, rng)
        dport = rng.choice([p for p in range(20000, 20100) if p not in v.tunnel_ports])
        return tcp(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), flags,
                   payload=_junk(rng, 0)), ""
    t = _real(v, rng)
    sport = rng.choice([p for p in range(20000, 20100) if p not in v.tunnel_ports])
    return tcp(t.src, t.dst, sport, t.dport, rng.getrandbits(32), rng.getrandbits(32), flags,
               payload=_junk(rng, 0)), ""


def b_spoofed_peer(v: Victim, rng: random.Random) -> Built:
    """Client: from a server port of an address that is not the server (a live tuple otherwise)."""
    t = _real(v, rng)
    src = rng.choice(v.spoof[v.family])
    payload = _bad_tag_record(rng, rng.randrange(1 << 40, 1 << 63))
    flags = rng.choice((ACK | PSH, RST, RST | ACK, FIN | ACK))
    return tcp(src, t.dst, t.sport, t.dport, t.rcv_nxt, t.snd_nxt, flags,
               payload=payload if flags & PSH else b""), ""


def b_bad_tag(v: Victim, rng: random.Random) -> Built:
    """A well-formed record (fresh counter, DATA frame) on a live tuple whose tag is wrong."""
    t = _real(v, rng)
    payload = _bad_tag_record(rng, rng.randrange(1 << 40, 1 << 63), 600)
    return tcp(t.src, t.dst, t.sport, t.dport, _behind(t, len(payload), rng), t.snd_nxt, ACK | PSH,
               options=_ts(rng), payload=payload), ""


def b_replay(v: Victim, rng: random.Random) -> Built:
    """A record with counter 0 on a live tuple: the hello's, always seen (RFC 6479 window)."""
    t = _real(v, rng)
    payload = _bad_tag_record(rng, 0, 600)
    return tcp(t.src, t.dst, t.sport, t.dport, _behind(t, len(payload), rng), t.snd_nxt, ACK | PSH,
               options=_ts(rng), payload=payload), ""


def b_rst_in(v: Victim, rng: random.Random) -> Built:
    """An RST inside the window but not at ``ack``: a challenge ACK, no reset (RFC 5961 §3.2)."""
    t = _real(v, rng)
    seq = t.rcv_nxt + rng.randrange(WINDOW // 2, WINDOW - 1)
    return tcp(t.src, t.dst, t.sport, t.dport, seq, t.snd_nxt, rng.choice((RST, RST | ACK))), ""


def b_rst_out(v: Victim, rng: random.Random) -> Built:
    """An RST near ``ack`` but behind it, or far ahead of the window: ignored."""
    t = _real(v, rng)
    behind = rng.random() < 0.5
    seq = t.rcv_nxt - rng.randrange(1, 1 << 20) if behind else t.rcv_nxt + rng.randrange(1 << 30, 1 << 31)
    return tcp(t.src, t.dst, t.sport, t.dport, seq, t.snd_nxt, rng.choice((RST, RST | ACK))), ""


def b_oversized(v: Victim, rng: random.Random) -> Built:
    """A full-MTU segment on a live tuple: a record claiming 65535 bytes, or a full one with a bad tag."""
    t = _real(v, rng)
    room = v.mtu - (20 if len(t.src) == 4 else 40) - 20
    if rng.random() < 0.5:
        payload = record(rng.randbytes(room - framing.RECORD_OVERHEAD), rng.getrandbits(63), rng.randbytes(8),
                         length=0xFFFF)
    else:
        datagram = rng.randbytes(room - framing.RECORD_OVERHEAD - framing.DATA_OVERHEAD)
        payload = record(framing.data_frame(rng.randrange(1, 1 << 32), datagram), rng.randrange(1 << 40, 1 << 63),
                         rng.randbytes(8))
    return tcp(t.src, t.dst, t.sport, t.dport, _behind(t, len(payload), rng), t.snd_nxt, ACK | PSH,
               payload=payload), ""


def b_zero_len(v: Victim, rng: random.Random) -> Built:
    """No payload on a live tuple: without ACK it is refused; with ACK it is a duplicate ACK (taken)."""
    t = _real(v, rng)
    flags = rng.choice((0, PSH, URG | PSH, ACK, ACK | PSH))
    return tcp(t.src, t.dst, t.sport, t.dport, _behind(t, 0, rng), t.snd_nxt, flags), "dup_ack" if flags & ACK else ""


def b_truncated_ip(v: Victim, rng: random.Random) -> Built:
    """The IP header claims more bytes than the frame holds."""
    extra = rng.randrange(1, 400)
    if v.role == "server":
        src, sport, dst, dport = _spoofed(v, rng)
        return tcp(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), ACK | PSH,
                   payload=_junk(rng), ip_extra=extra), ""
    t = _real(v, rng)
    return tcp(t.src, t.dst, t.sport, t.dport, t.rcv_nxt, t.snd_nxt, ACK | PSH, payload=_junk(rng),
               ip_extra=extra), ""


def b_udp_junk(v: Victim, rng: random.Random) -> Built:
    """Plain UDP at the tunnel's UDP sockets: junk, a udp-transport marker, or a fake steered segment."""
    kind = rng.randrange(3)
    if kind == 0:
        payload = bytes((rng.choice([b for b in range(0x50) if b != framing.UDP_MARKER]),)) + _junk(rng, 0)
    elif kind == 1:
        payload = bytes((framing.UDP_MARKER,)) + _junk(rng, 0, 60)
    else:  # offflags (data offset 5) window seq ack: what XDP makes of a segment, without the TCP checksum
        payload = struct.pack("!HHII", 5 << 12 | (ACK | PSH), 0xFFFF, 0, 0) + _junk(rng)
    if v.role == "server":
        src, sport, dst, dport = _spoofed(v, rng)
        return udp(src, dst, sport, dport, payload), ""
    t = _real(v, rng)
    if kind == 2:
        payload = payload[:4] + struct.pack("!II", _behind(t, len(payload) - 12, rng), t.snd_nxt) + payload[12:]
    return udp(t.src, t.dst, t.sport, t.dport, payload), ""


@dataclass(frozen=True)
class Category:
    name: str
    build: Builder
    weight: dict[str, int]  # lane role -> share of that lane's frames (0: not sent there)
    live: bool = False  # rebuilt every REFRESH from fresh sequence numbers
    doc: str = ""


CATEGORIES: tuple[Category, ...] = (
    Category("random_flags", b_random_flags, {"server": 12, "client": 12}),
    Category("syn_flood", b_syn_flood, {"server": 6, "client": 0}),
    Category("bad_checksum", b_bad_checksum, {"server": 12, "client": 12}),
    Category("bad_options", b_bad_options, {"server": 8, "client": 8}),
    Category("bad_offset", b_bad_offset, {"server": 6, "client": 6}),
    Category("wrong_port", b_wrong_port, {"server": 2, "client": 2}),
    Category("spoofed_peer", b_spoofed_peer, {"server": 0, "client": 2}),
    Category("bad_tag", b_bad_tag, {"server": 10, "client": 12}),
    Category("replay", b_replay, {"server": 8, "client": 10}),
    Category("rst_in_window", b_rst_in, {"server": 6, "client": 6}, live=True),
    Category("rst_out_of_window", b_rst_out, {"server": 6, "client": 6}),
    Category("oversized", b_oversized, {"server": 5, "client": 5}),
    Category("zero_length", b_zero_len, {"server": 5, "client": 5}),
    Category("truncated_ip", b_truncated_ip, {"server": 4, "client": 4}),
    Category("udp_junk", b_udp_junk, {"server": 10, "client": 10}),
)
BY_NAME = {c.name: c for c in CATEGORIES}
#: Where each category is meant to end up: rsockd's drop reasons, steering counters or kernel MIBs.
EXPECTED: dict[str, dict[str, tuple[str, ...]]] = {
    "xdp": {
        # port sharing: a segment of no connection of rsockd's (a spoofed tuple, an untagged SYN)
        # is the kernel's, counted passed_probe
        "bad_checksum": ("kernel.udp_csum_errors", "steer.syn_limited", "steer.passed_probe"),
        "bad_offset": ("steer.passed_malformed",),
        "truncated_ip": ("steer.passed_malformed",),
        "random_flags": ("drops.no_connection", "drops.unexpected", "drops.rst_ignored", "drops.malformed",
                         "steer.passed_probe"),
        "syn_flood": ("drops.backlog_full", "steer.syn_limited", "steer.passed_probe"),
        "bad_options": ("drops.bad_auth", "drops.no_connection", "steer.passed_probe"),
    },
    "nft": {
        # port sharing: an untagged SYN gets the kernel's verdict from the SYN queue (passed_probe)
        "syn_flood": ("drops.backlog_full", "steer.passed_probe"),
        "bad_checksum": ("drops.bad_checksum",),
        "bad_offset": ("drops.malformed",),
        "truncated_ip": ("drops.malformed",),
    },
    "any": {
        "random_flags": ("drops.no_connection", "drops.unexpected", "drops.rst_ignored", "drops.malformed"),
        "syn_flood": ("drops.backlog_full", "steer.syn_limited"),
        "bad_options": ("drops.bad_auth", "drops.no_connection"),
        "wrong_port": ("kernel.tcp_in_segs",),
        "spoofed_peer": ("kernel.tcp_in_segs",),
        "bad_tag": ("drops.bad_auth",),
        "replay": ("drops.replay",),
        "rst_in_window": ("drops.rst_ignored",),
        "rst_out_of_window": ("drops.rst_ignored",),
        "oversized": ("drops.malformed", "drops.bad_auth"),
        "zero_length": ("drops.unexpected",),
        "udp_junk": ("drops.malformed", "drops.unexpected", "drops.no_connection"),
    },
}


def expected(backend: str, category: str) -> tuple[str, ...]:
    return EXPECTED.get(backend, {}).get(category) or EXPECTED["any"][category]


# ---------------------------------------------------------------------------------------------
# Counters


def _mib(path: str) -> dict[str, int]:
    """``/proc/net/snmp``-style pairs of lines (or ``snmp6`` name/value lines) as one dict."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return out
    if path.endswith("snmp6"):
        for line in lines:
            k, _, val = line.partition(" ")
            if val.strip().lstrip("-").isdigit():
                out[k] = int(val)
        return out
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        proto, names = head.split(":", 1)
        for k, val in zip(names.split(), vals.split(":", 1)[1].split(), strict=False):
            out[f"{proto}{k}"] = int(val)
    return out


def kernel_counters(pid: int) -> dict[str, int]:
    """The kernel MIBs of the namespace ``pid`` lives in that the storm can move."""
    snmp = _mib(f"/proc/{pid}/net/snmp")
    snmp6 = _mib(f"/proc/{pid}/net/snmp6")
    netstat = _mib(f"/proc/{pid}/net/netstat")
    return {
        "kernel.udp_csum_errors": snmp.get("UdpInCsumErrors", 0) + snmp6.get("Udp6InCsumErrors", 0),
        "kernel.udp_rcvbuf_errors": snmp.get("UdpRcvbufErrors", 0) + snmp6.get("Udp6RcvbufErrors", 0),
        "kernel.tcp_in_segs": snmp.get("TcpInSegs", 0),
        "kernel.ip_truncated": netstat.get("IpExtInTruncatedPkts", 0) + snmp6.get("Ip6InTruncatedPkts", 0),
    }


def counters(control: str) -> dict[str, int]:
    """rsockd's drops and steering counters, and the kernel's, flattened (``drops.bad_auth``...)."""
    st = request(control, "status")["data"]
    conns = request(control, "ports")["data"]["connections"]
    out = {f"drops.{k}": int(v) for k, v in st.get("drops", {}).items()}
    out["conn.reconnects"] = sum(int(c["reconnects"]) for c in conns)
    out.update({f"steer.{k}": int(v) for k, v in st.get("steering", {}).items()})
    out.update(kernel_counters(int(st["pid"])))
    return out


#: Counters that say "refused and counted".  ``kernel.tcp_in_segs`` and ``kernel.ip_truncated`` are
#: reported beside them: the first is where wrong ports go, the second doubles ``passed_malformed``.
ACCOUNTED_PREFIXES = ("drops.", "steer.passed_", "steer.syn_limited", "steer.receiver_dropped",
                      "kernel.udp_csum_errors", "kernel.udp_rcvbuf_errors")


SETTLE_TOO = ("kernel.tcp_in_segs", "kernel.ip_truncated")


def accounted(delta: Mapping[str, int]) -> int:
    return sum(v for k, v in delta.items() if k.split("/", 1)[-1].startswith(ACCOUNTED_PREFIXES))


def diff(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


# ---------------------------------------------------------------------------------------------
# The storm


@dataclass
class PhaseResult:
    category: str
    sent: dict[str, int]  # lane ("server", "client") -> frames
    kinds: dict[str, int]  # Built kind -> frames ("dup_ack", "syn", "")
    seconds: float
    delta: dict[str, int]  # "server/drops.bad_auth" -> gained

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    @property
    def syn_opened(self) -> int:
        """Good SYNs to the server that neither the SYN limit nor the full backlog refused: each
        opened (or replaced) a half-open connection -- taken, not dropped."""
        refused = self.delta.get("server/steer.syn_limited", 0) + self.delta.get("server/drops.backlog_full", 0)
        return max(0, self.kinds.get("syn", 0) - refused)


@dataclass
class Storm:
    """Fire ``count`` crafted segments at a server and a client, category by category."""

    server: Victim
    client: Victim
    to_server: Lane  # the client's end of the veth
    to_client: Lane  # the server's end
    count: int = 1_000_000
    rate: float = 40_000.0  # frames/s over both lanes; 0: flat out
    seed: int = 1
    categories: Sequence[str] = tuple(c.name for c in CATEGORIES)
    pool: int = POOL
    settle_timeout: float = 5.0
    progress: Callable[[str], None] | None = None
    results: list[PhaseResult] = field(default_factory=list)

    def lane(self, role: str) -> tuple[Victim, Victim, Lane]:
        """The victim of a lane, its peer, and the socket that reaches it."""
        if role == "server":
            return self.server, self.client, self.to_server
        return self.client, self.server, self.to_client

    def snapshot(self) -> dict[str, int]:
        out = {f"server/{k}": v for k, v in counters(self.server.control).items()}
        out.update({f"client/{k}": v for k, v in counters(self.client.control).items()})
        return out

    def settle(self) -> dict[str, int]:
        """Wait until the storm's counters stop moving (the daemons have read their queues); the last
        reading.  Counters legitimate traffic moves too (``steered_*``) are not waited for."""
        def moving(snap: Mapping[str, int]) -> int:
            return accounted(snap) + sum(v for k, v in snap.items() if k.endswith(SETTLE_TOO))

        end = time.monotonic() + self.settle_timeout
        last = self.snapshot()
        still = 0
        while still < 3 and time.monotonic() < end:
            time.sleep(0.05)
            now = self.snapshot()
            still = still + 1 if moving(now) == moving(last) else 0
            last = now
        return last

    def shares(self) -> dict[tuple[str, str], int]:
        """(category, lane) -> frames: the lanes split ``count`` evenly, each by its weights."""
        out: dict[tuple[str, str], int] = {}
        for lane in ("server", "client"):
            cats = [BY_NAME[n] for n in self.categories if BY_NAME[n].weight[lane]]
            total = sum(c.weight[lane] for c in cats)
            budget = self.count // 2 + (self.count % 2 if lane == "server" else 0)
            for c in cats:
                out[(c.name, lane)] = budget * c.weight[lane] // total
            if cats:  # rounding leftovers go to the first category
                out[(cats[0].name, lane)] += budget - sum(out[(c.name, lane)] for c in cats)
        return out

    def _pool(self, cat: Category, role: str, rng: random.Random, n: int) -> FramePool:
        victim, _peer, lane = self.lane(role)
        built = [cat.build(victim, rng) for _ in range(n)]
        return FramePool([lane.ether(p) for p, _ in built], [k for _, k in built])

    def run(self) -> list[PhaseResult]:
        rng = random.Random(self.seed)
        for role in ("server", "client"):
            victim, peer, _ = self.lane(role)
            victim.refresh(peer.control)
        shares = self.shares()
        clock = 0.0  # seconds spent sending, over all phases: the rate is kept over these
        sent_total = 0
        before = self.settle()
        for name in self.categories:
            cat = BY_NAME[name]
            todo = {role: n for role in ("server", "client") if (n := shares.get((name, role), 0)) > 0}
            if not todo:
                continue
            for role in todo:  # a connection that reconnected has new sequence numbers
                victim, peer, _ = self.lane(role)
                victim.refresh(peer.control)
            size = {role: 256 if cat.live else min(self.pool, n) for role, n in todo.items()}
            pools = {role: self._pool(cat, role, rng, size[role]) for role in todo}
            sent = dict.fromkeys(todo, 0)
            kinds: dict[str, int] = {}
            t0 = refreshed = time.monotonic()
            while any(sent[r] < todo[r] for r in todo):
                if cat.live and time.monotonic() - refreshed >= REFRESH:
                    for role in todo:
                        victim, peer, _ = self.lane(role)
                        victim.refresh(peer.control)
                        pools[role] = self._pool(cat, role, rng, size[role])
                    refreshed = time.monotonic()
                for role in todo:
                    n = min(BATCH, todo[role] - sent[role])
                    if n > 0:
                        done = pools[role].send(self.lane(role)[2], n, kinds)
                        sent[role] += done
                        sent_total += done
                if self.rate:
                    ahead = sent_total / self.rate - (clock + time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
            seconds = time.monotonic() - t0
            clock += seconds
            after = self.settle()
            res = PhaseResult(name, sent, kinds, seconds, diff(after, before))
            before = after
            self.results.append(res)
            if self.progress is not None:
                self.progress(f"{name}: {res.total} frames in {seconds:.1f} s, {accounted(res.delta)} counted")
        return self.results


def kernel_share(r: PhaseResult) -> int:
    """Frames of a kernel-bound category (wrong ports, spoofed peers) the kernel's TCP got.  Capped
    at what was sent: the kernel's own RSTs in reply reach the other namespace's TCP too."""
    if "kernel.tcp_in_segs" not in EXPECTED["any"].get(r.category, ()):
        return 0
    return sum(min(n, r.delta.get(f"{lane}/kernel.tcp_in_segs", 0)) for lane, n in r.sent.items())


def summarize(results: Sequence[PhaseResult]) -> dict[str, Any]:
    """Totals over the phases: what was sent, what each counter gained, and how much is accounted for.

    ``accounted``: refused and counted (rsockd's drops, steering drops, the kernel's UDP checksum and
    queue drops).  ``taken``: meant to be taken without a drop (duplicate ACKs, SYNs that opened a
    half-open connection).  ``kernel_tcp``: frames of the wrong-port and spoofed-peer categories the
    kernel's TCP got (never rsockd's).  ``covered``: all three.
    """
    sent = sum(r.total for r in results)
    seconds = sum(r.seconds for r in results)
    total: dict[str, int] = {}
    for r in results:
        for k, v in r.delta.items():
            total[k] = total.get(k, 0) + v
    phases = []
    acc = dup = syn = kern = 0
    for r in results:
        a, d, y, kt = accounted(r.delta), r.kinds.get("dup_ack", 0), r.syn_opened, kernel_share(r)
        acc, dup, syn, kern = acc + a, dup + d, syn + y, kern + kt
        phases.append({"category": r.category, "sent": r.sent, "seconds": round(r.seconds, 2), "accounted": a,
                       "dup_acks": d, "syn_opened": y, "kernel_tcp": kt,
                       "covered_share": round((a + d + y + kt) / r.total, 4) if r.total else None,
                       "delta": dict(sorted(r.delta.items()))})
    return {
        "sent": sent, "seconds": round(seconds, 2), "pps": round(sent / seconds) if seconds else None,
        "accounted": acc, "accounted_share": round(acc / sent, 4) if sent else None,
        "taken_dup_acks": dup, "taken_syn_half_open": syn, "kernel_tcp": kern,
        "covered_share": round((acc + dup + syn + kern) / sent, 4) if sent else None,
        "wire_errors": 0, "totals": dict(sorted(total.items())), "phases": phases,
    }


# ---------------------------------------------------------------------------------------------
# Setting up from namespaces and control sockets


def _addresses(ns: str, dev: str) -> dict[int, bytes]:
    out = subprocess.run(["ip", "-n", ns, "-j", "addr", "show", "dev", dev], check=True, capture_output=True,
                         text=True).stdout
    addrs: dict[int, bytes] = {}
    for a in json.loads(out)[0]["addr_info"]:
        if a.get("scope") == "global":
            fam = 4 if a["family"] == "inet" else 6
            addrs.setdefault(fam, pack_address(a["local"]))
    return addrs


def spoof_addresses(addrs: Mapping[int, bytes]) -> dict[int, list[bytes]]:
    """Addresses in the link's prefixes (/24, /64) that no host holds: hosts ``SPOOF_HOSTS``."""
    out: dict[int, list[bytes]] = {}
    for fam, a in addrs.items():
        keep = 3 if fam == 4 else 8
        out[fam] = [a[:keep] + h.to_bytes(len(a) - keep, "big") for h in SPOOF_HOSTS]
    return out


def pin_neighbours(ns: str, dev: str, addrs: Sequence[bytes], mac: bytes) -> None:
    """Static neighbours: replies to these addresses leave at once (no ARP/ND for hosts that do not
    exist) towards ``mac``, whose namespace drops them as not its own."""
    lladdr = ":".join(f"{b:02x}" for b in mac)
    for a in addrs:
        text = socket.inet_ntop(socket.AF_INET if len(a) == 4 else socket.AF_INET6, a)
        subprocess.run(["ip", "-n", ns, "neigh", "replace", text, "lladdr", lladdr, "dev", dev, "nud", "permanent"],
                       check=True, capture_output=True)


@dataclass
class Setup:
    storm: Storm
    lanes: tuple[Lane, Lane]

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()


def setup(server_ns: str, server_dev: str, server_control: str, client_ns: str, client_dev: str,
          client_control: str, *, neighbours: bool = True, **kw: Any) -> Setup:
    """Lanes, victims and a ``Storm`` for a pair already up (every connection established)."""
    to_server = Lane(client_ns, client_dev)
    to_client = Lane(server_ns, server_dev)
    to_server.peer_mac, to_client.peer_mac = to_client.mac, to_server.mac
    s_addrs, c_addrs = _addresses(server_ns, server_dev), _addresses(client_ns, client_dev)
    sst = request(server_control, "status")["data"]
    cst = request(client_control, "status")["data"]
    family = 6 if ":" in cst["server"] else 4
    local_ports = [int(p) for p in cst.get("local_ports", [])]
    # Spoofed clients: in the link's prefix, their neighbour entries on the server pointing at the
    # client's end, which drops what the server answers them (not its address).  Their source ports
    # are never the client's local ports, or a capture backend on the client would take the answers.
    spoof_c = spoof_addresses(c_addrs)
    if neighbours:
        pin_neighbours(server_ns, server_dev, [a for v in spoof_c.values() for a in v], to_server.mac)
    server = Victim("server", server_control, family, s_addrs, c_addrs, spoof_c, list(sst["ports"]), [],
                    local_ports, int(sst.get("mtu", 1500)))
    client = Victim("client", client_control, family, {family: c_addrs[family]}, {family: s_addrs[family]},
                    {family: OFF_LINK[family]}, list(cst["ports"]), local_ports, [], int(cst.get("mtu", 1500)))
    return Setup(Storm(server, client, to_server, to_client, **kw), (to_server, to_client))


def exact_rst(victim: Victim, peer: Victim, lane: Lane, index: int = 0) -> Tuple4:
    """One RST at exactly the victim's next expected sequence number on live connection ``index``:
    RFC 5961 §3.2 says it resets the connection.  Returns the tuple it was aimed at."""
    victim.refresh(peer.control)
    t = victim.live[index]
    pkt = tcp(t.src, t.dst, t.sport, t.dport, t.rcv_nxt, 0, RST)
    lane.sock.send(lane.ether(pkt))
    return t


def blind_reset(victim: Victim, peer: Victim, lane: Lane, index: int = 0, jump: int = 1_000_000) -> Tuple4:
    """Two unauthenticated segments: a bare ACK at ``ack + jump``, then an RST at the sequence number
    that ACK would have made current.  A receiver that judges RSTs only against state authenticated
    traffic set is not reset by it."""
    victim.refresh(peer.control)
    t = victim.live[index]
    seq = (t.rcv_nxt + jump) & MASK32
    lane.sock.send(lane.ether(tcp(t.src, t.dst, t.sport, t.dport, seq, t.snd_nxt, ACK)))
    lane.sock.send(lane.ether(tcp(t.src, t.dst, t.sport, t.dport, seq, 0, RST)))
    return t


# ---------------------------------------------------------------------------------------------
# Command line


def render(summary: Mapping[str, Any]) -> str:
    lines = [f"sent {summary['sent']} segments in {summary['seconds']} s ({summary['pps']}/s); "
             f"accounted {summary['accounted']} ({summary['accounted_share']:.1%}), "
             f"taken {summary['taken_dup_acks']} duplicate ACKs + {summary['taken_syn_half_open']} "
             f"half-open SYNs, the kernel's TCP got {summary['kernel_tcp']} (covered {summary['covered_share']:.1%})"]
    for p in summary["phases"]:
        n = sum(p["sent"].values())
        gained = ", ".join(f"{k}={v}" for k, v in p["delta"].items() if not k.split("/")[-1].startswith(
            ("steer.steered", "kernel.ip_truncated")))
        lines.append(f"  {p['category']:<18} {n:>8}  covered {p['covered_share']:>6.1%}  {gained}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--server-ns", required=True)
    ap.add_argument("--server-dev", required=True)
    ap.add_argument("--server-control", required=True, help="the server's control socket")
    ap.add_argument("--client-ns", required=True)
    ap.add_argument("--client-dev", required=True)
    ap.add_argument("--client-control", required=True, help="the client's control socket")
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=40_000.0, help="frames per second, 0: flat out")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--categories", default=",".join(c.name for c in CATEGORIES))
    ap.add_argument("--backend", default="", help="the pair's backend (for the report only)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    cats = [c for c in args.categories.split(",") if c]
    unknown = [c for c in cats if c not in BY_NAME]
    if unknown:
        ap.error(f"unknown categories {unknown}; known: {', '.join(BY_NAME)}")
    s = setup(args.server_ns, args.server_dev, args.server_control, args.client_ns, args.client_dev,
              args.client_control, count=args.count, rate=args.rate, seed=args.seed, categories=cats,
              progress=None if args.json else lambda m: print(m, file=sys.stderr, flush=True))
    try:
        results = s.storm.run()
    finally:
        s.close()
    summary = summarize(results)
    summary["wire_errors"] = sum(lane.errors for lane in s.lanes)
    print(json.dumps(summary) if args.json else render(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
