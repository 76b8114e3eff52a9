"""Two ends of a tunnel connected in memory.

``Pair``: a client ``Connection`` against the real ``ServerEndpoint`` (its acceptor, admission,
replacement and sessions: the server's policy is the endpoint's, not a copy).  ``EndpointPair``:
a ``ClientEndpoint`` against a ``ServerEndpoint``, both whole.

Every segment crosses as wire bytes.  ``wire_segments`` does what a send path does (splits a run,
fills in the TCP checksum); the server reads each one as an IPv4 packet from a capture backend
(checksum verified), the client parses it.  A ``wire`` hook may drop, duplicate or hold back
segments to model loss and reordering.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rsockd.core import framing
from rsockd.core.counters import new_drops
from rsockd.core.endpoint import ClientEndpoint, EndpointEvent, Policy, ServerEndpoint, Transmit
from rsockd.core.faketcp import Connected, Connection, Event, Timing
from rsockd.core.framing import Keyring
from rsockd.core.packet import (
    ipv4_header,
    parse_tcp,
    pseudo_sum,
    run_segments,
    segment_checksum,
)

CLI = (bytes([10, 0, 0, 1]), 40001)
SRV = (bytes([10, 0, 0, 2]), 10001)

Wire = Callable[[str, bytes], list[bytes]]  # (direction "c2s"/"s2c", segment) -> what arrives


def passthrough(direction: str, seg: bytes) -> list[bytes]:
    return [seg]


def checksummed(seg: bytes, src: bytes, dst: bytes) -> bytes:
    """``seg`` with its TCP checksum filled in, as the raw send path does (too short to be a
    segment: as it is)."""
    if len(seg) < 20:
        return seg
    hl = (seg[12] >> 4) * 4
    check = segment_checksum(pseudo_sum(src, dst), seg[:16] + b"\0\0" + seg[18:hl], seg[hl:])
    return seg[:16] + check.to_bytes(2, "big") + seg[18:]


def wire_segments(t: Transmit) -> list[bytes]:
    """What a ``Transmit`` puts on the wire: TCP segments with checksums, or udp datagrams."""
    if t.transport == "udp":
        return [t.header + p for p in t.payloads]
    assert len(t.header) == (t.header[12] >> 4) * 4, "a Transmit's header is one whole TCP header"
    return [checksummed(h + p, t.local[0], t.remote[0]) for h, p in run_segments(t.header, t.payloads)]


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
        self.server = ServerEndpoint(Policy(key=self.server_key, timing=self.timing, backlog=self.backlog,
                                            transports=(self.transport,)), rng=self.rng)
        self.server.set_local_addresses({SRV[0]})
        self.acceptor = self.server.acceptor
        self.sessions = self.server.sessions
        self.drops_s = self.server.drops
        self.got_c: list[tuple[int, bytes]] = []
        self.got_s: list[tuple[int, bytes]] = []
        self.events_c: list[Event] = []
        self.events_s: list[EndpointEvent] = []
        self.log: list[tuple[str, bytes]] = []  # every segment put on the wire

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
        """``seg`` as a connection made it (checksum field 0) reaches the server."""
        if self.transport == "udp":
            self.server.receive_steered(SRV, src, memoryview(seg), self.now)
        else:
            seg = checksummed(seg, src[0], SRV[0])
            self.server.receive_packet(memoryview(ipv4_header(src[0], SRV[0], len(seg)) + seg), self.now)
        self.got_s.extend((key[1], d) for key, d in self.server.deliveries())
        while (ev := self.server.next_event()) is not None:
            self.events_s.append(ev)

    def server_segments(self) -> list[bytes]:
        """What the server has to send now, as wire bytes (and what a test made one of its
        connections produce by calling the connection directly)."""
        direct = [checksummed(s, c.local[0], c.remote[0]) if c.transport == "tcp" else s
                  for c in self.acceptor.all() for s in c.segments_to_send()]
        return [s for t in self.server.transmits(self.now) for s in wire_segments(t)] + direct

    def to_client(self, seg: bytes, client: Connection | None = None) -> None:
        client = client or self.client
        if self.transport == "udp":
            data = client.receive_datagram(seg, self.now)
        else:
            seg = checksummed(seg, SRV[0], client.local[0])
            hdr, payload = parse_tcp(seg)
            data = client.receive(hdr, payload, self.now)
        self.got_c.extend((f, bytes(d)) for f, d in data)
        while (ev := client.next_event()) is not None:
            self.events_c.append(ev)

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
            for seg in self.server_segments():
                moved = True
                self.log.append(("s2c", seg))
                for s in self.wire("s2c", seg):
                    self.to_client(s)
            if not moved:
                return

    def advance(self, dt: float, step: float = 0.05) -> None:
        """Let ``dt`` seconds pass, running every timer on the way."""
        end = self.now + dt
        while self.now < end:
            self.now = min(end, self.now + step)
            for side in (self.client, self.server):
                t = side.get_timer()
                if t is not None and t <= self.now:
                    side.handle_timer(self.now)
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


# ---------------------------------------------------------------------------------------------
# Both endpoints whole


APP = ("127.0.0.1", 5000)  # an application's source address on the client


@dataclass
class EndpointPair:
    """A ``ClientEndpoint`` with one connection per server port, against a ``ServerEndpoint``."""

    client_policy: Policy = field(default_factory=Policy)
    server_policy: Policy = field(default_factory=Policy)
    ports: tuple[int, ...] = (10001, 10002, 10003)
    seed: int = 1
    now: float = 1000.0
    wire: Wire = passthrough
    client_addr: bytes = CLI[0]
    server_addr: bytes = SRV[0]
    first_local_port: int = 40001

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.local_ports = [self.first_local_port + i for i in range(len(self.ports))]
        self.server = self.new_server()
        self.client = self.new_client(b"client01")
        self.app_got: list[tuple[Any, bytes]] = []
        self.target_got: list[tuple[Any, bytes]] = []
        self.events_c: list[EndpointEvent] = []
        self.events_s: list[EndpointEvent] = []

    def new_server(self, policy: Policy | None = None) -> ServerEndpoint:
        server = ServerEndpoint(policy or self.server_policy, rng=self.rng)
        server.set_local_addresses({self.server_addr})
        return server

    def new_client(self, client_id: bytes, policy: Policy | None = None) -> ClientEndpoint:
        client = ClientEndpoint(policy or self.client_policy, server=self.server_addr, ports=self.ports,
                                client_id=client_id, rng=self.rng)
        client.set_local_addresses({self.client_addr})
        client.bind(self.client_addr, self.local_ports)
        return client

    def start(self) -> None:
        self.client.connect(self.now)
        self.pump()

    def up(self, side: ServerEndpoint | ClientEndpoint | None = None) -> int:
        side = side or self.client
        return sum(1 for c in side.connections() if c.established)

    def arrive(self, to: ServerEndpoint | ClientEndpoint, t: Transmit, seg: bytes) -> None:
        src, dst = t.local, t.remote
        if t.transport == "udp":
            to.receive_steered((dst[0] if to is self.server else b"", dst[1]), src, memoryview(seg), self.now)
        else:
            to.receive_packet(memoryview(ipv4_header(src[0], dst[0], len(seg)) + seg), self.now)

    def collect(self) -> None:
        self.target_got += self.server.deliveries()
        self.app_got += self.client.deliveries()
        while (ev := self.server.next_event()) is not None:
            self.events_s.append(ev)
        while (ev := self.client.next_event()) is not None:
            self.events_c.append(ev)

    def pump(self, rounds: int = 20) -> None:
        """Move segments both ways until neither end has anything to send."""
        for _ in range(rounds):
            moved = False
            for src, dst, direction in ((self.client, self.server, "c2s"), (self.server, self.client, "s2c")):
                for t in src.transmits(self.now):
                    for seg in wire_segments(t):
                        moved = True
                        for s in self.wire(direction, seg):
                            self.arrive(dst, t, s)
                self.collect()
            if not moved:
                return

    def advance(self, dt: float, step: float = 0.05) -> None:
        """Let ``dt`` seconds pass, running both ends' timers on the way."""
        end = self.now + dt
        while self.now < end:
            self.now = min(end, self.now + step)
            for side in (self.client, self.server):
                t = side.get_timer()
                if t is not None and t <= self.now:
                    side.handle_timer(self.now)
            self.pump()
