"""The packet send path (``send_path = "packet"``, Linux, Ethernet links).

Segments leave as whole Ethernet frames through an ``AF_PACKET`` socket with ``PACKET_VNET_HDR``.
The virtio-net header in front of each frame asks the kernel to compute the TCP checksum
(``NEEDS_CSUM``: the checksum field carries the pseudo-header sum, and the device or the kernel
finishes it), and for a batch of segments of one connection it asks for segmentation
(``GSO_TCPV4/6``): one frame with one TCP header and many payloads, which the kernel splits into
segments of ``gso_size`` bytes, numbering their sequence numbers on and fixing the IP total
length, ID and checksum of each (the IDs count on from the header's, one per segment: the
connection's ``IpIdent`` takes as many).  So Python computes no checksum and makes one system
call per batch instead of one per segment.  The IP header is what the kernel's own TCP would
write: the route's TTL, DF and the connection's ID sequence (IPv4), its flow label (IPv6).

What it costs: the frames bypass routing and the output netfilter hooks.  The path is resolved
in userspace (the kernel's route for our mark, the link's and the next hop's MAC addresses) and
re-resolved within a second of a change the kernel reports; a destination without an Ethernet
route or a resolved neighbour uses the raw send path meanwhile, which also makes the kernel
resolve the neighbour.  docs/design.md, "Send path".
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from ..core.packet import PROTO_TCP, TCP_CHECK, pseudo_sum
from ..core.tcpprofile import IpIdent
from ..netlink import ARPHRD_ETHER, Host
from .hostprofile import default_hop_limit
from .rawsock import SO_MARK, Sender, SocketSender, grow_sndbuf

SOL_PACKET = 263
PACKET_VNET_HDR = 15
VNET_HDR = struct.Struct("=BBHHHH")  # flags gso_type hdr_len gso_size csum_start csum_offset
VNET_F_NEEDS_CSUM = 1
VNET_GSO_TCPV4 = 1
VNET_GSO_TCPV6 = 4
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_CHECK = struct.Struct("!H")
_TCP_CHECK = TCP_CHECK


@dataclass(frozen=True)
class L2Route:
    """Where frames to one destination go: the link and the two MAC addresses."""

    ifindex: int
    ifname: str
    src_mac: bytes
    dst_mac: bytes
    ttl: int = 64  # the route's TTL / hop limit


def resolve(host: Host, dst: bytes, mark: int) -> L2Route | None:
    """The Ethernet route to ``dst`` (packed) as the kernel would send a packet with ``mark``;
    None when the route's link is not Ethernet or the next hop's MAC is not known yet."""
    info = host.route_get(dst, mark)
    if info is None:
        return None
    link = host.link(index=info.oif)
    if link is None or link.type != ARPHRD_ETHER or len(link.address) != 6:
        return None
    mac = host.neighbour(info.oif, info.gateway or dst)
    if mac is None or len(mac) != 6:
        return None
    ttl = info.hoplimit or default_hop_limit(socket.AF_INET if len(dst) == 4 else socket.AF_INET6, link.name)
    return L2Route(info.oif, link.name, link.address, mac, ttl)


def resolve_all(dsts: Iterable[bytes], mark: int) -> dict[bytes, L2Route | None]:
    """``resolve`` for every destination, through one netlink socket.  Raises ``OSError`` when
    netlink cannot be asked at all."""
    with Host() as host:
        return {dst: resolve(host, dst, mark) for dst in dsts}


def _fold(s: int) -> int:
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


class PacketSender(SocketSender):
    """One packet socket per link, opened on first use."""

    WHAT = "packet send"

    def __init__(self, mark: int, errors: Counter[str] | None = None) -> None:
        super().__init__(mark, errors)
        self.batches = self.batched = 0  # GSO sends, and the segments they carried

    def _sock(self, route: L2Route) -> socket.socket:
        s = self._socks.get(route.ifindex)
        if s is None:
            # Protocol 0: the socket receives nothing; each frame's protocol comes from its
            # Ethernet header.
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
                grow_sndbuf(s)
                s.bind((route.ifname, 0))
                s.setblocking(False)
            except BaseException:
                s.close()
                raise
            self._socks[route.ifindex] = s
        return s

    @property
    def links(self) -> frozenset[int]:
        """The links (interface indexes) with an open socket."""
        return frozenset(self._socks)

    def keep_only(self, ifindexes: set[int]) -> None:
        """Close the sockets of links no route uses any more (a link deleted and made again gets
        a new index, and a socket of its own)."""
        for index in set(self._socks) - ifindexes:
            self._socks.pop(index).close()

    def wire(self, route: L2Route, dst: bytes) -> tuple[int, bytes, int]:
        """What the compiled writer sends frames to ``dst`` with (``_datapath`` ``fill``'s wire):
        the link's socket, the Ethernet header and the route's TTL."""
        eth = route.dst_mac + route.src_mac + _CHECK.pack(ETH_P_IP if len(dst) == 4 else ETH_P_IPV6)
        return self._sock(route).fileno(), eth, route.ttl

    def path(self, route: L2Route, src: bytes, dst: bytes) -> Sender:
        """The send function for runs of segments from ``src`` to ``dst`` (packed, one family):
        a run of one as one frame, a longer run as one GSO frame that the kernel splits (the
        checksum field is ignored: the kernel computes it)."""
        sendmsg = self._sock(route).sendmsg
        failed = self.failed
        v4 = len(dst) == 4
        iphl = 20 if v4 else 40
        eth = route.dst_mac + route.src_mac + _CHECK.pack(ETH_P_IP if v4 else ETH_P_IPV6)
        csum_start = 14 + iphl
        single = VNET_HDR.pack(VNET_F_NEEDS_CSUM, 0, 0, 0, csum_start, _TCP_CHECK) + eth
        gso_type = VNET_GSO_TCPV4 if v4 else VNET_GSO_TCPV6
        psum = pseudo_sum(src, dst)  # without the length, as for the connection's own checksums
        ttl = route.ttl
        if v4:
            # The IPv4 header's own sum without total length, ID and checksum (DF).
            hsum = 0x4500 + 0x4000 + (ttl << 8 | PROTO_TCP) + sum(struct.unpack("!4H", src + dst))
            ip4 = _IP4.pack

            def iphdr(tcp_len: int, ip: IpIdent, segs: int) -> bytes:
                tot = 20 + tcp_len
                ipid = ip.take(segs)
                return ip4(0x45, 0, tot, ipid, 0x4000, ttl, PROTO_TCP, ~_fold(hsum + tot + ipid) & 0xFFFF, src, dst)
        else:
            ip6 = _IP6.pack

            def iphdr(tcp_len: int, ip: IpIdent, segs: int) -> bytes:
                return ip6(6 << 28 | ip.label, tcp_len, PROTO_TCP, ttl, src, dst)

        check = _CHECK.pack
        no_ident = IpIdent()  # resets of no connection: ID 0, no flow label

        def send(header: bytes, payloads: list[bytes], ip: IpIdent | None) -> None:
            ip = ip or no_ident
            if len(payloads) == 1:
                n = len(header) + len(payloads[0])
                try:
                    sendmsg((single, iphdr(n, ip, 1), header[:_TCP_CHECK], check(_fold(psum + n)),
                             header[_TCP_CHECK + 2:], payloads[0]))
                except OSError as e:
                    failed(e)
                return
            self.batches += 1
            self.batched += len(payloads)
            n = len(header) + sum(map(len, payloads))
            vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, gso_type, csum_start + len(header), len(payloads[0]),
                                 csum_start, _TCP_CHECK)
            try:
                sendmsg((vnet, eth, iphdr(n, ip, len(payloads)), header[:_TCP_CHECK], check(_fold(psum + n)),
                         header[_TCP_CHECK + 2:], *payloads))
            except OSError as e:
                failed(e)

        return send

