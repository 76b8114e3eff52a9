"""The data path: moves bytes between sockets and the pure core (asyncio, Linux).

``ServerRelay`` and ``ClientRelay`` own the sockets (tunnel UDP sockets, TCP port reservations,
the application / target UDP sockets, raw senders) and the pure objects (connections, the
acceptor, sessions, flows).  They read every socket until ``EAGAIN`` on each wake-up, feed what
they read to the core, and send what the core produced.  One loop timer, armed at the earliest
connection timer, runs the connections' timers.

Steered segments arrive on the tunnel UDP sockets (XDP backend) or as whole IP packets on the
steering backend's packet sockets (nft backend); both end in ``_segment()``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..core import framing
from ..core.counters import new_drops
from ..core.faketcp import (
    Acceptor,
    Connected,
    Connection,
    ConnectionClosed,
    FlowClosed,
    HelloReceived,
    State,
    Timing,
)
from ..core.framing import CloseReason, Keyring
from ..core.packet import (
    PROTO_TCP,
    TCP_MIN_HEADER,
    TcpHeader,
    pack_address,
    parse_ip,
    parse_meta,
    parse_tcp,
    pseudo_sum,
    transport_checksum_ok,
)
from ..errors import PacketError, RsockdError
from ..logs import RateLimit
from ..service.config import Config
from .netinfo import Route, interface_mtu, resolve, route_to

if sys.platform == "darwin":
    from .rawsock_darwin import RawSender, Sender
else:
    from .rawsock import RawSender, Sender
if TYPE_CHECKING:
    from .packetsend import L2Route, PacketSender
from ..core.session import ClientFlow, FlowTable, ServerFlow, Session, SessionTable
from ..steer import Receiver

LOG = logging.getLogger(__name__)

# Fallbacks for a Python built without them: Linux's values, or macOS's (<netinet/in.h>,
# <netinet6/in6.h> with RFC 3542: they differ).
_DARWIN = sys.platform == "darwin"
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 26 if _DARWIN else 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 61 if _DARWIN else 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 46 if _DARWIN else 50)
BUF = 65536 + 64
BATCH = 256  # datagrams read per socket per wake-up before yielding to the loop
SOCKBUF = 4 << 20
TCP_OPT_TS = 12
ANC = socket.CMSG_SPACE(20)


def timing_of(cfg: Config) -> Timing:
    return Timing(keepalive=cfg.keepalive, dead_timeout=cfg.dead_timeout, syn_timeout=cfg.syn_timeout,
                  reconnect_min=cfg.reconnect_min, reconnect_max=cfg.reconnect_max)


def max_datagram(mtu: int, v6: bool, transports: Iterable[str]) -> int:
    """The largest application datagram one segment can carry (docs/protocol.md §4, Sizes)."""
    ip = 40 if v6 else 20
    over = {"tcp": TCP_MIN_HEADER + TCP_OPT_TS, "udp": 8 + 1}
    return mtu - ip - max(over[t] for t in transports) - framing.RECORD_OVERHEAD - framing.DATA_OVERHEAD


SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _bufsize(sock: socket.socket) -> None:
    """Large socket buffers: bursts of small datagrams cost ~1 KiB of buffer each.  The FORCE
    options (root) go past net.core.rmem_max/wmem_max, whose 208 KiB default caps the others."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        for opt in (force, plain) if sys.platform == "linux" else (plain,):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
                break
            except OSError:
                continue


def _bind(family: int, kind: int, addr: tuple[Any, ...], what: str) -> socket.socket:
    s = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(addr)
    except OSError as e:
        s.close()
        proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
        where = "" if addr[0] in ("", "0.0.0.0", "::") else f" on {addr[0]}"
        if e.errno == errno.EADDRINUSE:
            raise RsockdError(f"{what}: port {addr[1]}/{proto}{where} is already in use "
                              "(by another program or rsockd instance)") from None
        raise RsockdError(f"{what}: cannot bind port {addr[1]}/{proto}{where}: {e.strerror}") from None
    s.setblocking(False)
    return s


class Relay:
    """What both roles share: sockets, sending, the timer, reading packet sockets."""

    role = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.clock_offset = time.time() - self.loop.time()
        self.drops: Counter[str] = new_drops()
        self.tx_errors: Counter[str] = Counter()
        self.raw = RawSender(cfg.mark, self.tx_errors)
        # send_path = "packet": Ethernet frames, kernel checksums, batches split by the kernel
        self.packet: PacketSender | None = None
        self._l2: dict[bytes, L2Route | None] = {}  # destination -> its Ethernet route (None: raw for now)
        self._l2_warned: set[int | None] = set()  # errnos of packet sockets that would not open, logged
        if cfg.send_path == "packet":
            if sys.platform != "linux":
                raise RsockdError('send_path = "packet" is supported on Linux only; use "raw"')
            from .packetsend import PacketSender

            self.packet = PacketSender(cfg.mark, self.tx_errors)
        self.tx_batches = self.tx_batched = 0  # batches sent, and the segments they carried
        self.keyring = Keyring.from_secret(cfg.key)
        self.timing = timing_of(cfg)
        self.started = time.time()
        self.mtu = cfg.mtu or 1500
        self.max_datagram = 0
        self.app_rx = self.app_tx = self.app_rx_bytes = self.app_tx_bytes = 0
        self._sockets: list[socket.socket] = []
        self._readers: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._buf = bytearray(BUF)
        self._view = memoryview(self._buf)
        self._limit = RateLimit(10.0)
        self._oversize_warned = False
        self.interfaces: tuple[str, ...] = ()
        self.closing = False
        self.on_change: Callable[[], None] | None = None  # connections came up or went down
        self.local_addrs: frozenset[bytes] = frozenset()  # ours, packed: captured segments must be for one
        self.capturing = False
        self._ticks = 0
        self.delivery = Delivery(self)

    def _tick(self) -> None:
        """Once a second: every 5 s, re-read our addresses when a capture backend needs them; the
        packet send path's routes, every second."""
        self._ticks += 1
        if self.capturing and self._ticks % 5 == 0:
            self.refresh_local_addrs()
        if self.packet is not None:
            self._refresh_l2()

    # -- the packet send path -------------------------------------------------------------------

    def _l2_route(self, dst: bytes) -> L2Route | None:
        if dst not in self._l2:
            self._resolve_l2({dst})
        return self._l2[dst]

    def _resolve_l2(self, dsts: set[bytes]) -> None:
        """Look the Ethernet routes of ``dsts`` up (one netlink socket for them all) into the cache."""
        from .packetsend import resolve_all

        try:
            self._l2.update(resolve_all(dsts, self.cfg.mark))
        except OSError as e:
            LOG.warning("packet send path: cannot look up routes: %s", e)
        for dst in dsts:
            self._l2.setdefault(dst, None)

    def _refresh_l2(self) -> None:
        """Look every destination's route up again; a connection whose route changed (a new next
        hop, the neighbour resolved or lost) gets its send functions anew, here, between two
        sends (its segments' checksums depend on the path: ``kernel_checksum``)."""
        conns = [c for c in self.connections() if c.io is not None and c.transport == "tcp"]
        old, self._l2 = self._l2, {}  # only the destinations of current connections stay
        dsts = {c.remote[0] for c in conns}
        self._resolve_l2(dsts)
        changed = {dst for dst in dsts if self._l2[dst] != old.get(dst)}
        for conn in conns:
            if conn.remote[0] in changed:
                conn.io = None
                self._sender(conn)
        if self.packet is not None:
            self.packet.keep_only({r.ifindex for r in self._l2.values() if r is not None})

    def _tcp_sender(self, conn: Connection) -> Sender:
        """``conn``'s send functions: the packet path when it has a route, else the raw one."""
        local, remote = conn.local[0], conn.remote[0]
        route = self._l2_route(remote) if self.packet is not None else None
        if route is not None:
            assert self.packet is not None
            try:
                send, conn.io_batch = self.packet.path(route, local, remote)
            except OSError as e:  # e.g. a sandbox without AF_PACKET: raw sockets; tried again each second
                if e.errno not in self._l2_warned:
                    self._l2_warned.add(e.errno)
                    LOG.warning("packet send path: cannot open a packet socket on %s: %s; sending through raw "
                                "sockets meanwhile", route.ifname, e.strerror)
                self._l2[remote] = None
            else:
                conn.kernel_checksum = True  # the packet path's kernel computes it
                return send
        conn.io_batch = None
        conn.kernel_checksum = len(remote) == 16  # raw IPv6 sockets compute it, IPv4 ones do not
        return self.raw.path(local, remote)

    def refresh_local_addrs(self) -> None:
        """The addresses captured segments may be for: local_ip, else every address of our interfaces."""
        if self.cfg.local_ip:
            self.local_addrs = frozenset({pack_address(self.cfg.local_ip)})
            return
        from .netinfo import interface_addresses

        found: set[bytes] = set()
        for name in self.interfaces:
            try:
                found.update(pack_address(a.split("%")[0]) for a in interface_addresses(name))
            except (OSError, RsockdError, ValueError):
                continue  # an interface that went away: steering says so
        self.local_addrs = frozenset(found)

    # -- set-up helpers -------------------------------------------------------------------------

    def _watch(self, sock: socket.socket, callback: Callable[..., None], *args: Any) -> None:
        self.loop.add_reader(sock.fileno(), callback, *args)
        self._readers.append(sock.fileno())

    def _unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd in self._readers:
            self.loop.remove_reader(fd)
            self._readers.remove(fd)

    def add_receivers(self, receivers: list[Receiver]) -> None:
        """Capture sources of a capture backend: whole IP packets, checksum unverified."""
        for rx in receivers:
            self.loop.add_reader(rx.fileno(), self._on_packets, rx)
            self._readers.append(rx.fileno())
        self.capturing = bool(receivers)
        if self.capturing:
            self.refresh_local_addrs()

    # -- sending --------------------------------------------------------------------------------

    def _sender(self, conn: Connection) -> Sender:
        s: Sender | None = conn.io
        if s is None:
            if conn.transport == "udp":
                sock = self._udp_socket(conn.local)
                dst = (socket.inet_ntop(socket.AF_INET if len(conn.remote[0]) == 4 else socket.AF_INET6,
                                        conn.remote[0]), conn.remote[1])
                sendto = sock.sendto

                def s(payload: bytes) -> None:
                    try:
                        sendto(payload, dst)
                    except OSError as e:
                        self.tx_errors[errno.errorcode.get(e.errno or 0, "error").lower()] += 1
            else:
                s = self._tcp_sender(conn)
            conn.io = s
        return s

    def _udp_socket(self, local: tuple[bytes, int]) -> socket.socket:
        raise NotImplementedError

    def _flush(self, conn: Connection) -> None:
        """Send what ``conn`` produced and handle its events, until neither is left: handling an
        event may produce segments (accepting a hello makes the HELLO_ACK), which go out now."""
        while True:
            out = conn.segments_to_send()
            if out:
                send = self._sender(conn)
                for seg in out:
                    send(seg)
            ev = conn.next_event()
            if ev is None:
                break
            self._event(conn, ev)
        t = conn.get_timer()
        if t is not None and t < self._timer_at:
            self._arm(t)

    def _event(self, conn: Connection, ev: Any) -> None:
        raise NotImplementedError

    def _changed(self) -> None:
        if self.on_change is not None and not self.closing:
            self.on_change()

    # -- timers ---------------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = self.loop.time()
        nxt = math.inf
        for conn in self.connections():
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
                self._flush(conn)
                t = conn.get_timer()
            if t is not None and t < nxt:
                nxt = t
        if nxt < self._timer_at:
            self._arm(max(nxt, now + 0.001))

    def connections(self) -> list[Connection]:
        raise NotImplementedError

    # -- receiving ------------------------------------------------------------------------------

    def _on_packets(self, rx: Receiver) -> None:
        """Read IP packets from a capture source (nft/bpfdev backends): parse, verify, dispatch."""
        now = self.loop.time()
        try:
            for pkt in rx.packets(self._buf):
                self._packet(pkt, now)
        except OSError as e:
            self.tx_errors["rx_" + errno.errorcode.get(e.errno or 0, "error").lower()] += 1
        self._after_batch()

    def _packet(self, pkt: memoryview, now: float) -> None:
        try:
            ip, l4 = parse_ip(pkt)
            if ip.proto != PROTO_TCP or ip.fragment:
                self.drops["malformed"] += 1
                return
            if ip.dst not in self.local_addrs:  # a capture sees the link, not just what is ours
                self.drops["not_local"] += 1
                return
            if not transport_checksum_ok(pseudo_sum(ip.src, ip.dst), l4):
                self.drops["bad_checksum"] += 1
                return
            hdr, payload = parse_tcp(l4)
        except PacketError:
            self.drops["malformed"] += 1
            return
        self._segment((ip.dst, hdr.dport), (ip.src, hdr.sport), hdr, payload, now)

    def _after_batch(self) -> None:
        """Called after each batch of received segments: what they carried goes out now."""
        self.delivery.flush()

    def _tunnel_datagram(self, data: memoryview, local: tuple[bytes, int], remote: tuple[bytes, int],
                         now: float) -> None:
        """One datagram from a tunnel UDP socket: a steered segment or a udp-transport datagram."""
        if not data:
            self.drops["malformed"] += 1
            return
        b0 = data[0]
        if b0 >= 0x50:
            try:
                hdr, payload = parse_meta(data)
            except PacketError:
                self.drops["malformed"] += 1
                return
            hdr.sport, hdr.dport = remote[1], local[1]
            self._segment(local, remote, hdr, payload, now)
        elif b0 == framing.UDP_MARKER:
            self._datagram(local, remote, data, now)
        else:
            self.drops["malformed"] += 1

    def _segment(self, local: tuple[bytes, int], remote: tuple[bytes, int], hdr: TcpHeader,
                 payload: memoryview, now: float) -> None:
        raise NotImplementedError

    def _datagram(self, local: tuple[bytes, int], remote: tuple[bytes, int], data: memoryview, now: float) -> None:
        raise NotImplementedError

    def _oversize(self, size: int) -> None:
        self.drops["oversized"] += 1
        if not self._oversize_warned:
            self._oversize_warned = True
            LOG.warning("dropped a %d-byte datagram: the tunnel carries at most %d bytes per datagram "
                        "(path MTU %d); set the application's MTU to %d or less (WireGuard: MTU = %d)",
                        size, self.max_datagram, self.mtu, self.max_datagram, self.max_datagram - 32)

    # -- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Tell every peer we are going (CLOSE + FIN/RST), then release the sockets."""
        self.closing = True
        now = self.loop.time()
        for conn in self.connections():
            if conn.state != State.CLOSED:
                conn.close(now, CloseReason.SHUTDOWN)
            self._flush(conn)
        if self._timer is not None:
            self._timer.cancel()
        for fd in list(self._readers):
            self.loop.remove_reader(fd)
        self._readers.clear()
        for s in self._sockets:
            s.close()
        self._sockets.clear()
        self.raw.close()
        if self.packet is not None:
            self.packet.close()

    # -- status ---------------------------------------------------------------------------------

    def conn_info(self, conn: Connection, now: float) -> dict[str, Any]:
        fam = socket.AF_INET if len(conn.remote[0]) == 4 else socket.AF_INET6
        return {
            "transport": conn.transport,
            "index": conn.conn_index,
            "state": conn.state.name.lower(),
            "port": conn.local[1] if self.role == "server" else conn.remote[1],
            "local_port": conn.local[1],
            "peer": f"{socket.inet_ntop(fam, conn.remote[0])}:{conn.remote[1]}" if fam == socket.AF_INET
            else f"[{socket.inet_ntop(fam, conn.remote[0])}]:{conn.remote[1]}",
            "seq": conn.snd_nxt,
            "ack": conn.rcv_nxt,
            "rx_packets": conn.rx_packets,
            "rx_bytes": conn.rx_bytes,
            "tx_packets": conn.tx_packets,
            "tx_bytes": conn.tx_bytes,
            "last_rx_ago": round(now - conn.last_rx, 3) if conn.last_rx else None,
            "reconnects": conn.reconnects,
            "close_reason": conn.close_reason,
            "send_path": "udp" if conn.transport == "udp" else "packet" if conn.io_batch is not None else "raw",
        }


UDP_SEGMENT = 103  # <linux/udp.h>: UDP GSO segment size (cmsg on SOL_UDP)
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS
BATCH_MAX = 32  # records in one packet-path batch (fewer when larger: GSO_MAX_BYTES)
BATCH_OVERHEAD = framing.RECORD_OVERHEAD + 72  # what a record grows by as a segment: the tag; TCP and IP headers
GSO_MAX_BYTES = 65000  # under the 64 KiB an IP datagram can carry


class Delivery:
    """Datagrams for the application side (target or app), gathered during one wake-up.

    A run of equal-sized datagrams to one destination leaves in one ``sendmsg`` with UDP GSO
    (``UDP_SEGMENT``): the kernel makes the datagrams, the receiver sees each one as usual.  One
    send costs one trip through the stack instead of one per datagram.  Order is kept per
    destination; where GSO is refused, every datagram goes on its own.
    """

    __slots__ = ("gso", "queues", "relay")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.gso = sys.platform == "linux"
        self.queues: dict[tuple[socket.socket, Any], tuple[str, list[bytes]]] = {}

    def add(self, sock: socket.socket, addr: Any, label: str, data: bytes) -> None:
        q = self.queues.get((sock, addr))
        if q is None:
            self.queues[(sock, addr)] = (label, [data])
        else:
            q[1].append(data)

    def flush(self) -> None:
        if not self.queues:
            return
        queues, self.queues = self.queues, {}
        for (sock, addr), (label, items) in queues.items():
            if len(items) == 1 or not self.gso:
                for d in items:
                    self._one(sock, addr, label, d)
                continue
            i, n = 0, len(items)
            while i < n:
                size = len(items[i])
                j, total = i + 1, size
                while j < n and j - i < GSO_MAX_SEGMENTS and len(items[j]) == size and total + size <= GSO_MAX_BYTES:
                    total += size
                    j += 1
                if (j < n and j - i < GSO_MAX_SEGMENTS and len(items[j]) < size
                        and total + len(items[j]) <= GSO_MAX_BYTES):
                    j += 1  # a shorter datagram may end a run
                if j - i == 1 or size == 0:
                    for d in items[i:j]:
                        self._one(sock, addr, label, d)
                else:
                    self._run(sock, addr, label, items[i:j], size)
                i = j

    def _run(self, sock: socket.socket, addr: Any, label: str, run: list[bytes], size: int) -> None:
        cmsg = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
        try:
            if addr is None:
                sock.sendmsg(run, cmsg)
            else:
                sock.sendmsg(run, cmsg, 0, addr)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                LOG.info("UDP GSO refused (%s): sending datagrams one by one", e.strerror)
                self.gso = False
                for d in run:
                    self._one(sock, addr, label, d)
            else:
                self.relay.tx_errors[label + errno.errorcode.get(e.errno or 0, "error").lower()] += len(run)

    def _one(self, sock: socket.socket, addr: Any, label: str, data: bytes) -> None:
        try:
            if addr is None:
                sock.send(data)
            else:
                sock.sendto(data, addr)
        except OSError as e:
            self.relay.tx_errors[label + errno.errorcode.get(e.errno or 0, "error").lower()] += 1


class FrameBatch:
    """DATA frames read in one wake-up, packed per connection into as few segments as fit.

    Nothing waits for more traffic: the batch is flushed when the read loop ends, so a lone
    datagram goes out at once and a burst of small ones shares segments (one raw send, one
    record, one tag for many datagrams).
    """

    __slots__ = ("budget", "now", "pending", "records", "relay")

    def __init__(self, relay: Relay, budget: int, now: float) -> None:
        self.relay = relay
        self.budget = budget  # frame bytes one segment carries (the largest datagram + its frame header)
        self.now = now
        self.pending: dict[Connection, tuple[list[bytes], int]] = {}
        # Full records of connections whose send path takes batches: sent at flush, a run of
        # equal-sized ones in one send (packet send path: the kernel splits them into segments).
        self.records: dict[Connection, list[tuple[bytes, int]]] = {}

    def add(self, conn: Connection, frame: bytes) -> None:
        entry = self.pending.get(conn)
        if entry is None:
            self.pending[conn] = ([frame], len(frame))
            return
        frames, size = entry
        if size + len(frame) > self.budget:
            self._send(conn, frames)
            self.pending[conn] = ([frame], len(frame))
        else:
            frames.append(frame)
            self.pending[conn] = (frames, size + len(frame))

    def flush(self) -> None:
        for conn, (frames, _size) in self.pending.items():
            self._send(conn, frames)
        self.pending.clear()
        if self.records:
            for conn, records in self.records.items():
                self._send_records(conn, records)
            self.records.clear()

    def _send(self, conn: Connection, frames: list[bytes]) -> None:
        record = frames[0] if len(frames) == 1 else b"".join(frames)
        self.relay._sender(conn)  # resolves conn.io (and conn.io_batch) on first use
        if conn.io_batch is not None:
            records = self.records.get(conn)
            if records is None:
                self.records[conn] = [(record, len(frames))]
            else:
                records.append((record, len(frames)))
                if len(records) >= BATCH_MAX:
                    self._send_records(conn, records)
                    del self.records[conn]
            return
        self._send_one(conn, record, len(frames))

    def _send_one(self, conn: Connection, record: bytes, nframes: int) -> None:
        """One record as one segment; its frames count as dropped when ``conn`` is not established."""
        seg = conn.send_frames(record, self.now)
        if seg is None:
            self.relay.drops["no_route"] += nframes
        else:
            conn.io(seg)

    def _send_records(self, conn: Connection, records: list[tuple[bytes, int]]) -> None:
        """Runs of equal-sized records (the last of a run may be shorter) in one send each, each
        under the 64 KiB an IP packet can carry (jumbo frames make fewer records fit)."""
        i, n = 0, len(records)
        while i < n:
            size = len(records[i][0])
            fit = max(1, GSO_MAX_BYTES // (size + BATCH_OVERHEAD))
            j = i + 1
            while j < n and j - i < fit and len(records[j][0]) == size:
                j += 1
            if j < n and j - i < fit and len(records[j][0]) < size:
                j += 1
            if j - i == 1:
                self._send_one(conn, *records[i])
            else:
                batch = conn.send_batch([r for r, _ in records[i:j]], self.now)
                if batch is None:  # not established
                    self.relay.drops["no_route"] += sum(k for _, k in records[i:j])
                else:
                    conn.io_batch(*batch)
                    self.relay.tx_batches += 1
                    self.relay.tx_batched += j - i
            i = j


def _pktinfo_dst(anc: list[tuple[int, int, bytes]]) -> bytes | None:
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return data[8:12]  # struct in_pktinfo: ifindex, spec_dst, addr (the header's destination)
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
            return data[:16]
    return None


# ---------------------------------------------------------------------------------------------
# Server


class ServerRelay(Relay):
    """Accepts connections on the tunnel ports and relays each flow to ``target``."""

    role = "server"

    def __init__(self, cfg: Config, ports: tuple[int, ...] | None = None) -> None:
        super().__init__(cfg)
        assert cfg.target is not None
        self.ports = cfg.ports if ports is None else ports  # a worker serves its share (rsockd/service/worker.py)
        host = resolve(cfg.target[0])
        self.target = (host, cfg.target[1])
        self.target_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.acceptor = Acceptor(keyring=self.keyring, timing=self.timing, backlog=cfg.backlog,
                                 kernel_checksum_v6=True, clock_offset=self.clock_offset, drops=self.drops)
        self.sessions: SessionTable[socket.socket] = SessionTable(
            max_sessions=cfg.max_sessions, max_flows=cfg.max_flows, max_conns_per_client=cfg.max_conns_per_client,
            hello_skew=cfg.hello_skew, idle=cfg.duration, drops=self.drops)
        self._tunnel: dict[tuple[int, int], socket.socket] = {}  # (family, port) -> UDP socket
        self._housekeeping: asyncio.TimerHandle | None = None
        self.max_datagram_v6 = 0
        self._v6_only = False

    def bind(self, interfaces: tuple[str, ...]) -> None:
        """Reserve every tunnel port (TCP, bound, not listening) and bind its UDP socket."""
        self.interfaces = interfaces
        self.mtu = self.cfg.mtu or min((interface_mtu(i) for i in interfaces), default=1500)
        families = [socket.AF_INET, socket.AF_INET6]
        if self.cfg.local_ip:
            families = [socket.AF_INET6 if ":" in self.cfg.local_ip else socket.AF_INET]
        elif not socket.has_ipv6:
            families = [socket.AF_INET]
        # Each connection's limit follows its family; the IPv4 figure is the one reported when both are served.
        self._v6_only = families == [socket.AF_INET6]
        self._set_limits(self.mtu)
        self.acceptor.mss = self.mtu - 40
        for port in self.ports:
            for fam in families:
                host = self.cfg.local_ip or ("::" if fam == socket.AF_INET6 else "0.0.0.0")
                try:
                    tcp = _bind(fam, socket.SOCK_STREAM, (host, port), "server")
                except RsockdError:
                    if fam == socket.AF_INET6 and not self.cfg.local_ip and not self._ipv6_usable():
                        families = [socket.AF_INET]
                        continue
                    raise
                self._sockets.append(tcp)
                udp = _bind(fam, socket.SOCK_DGRAM, (host, port), "server")
                _bufsize(udp)
                if fam == socket.AF_INET:
                    udp.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                else:
                    udp.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                self._sockets.append(udp)
                self._tunnel[(fam, port)] = udp
                self._watch(udp, self._on_tunnel, udp, fam, port)
        self._housekeeping = self.loop.call_later(1.0, self._housekeep)

    @staticmethod
    def _ipv6_usable() -> bool:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.bind(("::1", 0))
            return True
        except OSError:
            return False

    def _udp_socket(self, local: tuple[bytes, int]) -> socket.socket:
        return self._tunnel[(socket.AF_INET if len(local[0]) == 4 else socket.AF_INET6, local[1])]

    def connections(self) -> list[Connection]:
        return self.acceptor.all()

    def _on_tunnel(self, sock: socket.socket, family: int, port: int) -> None:
        buf, view = self._buf, self._view
        now = self.loop.time()
        recvmsg_into = sock.recvmsg_into
        fallback = pack_address(self.cfg.local_ip) if self.cfg.local_ip else None
        for _ in range(BATCH):
            try:
                n, anc, _flags, addr = recvmsg_into((buf,), ANC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # e.g. ECONNREFUSED from an earlier ICMP: not about this read
                self.tx_errors["rx_" + errno.errorcode.get(e.errno or 0, "error").lower()] += 1
                continue
            dst = _pktinfo_dst(anc) or fallback
            if dst is None:
                self.drops["malformed"] += 1
                continue
            remote = (socket.inet_pton(family, addr[0].split("%")[0]), addr[1])
            self._tunnel_datagram(view[:n], (dst, port), remote, now)
        self._after_batch()

    def _segment(self, local: tuple[bytes, int], remote: tuple[bytes, int], hdr: TcpHeader,
                 payload: memoryview, now: float) -> None:
        conn, data = self.acceptor.segment(local, remote, hdr, payload, now)
        if conn is not None:
            if data:
                self._deliver(conn, data, now)
            self._flush(conn)

    def _datagram(self, local: tuple[bytes, int], remote: tuple[bytes, int], data: memoryview, now: float) -> None:
        if "udp" not in self.cfg.transports:
            self.drops["unexpected"] += 1
            return
        conn, frames = self.acceptor.datagram(local, remote, data, now)
        if conn is not None:
            if frames:
                self._deliver(conn, frames, now)
            self._flush(conn)

    def _after_batch(self) -> None:
        super()._after_batch()
        for local, remote, seg in self.acceptor.segments_to_send():
            self.raw.path(local[0], remote[0])(seg)

    def _deliver(self, conn: Connection, data: list[tuple[int, memoryview]], now: float) -> None:
        session = self.sessions.session_of(conn)
        if session is None:
            self.drops["unexpected"] += len(data)
            return
        for flow_id, dgram in data:
            flow, created = self.sessions.flow(session, flow_id, now)
            if flow is None:
                continue
            if created:
                try:
                    flow.handle = self._open_flow(session, flow)
                except OSError as e:
                    LOG.warning("cannot open a socket towards %s:%d: %s", *self.target, e.strerror)
                    session.flows.pop(flow_id, None)
                    self.drops["limit"] += 1
                    continue
            flow.conn = conn
            flow.rx += 1
            self.app_tx += 1
            self.app_tx_bytes += len(dgram)
            assert flow.handle is not None
            self.delivery.add(flow.handle, None, "target_", bytes(dgram))

    def _open_flow(self, session: Session[socket.socket], flow: ServerFlow[socket.socket]) -> socket.socket:
        s = socket.socket(self.target_family, socket.SOCK_DGRAM)
        s.setblocking(False)
        _bufsize(s)
        s.connect(self.target)
        self._watch(s, self._on_target, session, flow, s)
        return s

    def _close_flow(self, flow: ServerFlow[socket.socket]) -> None:
        if flow.handle is not None:
            self._unwatch(flow.handle)
            flow.handle.close()
            flow.handle = None

    def _on_target(self, session: Session[socket.socket], flow: ServerFlow[socket.socket], sock: socket.socket) -> None:
        buf, view = self._buf, self._view
        now = self.loop.time()
        flow.last_active = now
        session.last_active = now
        batch: FrameBatch | None = None
        for _ in range(BATCH):
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # ICMP port unreachable from the target: it is down, keep the flow
                self.tx_errors["target_" + errno.errorcode.get(e.errno or 0, "error").lower()] += 1
                continue
            conn = session.route(flow)
            if conn is None:
                self.drops["no_route"] += 1
                continue
            limit = self.max_datagram_v6 if len(conn.remote[0]) == 16 else self.max_datagram
            if n > limit:
                self._oversize(n)
                continue
            if batch is None:
                batch = FrameBatch(self, limit + framing.DATA_OVERHEAD, now)
            flow.tx += 1
            self.app_rx += 1
            self.app_rx_bytes += n
            batch.add(conn, framing.data_frame(flow.flow_id, view[:n]))
        if batch is not None:
            batch.flush()

    def _event(self, conn: Connection, ev: Any) -> None:
        now = self.loop.time()
        if isinstance(ev, HelloReceived):
            adm = self.sessions.admit(ev.hello, conn, now, now + self.clock_offset)
            if not adm.ok:
                if self._limit.allow("refused"):
                    LOG.warning("refused a hello from %s: %s", _peer(conn), adm.reason)
                conn.refuse(now, CloseReason.REFUSED)
                self._flush(conn)
                return
            conn.accept(now)
            old = self.acceptor.promote(conn)
            for stale in (old, adm.replaced):
                if stale is not None and stale is not conn:
                    self._retire(stale)
            LOG.info("connection %s (%s, index %d) established, client %s", _peer(conn), conn.transport,
                     conn.conn_index, ev.hello.client_id.hex())
            self._changed()
        elif isinstance(ev, ConnectionClosed):
            if conn.hello is not None and self.sessions.session_of(conn) is not None:
                LOG.info("connection %s (%s) closed: %s", _peer(conn), conn.transport, ev.reason)
            self.acceptor.forget(conn)
            self.sessions.remove_connection(conn)
            self._changed()
        elif isinstance(ev, FlowClosed):
            session = self.sessions.session_of(conn)
            flow = session.flows.pop(ev.flow_id, None) if session else None
            if flow is not None:
                self._close_flow(flow)

    def _retire(self, conn: Connection) -> None:
        """Forget a connection replaced by a newer one on the same tuple/index, silently."""
        self.acceptor.forget(conn)
        self.sessions.remove_connection(conn)
        conn.state = State.CLOSED

    def _follow_mtu(self) -> None:
        """An interface MTU lowered (or raised) at run time changes what one segment can carry."""
        if self.cfg.mtu:
            return
        try:
            mtu = min(interface_mtu(i) for i in self.interfaces)
        except RsockdError:
            return  # an interface went away; steering reports that
        if mtu != self.mtu:
            old = self.mtu
            self._set_limits(mtu)
            self.acceptor.mss = mtu - 40
            LOG.warning("interface MTU changed from %d to %d: the tunnel now carries datagrams of up to %d bytes",
                        old, mtu, self.max_datagram)
            self._oversize_warned = False

    def _set_limits(self, mtu: int) -> None:
        self.mtu = mtu
        self.max_datagram = max_datagram(mtu, self._v6_only, self.cfg.transports)
        self.max_datagram_v6 = max_datagram(mtu, True, self.cfg.transports)

    def _housekeep(self) -> None:
        now = self.loop.time()
        self._tick()
        self._follow_mtu()
        flows, _sessions = self.sessions.expire(now, now + self.clock_offset)
        for flow in flows:
            self._close_flow(flow)
        if not self.closing:
            self._housekeeping = self.loop.call_later(1.0, self._housekeep)

    def close(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        for session in self.sessions.sessions.values():
            for flow in session.flows.values():
                self._close_flow(flow)
        super().close()

    def status(self) -> dict[str, Any]:
        now = self.loop.time()
        conns = self.acceptor.all()
        return {
            "sessions": len(self.sessions.sessions),
            "flows": sum(len(s.flows) for s in self.sessions.sessions.values()),
            "connections": [self.conn_info(c, now) for c in conns],
            "half_open": len(self.acceptor.pending),
            "target": f"{self.target[0]}:{self.target[1]}",
            "peers": sorted({_peer(c).rsplit(":", 1)[0] for c in self.acceptor.connections.values()}),
        }


def _peer(conn: Connection) -> str:
    fam = socket.AF_INET if len(conn.remote[0]) == 4 else socket.AF_INET6
    a = socket.inet_ntop(fam, conn.remote[0])
    return f"{a}:{conn.remote[1]}" if fam == socket.AF_INET else f"[{a}]:{conn.remote[1]}"


# ---------------------------------------------------------------------------------------------
# Client


class ClientRelay(Relay):
    """Listens on ``listen`` and carries each application flow over the server connections."""

    role = "client"

    def __init__(self, cfg: Config, client_id: bytes | None = None, flows: FlowTable | None = None) -> None:
        super().__init__(cfg)
        assert cfg.server is not None and cfg.listen is not None
        self.server_ip = resolve(cfg.server)
        self.server_packed = pack_address(self.server_ip)
        self.flows = FlowTable(max_flows=cfg.max_flows, idle=cfg.duration, drops=self.drops)
        self.conns: list[Connection] = []
        self._by_port: dict[tuple[str, int, int], Connection] = {}  # transport, local port, server port
        self._tunnel: dict[int, socket.socket] = {}  # local port -> UDP socket
        self.local_ports: list[int] = []
        self.client_id = client_id or os.urandom(8)
        if flows is not None:
            self.flows = flows
            flows.drops = self.drops
        self.app: socket.socket | None = None
        self.src = ""
        self.route_interface = ""
        self._tunnel_socks: list[socket.socket] = []
        self.on_rebind: Callable[[], None] | None = None  # local ports changed: update steering
        self.on_path_change: Callable[[], None] | None = None  # the route moved to another interface
        self._housekeeping: asyncio.TimerHandle | None = None

    def route(self) -> Route:
        return route_to(self.server_ip)

    def bind(self, route: Route) -> None:
        """Reserve one local port per server port (TCP bound + UDP bound) and the app socket."""
        cfg = self.cfg
        self._bind_tunnel(route)
        assert cfg.listen is not None
        lhost, lport = cfg.listen
        lfam = socket.AF_INET6 if ":" in lhost else socket.AF_INET
        self.app = _bind(lfam, socket.SOCK_DGRAM, (lhost, lport), "listen")
        _bufsize(self.app)
        self._sockets.append(self.app)
        self._watch(self.app, self._on_app)
        self._housekeeping = self.loop.call_later(1.0, self._housekeep)

    def _bind_tunnel(self, route: Route) -> None:
        """The local side of the tunnel on ``route``: ports, UDP sockets, connections."""
        cfg = self.cfg
        self.interfaces = cfg.dev or (route.interface,)
        self.route_interface = route.interface
        src = cfg.local_ip or route.source
        if src is None:
            raise RsockdError(f"no source address towards {self.server_ip}: set local_ip")
        fam = socket.AF_INET6 if ":" in src else socket.AF_INET
        if (fam == socket.AF_INET6) != (len(self.server_packed) == 16):
            raise RsockdError(f"local_ip {src} and server {self.server_ip} are of different address families")
        self.src = src
        self._set_mtu(cfg.mtu or route.mtu)
        mss = self.mtu - (60 if fam == socket.AF_INET6 else 40)
        local = pack_address(src)
        n = len(cfg.ports)
        count = n * len(cfg.transports)
        for i, port in enumerate(cfg.ports):
            lport, udp = self._reserve(fam, src)
            self._tunnel[lport] = udp
            self.local_ports.append(lport)
            self._watch(udp, self._on_tunnel, udp, fam, lport)
            for t, transport in enumerate(cfg.transports):
                conn = Connection(role="client", transport=transport, local=(local, lport),  # type: ignore[arg-type]
                                  remote=(self.server_packed, port), keyring=self.keyring, timing=self.timing,
                                  client_id=self.client_id, conn_index=t * n + i, conn_count=count, mss=mss,
                                  kernel_checksum=fam == socket.AF_INET6, clock_offset=self.clock_offset,
                                  drops=self.drops)
                self.conns.append(conn)
                self._by_port[(transport, lport, port)] = conn

    def _set_mtu(self, mtu: int) -> None:
        v6 = len(self.server_packed) == 16
        if self.max_datagram and mtu != self.mtu:
            LOG.warning("path MTU changed from %d to %d: the tunnel now carries datagrams of up to %d bytes",
                        self.mtu, mtu, max_datagram(mtu, v6, self.cfg.transports))
            self._oversize_warned = False  # say it again, with the new figure, at the next oversized datagram
        self.mtu = mtu
        self.max_datagram = max_datagram(mtu, v6, self.cfg.transports)

    def rebind(self, route: Route) -> None:
        """Our address changed: the same tunnel from new local ports on the new address.

        The client id and the flows stay, so the server keeps the session and its flows.
        """
        now = self.loop.time()
        LOG.warning("local address changed from %s to %s: reconnecting from the new address", self.src,
                    route.source)
        for conn in self.conns:
            if conn.state != State.CLOSED:
                conn.close(now)
                self._flush(conn)  # best effort: the old address may be gone already
        for sock in self._tunnel_socks:
            self._unwatch(sock)
            sock.close()
            self._sockets.remove(sock)
        self._tunnel_socks.clear()
        self._by_port.clear()
        self._tunnel.clear()
        self.local_ports = []
        self.conns = []
        self._bind_tunnel(route)
        if self.capturing:
            self.refresh_local_addrs()
        self.flows.rebalance()
        if self.on_rebind is not None:
            self.on_rebind()
        self.start()

    def check_path(self) -> None:
        """Follow the route to the server: address, interface and MTU changes (every second)."""
        cfg = self.cfg
        try:
            route = route_to(self.server_ip)
        except RsockdError:
            return  # no route right now (link down): keep everything until it is back
        if not cfg.dev and route.interface != self.route_interface:
            LOG.warning("the route to %s moved from %s to %s", self.server_ip, self.route_interface, route.interface)
            if self.on_path_change is not None:
                self.on_path_change()
            return
        if not cfg.local_ip and route.source and route.source != self.src:
            self.rebind(route)
        elif not cfg.mtu and route.mtu != self.mtu:
            self._set_mtu(route.mtu)

    def _reserve(self, fam: int, src: str) -> tuple[int, socket.socket]:
        """A local port free for both TCP and UDP; keeps both bound (the TCP one never listens)."""
        for _ in range(64):
            udp = _bind(fam, socket.SOCK_DGRAM, (src, 0), "client")
            port = udp.getsockname()[1]
            try:
                tcp = _bind(fam, socket.SOCK_STREAM, (src, port), "client")
            except RsockdError:
                udp.close()
                continue
            _bufsize(udp)
            self._sockets += [tcp, udp]
            self._tunnel_socks += [tcp, udp]
            return port, udp
        raise RsockdError(f"no local port free for both TCP and UDP on {src}")

    def start(self) -> None:
        now = self.loop.time()
        for conn in self.conns:
            conn.connect(now)
            self._flush(conn)

    def _udp_socket(self, local: tuple[bytes, int]) -> socket.socket:
        return self._tunnel[local[1]]

    def connections(self) -> list[Connection]:
        return self.conns

    def _on_tunnel(self, sock: socket.socket, family: int, lport: int) -> None:
        buf, view = self._buf, self._view
        now = self.loop.time()
        server = self.server_packed
        for _ in range(BATCH):
            try:
                n, addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.tx_errors["rx_" + errno.errorcode.get(e.errno or 0, "error").lower()] += 1
                continue
            remote = socket.inet_pton(family, addr[0].split("%")[0])
            if remote != server:
                self.drops["no_connection"] += 1
                continue
            self._tunnel_datagram(view[:n], (b"", lport), (remote, addr[1]), now)
        self._after_batch()

    def _segment(self, local: tuple[bytes, int], remote: tuple[bytes, int], hdr: TcpHeader,
                 payload: memoryview, now: float) -> None:
        conn = self._by_port.get(("tcp", local[1], remote[1]))
        if conn is None or remote[0] != self.server_packed:
            self.drops["no_connection"] += 1
            return
        data = conn.receive(hdr, payload, now)
        if data:
            self._deliver(data)
        self._flush(conn)

    def _datagram(self, local: tuple[bytes, int], remote: tuple[bytes, int], data: memoryview, now: float) -> None:
        conn = self._by_port.get(("udp", local[1], remote[1]))
        if conn is None:
            self.drops["no_connection"] += 1
            return
        frames = conn.receive_datagram(data, now)
        if frames:
            self._deliver(frames)
        self._flush(conn)

    def _deliver(self, data: list[tuple[int, memoryview]]) -> None:
        app = self.app
        assert app is not None
        for flow_id, dgram in data:
            flow = self.flows.by_id.get(flow_id)
            if flow is None:
                self.drops["unexpected"] += 1
                continue
            flow.rx += 1
            self.app_tx += 1
            self.app_tx_bytes += len(dgram)
            self.delivery.add(app, flow.addr, "app_", bytes(dgram))

    def _on_app(self) -> None:
        app = self.app
        assert app is not None
        buf, view = self._buf, self._view
        now = self.loop.time()
        flows, conns, limit = self.flows, self.conns, self.max_datagram
        batch = FrameBatch(self, limit + framing.DATA_OVERHEAD, now)
        for _ in range(BATCH):
            try:
                n, addr = app.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.tx_errors["app_" + errno.errorcode.get(e.errno or 0, "error").lower()] += 1
                continue
            self.app_rx += 1
            self.app_rx_bytes += n
            if n > limit:
                self._oversize(n)
                continue
            flow = flows.lookup(addr, now)
            if flow is None:
                continue
            conn = flows.route(flow, conns)
            if conn is None or not conn.established:
                self.drops["no_route"] += 1
                continue
            flow.tx += 1
            batch.add(conn, framing.data_frame(flow.flow_id, view[:n]))
        batch.flush()

    def _event(self, conn: Connection, ev: Any) -> None:
        if isinstance(ev, Connected):
            LOG.info("connection to %s (%s, local port %d) established", _peer(conn), conn.transport, conn.local[1])
            self.flows.rebalance()
            self._changed()
        elif isinstance(ev, ConnectionClosed):
            self._changed()
            if not self.closing:
                LOG.info("connection to %s (%s) closed: %s; reconnecting in %.1f s", _peer(conn), conn.transport,
                         ev.reason, (ev.reconnect_at or self.loop.time()) - self.loop.time())
                if ev.reason in ("reset", "peer closed"):
                    # The server may have restarted: make every other connection find out now, not at
                    # its next keepalive, so no flow is hashed onto a connection the server forgot.
                    now = self.loop.time()
                    for other in self.conns:
                        if other is not conn and other.established and now - other.last_rx > 0.05:
                            other.probe(now)
                            self._flush(other)
        elif isinstance(ev, FlowClosed):
            pass  # the server forgot the flow; ours expires on its own or is recreated by traffic

    def _housekeep(self) -> None:
        now = self.loop.time()
        self._tick()
        self.check_path()
        gone: list[ClientFlow] = self.flows.expire(now)
        for flow in gone:
            if flow.conn is not None:
                flow.conn.close_flow(flow.flow_id, now)
                self._flush(flow.conn)
        if not self.closing:
            self._housekeeping = self.loop.call_later(1.0, self._housekeep)

    def close(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        super().close()

    def status(self) -> dict[str, Any]:
        now = self.loop.time()
        return {
            "flows": len(self.flows.by_id),
            "connections": [self.conn_info(c, now) for c in self.conns],
            "server": self.server_ip,
            "listen": f"{self.cfg.listen[0]}:{self.cfg.listen[1]}" if self.cfg.listen else None,
            "local_ports": self.local_ports,
            "peers": [self.server_ip],
        }

