"""The tunnel filter in the kernel: SO_ATTACH_FILTER on a real AF_PACKET socket, real traffic.

The client namespace sends crafted packets with raw sockets (tunnel segments and everything that
must not match); a packet socket in the server namespace with ``tunnel_filter`` attached must
queue exactly the tunnel segments.  The L3-first variant (Linux ``SOCK_DGRAM``, the nft backend's
receiver) and the Ethernet variant (``SOCK_RAW``, l3_offset 14: the filter macOS BPF devices get)
both run, for both roles.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from rsockd.core.packet import ACK, PROTO_TCP, PROTO_UDP, PSH, SYN, TcpHeader, ipv4_header, ipv6_header, pseudo_sum
from rsockd.steer import cbpf
from tests.netns import NetnsPair

pytestmark = pytest.mark.root

PORTS = frozenset({80, 443, *range(10001, 10011)})
LOCAL = 40000
ETH_P_ALL = 3
SOL_PACKET, PACKET_IGNORE_OUTGOING = 263, 23



def packed(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


def ip_packet(src: str, dst: str, l4: bytes, proto: int = PROTO_TCP, *, frag: int = 0x4000,
              options: bytes = b"", ident: int = 1) -> bytes:
    s, d = packed(src), packed(dst)
    if len(s) == 16:
        return ipv6_header(s, d, len(l4), proto=proto) + l4
    hdr = bytearray(ipv4_header(s, d, len(l4) + len(options), proto=proto, ident=ident, checksum=False))
    hdr[0] = 0x40 | (5 + len(options) // 4)
    hdr[6:8] = struct.pack("!H", frag)
    return bytes(hdr) + options + l4


def segment(src: str, dst: str, sport: int, dport: int, tag: bytes, flags: int = SYN, **kw: Any) -> bytes:
    tcp = TcpHeader(sport, dport, 1000, 0, flags, 65535).pack(tag, pseudo_sum(packed(src), packed(dst)))
    return ip_packet(src, dst, tcp, **kw)


def udp(src: str, dst: str, sport: int, dport: int, tag: bytes) -> bytes:
    return ip_packet(src, dst, struct.pack("!HHHH", sport, dport, 8 + len(tag), 0) + tag, PROTO_UDP)


def ping(src: str, dst: str, tag: bytes) -> bytes:
    if ":" in src:
        return ip_packet(src, dst, b"\x80\x00\x00\x00\x00\x01\x00\x01" + tag, 58)
    body = b"\x08\x00\x00\x00\x00\x01\x00\x01" + tag
    csum = ~(int.from_bytes(body + b"\0" * (len(body) & 1), "big") % 0xFFFF) & 0xFFFF
    return ip_packet(src, dst, body[:2] + struct.pack("!H", csum) + body[4:], 1)


class Sender:
    """Raw IPv4/IPv6 sockets that send whole crafted packets (header included)."""

    def __init__(self) -> None:
        self.s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def send(self, pkt: bytes) -> None:
        if pkt[0] >> 4 == 6:
            self.s6.sendto(pkt, (socket.inet_ntop(socket.AF_INET6, pkt[24:40]), 0))
        else:
            self.s4.sendto(pkt, (socket.inet_ntoa(pkt[16:20]), 0))

    def close(self) -> None:
        self.s4.close()
        self.s6.close()


def wrong_peers(net: NetnsPair) -> tuple[str, str]:
    """A second IPv4 and IPv6 address of the client namespace (added by the fixture)."""
    return net.cli4.rsplit(".", 1)[0] + ".7", net.cli6.rsplit(":", 1)[0] + ":7"


@contextmanager
def pair_with_wrong_peers() -> Iterator[NetnsPair]:
    """A namespace pair whose client also holds the ``wrong_peers`` addresses."""
    with NetnsPair() as pair:
        x4, x6 = wrong_peers(pair)
        pair.run("c", ["ip", "addr", "add", f"{x4}/24", "dev", pair.dev["c"]])
        pair.run("c", ["ip", "addr", "add", f"{x6}/64", "dev", pair.dev["c"], "nodad"])
        yield pair


@pytest.fixture(scope="module")
def net() -> Iterator[NetnsPair]:
    with pair_with_wrong_peers() as pair:
        yield pair


def cases(net: NetnsPair, role: str) -> list[tuple[bytes, bool]]:
    """(packet, must be received) sent from the client namespace; every packet carries a tag."""
    c4, c6, s4, s6 = net.cli4, net.cli6, net.srv4, net.srv6
    x4, x6 = wrong_peers(net)
    out: list[tuple[bytes, bool]] = []

    def add(make: object, want: bool) -> None:
        tag = b"<tag%04d>" % len(out)
        out.append((make(tag), want))  # type: ignore[operator]

    if role == "server":
        add(lambda t: segment(c4, s4, 40001, 443, t), True)
        add(lambda t: segment(c4, s4, 40001, 10010, t, ACK | PSH), True)
        add(lambda t: segment(x4, s4, 40001, 10001, t), True)  # any source is fine for the server
        add(lambda t: segment(c4, s4, 40001, 80, t, options=b"\x01\x01\x01\x00"), True)  # IHL 6
        add(lambda t: segment(c6, s6, 40001, 10005, t), True)
        add(lambda t: segment(x6, s6, 40001, 80, t, ACK), True)
        add(lambda t: segment(c4, s4, 40001, 444, t), False)
        add(lambda t: segment(c4, s4, 40001, 10011, t), False)
        add(lambda t: segment(c4, s4, 443, 40001, t), False)  # tunnel port as source
        add(lambda t: segment(c6, s6, 40001, 10000, t), False)
        add(lambda t: segment(c4, s4, 40001, 443, t, frag=0x2000), False)  # first fragment
        add(lambda t: segment(c4, s4, 40001, 443, t, frag=0x0004), False)  # later fragment
        frag_hdr = b"\x06\x00\x00\x01\x00\x00\x00\x2a"  # next header TCP, offset 0, MF
        add(lambda t: ip_packet(c6, s6, frag_hdr + segment(c6, s6, 1, 443, t)[40:], 44), False)
        add(lambda t: udp(c4, s4, 40001, 443, t), False)
        add(lambda t: udp(c6, s6, 40001, 10001, t), False)
        add(lambda t: ping(c4, s4, t), False)
        add(lambda t: ping(c6, s6, t), False)
    else:  # peers = the client namespace's first addresses, local port 40000 on the server side
        add(lambda t: segment(c4, s4, 443, LOCAL, t, SYN | ACK), True)
        add(lambda t: segment(c4, s4, 10003, LOCAL, t, ACK | PSH), True)
        add(lambda t: segment(c6, s6, 10010, LOCAL, t, ACK), True)
        add(lambda t: segment(x4, s4, 443, LOCAL, t, ACK), False)  # wrong peer
        add(lambda t: segment(x6, s6, 443, LOCAL, t, ACK), False)
        add(lambda t: segment(c4, s4, 444, LOCAL, t, ACK), False)  # not a tunnel port
        add(lambda t: segment(c4, s4, 443, LOCAL + 1, t, ACK), False)  # not our local port
        add(lambda t: segment(c6, s6, LOCAL, 443, t, ACK), False)  # reversed
        add(lambda t: segment(c4, s4, 443, LOCAL, t, ACK, frag=0x2000), False)
        add(lambda t: udp(c4, s4, 443, LOCAL, t), False)
        add(lambda t: ping(c6, s6, t), False)
    return out


@pytest.mark.parametrize("role", ["server", "client"])
@pytest.mark.parametrize("variant", ["dgram-l3", "raw-en10mb"])
def test_filter_in_kernel_receives_exactly_tunnel_segments(net: NetnsPair, role: str, variant: str) -> None:
    peers = [net.cli4, net.cli6]
    if variant == "dgram-l3":
        kind, prog = socket.SOCK_DGRAM, cbpf.tunnel_filter(role, PORTS, {LOCAL}, peers)  # type: ignore[arg-type]
    else:
        kind, prog = socket.SOCK_RAW, cbpf.tunnel_filter(
            role, PORTS, {LOCAL}, peers, l3_offset=14, link="en10mb")  # type: ignore[arg-type]
    with net.inside("s"):
        rx = socket.socket(socket.AF_PACKET, kind, 0)
    with net.inside("c"):
        tx = Sender()
    try:
        cbpf.attach_filter(rx, prog)
        rx.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        rx.bind((net.dev["s"], ETH_P_ALL))
        sent = cases(net, role)
        for pkt, _want in sent:
            tx.send(pkt)
        # A last tunnel segment: once it is queued, everything sent before it has been filtered.
        end = b"<end>"
        if role == "server":
            tx.send(segment(net.cli4, net.srv4, 40001, 10001, end))
        else:
            tx.send(segment(net.cli4, net.srv4, 10001, LOCAL, end, ACK))
        got = []
        deadline = time.monotonic() + 5
        while True:
            assert select.select([rx], [], [], max(0.0, deadline - time.monotonic()))[0], "end marker not received"
            frame = rx.recv(65536)
            if end in frame:
                break
            got.append(frame)
        l3 = 0 if variant == "dgram-l3" else 14
        received = {bytes(f[l3:]) for f in got}
        tags = {pkt: pkt[-9:] for pkt, _ in sent}
        for pkt, want in sent:
            hit = any(tags[pkt] in f for f in received)
            assert hit == want, f"{'missed' if want else 'wrongly received'} {pkt.hex()}"
        if variant == "raw-en10mb":
            assert all(f[12:14] in (b"\x08\x00", b"\x86\xdd") for f in got)
        assert len(got) == sum(w for _, w in sent)
    finally:
        rx.close()
        tx.close()


def test_drop_all_and_detach(net: NetnsPair) -> None:
    """``drop_all`` queues nothing; ``detach_filter`` then lets everything through.  A second
    socket with the tunnel filter shows when a packet has passed the taps."""
    with net.inside("s"):
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        witness = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    with net.inside("c"):
        tx = Sender()

    def wait_for(sock: socket.socket, tag: bytes, never: bytes = b"-") -> None:
        deadline = time.monotonic() + 5
        while True:
            assert select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0], f"{tag!r} not received"
            frame = sock.recv(65536)
            assert never not in frame
            if tag in frame:
                return

    try:
        cbpf.attach_filter(rx, cbpf.drop_all())
        cbpf.attach_filter(witness, cbpf.tunnel_filter("server", PORTS))
        rx.bind((net.dev["s"], ETH_P_ALL))
        witness.bind((net.dev["s"], ETH_P_ALL))
        tx.send(segment(net.cli4, net.srv4, 1, 443, b"<dropped>"))
        wait_for(witness, b"<dropped>")
        cbpf.detach_filter(rx)
        cbpf.detach_filter(rx)  # no filter any more: no error
        tx.send(segment(net.cli4, net.srv4, 1, 443, b"<passed>"))
        wait_for(rx, b"<passed>", never=b"<dropped>")
    finally:
        rx.close()
        witness.close()
        tx.close()
