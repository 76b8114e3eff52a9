"""Two ends of a tunnel connected in memory: a client Connection and a server Acceptor.

Every segment crosses as wire bytes: the client's are parsed with ``rsockd.core.packet`` (checksum
verified) exactly as a capture backend would, the server's too.  A ``wire`` hook may drop,
duplicate or hold back segments to model loss and reordering.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from rsockd.core import framing
from rsockd.core.counters import new_drops
from rsockd.core.faketcp import Acceptor, Connected, Connection, ConnectionClosed, Event, HelloReceived, Timing
from rsockd.core.framing import Keyring
from rsockd.core.packet import parse_tcp, pseudo_sum, transport_checksum_ok
from rsockd.core.session import SessionTable

CLI = (bytes([10, 0, 0, 1]), 40001)
SRV = (bytes([10, 0, 0, 2]), 10001)

Wire = Callable[[str, bytes], list[bytes]]  # (direction "c2s"/"s2c", segment) -> what arrives


def passthrough(direction: str, seg: bytes) -> list[bytes]:
    return [seg]


@dataclass
class Pair:
    client_key: str | None = None
    server_key: str | None = None
    transport: str = "tcp"
    timing: Timing = field(default_factory=Timing)
    backlog: int = 16
    seed: int = 1
    now: float = 1000.0
    wire: Wire = passthrough

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.drops_c = new_drops()
        self.drops_s = new_drops()
        self.client = self.new_client()
        self.acceptor = Acceptor(keyring=Keyring.from_secret(self.server_key), timing=self.timing,
                                 backlog=self.backlog, rng=self.rng, drops=self.drops_s)
        self.sessions: SessionTable[None] = SessionTable(drops=self.drops_s)
        self.got_c: list[tuple[int, bytes]] = []
        self.got_s: list[tuple[int, bytes]] = []
        self.events_c: list[Event] = []
        self.events_s: list[Event] = []
        self.log: list[tuple[str, bytes]] = []  # every segment put on the wire
        self._last_words: list[bytes] = []

    def new_client(self, local: tuple[bytes, int] = CLI, index: int = 0) -> Connection:
        return Connection(role="client", local=local, remote=SRV, keyring=Keyring.from_secret(self.client_key),
                          transport=self.transport,  # type: ignore[arg-type]
                          timing=self.timing, client_id=b"client01", conn_index=index, rng=self.rng,
                          drops=self.drops_c)

    # -- moving bytes ---------------------------------------------------------------------------

    def server_conn(self) -> Connection:
        conns = list(self.acceptor.connections.values())
        assert len(conns) == 1, conns
        return conns[0]

    def to_server(self, seg: bytes, src: tuple[bytes, int] = CLI) -> None:
        if self.transport == "udp":
            conn, data = self.acceptor.datagram(SRV, src, seg, self.now)
        else:
            assert transport_checksum_ok(pseudo_sum(src[0], SRV[0]), seg), "client sent a bad checksum"
            hdr, payload = parse_tcp(seg)
            assert hdr.dport == SRV[1]
            conn, data = self.acceptor.segment(SRV, src, hdr, payload, self.now)
        self.got_s.extend((f, bytes(d)) for f, d in data)
        if conn is not None:
            self.server_events(conn)

    def to_client(self, seg: bytes, client: Connection | None = None) -> None:
        client = client or self.client
        if self.transport == "udp":
            data = client.receive_datagram(seg, self.now)
        else:
            assert transport_checksum_ok(pseudo_sum(SRV[0], client.local[0]), seg), "server sent a bad checksum"
            hdr, payload = parse_tcp(seg)
            assert hdr.sport == SRV[1] and hdr.dport == client.local[1]
            data = client.receive(hdr, payload, self.now)
        self.got_c.extend((f, bytes(d)) for f, d in data)
        while (ev := client.next_event()) is not None:
            self.events_c.append(ev)

    def server_events(self, conn: Connection) -> None:
        while (ev := conn.next_event()) is not None:
            self.events_s.append(ev)
            if isinstance(ev, HelloReceived):
                adm = self.sessions.admit(ev.hello, conn, self.now, self.now)
                if adm.ok:
                    conn.accept(self.now)
                    self.acceptor.promote(conn)
                else:
                    conn.refuse(self.now)
            elif isinstance(ev, ConnectionClosed):
                self._last_words.extend(conn.segments_to_send())  # flushed before it is forgotten
                self.acceptor.forget(conn)
                self.sessions.remove_connection(conn)

    def pump(self, rounds: int = 20) -> None:
        """Move segments both ways until nothing is left to send."""
        for _ in range(rounds):
            moved = False
            for seg in self.client.segments_to_send():
                moved = True
                self.log.append(("c2s", seg))
                for s in self.wire("c2s", seg):
                    self.to_server(s)
            while (ev := self.client.next_event()) is not None:
                self.events_c.append(ev)
            out = [(c, s) for c in self.acceptor.all() for s in c.segments_to_send()]
            out += [(None, s) for _l, _r, s in self.acceptor.segments_to_send()]
            out += [(None, s) for s in self._last_words]
            self._last_words = []
            for _c, seg in out:
                moved = True
                self.log.append(("s2c", seg))
                for s in self.wire("s2c", seg):
                    self.to_client(s)
            for c in self.acceptor.all():
                self.server_events(c)
            if not moved:
                return

    def advance(self, dt: float, step: float = 0.05) -> None:
        """Let ``dt`` seconds pass, running every timer on the way."""
        end = self.now + dt
        while self.now < end:
            self.now = min(end, self.now + step)
            for c in [self.client, *self.acceptor.all()]:
                t = c.get_timer()
                if t is not None and t <= self.now:
                    c.handle_timer(self.now)
                    if c is not self.client:
                        self.server_events(c)
            self.pump()

    def establish(self) -> Connection:
        self.client.connect(self.now)
        self.pump()
        assert self.client.established, self.client.state
        assert any(isinstance(e, Connected) for e in self.events_c)
        return self.server_conn()

    def send_c(self, flow: int, data: bytes) -> bytes:
        seg = self.client.send_datagram(flow, data, self.now)
        assert seg is not None
        return seg

    def frames_of(self, seg: bytes) -> list[int]:
        """The frame types inside one client->server segment (without authenticating)."""
        payload = seg[1:] if self.transport == "udp" else bytes(parse_tcp(seg)[1])
        return [t for _c, _t, fr in framing.split_records(payload) for t, _b in framing.iter_frames(fr)]
