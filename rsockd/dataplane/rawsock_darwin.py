"""Raw sockets that send the crafted TCP segments (macOS); the same API as ``rsockd.dataplane.rawsock``.

IPv4: ``SOCK_RAW``/``IPPROTO_RAW`` with ``IP_HDRINCL`` set explicitly (xnu's ``rip_attach`` does
not imply it for ``IPPROTO_RAW`` the way Linux does).  BSD raw IP output takes ``ip_len`` and
``ip_off`` in *host* byte order: xnu ``rip_output`` checks ``ip->ip_len > m->m_pkthdr.len``
unconverted, and ``ip_output`` swaps both to network order (``HTONS``) just before the
interface.  So each path keeps a 20-byte header whose length is written in host order per
segment; ``ip_id`` 0 is replaced by a random id (what macOS's own TCP sends: random IDs,
``net.inet.ip.random_id``) and ``ip_sum`` is always computed by the kernel.  The TTL is the
route's default (``HopLimits``).

IPv6: ``SOCK_RAW``/``IPPROTO_TCP`` with ``IPV6_CHECKSUM`` at offset 16, so the kernel computes
the TCP checksum with the source it uses; the source is pinned per path with an
``IPV6_PKTINFO`` control message.  BSD raw sockets never receive TCP (``tcp_input`` /
``tcp6_input`` consume it), so unlike Linux no ``ret 0`` filter is needed.

The socket option numbers are macOS's own (they differ from Linux's), written out here so the
module is correct whatever the ``socket`` module of the running Python exposes.

**No SO_MARK.**  macOS has no per-socket packet mark, and pf can only match tags that pf itself
set, so the pf anchor cannot tell our segments from segments the kernel makes.  It need not:

- on Linux the mark lets the egress guard drop the kernel's RST/ACK for tunnel segments the TCP
  stack saw.  On macOS the anchor blocks the tunnel segments *inbound*, before IP input, so the
  TCP stack never sees them and never answers them: there is nothing of the kernel's to drop;
- on Linux the mark exempts our sends from conntrack.  pf's equivalent is state; the anchor's
  ``pass out quick ... no state`` rule matches our segments by their ports and addresses and
  keeps pf from creating state for them (a state would let the peer's replies skip the
  inbound block).  The kernel sends nothing from those ports, so matching by ports is enough.

``mark`` is accepted for the common constructor and ignored.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct

from ..core.packet import (
    IPV4_HEADER,
    IPV4_MIN_HEADER,
    PROTO_TCP,
    TCP_CHECK,
    pseudo_sum,
    run_segments,
    segment_checksum,
)
from ..core.tcpprofile import IpIdent
from . import rawsock
from .rawsock import Sender

__all__ = ["RawSender", "Sender", "ipv4_header"]

LOG = logging.getLogger(__name__)

IP_HDRINCL = 2  # <netinet/in.h> (Linux: 3)
IPV6_CHECKSUM = 26  # <netinet6/in6.h> (Linux: 7)
IPV6_PKTINFO = 46  # <netinet6/in6.h> IPV6_3542PKTINFO (Linux: 50); struct in6_pktinfo is the same
IP_DF = 0x4000
_HOST_U16 = struct.Struct("=H")


def ipv4_header(src: bytes, dst: bytes, total_length: int = 0, *, ttl: int = 64) -> bytearray:
    """An option-less IPv4 header for ``IP_HDRINCL`` on macOS: ``ip_len`` (``total_length``)
    and ``ip_off`` (DF) in host byte order, everything else in network order, ``ip_id`` and
    ``ip_sum`` 0 for the kernel to fill."""
    hdr = bytearray(IPV4_HEADER.pack(0x45, 0, 0, 0, 0, ttl, PROTO_TCP, 0, src, dst))
    _HOST_U16.pack_into(hdr, 2, total_length)
    _HOST_U16.pack_into(hdr, 6, IP_DF)
    return hdr


class RawSender(rawsock.RawSender):
    """The Linux sender with macOS's sockets and IPv4 header; ``mark`` is kept and unused."""

    NEED_ROOT = "raw sockets need root"
    IPV6_PKTINFO = IPV6_PKTINFO

    def _open(self, family: int) -> socket.socket:
        if family == socket.AF_INET:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            s.setsockopt(socket.IPPROTO_IP, IP_HDRINCL, 1)
        else:
            s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 16)
        return s

    def _path4(self, sock: socket.socket, src: bytes, dst: bytes, ttl: int) -> Sender:
        hdr = ipv4_header(src, dst, ttl=ttl)
        set_len = _HOST_U16.pack_into
        addr4 = (socket.inet_ntop(socket.AF_INET, dst), 0)
        sendmsg = sock.sendmsg

        psum = pseudo_sum(src, dst)

        def send4(header: bytes, payloads: list[bytes], ip: IpIdent | None) -> None:
            # ``ip`` goes unused: macOS numbers the IDs itself, at random, as for its own TCP.
            for tcp, payload in run_segments(header, payloads):
                total = IPV4_MIN_HEADER + len(tcp) + len(payload)
                if total > 0xFFFF:
                    self.failed(OSError(errno.EMSGSIZE, "segment too long for IPv4"))
                    continue
                set_len(hdr, 2, total)  # sendmsg copies it, so one header serves the path
                check = segment_checksum(psum, tcp, payload).to_bytes(2, "big")
                try:
                    sendmsg((hdr, tcp[:TCP_CHECK], check, tcp[TCP_CHECK + 2:], payload), (), 0, addr4)
                except OSError as e:
                    self.failed(e)

        return send4
