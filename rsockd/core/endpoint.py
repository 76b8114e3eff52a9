"""The endpoint: the protocol's policy for one role, pure (the shape of aioquic's ``QuicConnection``).

A ``ServerEndpoint`` or ``ClientEndpoint`` owns every connection of its role, the server's
acceptor and sessions, the client's flow table, and the policy that ties them together.  It opens
no socket and reads no clock.

Inputs, each with ``now`` (monotonic seconds; the wall clock is ``now + clock_offset``):

- ``receive_steered(local, remote, data, now)``: a datagram read from a tunnel UDP socket, either
  a segment the XDP program rewrote (first byte >= 0x50, docs/design.md) or a datagram of the
  ``udp`` transport (first byte ``UDP_MARKER``);
- ``receive_packet(packet, now)``: a whole IP packet from a capture backend (nft, bpfdev), its TCP
  checksum not yet verified;
- ``send_app(addr, datagram, now)`` (client) and ``send_target(key, datagram, now)`` (server):
  a datagram of the application, or of the target for flow ``key``;
- ``handle_timer(now)``, ``close(now)``, ``reconfigure(policy)``, and the host facts the I/O layer
  follows: ``set_mtu``, ``set_local_addresses``, ``rebind`` (client).

Outputs, pulled after each batch of inputs:

- ``transmits(now)``: what to send, in one shape, ``Transmit`` (runs of equal-sized records leave as
  one; the packet send path hands a run to the kernel as one GSO send);
- ``deliveries()``: datagrams for the application (client: ``(address, datagram)``) or the target
  (server: ``(flow key, datagram)``);
- ``next_event()``: what the I/O layer acts on or logs (``FlowOpened`` asks for a socket);
- ``get_timer()``: when ``handle_timer`` next has work.

Rules:

1. Server admission (docs/security.md): a connection's authenticated hello is admitted or refused
   by the session table; an admitted connection replaces an older one on the same 4-tuple or with
   the same (client id, connection index), which is retired silently.
2. Client reconnect: a connection reconnects on its own back-off; when one is reset or closed by
   the server, every other established connection sends a keepalive at once, so that after a
   server restart no flow stays hashed onto a connection the server has forgotten.
3. Flows: a client flow rides the established connection its rendezvous hash picks and moves
   only when that connection dies; a server flow answers on the connection it last came from.
   Idle flows expire after ``idle`` seconds, checked once a second.
4. Data: the datagrams given during one batch are packed per connection into records of up to
   the largest datagram (one tag for many small datagrams), each record one segment.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import PacketError
from . import framing
from .batching import runs
from .counters import new_drops
from .faketcp import (
    Acceptor,
    Connected,
    Connection,
    ConnectionClosed,
    ConnKey,
    FastState,
    FlowClosed,
    HelloReceived,
    HostPort,
    State,
    Timing,
    Transport,
)
from .framing import CloseReason, Keyring
from .packet import (
    PROTO_TCP,
    TCP_MIN_HEADER,
    TcpHeader,
    parse_ip,
    parse_meta,
    parse_tcp,
    pseudo_sum,
    transport_checksum_ok,
)
from .session import ClientFlow, FlowKey, FlowTable, SessionTable
from .tcpprofile import IpIdent, TcpProfile

TCP_OPT_TS = 12
BATCH_MAX = 32  # records in one run (fewer when larger: GSO_MAX_BYTES)
BATCH_OVERHEAD = framing.RECORD_OVERHEAD + 72  # what a record grows by as a segment: the tag; TCP and IP headers
HOUSEKEEPING = 1.0  # seconds between flow expiry checks


def max_datagram(mtu: int, v6: bool, transports: Iterable[str]) -> int:
    """The largest application datagram one segment can carry (docs/protocol.md §4, Sizes)."""
    ip = 40 if v6 else 20
    over = {"tcp": TCP_MIN_HEADER + TCP_OPT_TS, "udp": 8 + 1}
    return mtu - ip - max(over[t] for t in transports) - framing.RECORD_OVERHEAD - framing.DATA_OVERHEAD


@dataclass(frozen=True, slots=True)
class Policy:
    """What an endpoint needs of the configuration (the service builds it from its ``Config``)."""

    key: str | None = None
    timing: Timing = field(default_factory=Timing)
    transports: tuple[str, ...] = ("tcp",)
    idle: float = 30.0  # flow expiry, seconds
    max_flows: int = 4096  # per session (server), in all (client)
    backlog: int = 256  # server: half-open + hello-pending connections
    max_sessions: int = 1024
    max_conns_per_client: int = 64
    hello_skew: float = 120.0


# ---------------------------------------------------------------------------------------------
# Outputs


@dataclass(slots=True)
class Transmit:
    """Segments (or ``udp``-transport datagrams) for one peer, to send in order.

    Segment *i* is ``header_i + payloads[i]``: ``header`` is the first segment's TCP header, and
    each later one is the same with the sequence number moved on by the payloads before it
    (``packet.run_segments``).  All payloads but the last are equally long, so a run can go to the
    kernel as one GSO send.  ``header`` is always a whole TCP header (even-length, its data offset
    long).  A ``udp``-transport datagram comes whole in ``header`` with one empty payload.  The TCP
    checksum field is 0: the send path fills it in, or has the kernel do it.  ``ip`` is the
    sending connection's IPv4 ID counter and IPv6 flow label (the send path takes one ID per
    segment); None for segments of no connection (resets), which carry ID 0 as the kernel's.
    """

    transport: Transport
    local: HostPort
    remote: HostPort
    header: bytes
    payloads: list[bytes]
    ip: IpIdent | None = None


@dataclass(frozen=True, slots=True)
class ConnectionUp:
    conn: Connection
    client_id: bytes = b""  # server: the session it joined


@dataclass(frozen=True, slots=True)
class ConnectionDown:
    conn: Connection
    reason: str
    reconnect_at: float | None = None


@dataclass(frozen=True, slots=True)
class HelloRefused:
    conn: Connection
    reason: str


@dataclass(frozen=True, slots=True)
class FlowOpened:
    """Server: a new flow needs a socket towards the target; ``flow_failed(key)`` if none opens."""

    key: FlowKey


@dataclass(frozen=True, slots=True)
class FlowGone:
    """Server: a flow expired or the client closed it; its socket can go."""

    key: FlowKey


@dataclass(frozen=True, slots=True)
class Oversized:
    """The first datagram too large to carry since the limit was last set (say it once)."""

    size: int
    limit: int
    mtu: int


@dataclass(frozen=True, slots=True)
class TupleReleased:
    """Server: no connection uses this 4-tuple any more (port sharing: steering may hand its
    segments to the kernel again, which answers a late one with RST)."""

    local: HostPort
    remote: HostPort


#: ``fast_flow``: (the flow, its connection, flow id, largest datagram, the tag's key, the next counter).
FastFlow = tuple[Any, Connection, int, int, tuple[bytes, bytes, bytes], int]

EndpointEvent = ConnectionUp | ConnectionDown | HelloRefused | FlowOpened | FlowGone | Oversized | TupleReleased


def _whole(transport: Transport, local: HostPort, remote: HostPort, seg: bytes, ip: IpIdent | None = None) -> Transmit:
    """One segment (or udp datagram) as a ``Transmit``: its TCP header apart from its payload."""
    if transport == "udp":
        return Transmit(transport, local, remote, seg, [b""])
    hl = (seg[12] >> 4) * 4
    return Transmit(transport, local, remote, seg[:hl], [seg[hl:]], ip)


# ---------------------------------------------------------------------------------------------
# What both roles share


class _Endpoint:
    role = ""

    def __init__(self, policy: Policy, *, mtu: int, clock_offset: float = 0.0,
                 rng: random.Random | None = None, profile: TcpProfile | None = None) -> None:
        self.policy = policy
        self.keyring = Keyring.from_secret(policy.key)
        self.clock_offset = clock_offset
        # ISNs, timestamp offsets and IP IDs come from it: the OS's generator unless a test passes its own.
        self.rng = rng or random.SystemRandom()
        self.profile = profile or TcpProfile()  # the host's TCP, for segments that look like its own
        self.drops: Counter[str] = new_drops()
        self.mtu = mtu
        self.max_datagram = 0
        self.app_rx = self.app_tx = self.app_rx_bytes = self.app_tx_bytes = 0
        self.local_addrs: frozenset[bytes] = frozenset()  # captured packets must be for one of these
        self.closing = False
        self._transmits: list[Transmit] = []
        self._deliveries: list[tuple[Any, bytes]] = []
        self._events: deque[EndpointEvent] = deque()
        self._frames: dict[Connection, tuple[list[bytes], int]] = {}  # frames of the record being filled
        self._records: dict[Connection, list[tuple[bytes, int]]] = {}  # full records, frame counts
        self._timer_at = math.inf
        self._housekeep_at = 0.0
        self._oversize_said = False

    # -- outputs --------------------------------------------------------------------------------

    def transmits(self, now: float) -> list[Transmit]:
        """Everything to send since the last call, the datagrams given meanwhile packed."""
        if self._frames:
            for conn, (frames, _size) in self._frames.items():
                self._close_record(conn, frames)
            self._frames.clear()
        if self._records:
            for conn, records in self._records.items():
                self._emit_records(conn, records, now)
            self._records.clear()
        return self.sealed_transmits()

    def sealed_transmits(self) -> list[Transmit]:
        """What ``transmits`` would give, without closing the records still being filled: what
        must leave before a connection's next segments are made elsewhere (the compiled writer)."""
        out, self._transmits = self._transmits, []
        return out

    def deliveries(self) -> list[tuple[Any, bytes]]:
        out, self._deliveries = self._deliveries, []
        return out

    def next_event(self) -> EndpointEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        return min(self._timer_at, self._housekeep_at) if not self.closing else None

    def connections(self) -> list[Connection]:
        raise NotImplementedError

    # -- inputs ---------------------------------------------------------------------------------

    def set_local_addresses(self, addrs: Iterable[bytes]) -> None:
        """The addresses (packed) that captured packets may be addressed to."""
        self.local_addrs = frozenset(addrs)

    def receive_steered(self, local: HostPort, remote: HostPort, data: memoryview, now: float) -> None:
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

    def fast_conn(self, laddr: bytes, lport: int, raddr: bytes, rport: int) -> FastState | None:
        """The compiled reader (dataplane/_datapath.c) asks, once per wake-up, whether it may take
        the data segments of the connection on this 4-tuple itself (``Connection.fast_state``)."""
        raise NotImplementedError

    def steered_run(self, conn: Connection, data: list[tuple[int, bytes]] | None, segments: int, nbytes: int,
                    authed: int, authed_bytes: int, rcv_nxt: int, ts_recent: int | None, top: int, bits: bytes,
                    replays: int, bad: int, sent: list[tuple[Any, int, int]] | None, now: float) -> None:
        """What the compiled reader did with a run of ``conn``'s data segments
        (``Connection.received_run``), their DATA frames (``data``: for ``deliveries``), and the
        datagrams the relay sent itself (``sent``: ``(flow, count, bytes)`` of flows ``fast_sink``
        named): the rest as for any segment."""
        conn.received_run(segments, nbytes, authed, authed_bytes, rcv_nxt, ts_recent, top, bits, replays, bad, now)
        if data:
            self._deliver_frames(conn, data, now)
        if sent:
            self._delivered(conn, sent, now)
        self._service(conn, now)

    def fast_sink(self, conn: Connection, flow_id: int) -> tuple[Any, Any] | None:
        """The compiled reader asks, once per connection, flow and wake-up, where the datagrams of
        ``flow_id`` arriving on ``conn`` go: ``(flow, destination)``, the destination the flow's key
        (server) or the application's address (client), for the relay to send them itself and
        ``steered_run`` to count (``_delivered``).  None: they come back as ``deliveries`` (an
        unknown flow, or a new one the endpoint opens), as everything does once ``deliveries`` holds
        anything (a segment the reader handed back delivered): a flow's datagrams keep their order."""
        raise NotImplementedError

    def _deliver_frames(self, conn: Connection, data: list[tuple[int, bytes]], now: float) -> None:
        raise NotImplementedError

    def _delivered(self, conn: Connection, sent: list[tuple[Any, int, int]], now: float) -> None:
        """What ``_deliver`` counts, for datagrams of ``fast_sink``'s flows the relay sent."""
        raise NotImplementedError

    def fast_flow(self, source: Any, now: float) -> FastFlow | None:
        """The compiled writer (dataplane/_datapath.c) asks, once per flow and wake-up, whether it
        may frame and seal the flow's datagrams itself: the application's address (client) or
        the flow's key (server).  None: they take ``send_app`` / ``send_target`` (a new flow,
        no route, a connection that is not ESTABLISHED over tcp)."""
        raise NotImplementedError

    def flow_sent(self, flow: Any, count: int, nbytes: int, now: float) -> None:
        """The compiled writer framed ``count`` datagrams (``nbytes``) of ``flow`` (``fast_flow``)."""
        raise NotImplementedError

    def _fast_flow(self, flow: Any, conn: Connection | None, flow_id: int, limit: int, now: float) -> FastFlow | None:
        if conn is None or conn.fast_sealer() is None:
            return None
        self._flush_pending(conn, now)
        sealer = conn.fast_sealer()
        assert sealer is not None
        return flow, conn, flow_id, limit, sealer[0], sealer[1]

    def receive_packet(self, pkt: memoryview, now: float, unfilled: bool = False) -> None:
        """One IP packet from a capture backend: parse, verify the checksum, dispatch.
        ``unfilled``: the capture says a device of this host is still to fill the checksum in
        (a local sender with offload): there is nothing to verify, and the data never left."""
        try:
            ip, l4 = parse_ip(pkt)
            if ip.proto != PROTO_TCP or ip.fragment:
                self.drops["malformed"] += 1
                return
            if ip.dst not in self.local_addrs:  # a capture sees the link, not just what is ours
                self.drops["not_local"] += 1
                return
            if not unfilled and not transport_checksum_ok(pseudo_sum(ip.src, ip.dst), l4):
                self.drops["bad_checksum"] += 1
                return
            hdr, payload = parse_tcp(l4)
        except PacketError:
            self.drops["malformed"] += 1
            return
        self._segment((ip.dst, hdr.dport), (ip.src, hdr.sport), hdr, payload, now)

    def handle_timer(self, now: float) -> None:
        """Run every connection timer due at ``now``, and the flow expiry once a second."""
        nxt = math.inf
        for conn in self.connections():
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
                self._service(conn, now)
                t = conn.get_timer()
            if t is not None and t < nxt:
                nxt = t
        self._timer_at = nxt
        if now >= self._housekeep_at:
            self._housekeep_at = now + HOUSEKEEPING
            self._expire(now)

    def close(self, now: float) -> None:
        """Tell every peer we are going (CLOSE + FIN, or RST); then pull ``transmits``."""
        self.closing = True
        for conn in self.connections():
            if conn.state != State.CLOSED:
                conn.close(now, CloseReason.SHUTDOWN)
            self._service(conn, now)

    def reconfigure(self, policy: Policy) -> None:
        """Live reload: a new key applies to new connections (established ones keep the key of
        their hello); timers, limits and the idle time apply at once."""
        old, self.policy = self.policy, policy
        if policy.key != old.key:
            self.keyring = Keyring.from_secret(policy.key)
        for c in self.connections():
            c.timing = policy.timing

    # -- the shared machinery -------------------------------------------------------------------

    def _segment(self, local: HostPort, remote: HostPort, hdr: TcpHeader, payload: memoryview, now: float) -> None:
        raise NotImplementedError

    def _datagram(self, local: HostPort, remote: HostPort, data: memoryview, now: float) -> None:
        raise NotImplementedError

    def _expire(self, now: float) -> None:
        raise NotImplementedError

    def _on_event(self, conn: Connection, ev: Any, now: float) -> None:
        raise NotImplementedError

    def _service(self, conn: Connection, now: float) -> None:
        """Take what ``conn`` produced and handle its events, until neither is left: handling an
        event may produce segments (accepting a hello makes the HELLO_ACK)."""
        while True:
            for seg in conn.segments_to_send():
                self._transmits.append(_whole(conn.transport, conn.local, conn.remote, seg, conn.ip))
            ev = conn.next_event()
            if ev is None:
                break
            self._on_event(conn, ev, now)
        t = conn.get_timer()
        if t is not None and t < self._timer_at:
            self._timer_at = t

    def _oversize(self, size: int, limit: int) -> None:
        self.drops["oversized"] += 1
        if not self._oversize_said:
            self._oversize_said = True
            self._events.append(Oversized(size, limit, self.mtu))

    def _queue(self, conn: Connection, frame: bytes, budget: int) -> None:
        """Add a DATA frame to the record being filled for ``conn``; a full record is set aside."""
        entry = self._frames.get(conn)
        if entry is None:
            self._frames[conn] = ([frame], len(frame))
            return
        frames, size = entry
        if size + len(frame) > budget:
            self._close_record(conn, frames)
            self._frames[conn] = ([frame], len(frame))
        else:
            frames.append(frame)
            self._frames[conn] = (frames, size + len(frame))

    def _close_record(self, conn: Connection, frames: list[bytes]) -> None:
        record = frames[0] if len(frames) == 1 else b"".join(frames)
        records = self._records.get(conn)
        if records is None:
            self._records[conn] = [(record, len(frames))]
        else:
            records.append((record, len(frames)))

    def _emit_records(self, conn: Connection, records: list[tuple[bytes, int]], now: float) -> None:
        """Seal ``records`` into segments: runs of equal-sized ones as one ``Transmit``."""
        if not conn.established:
            self.drops["no_route"] += sum(k for _, k in records)
            return
        sealed = [conn.seal(r, now) for r, _ in records]
        self._emit_sealed(conn, [s for s in sealed if s is not None], now)

    def _emit_sealed(self, conn: Connection, payloads: list[bytes], now: float) -> None:
        """Sealed records into segments: runs of equal-sized ones as one ``Transmit``."""
        local, remote, transport = conn.local, conn.remote, conn.transport
        batches = conn.batches
        if batches and len(payloads) == 1:  # a lone record (a quiet tunnel's every one): no split, no copy
            self._transmits.append(Transmit(transport, local, remote, conn.batch_header(payloads, now), payloads,
                                            conn.ip))
            return
        for i, j in runs([len(p) for p in payloads], BATCH_MAX, overhead=BATCH_OVERHEAD - framing.RECORD_OVERHEAD):
            if batches:  # a run, or one record: its header apart, as the send path takes it
                run = payloads[i:j]
                self._transmits.append(Transmit(transport, local, remote, conn.batch_header(run, now), run, conn.ip))
                continue
            for payload in payloads[i:j]:  # a connection without timestamps, or udp
                seg = conn.send_sealed(payload, now)
                if seg is not None:
                    self._transmits.append(_whole(transport, local, remote, seg, conn.ip))

    def _flush_pending(self, conn: Connection, now: float) -> None:
        """Seal and send what is queued for ``conn`` now, before the compiled writer's records."""
        entry = self._frames.pop(conn, None)
        if entry is not None:
            self._close_record(conn, entry[0])
        records = self._records.pop(conn, None)
        if records:
            self._emit_records(conn, records, now)

    def sealed_run(self, conn: Connection, payloads: list[bytes], counter: int, now: float) -> None:
        """The compiled writer sealed ``payloads`` for ``conn`` (its counter is now ``counter``):
        into segments, as ``transmits`` does with the records it seals."""
        conn.sealed_by_writer(counter, now)
        if payloads:
            self._emit_sealed(conn, payloads, now)

    def sent_run(self, conn: Connection, counter: int, segments: int, nbytes: int, snd_nxt: int, ids: int,
                 now: float) -> None:
        """The compiled writer sealed ``conn``'s records up to ``counter`` and sent them itself
        (``Connection.wire_state``): ``segments`` segments, ``nbytes`` of payload, up to
        ``snd_nxt``, ``ids`` IPv4 IDs taken."""
        conn.sent_by_writer(counter, segments, nbytes, snd_nxt, ids, now)


# ---------------------------------------------------------------------------------------------
# Server


class ServerEndpoint(_Endpoint):
    """Accepts connections on the tunnel ports and relays each flow to the target."""

    role = "server"

    def __init__(self, policy: Policy, *, mtu: int = 1500, v6_only: bool = False, clock_offset: float = 0.0,
                 rng: random.Random | None = None, profile: TcpProfile | None = None) -> None:
        super().__init__(policy, mtu=mtu, clock_offset=clock_offset, rng=rng, profile=profile)
        self.acceptor = Acceptor(keyring=self.keyring, timing=policy.timing, backlog=policy.backlog,
                                 rng=self.rng, clock_offset=clock_offset, drops=self.drops, profile=self.profile)
        self.sessions = SessionTable(
            max_sessions=policy.max_sessions, max_flows=policy.max_flows,
            max_conns_per_client=policy.max_conns_per_client, hello_skew=policy.hello_skew, idle=policy.idle,
            drops=self.drops)
        self.v6_only = v6_only  # the figure reported is IPv6's when only IPv6 is served
        self.max_datagram_v6 = 0
        self._failed_flows: set[FlowKey] = set()
        self.set_mtu(mtu)

    def connections(self) -> list[Connection]:
        return self.acceptor.all()

    def set_mtu(self, mtu: int) -> None:
        """What one segment can carry follows the interfaces' MTU (each connection its family's)."""
        self.mtu = mtu
        self.max_datagram = max_datagram(mtu, self.v6_only, self.policy.transports)
        self.max_datagram_v6 = max_datagram(mtu, True, self.policy.transports)
        self.acceptor.mss = mtu - 40
        self._oversize_said = False

    def reconfigure(self, policy: Policy) -> None:
        super().reconfigure(policy)
        a, s = self.acceptor, self.sessions
        a.keyring, a.timing, a.backlog = self.keyring, policy.timing, policy.backlog
        s.max_sessions, s.max_flows, s.max_conns_per_client = (policy.max_sessions, policy.max_flows,
                                                               policy.max_conns_per_client)
        s.hello_skew, s.idle = policy.hello_skew, policy.idle

    # -- inputs ---------------------------------------------------------------------------------

    def _segment(self, local: HostPort, remote: HostPort, hdr: TcpHeader, payload: memoryview, now: float) -> None:
        conn, data = self.acceptor.segment(local, remote, hdr, payload, now)
        if conn is not None:
            if data:
                self._deliver(conn, data, now)
            self._service(conn, now)
        self._take_resets()

    def _datagram(self, local: HostPort, remote: HostPort, data: memoryview, now: float) -> None:
        if "udp" not in self.policy.transports:
            self.drops["unexpected"] += 1
            return
        conn, frames = self.acceptor.datagram(local, remote, data, now)
        if conn is not None:
            if frames:
                self._deliver(conn, frames, now)
            self._service(conn, now)

    def fast_conn(self, laddr: bytes, lport: int, raddr: bytes, rport: int) -> FastState | None:
        key: ConnKey = ("tcp", laddr, lport, raddr, rport)
        a = self.acceptor
        conn = a.connections.get(key)
        if conn is None or key in a.pending:  # a reconnect on the tuple: Acceptor.segment decides
            return None
        return conn.fast_state()

    def _deliver_frames(self, conn: Connection, data: list[tuple[int, bytes]], now: float) -> None:
        self._deliver(conn, data, now)

    def fast_sink(self, conn: Connection, flow_id: int) -> tuple[Any, Any] | None:
        if self._deliveries:
            return None
        session = self.sessions.session_of(conn)
        flow = session.flows.get(flow_id) if session is not None else None
        if session is None or flow is None:
            return None
        return (session, flow), (session.client_id, flow_id)

    def _delivered(self, conn: Connection, sent: list[tuple[Any, int, int]], now: float) -> None:
        for (session, flow), count, nbytes in sent:
            flow.last_active = session.last_active = now
            flow.conn = conn
            flow.rx += count
            self.app_tx += count
            self.app_tx_bytes += nbytes

    def fast_flow(self, source: Any, now: float) -> FastFlow | None:
        key: FlowKey = source
        session = self.sessions.sessions.get(key[0])
        flow = session.flows.get(key[1]) if session is not None else None
        if session is None or flow is None:
            return None
        conn = session.route(flow)
        limit = self.max_datagram_v6 if conn is not None and len(conn.remote[0]) == 16 else self.max_datagram
        return self._fast_flow((session, flow), conn, key[1], limit, now)

    def flow_sent(self, flow: Any, count: int, nbytes: int, now: float) -> None:
        session, f = flow
        f.last_active = session.last_active = now
        f.tx += count
        self.app_rx += count
        self.app_rx_bytes += nbytes

    def _take_resets(self) -> None:
        for local, remote, seg in self.acceptor.segments_to_send():
            self._transmits.append(_whole("tcp", local, remote, seg))

    def send_target(self, key: FlowKey, datagram: bytes | memoryview, now: float) -> None:
        """A datagram from the target for flow ``key``: back to its client."""
        session = self.sessions.sessions.get(key[0])
        flow = session.flows.get(key[1]) if session is not None else None
        if session is None or flow is None:
            self.drops["no_route"] += 1
            return
        flow.last_active = session.last_active = now
        conn = session.route(flow)
        if conn is None:
            self.drops["no_route"] += 1
            return
        limit = self.max_datagram_v6 if len(conn.remote[0]) == 16 else self.max_datagram
        n = len(datagram)
        if n > limit:
            self._oversize(n, limit)
            return
        flow.tx += 1
        self.app_rx += 1
        self.app_rx_bytes += n
        self._queue(conn, framing.data_frame(key[1], datagram), limit + framing.DATA_OVERHEAD)

    def flow_failed(self, key: FlowKey) -> None:
        """No socket towards the target could be opened for ``key``: forget the flow, count it."""
        session = self.sessions.sessions.get(key[0])
        if session is not None and session.flows.pop(key[1], None) is not None:
            self.drops["limit"] += 1
            self._failed_flows.add(key)

    def deliveries(self) -> list[tuple[Any, bytes]]:
        out = super().deliveries()
        if self._failed_flows:
            failed, self._failed_flows = self._failed_flows, set()
            out = [d for d in out if d[0] not in failed]
        return out

    def _deliver(self, conn: Connection, data: Sequence[tuple[int, bytes | memoryview]], now: float) -> None:
        session = self.sessions.session_of(conn)
        if session is None:
            self.drops["unexpected"] += len(data)
            return
        cid = session.client_id
        for flow_id, dgram in data:
            flow, created = self.sessions.flow(session, flow_id, now)
            if flow is None:
                continue
            if created:
                self._events.append(FlowOpened((cid, flow_id)))
            flow.conn = conn
            flow.rx += 1
            self.app_tx += 1
            self.app_tx_bytes += len(dgram)
            self._deliveries.append(((cid, flow_id), bytes(dgram)))

    def _on_event(self, conn: Connection, ev: Any, now: float) -> None:
        if isinstance(ev, HelloReceived):
            adm = self.sessions.admit(ev.hello, conn, now, now + self.clock_offset)
            if not adm.ok:
                self._events.append(HelloRefused(conn, adm.reason))
                conn.refuse(now, CloseReason.REFUSED)
                return
            conn.accept(now)
            old = self.acceptor.promote(conn)
            for stale in (old, adm.replaced):
                if stale is not None and stale is not conn:
                    self._retire(stale)
            self._events.append(ConnectionUp(conn, ev.hello.client_id))
        elif isinstance(ev, ConnectionClosed):
            admitted = conn.hello is not None and self.sessions.session_of(conn) is not None
            self.acceptor.forget(conn)
            self.sessions.remove_connection(conn)
            if admitted:
                self._events.append(ConnectionDown(conn, ev.reason))
            key = self.acceptor.key_of(conn)
            if conn.transport == "tcp" and key not in self.acceptor.pending and key not in self.acceptor.connections:
                self._events.append(TupleReleased(conn.local, conn.remote))
        elif isinstance(ev, FlowClosed):
            session = self.sessions.session_of(conn)
            if session is not None and session.flows.pop(ev.flow_id, None) is not None:
                self._events.append(FlowGone((session.client_id, ev.flow_id)))

    def _retire(self, conn: Connection) -> None:
        """Forget a connection replaced by a newer one on the same tuple/index, silently."""
        self.acceptor.forget(conn)
        self.sessions.remove_connection(conn)
        conn.retire()

    def _expire(self, now: float) -> None:
        flows, _sessions = self.sessions.expire(now, now + self.clock_offset)
        for key in flows:
            self._events.append(FlowGone(key))

    def close(self, now: float) -> None:
        super().close(now)
        self._take_resets()


# ---------------------------------------------------------------------------------------------
# Client


class ClientEndpoint(_Endpoint):
    """Carries each application flow over one connection per (transport, server port)."""

    role = "client"

    def __init__(self, policy: Policy, *, server: bytes, ports: tuple[int, ...], client_id: bytes,
                 mtu: int = 1500, clock_offset: float = 0.0, rng: random.Random | None = None,
                 flows: FlowTable | None = None, profile: TcpProfile | None = None) -> None:
        super().__init__(policy, mtu=mtu, clock_offset=clock_offset, rng=rng, profile=profile)
        self.server = server  # packed
        self.ports = ports
        self.client_id = client_id
        self.flows = flows or FlowTable(max_flows=policy.max_flows, idle=policy.idle)
        self.flows.drops = self.drops
        self.conns: list[Connection] = []
        self._by_port: dict[tuple[str, int, int], Connection] = {}  # transport, local port, server port
        self.set_mtu(mtu)

    def connections(self) -> list[Connection]:
        return self.conns

    def set_mtu(self, mtu: int) -> None:
        self.mtu = mtu
        self.max_datagram = max_datagram(mtu, len(self.server) == 16, self.policy.transports)
        self._oversize_said = False

    def bind(self, local: bytes, local_ports: list[int]) -> None:
        """Make the connections from ``local`` (packed), one local port per server port; they
        open at ``connect``.  After ``close_connections``, again for a new address: the client
        id and the flows stay, so the server keeps the session and its flows."""
        n = len(self.ports)
        transports = self.policy.transports
        count = n * len(transports)
        mss = self.mtu - (60 if len(local) == 16 else 40)
        self.conns = []
        self._by_port.clear()
        for i, (port, lport) in enumerate(zip(self.ports, local_ports, strict=True)):
            for t, transport in enumerate(transports):
                conn = Connection(role="client", transport=transport, local=(local, lport),  # type: ignore[arg-type]
                                  remote=(self.server, port), keyring=self.keyring, timing=self.policy.timing,
                                  client_id=self.client_id, conn_index=t * n + i, conn_count=count, mss=mss,
                                  rng=self.rng, clock_offset=self.clock_offset, drops=self.drops,
                                  profile=self.profile)
                self.conns.append(conn)
                self._by_port[(transport, lport, port)] = conn

    def connect(self, now: float) -> None:
        """Open every connection."""
        for conn in self.conns:
            conn.connect(now)
            self._service(conn, now)

    def close_connections(self, now: float) -> None:
        """Close every connection for good (our address is going): CLOSE + FIN, or RST."""
        for conn in self.conns:
            if conn.state != State.CLOSED:
                conn.close(now)
                self._service(conn, now)
        self._frames.clear()
        self._records.clear()
        self.flows.rebalance()

    def reconfigure(self, policy: Policy) -> None:
        super().reconfigure(policy)
        for c in self.conns:
            c.keyring = self.keyring
        self.flows.idle = policy.idle

    # -- inputs ---------------------------------------------------------------------------------

    def receive_steered(self, local: HostPort, remote: HostPort, data: memoryview, now: float) -> None:
        if remote[0] != self.server:
            self.drops["no_connection"] += 1
            return
        super().receive_steered(local, remote, data, now)

    def _segment(self, local: HostPort, remote: HostPort, hdr: TcpHeader, payload: memoryview, now: float) -> None:
        conn = self._by_port.get(("tcp", local[1], remote[1]))
        if conn is None or remote[0] != self.server:
            self.drops["no_connection"] += 1
            return
        data = conn.receive(hdr, payload, now)
        if data:
            self._deliver(data)
        self._service(conn, now)

    def _datagram(self, local: HostPort, remote: HostPort, data: memoryview, now: float) -> None:
        conn = self._by_port.get(("udp", local[1], remote[1]))
        if conn is None:
            self.drops["no_connection"] += 1
            return
        frames = conn.receive_datagram(data, now)
        if frames:
            self._deliver(frames)
        self._service(conn, now)

    def _deliver(self, data: Sequence[tuple[int, bytes | memoryview]]) -> None:
        by_id = self.flows.by_id
        for flow_id, dgram in data:
            flow = by_id.get(flow_id)
            if flow is None:
                self.drops["unexpected"] += 1
                continue
            flow.rx += 1
            self.app_tx += 1
            self.app_tx_bytes += len(dgram)
            self._deliveries.append((flow.addr, bytes(dgram)))

    def fast_conn(self, laddr: bytes, lport: int, raddr: bytes, rport: int) -> FastState | None:
        conn = self._by_port.get(("tcp", lport, rport)) if raddr == self.server else None
        return conn.fast_state() if conn is not None else None

    def _deliver_frames(self, conn: Connection, data: list[tuple[int, bytes]], now: float) -> None:
        self._deliver(data)

    def fast_sink(self, conn: Connection, flow_id: int) -> tuple[Any, Any] | None:
        flow = self.flows.by_id.get(flow_id) if not self._deliveries else None
        return None if flow is None else (flow, flow.addr)

    def _delivered(self, conn: Connection, sent: list[tuple[Any, int, int]], now: float) -> None:
        for flow, count, nbytes in sent:
            flow.rx += count
            self.app_tx += count
            self.app_tx_bytes += nbytes

    def fast_flow(self, source: Any, now: float) -> FastFlow | None:
        flow = self.flows.by_addr.get(source)
        if flow is None:
            return None
        return self._fast_flow(flow, self.flows.route(flow, self.conns), flow.flow_id, self.max_datagram, now)

    def flow_sent(self, flow: Any, count: int, nbytes: int, now: float) -> None:
        flow.last_active = now
        flow.tx += count
        self.app_rx += count
        self.app_rx_bytes += nbytes

    def send_app(self, addr: Any, datagram: bytes | memoryview, now: float) -> None:
        """A datagram from the application at ``addr``: onto its flow's connection."""
        n = len(datagram)
        self.app_rx += 1
        self.app_rx_bytes += n
        limit = self.max_datagram
        if n > limit:
            self._oversize(n, limit)
            return
        flow = self.flows.lookup(addr, now)
        if flow is None:
            return
        conn = self.flows.route(flow, self.conns)
        if conn is None or not conn.established:
            self.drops["no_route"] += 1
            return
        flow.tx += 1
        self._queue(conn, framing.data_frame(flow.flow_id, datagram), limit + framing.DATA_OVERHEAD)

    def _on_event(self, conn: Connection, ev: Any, now: float) -> None:
        if isinstance(ev, Connected):
            self.flows.rebalance()
            self._events.append(ConnectionUp(conn))
        elif isinstance(ev, ConnectionClosed):
            self._events.append(ConnectionDown(conn, ev.reason, ev.reconnect_at))
            if not self.closing and ev.reason in ("reset", "peer closed"):
                for other in self.conns:
                    if other is not conn and other.established and now - other.last_rx > 0.05:
                        other.probe(now)
                        self._service(other, now)
        # FlowClosed: the server forgot the flow; ours expires on its own or is recreated by traffic

    def _expire(self, now: float) -> None:
        gone: list[ClientFlow] = self.flows.expire(now)
        for flow in gone:
            if flow.conn is not None:
                flow.conn.close_flow(flow.flow_id, now)
                self._service(flow.conn, now)
