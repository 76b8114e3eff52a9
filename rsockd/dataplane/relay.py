"""The data path's I/O: moves bytes between sockets and the pure endpoint (asyncio).

``ServerRelay`` and ``ClientRelay`` own the sockets (tunnel UDP sockets, the client's TCP port reservations,
the application / target UDP sockets, raw and packet senders) and one endpoint
(``rsockd.core.endpoint``), which owns every protocol decision.  On each wake-up a relay reads a
socket until ``EAGAIN`` (at most ``BATCH`` datagrams), hands each datagram to the endpoint, and
then ``_pump``s: it acts on the endpoint's events (a flow wants a socket, a connection came up),
sends its transmits, delivers its datagrams in batches and arms one loop timer at the endpoint's.
Where the compiled data path is built (``dataplane/_datapath.c``, Linux), its reader and writer
read the tunnel and application-side sockets instead, take an established connection's data
themselves and hand every other datagram to the endpoint as the loops here do.

Steered segments arrive on the tunnel UDP sockets (XDP backend) or as whole IP packets on the
steering backend's packet sockets (nft and bpfdev backends).  The host facts the endpoint follows
(MTU, our addresses, the client's route to the server) are read here, within a second of the
kernel saying they changed (``netlink.ChangeWatch``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import rsockd

from ..core.endpoint import (
    ClientEndpoint,
    ConnectionDown,
    ConnectionUp,
    EndpointEvent,
    FlowGone,
    FlowOpened,
    HelloRefused,
    Oversized,
    Policy,
    ServerEndpoint,
    Transmit,
    TupleReleased,
)
from ..core.faketcp import Connection, HostPort, State
from ..core.packet import family_of, pack_address
from ..core.session import FlowKey, FlowTable
from ..errors import RsockdError, errno_name
from ..logs import RateLimit
from ..netlink import ChangeWatch
from ..steer import Receiver
from .delivery import Delivery
from .hostprofile import tcp_profile
from .platform import (
    DARWIN,
    RawSender,
    Route,
    Sender,
    interface_addresses,
    interface_mtu,
    resolve,
    route_to,
)

if TYPE_CHECKING:
    from ..service.config import Config
    from .packetsend import L2Route, PacketSender

LOG = logging.getLogger(__name__)

# Fallbacks for a Python built without them: Linux's values, or macOS's (<netinet/in.h>,
# <netinet6/in6.h> with RFC 3542: they differ).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 26 if DARWIN else 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 61 if DARWIN else 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 46 if DARWIN else 50)
BUF = 65536 + 64
BATCH = 256  # datagrams read per socket per wake-up before yielding to the loop
# ... and bytes: a read of coalesced segments (GRO) holds up to 64 of them, and what one wake-up
# reads is held until its pump has sent it on.  Bounds the daemon's memory under a flood.
READ_BUDGET = 256 << 10
SOCKBUF = 4 << 20
ANC = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(4)  # the destination (pktinfo), and GRO's segment size
UDP_GRO = 104  # <linux/udp.h>: setsockopt to receive coalesced datagrams; the cmsg with their size
PATHS_MAX = 4096  # cached send paths (address pairs); a spoofed SYN flood must not grow it unbounded
RELOOK = 60  # seconds: the host is looked up again this often even when the kernel said nothing changed
# While datagrams keep coming, the relay waits for the next one itself (``_on_data``) for up to
# this long before it lets the event loop run again: asyncio's pass per wake-up is skipped.
DATA_WAIT = 0.020
POLL_EVENTS = 64  # sockets served per epoll_wait (the rest are still ready at the next)

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


def peer_text(remote: HostPort) -> str:
    """``address:port`` (IPv6 in brackets) of a packed endpoint."""
    fam = family_of(remote[0])
    a = socket.inet_ntop(fam, remote[0])
    return f"{a}:{remote[1]}" if fam == socket.AF_INET else f"[{a}]:{remote[1]}"


E = TypeVar("E", ServerEndpoint, ClientEndpoint)


class Relay(Generic[E]):
    """What both roles share: sending, the timer, the pump, reading packet sockets."""

    role = ""
    endpoint: E

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.clock_offset = time.time() - time.monotonic()
        self.profile = tcp_profile((cfg.key or "").encode())  # the host's TCP, for segments like its own
        self.tx_errors: Counter[str] = Counter()
        io = _compiled_io()
        self.raw = RawSender(cfg.mark, self.tx_errors, io)  # with io: a run in one sendmmsg
        # send_path = "packet": Ethernet frames, kernel checksums, batches split by the kernel
        self.packet: PacketSender | None = None
        self._l2: dict[bytes, L2Route | None] = {}  # destination -> its Ethernet route (None: raw for now)
        self._l2_warned: set[int | None] = set()  # errnos of packet sockets that would not open, logged
        self._packet_sender: PacketSender | None = None  # kept while "auto" turns the path off
        self._auto = cfg.send_path == "auto" and sys.platform == "linux"
        self._bypassed: str | None = ""  # "auto": what the packet path would skip ("": not looked yet)
        if cfg.send_path == "packet":
            if sys.platform != "linux":
                raise RsockdError('send_path = "packet" is supported on Linux only; use "raw"')
            self.packet = self._make_packet_sender()
        # (local, remote) address -> its send function, its kind ("packet" or "raw") and, on the
        # packet path, what the compiled writer sends frames with itself (PacketSender.wire)
        self._paths: dict[tuple[bytes, bytes], tuple[Sender, str, tuple[int, bytes, int] | None]] = {}
        self.started = time.time()
        self._sockets: list[socket.socket] = []
        self._readers: list[int] = []  # fds asyncio watches for us
        # The sockets' own epoll (Linux; docs/design.md, "Wake-ups"): fd -> its callback and arguments
        self._poll: Any = None
        self._handlers: dict[int, tuple[Callable[..., None], tuple[Any, ...]]] = {}
        self.wakeups_loop = 0  # times asyncio woke the relay for its sockets (_on_data)
        self.wakeups_own = 0  # datagrams' wake-ups in the relay's own wait, asyncio skipped
        if sys.platform == "linux" and os.environ.get("RSOCKD_ASYNCIO_WAKEUPS") != "1":
            self._poll = select.epoll()
            self.loop.add_reader(self._poll.fileno(), self._on_data)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._housekeeping: asyncio.TimerHandle | None = None
        self._buf = bytearray(BUF)
        self._view = memoryview(self._buf)
        self._limit = RateLimit(10.0)
        self.interfaces: tuple[str, ...] = ()
        self.closing = False
        self.on_change: Callable[[], None] | None = None  # connections came up or went down
        # server: 4-tuples no connection uses any more, as (local, lport, peer, pport) (port sharing)
        self.on_release: Callable[[list[tuple[str, int, str, int]]], None] | None = None
        self.capturing = False
        self._ticks = 0
        self.delivery = Delivery(self.tx_errors)
        self._reader = io.Reader() if io is not None else None  # the tunnel sockets' (_drain)
        self._rx_batches = self._rx_batched = 0  # reads of several segments (GRO), without the reader
        self._writer = io.Writer() if io is not None else None  # the application side's (_fill)
        # The wait loop in C (_on_data): the sockets' own epoll served by the reader and the writer
        # without a Python frame per socket; RSOCKD_PYTHON_LOOP=1 keeps the loop below (comparisons).
        self._serve = (io.Serve(self._poll.fileno(), BATCH, READ_BUDGET)
                       if io is not None and self._poll is not None and os.environ.get("RSOCKD_PYTHON_LOOP") != "1"
                       else None)
        # What the kernel says changed (netlink notifications): housekeeping looks the host up
        # again only then (docs/design.md, "Following the host"); None: it cannot say, look.
        self._host_changed = self._egress_changed = False
        self._host_watch = self._open_watch(ChangeWatch.routes, "links, addresses and routes")
        self._egress_blind = False
        self._legacy: str | None = None
        if self._auto:
            from .sendpath import OUR_TABLES, legacy_tables

            egress = [self._open_watch(lambda: ChangeWatch.nftables(ours=OUR_TABLES), "nftables"),
                      self._open_watch(ChangeWatch.xfrm_policies, "IPsec policies")]
            self._egress_blind = None in egress
            self._legacy = legacy_tables()
            self._choose_send_path()

    @property
    def mtu(self) -> int:
        return self.endpoint.mtu

    @property
    def max_datagram(self) -> int:
        return self.endpoint.max_datagram

    def connections(self) -> list[Connection]:
        return self.endpoint.connections()

    def _start_housekeeping(self) -> None:
        self._housekeeping = self.loop.call_later(1.0, self._housekeep)

    def _housekeep(self) -> None:
        """Once a second: follow the host (MTU, route, addresses, the packet path's routes) when
        the kernel said they changed; ``send_path = "auto"``: every 5 s, its egress when its
        firewall, IPsec policies or legacy iptables tables changed.  Every RELOOK seconds all of
        it regardless (a path MTU the host's own TCP learnt comes with no notification), and every
        second where the kernel cannot say.  The look-ups take milliseconds on the event loop:
        looking only on a change keeps them from stalling the datagrams."""
        self._ticks += 1
        relook = self._ticks % RELOOK == 0
        host = self._host_changed or self._host_watch is None or relook
        self._host_changed = False
        if host and self.capturing:
            self.refresh_local_addrs()
        if self._auto and self._ticks % 5 == 0:
            from .sendpath import legacy_tables

            legacy = legacy_tables()  # two small /proc files: x_tables has no notifications
            if self._egress_changed or self._egress_blind or relook or legacy != self._legacy:
                self._egress_changed = False
                self._legacy = legacy
                self._choose_send_path()
        if host and self.packet is not None:
            self._refresh_l2()
        if host:
            self._follow_host()
        self._pump(time.monotonic())
        if not self.closing:
            self._housekeeping = self.loop.call_later(1.0, self._housekeep)

    def _open_watch(self, make: Callable[[], ChangeWatch], what: str) -> ChangeWatch | None:
        """Listen for the kernel's notifications of changes to ``what``; None where it cannot."""
        if sys.platform != "linux":
            return None
        try:
            w = make()
        except OSError as e:
            LOG.info("cannot listen for changes to %s (%s): looking every second", what, e.strerror)
            return None
        self._sockets.append(w.sock)
        self._watch(w.sock.fileno(), self._on_host_change, w)
        return w

    def _on_host_change(self, w: ChangeWatch) -> None:
        if w.changed():
            if w is self._host_watch:
                self._host_changed = True
            else:
                self._egress_changed = True

    def _follow_host(self) -> None:
        raise NotImplementedError

    # -- the packet send path -------------------------------------------------------------------

    def _make_packet_sender(self) -> PacketSender:
        if self._packet_sender is None:
            from .packetsend import PacketSender

            self._packet_sender = PacketSender(self.cfg.mark, self.tx_errors)
        return self._packet_sender

    def _choose_send_path(self) -> None:
        """``send_path = "auto"``: the packet path while the host has nothing on its egress that
        the path would skip (sendpath.py), raw sockets otherwise; looked at again every 5 s."""
        from .sendpath import egress_hooks

        bypassed = egress_hooks()
        if bypassed == self._bypassed:
            return
        self._bypassed = bypassed
        if bypassed is None:
            self.packet = self._make_packet_sender()
            LOG.info("send path: packet (auto: nothing on this host's egress for it to skip)")
        else:
            if self.packet is not None:
                self.packet.keep_only(set())
            self.packet = None
            LOG.info("send path: raw sockets (auto: the packet path would skip %s)", bypassed)
        self._paths.clear()
        self._l2.clear()

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
        """Look every connection's destination up again.  Only the send paths of current
        connections' destinations whose route did not change stay: the others (a new next hop,
        the neighbour resolved or lost, a peer gone) are made anew at their next send, so none
        is left holding the socket of a link that no route uses any more."""
        dsts = {c.remote[0] for c in self.connections() if c.transport == "tcp" and c.state != State.CLOSED}
        old, self._l2 = self._l2, {}
        self._resolve_l2(dsts)
        keep = {dst for dst in dsts if self._l2[dst] == old.get(dst)}
        self._paths = {k: v for k, v in self._paths.items() if k[1] in keep}
        if self.packet is not None:
            self.packet.keep_only({r.ifindex for r in self._l2.values() if r is not None})

    def _path(self, local: bytes, remote: bytes) -> Sender:
        """The send function from ``local`` to ``remote``: the packet path when it has a route,
        else the raw one."""
        return self._path_entry(local, remote)[0]

    def _path_entry(self, local: bytes, remote: bytes) -> tuple[Sender, str, tuple[int, bytes, int] | None]:
        entry = self._paths.get((local, remote))
        if entry is not None:
            return entry
        if len(self._paths) >= PATHS_MAX:
            self._paths.clear()
        got = self._packet_path(local, remote) if self.packet is not None else None
        entry = (got[0], "packet", got[1]) if got is not None else (self.raw.path(local, remote), "raw", None)
        self._paths[(local, remote)] = entry
        return entry

    def _packet_path(self, local: bytes, remote: bytes) -> tuple[Sender, tuple[int, bytes, int]] | None:
        assert self.packet is not None
        if remote not in self._l2:
            self._resolve_l2({remote})
        route = self._l2[remote]
        if route is None:
            return None
        try:
            return self.packet.path(route, local, remote), self.packet.wire(route, remote)
        except OSError as e:  # e.g. a sandbox without AF_PACKET: raw sockets; tried again each second
            if e.errno not in self._l2_warned:
                self._l2_warned.add(e.errno)
                LOG.warning("packet send path: cannot open a packet socket on %s: %s; sending through raw "
                            "sockets meanwhile", route.ifname, e.strerror)
            self._l2[remote] = None
            return None

    def send_path_of(self, conn: Connection) -> str:
        """How ``conn``'s segments leave: "udp", "packet" or "raw"."""
        if conn.transport == "udp":
            return "udp"
        entry = self._paths.get((conn.local[0], conn.remote[0]))
        return entry[1] if entry is not None else "raw"

    @property
    def tx_batches(self) -> tuple[int, int]:
        """Sends the kernel split into segments (packet send path), and the segments they made."""
        p, w = self._packet_sender, self._writer
        batches, batched = (p.batches, p.batched) if p is not None else (0, 0)
        return (batches + w.tx_batches, batched + w.tx_batched) if w is not None else (batches, batched)

    @property
    def rx_batches(self) -> tuple[int, int]:
        """Reads of a tunnel socket that carried several segments (GRO), and the segments in them."""
        r = self._reader
        return (r.rx_batches, r.rx_batched) if r is not None else (self._rx_batches, self._rx_batched)

    def _cut(self, view: memoryview, n: int, seg: int) -> Sequence[memoryview]:
        """``_gro_parts``, counted for ``rx_batches``."""
        parts = _gro_parts(view, n, seg)
        if len(parts) > 1:
            self._rx_batches += 1
            self._rx_batched += len(parts)
        return parts

    def refresh_local_addrs(self) -> None:
        """The addresses captured segments may be for: local_ip, else every address of our interfaces."""
        if self.cfg.local_ip:
            self.endpoint.set_local_addresses({pack_address(self.cfg.local_ip)})
            return
        found: set[bytes] = set()
        for name in self.interfaces:
            try:
                found.update(pack_address(a.split("%")[0]) for a in interface_addresses(name))
            except (OSError, RsockdError, ValueError):
                continue  # an interface that went away: steering says so
        self.endpoint.set_local_addresses(found)

    # -- set-up helpers -------------------------------------------------------------------------

    def _watch(self, fd: int, callback: Callable[..., None], *args: Any) -> None:
        """Call ``callback(*args)`` whenever ``fd`` is readable: from ``_on_data`` (Linux), else asyncio."""
        if self._poll is not None:
            self._poll.register(fd, select.EPOLLIN)
            self._handlers[fd] = (callback, args)
        else:
            self.loop.add_reader(fd, callback, *args)
            self._readers.append(fd)

    def _serve_tunnel(self, fd: int, family: int, port: int, fallback: bytes | None) -> None:
        """A watched tunnel socket: the compiled loop's reader drains it (as ``_on_tunnel`` would)."""
        if self._serve is not None:
            self._serve.tunnel(fd, family, port, fallback)

    def _serve_fill(self, fd: int, key: Any) -> None:
        """A watched application-side socket (``key``: a target socket's flow, None: the
        application socket): the compiled loop's writer fills from it (as ``_on_target`` /
        ``_on_app`` would)."""
        if self._serve is not None:
            self._serve.fill(fd, key)

    def _unwatch(self, fd: int) -> None:
        if self._serve is not None:
            self._serve.forget(fd)
        if self._handlers.pop(fd, None) is not None:
            try:
                self._poll.unregister(fd)
            except OSError:
                pass  # closed already: the kernel dropped it from the epoll
        elif fd in self._readers:
            self.loop.remove_reader(fd)
            self._readers.remove(fd)

    def _on_data(self) -> None:
        """A socket of ours is readable (asyncio says so).  Serve every ready one, then wait for
        the next datagram here, in one ``epoll_wait``, for up to DATA_WAIT (never past the
        endpoint's timer), before asyncio runs again: while traffic flows, a datagram wakes the
        relay's own code, not asyncio's pass over its selector, handles and timers.  What asyncio
        holds meanwhile (the control socket, signals, its other timers) waits at most DATA_WAIT.
        Compiled (``_serve``), the loop and the reader's and writer's calls run in C, and come
        back here for what the Python loop below would do beyond them (``_handle``,
        ``_tunnel_back``, ``_tunnel_failed``, ``_fill_back``, ``_fill_failed``, ``_pump``)."""
        serve = self._serve
        if serve is not None:
            loop, own = serve.run(self, self.endpoint, self._reader, self._writer, time.monotonic() + DATA_WAIT,
                                  self.role == "server", self.delivery.gso,
                                  self._wire_of if self.packet is not None else None)
            self.wakeups_loop += loop
            self.wakeups_own += own
            return
        poll, handlers = self._poll, self._handlers
        until = time.monotonic() + DATA_WAIT
        timeout = 0.0
        while True:
            events = poll.poll(timeout, POLL_EVENTS)
            if not events:
                return
            if timeout:
                self.wakeups_own += 1
            else:
                self.wakeups_loop += 1
            for fd, _mask in events:
                handler = handlers.get(fd)
                if handler is not None:  # not unwatched by a callback of this round
                    handler[0](*handler[1])
            if self.closing:
                return
            timeout = min(until, self._timer_at) - time.monotonic()
            if timeout <= 0:
                return

    def _handle(self, fd: int) -> None:
        """The compiled loop's socket of another kind: its handler, if it is still watched."""
        handler = self._handlers.get(fd)
        if handler is not None:
            handler[0](*handler[1])

    def add_receivers(self, receivers: list[Receiver]) -> None:
        """Capture sources of a capture backend: whole IP packets, checksum unverified.  When
        they share the ports with the kernel, the server leaves segments of no connection to it."""
        for rx in receivers:
            self._watch(rx.fileno(), self._on_packets, rx)
        if isinstance(self.endpoint, ServerEndpoint) and receivers:
            self.endpoint.acceptor.reset_strays = not any(rx.shared for rx in receivers)
        self.capturing = bool(receivers)
        if self.capturing:
            self.refresh_local_addrs()

    # -- the pump: after every batch of inputs --------------------------------------------------

    def _pump(self, now: float) -> None:
        """Act on the endpoint's events, send its transmits, deliver its datagrams, arm its timer."""
        ep = self.endpoint
        ev = ep.next_event()
        while ev is not None:
            self._on_event(ev)
            ev = ep.next_event()
        for tx in ep.transmits(now):
            self._send(tx)
        deliveries = ep.deliveries()
        if deliveries:
            self._deliver(deliveries)
            self.delivery.flush()
        t = ep.get_timer()
        if t is not None and t < self._timer_at:
            self._arm(max(t, now + 0.001))

    def _send(self, t: Transmit) -> None:
        if t.transport == "tcp":
            self._path(t.local[0], t.remote[0])(t.header, t.payloads, t.ip)
            return
        sock = self._udp_socket(t.local)
        dst = (socket.inet_ntop(family_of(t.remote[0]), t.remote[0]), t.remote[1])
        for p in t.payloads:
            try:
                sock.sendto(t.header + p if p else t.header, dst)
            except OSError as e:
                self.tx_errors[errno_name(e)] += 1

    def _udp_socket(self, local: HostPort) -> socket.socket:
        raise NotImplementedError

    def _deliver(self, deliveries: list[tuple[Any, bytes]]) -> None:
        raise NotImplementedError

    def _sink_of(self, conn: Connection, flow_id: int) -> tuple[Any, int, Any] | None:
        """For the compiled reader: the socket (and address) the datagrams of ``flow_id`` on ``conn``
        go to, when the endpoint names its destination (``fast_sink``) and the socket is open."""
        raise NotImplementedError

    def _on_event(self, ev: EndpointEvent) -> None:
        if isinstance(ev, Oversized):
            LOG.warning("dropped a %d-byte datagram: the tunnel carries at most %d bytes per datagram "
                        "(path MTU %d); set the application's MTU to %d or less (WireGuard: MTU = %d)",
                        ev.size, ev.limit, ev.mtu, ev.limit, ev.limit - 32)
        elif isinstance(ev, (ConnectionUp, ConnectionDown)):
            self._log_connection(ev)
            if self.on_change is not None and not self.closing:
                self.on_change()

    def _log_connection(self, ev: ConnectionUp | ConnectionDown) -> None:
        raise NotImplementedError

    # -- timers ---------------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        # Every time of the relay and its endpoint is time.monotonic()'s; the loop's own clock may differ.
        self._timer = self.loop.call_later(max(0.0, when - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = time.monotonic()
        self.endpoint.handle_timer(now)
        self._pump(now)

    # -- receiving ------------------------------------------------------------------------------

    def _on_packets(self, rx: Receiver) -> None:
        """Read IP packets from a capture source (nft/bpfdev backends)."""
        now = time.monotonic()
        receive = self.endpoint.receive_packet
        try:
            for pkt, unfilled in rx.packets(self._buf):
                receive(pkt, now, unfilled)
        except OSError as e:
            self.tx_errors["rx_" + errno_name(e)] += 1
        self._pump(now)

    def _drain(self, reader: Any, sock: socket.socket, family: int, port: int, now: float,
               fallback: bytes | None) -> None:
        """A wake-up of a tunnel socket through the compiled reader (dataplane/_datapath.c): it
        takes the established connections' data segments itself and hands back each other one,
        which takes ``receive_steered`` as in the loop it replaces."""
        fd, pktinfo, sink = sock.fileno(), self.role == "server", self._sink_of
        while True:
            try:
                back = reader.drain(fd, family, port, self.endpoint, now, pktinfo, fallback, BATCH, READ_BUDGET,
                                    sink, self.delivery.gso)
            except OSError as e:  # e.g. ECONNREFUSED from an earlier ICMP: not about this read
                self._tunnel_failed(e)
                continue
            self._tunnel_failed(None)
            if back is None:
                return
            self._tunnel_back(back, now)

    def _tunnel_back(self, back: tuple[Any, Any, bytes], now: float) -> None:
        """A segment the reader handed back: ``receive_steered`` takes it."""
        local, remote, segment = back
        if local is None:
            self.endpoint.drops["malformed"] += 1
        else:
            self.endpoint.receive_steered(local, remote, memoryview(segment), now)

    def _tunnel_failed(self, err: OSError | None) -> None:
        """After a reader's call: what it could not send on; ``err``: its read failed."""
        assert self._reader is not None
        self._send_errors(self._reader, "target_" if self.role == "server" else "app_")
        if err is not None:
            self.tx_errors["rx_" + errno_name(err)] += 1

    def _send_errors(self, reader: Any, label: str) -> None:
        """Count what the reader could not send on to the application side."""
        errors, refused = reader.take_errors()
        for err, count in errors:
            self.tx_errors[label + errno_name(err)] += count
        if refused and self.delivery.gso:
            LOG.info("UDP GSO refused: sending datagrams one by one")
            self.delivery.gso = False

    def _fill(self, writer: Any, sock: socket.socket, key: Any, now: float) -> None:
        """A wake-up of an application-side socket through the compiled writer (dataplane/_datapath.c):
        it frames and seals the datagrams of flows on established connections itself and hands
        back each other one, which takes ``send_app`` / ``send_target`` as in the loop it replaces.
        ``key``: the flow of a target socket (server), None for the application socket (client)."""
        ep, fd = self.endpoint, sock.fileno()
        wire = self._wire_of if self.packet is not None else None
        while True:
            try:
                back = writer.fill(fd, ep, now, key, BATCH, READ_BUDGET, wire)
            except OSError as e:  # ICMP port unreachable from the target: it is down, keep the flow
                self._fill_failed(key, e)
                continue
            self._fill_failed(key, None)
            if back is None:
                return
            self._fill_back(key, back, now)

    def _fill_back(self, key: Any, back: tuple[Any, bytes], now: float) -> None:
        """A datagram the writer handed back: ``send_target`` / ``send_app`` takes it."""
        addr, datagram = back
        ep = self.endpoint
        if isinstance(ep, ServerEndpoint):
            ep.send_target(key, datagram, now)
        else:
            ep.send_app(addr, datagram, now)

    def _fill_failed(self, key: Any, err: OSError | None) -> None:
        """After a writer's call: its own sends that failed; ``err``: its read failed."""
        if err is not None:
            self.tx_errors[("app_" if key is None else "target_") + errno_name(err)] += 1
        if self.packet is not None and self._writer is not None:
            self._wire_errors(self._writer)

    def _wire_of(self, conn: Connection, now: float) -> tuple[Any, ...] | None:
        """For the compiled writer: how it sends ``conn``'s records as segments itself (the
        packet path's socket, Ethernet header and TTL, the addresses, and the header fields of
        ``Connection.wire_state``), or None: they go back to the endpoint (``sealed_run``) and
        leave as its transmits.  What the endpoint sealed before (``fast_flow`` seals what was
        queued for ``conn``) leaves first: a connection's segments leave in sequence order."""
        for tx in self.endpoint.sealed_transmits():
            self._send(tx)
        if conn.transport != "tcp":
            return None
        wire = self._path_entry(conn.local[0], conn.remote[0])[2]
        fields = conn.wire_state(now) if wire is not None else None
        if wire is None or fields is None:
            return None
        return wire + (conn.local[0], conn.remote[0]) + fields  # noqa: RUF005 - mypy cannot type the unpacked form here

    def _wire_errors(self, writer: Any) -> None:
        """Count the compiled writer's own sends that failed, as the packet path counts its own."""
        sender = self._packet_sender
        for err, count in writer.take_errors():
            if sender is not None:
                sender.failed(err, count)
            else:
                self.tx_errors[errno_name(err)] += count

    # -- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Tell every peer we are going (CLOSE + FIN/RST), then release the sockets."""
        self.closing = True
        now = time.monotonic()
        self.endpoint.close(now)
        self._pump(now)
        for handle in (self._timer, self._housekeeping):
            if handle is not None:
                handle.cancel()
        for fd in list(self._readers):
            self.loop.remove_reader(fd)
        self._readers.clear()
        if self._poll is not None:
            self.loop.remove_reader(self._poll.fileno())
            self._poll.close()
            self._handlers.clear()
        for s in self._sockets:
            s.close()
        self._sockets.clear()
        self.raw.close()
        if self._packet_sender is not None:
            self._packet_sender.close()


def _gro(sock: socket.socket) -> None:
    """Let the kernel hand over a connection's segments that arrived together as one read (UDP
    GRO, Linux 5.0+: after the XDP rewrite, the receive path coalesces equal-sized datagrams of a
    flow); one system call and one trip through the socket then carry up to 64 of them."""
    if sys.platform == "linux":
        try:
            sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
        except OSError:
            pass  # an older kernel: one datagram per read, as without it


def _gro_parts(view: memoryview, n: int, seg: int) -> Sequence[memoryview]:
    """The datagrams of a read of ``n`` bytes: GRO's coalesced ones cut at its segment size
    ``seg`` (each one steered segment again, the last maybe shorter), else the one read."""
    if seg and n > seg:
        return [view[off:min(off + seg, n)] for off in range(0, n, seg)]
    return (view[:n],)


def _pktinfo_gro(anc: list[tuple[int, int, bytes]]) -> tuple[bytes | None, int]:
    """The header's destination address (pktinfo), and GRO's segment size (0: one datagram)."""
    dst, seg = None, 0
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            dst = data[8:12]  # struct in_pktinfo: ifindex, spec_dst, addr (the header's destination)
        elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
            dst = data[:16]
        elif level == socket.SOL_UDP and kind == UDP_GRO and len(data) >= 4:
            seg = int.from_bytes(data[:4], sys.byteorder)
    return dst, seg


def _compiled_io() -> Any | None:
    """The compiled reader and writer (dataplane/_datapath.c, Linux), where the build made them
    and the package runs compiled; None: the Python loops of ``_on_tunnel``, ``_on_app`` and
    ``_on_target``."""
    if sys.platform != "linux" or rsockd.PURE:
        return None
    try:
        from . import _datapath
    except ImportError:
        return None
    return _datapath


# ---------------------------------------------------------------------------------------------
# Server


class ServerRelay(Relay[ServerEndpoint]):
    """Serves the tunnel ports: their sockets, and one UDP socket towards ``target`` per flow."""

    role = "server"

    def __init__(self, cfg: Config, policy: Policy, ports: tuple[int, ...] | None = None) -> None:
        super().__init__(cfg)
        assert cfg.target is not None
        self.ports = cfg.ports if ports is None else ports  # a worker serves its share (rsockd/service/worker.py)
        self.endpoint = ServerEndpoint(policy, mtu=cfg.mtu or 1500, clock_offset=self.clock_offset,
                                       profile=self.profile)
        self.set_target(cfg.target)
        self._tunnel: dict[tuple[int, int], socket.socket] = {}  # (family, port) -> UDP socket
        self._targets: dict[FlowKey, socket.socket] = {}  # flow -> its socket towards the target
        # a steered datagram's destination when its pktinfo is missing (local_ip: set at start, not live)
        self._fallback = pack_address(cfg.local_ip) if cfg.local_ip else None

    def set_target(self, target: tuple[str, int]) -> None:
        """Where new flows go (open ones keep their socket)."""
        host = resolve(target[0])
        self.target = (host, target[1])
        self.target_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def bind(self, interfaces: tuple[str, ...]) -> None:
        """Bind every tunnel port's UDP socket, where steered segments land.

        The TCP side of a tunnel port is left free (port sharing, docs/security.md): a real
        service may listen there, and with nothing bound the kernel answers a probe with RST,
        as for any closed port.  Steering hands the kernel everything but our connections.
        """
        self.interfaces = interfaces
        mtu = self.cfg.mtu or min((interface_mtu(i) for i in interfaces), default=1500)
        families = [socket.AF_INET, socket.AF_INET6]
        if self.cfg.local_ip:
            families = [socket.AF_INET6 if ":" in self.cfg.local_ip else socket.AF_INET]
        elif not socket.has_ipv6:
            families = [socket.AF_INET]
        # Each connection's limit follows its family; the IPv4 figure is the one reported when both are served.
        self.endpoint.v6_only = families == [socket.AF_INET6]
        self.endpoint.set_mtu(mtu)
        for port in self.ports:
            for fam in families:
                host = self.cfg.local_ip or ("::" if fam == socket.AF_INET6 else "0.0.0.0")
                try:
                    udp = _bind(fam, socket.SOCK_DGRAM, (host, port), "server")
                except RsockdError:
                    if fam == socket.AF_INET6 and not self.cfg.local_ip and not self._ipv6_usable():
                        families = [socket.AF_INET]
                        continue
                    raise
                _bufsize(udp)
                if fam == socket.AF_INET:
                    udp.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                else:
                    udp.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                _gro(udp)
                self._sockets.append(udp)
                self._tunnel[(fam, port)] = udp
                self._watch(udp.fileno(), self._on_tunnel, udp, fam, port)
                self._serve_tunnel(udp.fileno(), fam, port, self._fallback)
        self._start_housekeeping()

    @staticmethod
    def _ipv6_usable() -> bool:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.bind(("::1", 0))
            return True
        except OSError:
            return False

    def _udp_socket(self, local: HostPort) -> socket.socket:
        return self._tunnel[(family_of(local[0]), local[1])]

    def _on_tunnel(self, sock: socket.socket, family: int, port: int) -> None:
        buf, view = self._buf, self._view
        now = time.monotonic()
        fallback = self._fallback
        if self._reader is not None:
            self._drain(self._reader, sock, family, port, now, fallback)
            self._pump(now)
            return
        recvmsg_into = sock.recvmsg_into
        receive = self.endpoint.receive_steered
        got = 0
        for _ in range(BATCH):
            if got >= READ_BUDGET:
                break
            try:
                n, anc, _flags, addr = recvmsg_into((buf,), ANC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # e.g. ECONNREFUSED from an earlier ICMP: not about this read
                self.tx_errors["rx_" + errno_name(e)] += 1
                continue
            got += n
            dst, seg = _pktinfo_gro(anc)
            dst = dst or fallback
            if dst is None:
                self.endpoint.drops["malformed"] += 1
                continue
            local, remote = (dst, port), (socket.inet_pton(family, addr[0].split("%")[0]), addr[1])
            for part in self._cut(view, n, seg):
                receive(local, remote, part, now)
        self._pump(now)

    def _on_target(self, key: FlowKey, sock: socket.socket) -> None:
        buf, view = self._buf, self._view
        now = time.monotonic()
        if self._writer is not None:
            self._fill(self._writer, sock, key, now)
            self._pump(now)
            return
        send_target = self.endpoint.send_target
        for _ in range(BATCH):
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # ICMP port unreachable from the target: it is down, keep the flow
                self.tx_errors["target_" + errno_name(e)] += 1
                continue
            send_target(key, view[:n], now)
        self._pump(now)

    def _deliver(self, deliveries: list[tuple[Any, bytes]]) -> None:
        targets, add = self._targets, self.delivery.add
        for key, data in deliveries:
            sock = targets.get(key)
            if sock is not None:
                add(sock, None, "target_", data)

    def _sink_of(self, conn: Connection, flow_id: int) -> tuple[Any, int, Any] | None:
        got = self.endpoint.fast_sink(conn, flow_id)
        sock = self._targets.get(got[1]) if got is not None else None
        return None if got is None or sock is None else (got[0], sock.fileno(), None)

    def _on_event(self, ev: EndpointEvent) -> None:
        if isinstance(ev, FlowOpened):
            try:
                sock = socket.socket(self.target_family, socket.SOCK_DGRAM)
            except OSError as e:
                LOG.warning("cannot open a socket towards %s:%d: %s", *self.target, e.strerror)
                self.endpoint.flow_failed(ev.key)
                return
            try:
                sock.setblocking(False)
                _bufsize(sock)
                sock.connect(self.target)
            except OSError as e:
                sock.close()
                LOG.warning("cannot open a socket towards %s:%d: %s", *self.target, e.strerror)
                self.endpoint.flow_failed(ev.key)
                return
            self._targets[ev.key] = sock
            self._watch(sock.fileno(), self._on_target, ev.key, sock)
            self._serve_fill(sock.fileno(), ev.key)
        elif isinstance(ev, FlowGone):
            self._close_flow(ev.key)
        elif isinstance(ev, HelloRefused):
            if self._limit.allow("refused"):
                LOG.warning("refused a hello from %s: %s", peer_text(ev.conn.remote), ev.reason)
        elif isinstance(ev, TupleReleased):
            if self.on_release is not None:
                (local, lport), (peer, pport) = ev.local, ev.remote
                self.on_release([(socket.inet_ntop(family_of(local), local), lport,
                                  socket.inet_ntop(family_of(peer), peer), pport)])
        else:
            super()._on_event(ev)

    def _log_connection(self, ev: ConnectionUp | ConnectionDown) -> None:
        c = ev.conn
        if isinstance(ev, ConnectionUp):
            LOG.info("connection %s (%s, index %d) established, client %s", peer_text(c.remote), c.transport,
                     c.conn_index, ev.client_id.hex())
        else:
            LOG.info("connection %s (%s) closed: %s", peer_text(c.remote), c.transport, ev.reason)

    def _close_flow(self, key: FlowKey) -> None:
        sock = self._targets.pop(key, None)
        if sock is not None:
            self._unwatch(sock.fileno())
            self.delivery.forget(sock)
            sock.close()

    def _follow_host(self) -> None:
        """An interface MTU lowered (or raised) at run time changes what one segment can carry."""
        if self.cfg.mtu:
            return
        try:
            mtu = min(interface_mtu(i) for i in self.interfaces)
        except RsockdError:
            return  # an interface went away; steering reports that
        if mtu != self.endpoint.mtu:
            old = self.endpoint.mtu
            self.endpoint.set_mtu(mtu)
            LOG.warning("interface MTU changed from %d to %d: the tunnel now carries datagrams of up to %d bytes",
                        old, mtu, self.endpoint.max_datagram)

    def close(self) -> None:
        super().close()
        for key in list(self._targets):
            self._close_flow(key)


# ---------------------------------------------------------------------------------------------
# Client


class ClientRelay(Relay[ClientEndpoint]):
    """Listens on ``listen`` and owns one local port (TCP reserved + UDP bound) per server port."""

    role = "client"

    def __init__(self, cfg: Config, policy: Policy, client_id: bytes | None = None,
                 flows: FlowTable | None = None) -> None:
        super().__init__(cfg)
        assert cfg.server is not None and cfg.listen is not None
        self.server_ip = resolve(cfg.server)
        self.server_packed = pack_address(self.server_ip)
        self.endpoint = ClientEndpoint(policy, server=self.server_packed, ports=cfg.ports,
                                       client_id=client_id or os.urandom(8), mtu=cfg.mtu or 1500,
                                       clock_offset=self.clock_offset, flows=flows, profile=self.profile)
        self._tunnel: dict[int, socket.socket] = {}  # local port -> UDP socket
        self.local_ports: list[int] = []
        self.app: socket.socket | None = None
        self.src = ""
        self.route_interface = ""
        self._tunnel_socks: list[socket.socket] = []
        self.on_rebind: Callable[[], None] | None = None  # local ports changed: update steering
        self.on_path_change: Callable[[], None] | None = None  # the route moved to another interface

    @property
    def client_id(self) -> bytes:
        return self.endpoint.client_id

    @property
    def flows(self) -> FlowTable:
        return self.endpoint.flows

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
        self._watch(self.app.fileno(), self._on_app)
        self._serve_fill(self.app.fileno(), None)
        self._start_housekeeping()

    def _bind_tunnel(self, route: Route) -> None:
        """The local side of the tunnel on ``route``: ports and UDP sockets; the endpoint's connections."""
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
        self.local_ports = []
        for _port in cfg.ports:
            lport, udp = self._reserve(fam, src)
            self._tunnel[lport] = udp
            self.local_ports.append(lport)
            self._watch(udp.fileno(), self._on_tunnel, udp, fam, lport)
            self._serve_tunnel(udp.fileno(), fam, lport, None)
        self.endpoint.bind(pack_address(src), self.local_ports)

    def conn_tuples(self) -> list[tuple[str, int, str, int]]:
        """``(local address, local port, server address, server port)`` of each fake-TCP
        connection: what steering must hand us (port sharing: the rest is the kernel's)."""
        return [(self.src, c.local[1], self.server_ip, c.remote[1]) for c in self.connections() if c.transport == "tcp"]

    def _set_mtu(self, mtu: int) -> None:
        ep = self.endpoint
        old = ep.mtu
        ep.set_mtu(mtu)
        if self.local_ports and mtu != old:  # a change, not the first bind's figure
            LOG.warning("path MTU changed from %d to %d: the tunnel now carries datagrams of up to %d bytes",
                        old, mtu, ep.max_datagram)

    def start(self) -> None:
        now = time.monotonic()
        self.endpoint.connect(now)
        self._pump(now)

    def rebind(self, route: Route) -> None:
        """Our address changed: the same tunnel from new local ports on the new address.

        The client id and the flows stay, so the server keeps the session and its flows.
        """
        now = time.monotonic()
        LOG.warning("local address changed from %s to %s: reconnecting from the new address", self.src,
                    route.source)
        self.endpoint.close_connections(now)
        self._pump(now)  # best effort: the old address may be gone already
        for sock in self._tunnel_socks:
            self._unwatch(sock.fileno())
            sock.close()
            self._sockets.remove(sock)
        self._tunnel_socks.clear()
        self._tunnel.clear()
        self._bind_tunnel(route)
        if self.capturing:
            self.refresh_local_addrs()
        if self.on_rebind is not None:
            self.on_rebind()
        self.start()

    def _follow_host(self) -> None:
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
        elif not cfg.mtu and route.mtu != self.endpoint.mtu:
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
            _gro(udp)
            self._sockets += [tcp, udp]
            self._tunnel_socks += [tcp, udp]
            return port, udp
        raise RsockdError(f"no local port free for both TCP and UDP on {src}")

    def _udp_socket(self, local: HostPort) -> socket.socket:
        return self._tunnel[local[1]]

    def _on_tunnel(self, sock: socket.socket, family: int, lport: int) -> None:
        buf, view = self._buf, self._view
        now = time.monotonic()
        if self._reader is not None:
            self._drain(self._reader, sock, family, lport, now, None)
            self._pump(now)
            return
        receive = self.endpoint.receive_steered
        recvmsg_into = sock.recvmsg_into
        got = 0
        for _ in range(BATCH):
            if got >= READ_BUDGET:
                break
            try:
                n, anc, _flags, addr = recvmsg_into((buf,), ANC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.tx_errors["rx_" + errno_name(e)] += 1
                continue
            got += n
            local, remote = (b"", lport), (socket.inet_pton(family, addr[0].split("%")[0]), addr[1])
            for part in self._cut(view, n, _pktinfo_gro(anc)[1] if anc else 0):
                receive(local, remote, part, now)
        self._pump(now)

    def _on_app(self) -> None:
        app = self.app
        assert app is not None
        buf, view = self._buf, self._view
        now = time.monotonic()
        if self._writer is not None:
            self._fill(self._writer, app, None, now)
            self._pump(now)
            return
        send_app = self.endpoint.send_app
        for _ in range(BATCH):
            try:
                n, addr = app.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.tx_errors["app_" + errno_name(e)] += 1
                continue
            send_app(addr, view[:n], now)
        self._pump(now)

    def _deliver(self, deliveries: list[tuple[Any, bytes]]) -> None:
        app, add = self.app, self.delivery.add
        assert app is not None
        for addr, data in deliveries:
            add(app, addr, "app_", data)

    def _sink_of(self, conn: Connection, flow_id: int) -> tuple[Any, int, Any] | None:
        got = self.endpoint.fast_sink(conn, flow_id)
        return None if got is None or self.app is None else (got[0], self.app.fileno(), got[1])

    def _log_connection(self, ev: ConnectionUp | ConnectionDown) -> None:
        c = ev.conn
        if isinstance(ev, ConnectionUp):
            LOG.info("connection to %s (%s, local port %d) established", peer_text(c.remote), c.transport,
                     c.local[1])
        elif not self.closing:
            now = time.monotonic()
            LOG.info("connection to %s (%s) closed: %s; reconnecting in %.1f s", peer_text(c.remote), c.transport,
                     ev.reason, (ev.reconnect_at or now) - now)
