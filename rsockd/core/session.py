"""Sessions and flows: which datagram goes where.  Pure (no sockets, ``now`` passed in).

Client: every application source address is a *flow* with a 32-bit id.  A flow is carried by one
of the client's connections, chosen by rendezvous hashing over the established ones: stable while
the set does not change, and only the flows of a dying connection move when it dies.

Server: connections are grouped into *sessions* by the client id of their hello; a session owns
its flows (the I/O layer keeps one UDP socket towards the target for each, by (client id, flow
id)), so flows survive the reconnect of any connection.  Idle flows expire after ``duration`` seconds (rsock's flag).

Hellos are checked here (docs/security.md): the timestamp must be within ``hello_skew`` of our
wall clock and newer than the last hello of the same (client id, connection index), so a captured
hello cannot be replayed into a new connection.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .counters import new_drops
from .faketcp import Connection
from .framing import PROTOCOL_VERSION, Hello

Addr = tuple[Any, ...]  # a socket address as returned by recvfrom
FlowKey = tuple[bytes, int]  # server: (client id, flow id)


def _weight(flow_id: int, conn_index: int) -> int:
    return int.from_bytes(hashlib.blake2s(f"{flow_id}:{conn_index}".encode(), digest_size=8).digest(), "big")


def rendezvous(flow_id: int, conns: Iterable[Connection]) -> Connection | None:
    """The established connection with the highest weight for ``flow_id`` (HRW hashing)."""
    best: Connection | None = None
    best_w = -1
    for c in conns:
        if c.established:
            w = _weight(flow_id, c.conn_index)
            if w > best_w:
                best, best_w = c, w
    return best


# ---------------------------------------------------------------------------------------------
# Client


@dataclass(slots=True)
class ClientFlow:
    flow_id: int
    addr: Addr
    last_active: float
    conn: Connection | None = None
    rx: int = 0
    tx: int = 0


class FlowTable:
    """Client: application address <-> flow id, and the connection carrying each flow."""

    def __init__(self, *, max_flows: int = 4096, idle: float = 30.0, drops: Counter[str] | None = None) -> None:
        self.max_flows = max_flows
        self.idle = idle
        self.drops = drops if drops is not None else new_drops()
        self.by_addr: dict[Addr, ClientFlow] = {}
        self.by_id: dict[int, ClientFlow] = {}
        self._next_id = 1

    def lookup(self, addr: Addr, now: float) -> ClientFlow | None:
        """The flow of ``addr`` (created if new); None when the flow limit is reached."""
        flow = self.by_addr.get(addr)
        if flow is None:
            if len(self.by_addr) >= self.max_flows:
                self.drops["limit"] += 1
                return None
            while self._next_id in self.by_id or self._next_id == 0:
                self._next_id = (self._next_id + 1) & 0xFFFFFFFF
            flow = ClientFlow(self._next_id, addr, now)
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF
            self.by_addr[addr] = flow
            self.by_id[flow.flow_id] = flow
        flow.last_active = now
        return flow

    def route(self, flow: ClientFlow, conns: list[Connection]) -> Connection | None:
        """The connection to send ``flow`` on: its current one while established, else rehash."""
        c = flow.conn
        if c is None or not c.established:
            c = flow.conn = rendezvous(flow.flow_id, conns)
        return c

    def rebalance(self) -> None:
        """Forget every flow's connection (a connection came back: let hashing pick again)."""
        for flow in self.by_id.values():
            flow.conn = None

    def expire(self, now: float) -> list[ClientFlow]:
        gone = [f for f in self.by_id.values() if now - f.last_active > self.idle]
        for f in gone:
            del self.by_id[f.flow_id]
            del self.by_addr[f.addr]
        return gone

    def remove(self, flow_id: int) -> ClientFlow | None:
        flow = self.by_id.pop(flow_id, None)
        if flow is not None:
            del self.by_addr[flow.addr]
        return flow


# ---------------------------------------------------------------------------------------------
# Server


@dataclass(slots=True)
class ServerFlow:
    flow_id: int
    last_active: float
    conn: Connection | None = None  # where the last datagram of the flow came from
    rx: int = 0
    tx: int = 0


@dataclass(slots=True)
class Session:
    client_id: bytes
    created: float
    last_active: float
    connections: dict[int, Connection] = field(default_factory=dict)  # by conn_index
    flows: dict[int, ServerFlow] = field(default_factory=dict)

    def live(self) -> list[Connection]:
        return [c for c in self.connections.values() if c.established]

    def route(self, flow: ServerFlow) -> Connection | None:
        """Reply on the connection the flow last came from, else any established one."""
        c = flow.conn
        if c is None or not c.established:
            c = flow.conn = rendezvous(flow.flow_id, self.connections.values())
        return c


@dataclass(frozen=True, slots=True)
class Admission:
    ok: bool
    reason: str = ""
    session: Session | None = None
    replaced: Connection | None = None


class SessionTable:
    """Server: sessions by client id, with the limits of docs/design.md."""

    def __init__(self, *, max_sessions: int = 1024, max_flows: int = 4096, max_conns_per_client: int = 64,
                 hello_skew: float = 120.0, idle: float = 30.0, linger: float = 60.0,
                 drops: Counter[str] | None = None) -> None:
        self.max_sessions = max_sessions
        self.max_flows = max_flows
        self.max_conns_per_client = max_conns_per_client
        self.hello_skew = hello_skew
        self.idle = idle
        self.linger = linger  # a session without connections is kept this long for a reconnect
        self.drops = drops if drops is not None else new_drops()
        self.sessions: dict[bytes, Session] = {}
        self._by_conn: dict[int, Session] = {}
        self._last_hello: dict[tuple[bytes, int], int] = {}

    def admit(self, hello: Hello, conn: Connection, now: float, wall: float) -> Admission:
        """Decide on an authenticated hello; on success ``conn`` joins its session."""
        if hello.version != PROTOCOL_VERSION:
            return self._refuse(f"protocol version {hello.version}")
        skew = abs(hello.timestamp_ns / 1e9 - wall)
        if self.hello_skew and skew > self.hello_skew:
            return self._refuse(f"hello timestamp {skew:.0f} s away from our clock")
        key = (hello.client_id, hello.conn_index)
        if hello.timestamp_ns <= self._last_hello.get(key, -1):
            return self._refuse("hello replayed (not newer than the last one)")
        session = self.sessions.get(hello.client_id)
        if session is None:
            if len(self.sessions) >= self.max_sessions:
                self.drops["limit"] += 1
                return Admission(False, "session limit reached")
            session = Session(hello.client_id, now, now)
            self.sessions[hello.client_id] = session
        replaced = session.connections.get(hello.conn_index)
        if replaced is None and len(session.connections) >= self.max_conns_per_client:
            self.drops["limit"] += 1
            return Admission(False, "connection limit per client reached")
        self._last_hello[key] = hello.timestamp_ns
        if replaced is not None:
            self._by_conn.pop(id(replaced), None)
        session.connections[hello.conn_index] = conn
        session.last_active = now
        self._by_conn[id(conn)] = session
        return Admission(True, session=session, replaced=replaced)

    def _refuse(self, reason: str) -> Admission:
        self.drops["refused"] += 1
        return Admission(False, reason)

    def session_of(self, conn: Connection) -> Session | None:
        return self._by_conn.get(id(conn))

    def remove_connection(self, conn: Connection) -> None:
        session = self._by_conn.pop(id(conn), None)
        if session is not None and session.connections.get(conn.conn_index) is conn:
            del session.connections[conn.conn_index]

    def flow(self, session: Session, flow_id: int, now: float) -> tuple[ServerFlow | None, bool]:
        """The flow ``flow_id`` of ``session`` (created when new): (flow or None at the limit, created)."""
        flow = session.flows.get(flow_id)
        created = False
        if flow is None:
            if len(session.flows) >= self.max_flows:
                self.drops["limit"] += 1
                return None, False
            flow = session.flows[flow_id] = ServerFlow(flow_id, now)
            created = True
        flow.last_active = now
        session.last_active = now
        return flow, created

    def expire(self, now: float, wall: float) -> tuple[list[FlowKey], list[Session]]:
        """Drop idle flows, and sessions with no connection left for ``linger`` seconds: the
        keys of the flows dropped, and the sessions."""
        flows: list[FlowKey] = []
        dead: list[Session] = []
        for cid, session in list(self.sessions.items()):
            for fid, flow in list(session.flows.items()):
                if now - flow.last_active > self.idle:
                    flows.append((cid, fid))
                    del session.flows[fid]
            if not session.connections and now - session.last_active > self.linger:
                flows.extend((cid, fid) for fid in session.flows)
                session.flows.clear()
                dead.append(session)
                del self.sessions[cid]
        if self.hello_skew:
            # Older hellos fail the skew check anyway: their last timestamps need not be kept.
            cutoff = int((wall - self.hello_skew) * 1e9)
            self._last_hello = {k: v for k, v in self._last_hello.items() if v > cutoff}
        return flows, dead
