"""Raw sockets that send the crafted TCP segments (Linux).

A path sends a run of segments (``endpoint.Transmit``: a header and payloads) one segment at a
time.  IPv4: ``SOCK_RAW``/``IPPROTO_RAW`` (implies ``IP_HDRINCL``).  Each path gets a 20-byte
header template with total length and checksum 0: the kernel fills those in (raw(7)); the TCP
checksum is computed here, with the path's pseudo-header sum, and sent in place of the segment's
zero field (no copy of the payload).  The TTL is the route's, and the ID is the sending
connection's (``Transmit.ip``): the kernel would leave a DF packet's zero ID as it is, where its
own TCP numbers them.  The IPv6 header is the kernel's, hop limit and flow label included.
IPv6: ``SOCK_RAW``/``IPPROTO_TCP`` with ``IPV6_CHECKSUM`` at offset 16, so the kernel computes
the checksum with the source address it picks; the source is pinned per path with
``IPV6_PKTINFO``.  A ``ret 0`` classic filter keeps the
IPv6 socket from receiving a copy of every inbound TCP segment.  Both set ``SO_MARK`` so the
egress guard and the notrack rule recognise our packets.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..core.packet import IPV4_HEADER, PROTO_TCP, TCP_CHECK, pseudo_sum, run_segments, segment_checksum
from ..core.tcpprofile import IpIdent
from ..errors import RsockdError, errno_name
from ..steer import cbpf
from .hostprofile import HopLimits

LOG = logging.getLogger(__name__)

SO_MARK = getattr(socket, "SO_MARK", 36)
IPV6_CHECKSUM = getattr(socket, "IPV6_CHECKSUM", 7)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
SNDBUF = 4 << 20
IN6_PKTINFO = struct.Struct("=16sI")  # struct in6_pktinfo {struct in6_addr addr; unsigned int ifindex;}

#: Sends a run: (first segment's TCP header, payloads, the connection's IP numbering or None);
#: see ``endpoint.Transmit``.
Sender = Callable[[bytes, list[bytes], IpIdent | None], None]
_NO_IDENT = IpIdent()  # never started: ID 0


def grow_sndbuf(s: socket.socket) -> None:
    """Give ``s`` a send buffer of ``SNDBUF`` bytes where the system allows it: Linux caps a larger
    value at ``net.core.wmem_max``, macOS refuses it (``ENOBUFS``) and the default stays."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    except OSError:
        pass


class SocketSender:
    """Sockets opened on first use, by a number (an address family, a link); send failures
    counted into ``errors`` by errno name, and logged once per kind."""

    #: Names the sends in the log.
    WHAT = "send"

    def __init__(self, mark: int, errors: Counter[str] | None = None) -> None:
        self.mark = mark
        self.errors: Counter[str] = errors if errors is not None else Counter()
        self._socks: dict[int, socket.socket] = {}
        self._logged: set[int] = set()

    def failed(self, e: OSError | int, count: int = 1) -> None:
        """``count`` sends failed with ``e`` (an exception, or an errno)."""
        name = errno_name(e)
        self.errors[name] += count
        n = e if isinstance(e, int) else e.errno or 0
        if n not in self._logged:  # once per kind: a full queue can fail thousands of times
            self._logged.add(n)
            LOG.warning("%s failed: %s (further %s failures are only counted)", self.WHAT,
                        os.strerror(n) if isinstance(e, int) else e.strerror, name)

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()


class RawSender(SocketSender):
    """One raw socket per address family, opened on first use."""

    WHAT = "raw send"

    #: What to say when the sockets cannot be opened for want of privilege.
    NEED_ROOT = "raw sockets need CAP_NET_RAW and SO_MARK needs CAP_NET_ADMIN (run as root)"
    #: The IPV6_PKTINFO option number; struct in6_pktinfo is the same on Linux and macOS.
    IPV6_PKTINFO = IPV6_PKTINFO

    def __init__(self, mark: int, errors: Counter[str] | None = None, io: Any = None) -> None:
        super().__init__(mark, errors)
        self.hop_limit = HopLimits(mark)
        self.io = io  # the compiled data path (dataplane/_datapath.c): a run in one sendmmsg

    def close(self) -> None:
        super().close()
        self.hop_limit.close()

    def _sock(self, family: int) -> socket.socket:
        s = self._socks.get(family)
        if s is None:
            try:
                s = self._open(family)
            except PermissionError:
                raise RsockdError(self.NEED_ROOT) from None
            grow_sndbuf(s)
            s.setblocking(False)
            self._socks[family] = s
        return s

    def _open(self, family: int) -> socket.socket:
        """A raw socket of ``family`` set up for this platform."""
        if family == socket.AF_INET:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        else:
            s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
            cbpf.attach_filter(s, cbpf.drop_all())
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 16)
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
        return s

    def path(self, src: bytes, dst: bytes) -> Sender:
        """A function sending runs of TCP segments from ``src`` to ``dst`` (packed addresses)."""
        if len(dst) == 4:
            return self._path4(self._sock(socket.AF_INET), src, dst, self.hop_limit(dst))
        s6 = self._sock(socket.AF_INET6)
        pktinfo = IN6_PKTINFO.pack(src, 0)
        if self.io is not None:
            send_raw, fd6 = self.io.send_raw, s6.fileno()

            def send6c(header: bytes, payloads: list[bytes], ip: IpIdent | None) -> None:
                for err, count in send_raw(fd6, dst, b"", 0, 0, header, payloads, 0, pktinfo):
                    self.failed(err, count)

            return send6c
        cmsg = [(socket.IPPROTO_IPV6, self.IPV6_PKTINFO, pktinfo)]
        addr6 = (socket.inet_ntop(socket.AF_INET6, dst), 0, 0, 0)
        sendmsg6 = s6.sendmsg

        def send6(header: bytes, payloads: list[bytes], ip: IpIdent | None) -> None:
            for hdr, payload in run_segments(header, payloads):
                try:
                    sendmsg6((hdr, payload), cmsg, 0, addr6)
                except OSError as e:
                    self.failed(e)

        return send6

    def _path4(self, sock: socket.socket, src: bytes, dst: bytes, ttl: int) -> Sender:
        """IPv4: a header template whose length and checksum the kernel fills in."""
        tmpl = IPV4_HEADER.pack(0x45, 0, 0, 0, 0x4000, ttl, PROTO_TCP, 0, src, dst)
        head, tail = tmpl[:4], tmpl[6:]  # around the ID
        addr4 = (socket.inet_ntop(socket.AF_INET, dst), 0)
        sendmsg = sock.sendmsg
        psum = pseudo_sum(src, dst)
        if self.io is not None:
            send_raw, fd = self.io.send_raw, sock.fileno()

            def send4c(header: bytes, payloads: list[bytes], ip: IpIdent | None) -> None:
                ident = ip or _NO_IDENT
                step = 1 if ident.counting else 0
                first = ident.take(len(payloads))
                for err, count in send_raw(fd, dst, tmpl, first, step, header, payloads, psum, b""):
                    self.failed(err, count)

            return send4c

        def send4(header: bytes, payloads: list[bytes], ip: IpIdent | None) -> None:
            take = (ip or _NO_IDENT).take
            for hdr, payload in run_segments(header, payloads):
                check = segment_checksum(psum, hdr, payload).to_bytes(2, "big")
                try:
                    sendmsg((head, take().to_bytes(2, "big"), tail, hdr[:TCP_CHECK], check, hdr[TCP_CHECK + 2:],
                             payload), (), 0, addr4)
                except OSError as e:
                    self.failed(e)

        return send4

