"""The compiled data path (rsockd/dataplane/_datapath.c) against the Python path.

The reader: two identical tunnels (same seed: the same keys, nonces and sequence numbers) receive the same
steered segments: one end reads them from a real UDP socket through the reader, the other takes
each one with ``receive_steered``, as relay.py does without the reader.  The reader sends the
datagrams of known flows on itself, to real sockets (``sink``).  Afterwards both ends must hold
the same: each destination's datagrams in the same order, drops, and each connection's sequence
number, timestamp, replay window and counters.  The segments are a client's (or server's) real ones,
with what a hostile or lossy path adds: replays, forged tags, reordering, control frames, a FIN,
junk, a stranger's segments.  The writer: the same application datagrams read through it, or
taken by ``send_app`` / ``send_target``, make the same segments, byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import select
import socket
import struct
from typing import Any

import pytest

import rsockd
from rsockd.core import framing
from rsockd.core.endpoint import ClientEndpoint, ServerEndpoint, Transmit
from rsockd.core.faketcp import Connection, State
from rsockd.core.packet import run_segments
from rsockd.dataplane import relay
from tests.unit.tunnelpair import EndpointPair

datapath = pytest.importorskip("rsockd.dataplane._datapath", reason="the compiled reader is not built (pure run)")
pytestmark = pytest.mark.skipif(rsockd.PURE, reason="RSOCKD_PURE: the package runs its source")

LO = bytes([127, 0, 0, 1])
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
UDP_SEGMENT = 103


def test_tag_is_keyed_blake2b_with_personalization() -> None:
    rng = random.Random(7)
    for n in (0, 1, 111, 119, 120, 127, 128, 129, 247, 1200, 9000):
        key, context, data = rng.randbytes(32), rng.randbytes(9), rng.randbytes(n)
        h = hashlib.blake2b(key=key, digest_size=8, person=b"rsockdT2")
        h.update(context + data)
        assert datapath.tag(key, b"rsockdT2", context, data) == h.digest(), n


def test_tags_four_at_a_time_are_the_tags() -> None:
    """record_tags, as the reader and the writer use it: one to four records of one size, at
    every block boundary and with contexts that leave the counter across a block's end."""
    rng = random.Random(11)
    key = rng.randbytes(32)
    for clen in (0, 9, 119, 120, 127, 128):
        context = rng.randbytes(clen)
        for n in (*range(0, 260), 1200, 1382, 9000):
            count = 1 + n % 4
            counters = [rng.randbytes(8) for _ in range(count)]
            frames = [rng.randbytes(n) for _ in range(count)]
            want = []
            for c, f in zip(counters, frames, strict=True):
                h = hashlib.blake2b(key=key, digest_size=8, person=b"rsockdT2")
                h.update(context + c + f)
                want.append(h.digest())
            assert datapath.tags(key, b"rsockdT2", context, counters, frames) == want, (clen, n, count)


def steered_form(seg: bytes) -> bytes:
    """A TCP segment as the XDP program hands it over: offflags window seq ack, then the options
    and the payload (docs/protocol.md)."""
    return seg[12:16] + seg[4:12] + seg[20:]


def segments(t: Transmit) -> list[bytes]:
    return [steered_form(h + p) for h, p in run_segments(t.header, t.payloads)]


class Rig:
    """Two identical tunnels on loopback ports; ``role`` is the end that receives."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the receiving end's tunnel socket
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the sending end's
        self.stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.rx, self.tx, self.stranger):
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        self.rx.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        relay._bufsize(self.rx)  # as the relay sizes it: a test's burst must not overflow it
        self.rx.setsockopt(socket.SOL_UDP, 104, 1)  # UDP_GRO, as relay.py sets it
        rport, tport = self.rx.getsockname()[1], self.tx.getsockname()[1]
        sport, cport = (rport, tport) if role == "server" else (tport, rport)
        self.pairs = [EndpointPair(ports=(sport,), client_addr=LO, server_addr=LO, first_local_port=cport)
                      for _ in range(2)]
        for p in self.pairs:
            p.start()
        a, b = self.pairs
        assert a.up() == b.up() == 1
        self.fast_end: ServerEndpoint | ClientEndpoint = a.server if role == "server" else a.client
        self.slow_end: ServerEndpoint | ClientEndpoint = b.server if role == "server" else b.client
        self.sender = a.client if role == "server" else a.server  # whose segments both ends get
        self.local = (LO if role == "server" else b"", rport)
        self.remote = (LO, tport)
        self.reader = datapath.Reader()
        self.sent = 0
        self.handed_back = 0  # segments the reader left to receive_steered
        self.fast_conn, self.slow_conn = self.conn(self.fast_end), self.conn(self.slow_end)  # kept when closed
        # Where the reader sends a flow's datagrams: per destination, a socket that receives them,
        # and (server) a socket connected to it, as a target socket is, or (client) one unconnected
        # socket, as the application socket is.
        self.inboxes: dict[Any, socket.socket] = {}
        self.outs: dict[Any, socket.socket] = {}
        self.app = self.udp()
        self.gso = True
        self.by_reader = 0  # datagrams the reader sent itself
        self.fast_got: dict[Any, list[bytes]] = {}  # per destination, in the order they left
        self.slow_got: dict[Any, list[bytes]] = {}
        self.errors: list[tuple[int, int]] = []

    @staticmethod
    def udp() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        return s

    def close(self) -> None:
        for s in (self.rx, self.tx, self.stranger, self.app, *self.inboxes.values(), *self.outs.values()):
            s.close()

    def sink(self, conn: Connection, flow_id: int) -> tuple[Any, int, Any] | None:
        """The relay's ``_sink_of``, with sockets of the test's own."""
        got = self.fast_end.fast_sink(conn, flow_id)
        if got is None:
            return None
        flow, dest = got
        if dest not in self.inboxes:
            inbox = self.inboxes[dest] = self.udp()
            relay._bufsize(inbox)
            if self.role == "server":
                out = self.outs[dest] = self.udp()
                out.connect(inbox.getsockname())
        if self.role == "server":
            return flow, self.outs[dest].fileno(), None
        return flow, self.app.fileno(), self.inboxes[dest].getsockname()

    def collect(self) -> None:
        """What the reader sent (after each drain call); with ``delivered``, what the endpoint
        delivers (the relay sends those after the wake-up)."""
        for dest, inbox in self.inboxes.items():
            while True:
                try:
                    d = inbox.recv(65536)
                except BlockingIOError:
                    break
                self.fast_got.setdefault(dest, []).append(d)
                self.by_reader += 1

    def collect_delivered(self) -> None:
        for dest, d in self.fast_end.deliveries():
            self.fast_got.setdefault(dest, []).append(d)

    def conn(self, end: ServerEndpoint | ClientEndpoint) -> Connection:
        (c,) = [c for c in end.connections() if c.transport == "tcp"]
        return c

    def outgoing(self) -> list[bytes]:
        """The sending end's segments since the last call, in the reader's form."""
        out: list[bytes] = []
        for t in self.sender.transmits(self.pairs[0].now):
            out += segments(t)
        return out

    def deliver(self, segs: list[bytes], sock: socket.socket | None = None, gso: bool = False) -> None:
        """Both ends receive ``segs``: the reader's end through the socket, the other directly.
        ``gso``: runs of equal-sized segments as one send (UDP GSO), which the socket (UDP GRO)
        hands over as one read, as it does a connection's segments that arrive together."""
        sock = sock or self.tx
        now = self.pairs[0].now
        i = 0
        while i < len(segs):
            j = i + 1
            while gso and j < len(segs) and (j - i + 1) * len(segs[i]) <= 65000 and len(segs[j]) == len(segs[i]):
                j += 1
            if j - i > 1:
                size = struct.pack("H", len(segs[i]))
                sock.sendmsg([b"".join(segs[i:j])], [(socket.SOL_UDP, UDP_SEGMENT, size)], 0, self.rx.getsockname())
            else:
                sock.sendto(segs[i], self.rx.getsockname())
            i = j
        for seg in segs:
            remote = (LO, sock.getsockname()[1])
            self.slow_end.receive_steered(self.local, remote, memoryview(seg), now)
        self.sent += len(segs)
        self.drain()

    def drain(self) -> None:
        now = self.pairs[0].now
        while select.select([self.rx], [], [], 2.0)[0]:
            while True:
                back = self.reader.drain(self.rx.fileno(), socket.AF_INET, self.local[1], self.fast_end, now,
                                         self.role == "server", None, relay.BATCH, relay.READ_BUDGET,
                                         self.sink, self.gso)
                errors, _refused = self.reader.take_errors()
                self.errors += errors
                self.collect()
                if back is None:
                    break
                local, remote, seg = back
                self.handed_back += 1
                assert local == self.local
                self.fast_end.receive_steered(local, remote, memoryview(seg), now)
            self.collect_delivered()  # the wake-up is over
            if not select.select([self.rx], [], [], 0.05)[0]:
                break

    def compare(self) -> None:
        """Both ends hold the same after the same segments."""
        a, b = self.fast_end, self.slow_end
        assert self.fast_conn.rx_packets == self.slow_conn.rx_packets, "the socket lost datagrams"
        self.collect()
        self.collect_delivered()
        for dest, d in b.deliveries():
            self.slow_got.setdefault(dest, []).append(d)
        assert self.fast_got == self.slow_got
        assert a.drops == b.drops
        assert (a.app_tx, a.app_tx_bytes) == (b.app_tx, b.app_tx_bytes)
        assert flows(a) == flows(b)
        assert snapshot(self.fast_conn) == snapshot(self.slow_conn)

    def delivered(self) -> int:
        return sum(len(v) for v in self.fast_got.values())


def flows(end: ServerEndpoint | ClientEndpoint) -> dict[Any, tuple[int, int]]:
    """Each flow's datagrams received and sent."""
    if isinstance(end, ServerEndpoint):
        return {(cid, fid): (f.rx, f.tx) for cid, s in end.sessions.sessions.items() for fid, f in s.flows.items()}
    return {f.flow_id: (f.rx, f.tx) for f in end.flows.by_id.values()}


def snapshot(c: Connection) -> dict[str, Any]:
    w = c._opener.window if c._opener is not None else None
    return {"state": c.state, "rcv_nxt": c.rcv_nxt, "ts_recent": c._ts_recent, "rx_packets": c.rx_packets,
            "rx_bytes": c.rx_bytes, "last_rx": c.last_rx, "last_auth": c._last_auth,
            "window": (w.top, w.bits) if w is not None else None, "rwin": c._rwin.wnd}


@pytest.fixture(params=["server", "client"])
def rig(request: pytest.FixtureRequest) -> Any:
    r = Rig(request.param)
    yield r
    r.close()


def send_datagrams(r: Rig, count: int, sizes: tuple[int, ...] = (1200, 64, 700)) -> None:
    now = r.pairs[0].now
    for i in range(count):
        data = bytes([i & 0xFF]) * sizes[i % len(sizes)]
        if r.role == "server":
            assert isinstance(r.sender, ClientEndpoint)
            r.sender.send_app(("127.0.0.1", 5000 + i % 3), data, now)
        else:
            assert isinstance(r.sender, ServerEndpoint)
            for key in r.flow_keys:  # type: ignore[attr-defined]
                r.sender.send_target(key, data, now)


def open_flows(r: Rig) -> None:
    """The client side's flows must exist on the server before it can send to them."""
    if r.role == "client":
        a, b = r.pairs
        for p in (a, b):
            for k in range(2):
                p.client.send_app(("127.0.0.1", 6000 + k), b"open", p.now)
            p.pump()
        assert a.target_got == b.target_got
        r.flow_keys = sorted({k for k, _ in a.target_got})  # type: ignore[attr-defined]
        for end in (r.fast_end, r.slow_end):
            end.deliveries()


def test_data_segments_leave_both_ends_alike(rig: Rig) -> None:
    open_flows(rig)
    send_datagrams(rig, 60)
    segs = rig.outgoing()
    assert len(segs) > 20
    rig.deliver(segs)
    rig.compare()
    assert rig.delivered() == 60 * (1 if rig.role == "server" else 2)
    assert rig.fast_conn.state == State.ESTABLISHED
    assert rig.handed_back == 0, "data segments of an established connection are the reader's"
    # Flows the endpoint knew before the wake-up (client: all; server: none yet, these datagrams
    # opened them) go from the reader to their sockets; the others with the endpoint's deliveries.
    assert rig.by_reader == (0 if rig.role == "server" else rig.delivered()) and not rig.errors
    send_datagrams(rig, 60)
    rig.deliver(rig.outgoing())
    rig.compare()
    assert rig.by_reader == (60 if rig.role == "server" else rig.delivered()) and not rig.errors


def known_flows(r: Rig) -> None:
    """Flows both ends know (server: opened by a first datagram each, taken by the endpoint)."""
    open_flows(r)
    if r.role == "server":
        send_datagrams(r, 3)
        r.deliver(r.outgoing())
        r.compare()


def test_datagrams_one_by_one_without_gso(rig: Rig) -> None:
    rig.gso = False
    known_flows(rig)
    send_datagrams(rig, 40, sizes=(500,))
    rig.deliver(rig.outgoing())
    rig.compare()
    assert rig.by_reader > 30


def test_a_handed_back_delivery_keeps_its_flows_order(rig: Rig) -> None:
    """A segment handed back delivers through the endpoint, after the wake-up: the reader sends
    nothing more itself in that wake-up, so the flow's later datagrams do not overtake it."""
    known_flows(rig)
    sender = rig.sender
    fid = next(iter(sender.flows.by_id)) if isinstance(sender, ClientEndpoint) else rig.flow_keys[0][1]  # type: ignore[attr-defined]
    send_datagrams(rig, 6)
    before = rig.outgoing()
    conn = rig.conn(sender)
    # a record with a control frame (the full path) and a DATA frame of a flow the reader sends
    conn._send_record(framing.flow_close_frame(0xFFFF) + framing.data_frame(fid, b"handed back"), rig.pairs[0].now)
    mixed = [steered_form(s) for s in conn.segments_to_send()]
    send_datagrams(rig, 6)
    rig.deliver(before + mixed + rig.outgoing())  # one wake-up
    rig.compare()
    assert rig.handed_back == len(mixed) == 1 and rig.by_reader > 0
    assert any(b"handed back" in v for v in rig.fast_got.values())


def test_send_errors_are_counted(rig: Rig) -> None:
    """A datagram the reader cannot send is counted by errno (the relay adds them to its tx
    errors), and the other flows' datagrams still leave."""
    known_flows(rig)
    send_datagrams(rig, 12)
    rig.deliver(rig.outgoing())
    rig.compare()
    before = {d: len(v) for d, v in rig.fast_got.items()}
    bad = sorted(rig.inboxes, key=repr)[0]
    sink = rig.sink

    def broken(conn: Connection, flow_id: int) -> tuple[Any, int, Any] | None:
        got = sink(conn, flow_id)
        if got is not None and rig.fast_end.fast_sink(conn, flow_id)[1] == bad:  # type: ignore[index]
            return got[0], 1 << 20, got[2]  # a descriptor that is not open: EBADF
        return got

    rig.sink = broken  # type: ignore[method-assign]
    for _ in range(3):
        send_datagrams(rig, 9)
        rig.deliver(rig.outgoing())
    lost = 3 * 3 if rig.role == "server" else 3 * 9  # a round: 3 per flow of 3 (server), 9 per flow (client)
    assert {e for e, _ in rig.errors} == {errno.EBADF}, rig.errors
    assert len(rig.fast_got[bad]) == before[bad]
    assert all(len(rig.fast_got[d]) > before[d] for d in rig.inboxes if d != bad)
    assert sum(n for _, n in rig.errors) == lost

def test_replays_forgeries_reordering_and_control_frames(rig: Rig) -> None:
    open_flows(rig)
    rng = random.Random(3)
    send_datagrams(rig, 300, sizes=(1200, 64, 64, 300))
    segs = rig.outgoing()
    half = len(segs) // 2
    assert half > 40
    # reordered (the replay window shifts by many words at once, and old counters land)
    block = segs[:half]
    rng.shuffle(block)
    rig.deliver(block)
    rig.compare()
    # replays of what came, a forged tag, a forged payload, and the rest with duplicates
    forged_tag = bytearray(segs[half + 1])
    forged_tag[12 + ((forged_tag[0] >> 4) * 4 - 20) + 10] ^= 1  # the first record's tag
    forged_body = bytearray(segs[half + 2])
    forged_body[-1] ^= 0x40
    rest = segs[half:]
    mixed = [*segs[:5], bytes(forged_tag), bytes(forged_body), *rest, *rest[:10]]
    rig.deliver(mixed)
    rig.compare()
    # a keepalive (taken by the reader) and a flow closing (a control frame: the full path)
    now = rig.pairs[0].now
    conn = rig.conn(rig.sender)
    conn.probe(now)
    conn.close_flow(1, now)
    send_datagrams(rig, 5)
    rig.deliver([steered_form(s) for s in conn.segments_to_send()] + rig.outgoing())
    rig.compare()
    # junk, a header without its options, one with a bad data offset, and a stranger's copy
    junk = [b"\x01", b"\x50\x10", os.urandom(40), b"\x40" + segs[0][1:], segs[0][:12], segs[0][:12] + b"\x01"]
    rig.deliver(junk)
    rig.deliver(segs[-3:], rig.stranger)
    rig.compare()
    assert rig.fast_end.drops["replay"] > 0 and rig.fast_end.drops["bad_auth"] >= 2
    assert 0 < rig.handed_back < rig.sent / 4  # the junk, the control frame, the stranger's


def test_records_of_one_size_are_checked_four_at_a_time(rig: Rig) -> None:
    """Segments that arrive together (one read, UDP GRO) with records of one size: their tags are
    computed four at a time where the CPU can (``TAGS_AT_ONCE``), the later ones before their
    records are reached.  A forged tag or payload among them, a replay and a gap between runs
    must come out as they do one at a time."""
    known_flows(rig)
    send_datagrams(rig, 90, sizes=(1200,))
    segs = rig.outgoing()
    assert len(segs) >= 90 and len({len(s) for s in segs}) == 1
    forged_tag = bytearray(segs[5])
    forged_tag[12 + ((forged_tag[0] >> 4) * 4 - 20) + 10] ^= 1
    forged_body = bytearray(segs[10])
    forged_body[-1] ^= 0x40
    mixed = [*segs[:5], bytes(forged_tag), *segs[6:10], bytes(forged_body), *segs[11:40], segs[3], *segs[40:]]
    rig.deliver(mixed, gso=True)
    rig.compare()
    assert rig.fast_end.drops["bad_auth"] == 2 and rig.fast_end.drops["replay"] == 1
    assert rig.handed_back == 0
    assert 0 < rig.reader.rx_batches < rig.reader.rx_batched <= len(mixed)  # the reads GRO coalesced
    if datapath.TAGS_AT_ONCE == 4:
        assert rig.reader.tags_ahead >= len(mixed) // 2
    else:
        assert rig.reader.tags_ahead == 0


def test_fin_takes_the_full_path(rig: Rig) -> None:
    open_flows(rig)
    send_datagrams(rig, 10)
    rig.deliver(rig.outgoing())
    conn = rig.conn(rig.sender)
    conn.close(rig.pairs[0].now)
    rig.deliver([steered_form(s) for s in conn.segments_to_send()])
    rig.compare()
    assert rig.fast_conn.state != State.ESTABLISHED


# -- the writer ------------------------------------------------------------------------------


class WriterRig:
    """Two identical tunnels; ``role``'s end sends the same datagrams in both: one reads them
    from a real socket through the writer (the application socket, or a target socket), the
    other takes each with ``send_app`` / ``send_target``, as relay.py does without the writer."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.pairs = [EndpointPair(ports=(10001,)) for _ in range(2)]  # one connection: one order
        for p in self.pairs:
            p.start()
            assert p.up() == 1
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the app socket, or a target socket
        self.rx.bind(("127.0.0.1", 0))
        self.rx.setblocking(False)
        relay._bufsize(self.rx)
        self.sources = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
        for s in self.sources:
            s.bind(("127.0.0.1", 0))
        self.key: Any = None
        if role == "server":  # a flow the client opened: the server's target socket for it
            for p in self.pairs:
                p.client.send_app(("127.0.0.1", 6000), b"open", p.now)
                p.pump()
            (self.key,) = {k for k, _ in self.pairs[0].target_got}
            self.sources = self.sources[:1]
            self.rx.connect(self.sources[0].getsockname())
        self.ends: list[Any] = [p.server if role == "server" else p.client for p in self.pairs]
        self.writer = datapath.Writer()
        self.wire_of: Any = None  # the writer's ``wire`` (tests/integration/test_packet_send_kernel.py)
        self.handed_back = 0

    def close(self) -> None:
        for s in (self.rx, *self.sources):
            s.close()

    def send(self, datagrams: list[tuple[int, bytes]]) -> None:
        now = self.pairs[0].now
        fast, slow = self.ends
        for i, d in datagrams:
            src = self.sources[i]
            src.sendto(d, self.rx.getsockname())
            if self.role == "server":
                slow.send_target(self.key, d, now)
            else:
                slow.send_app(src.getsockname(), d, now)
        taken = 0
        while taken < len(datagrams) and select.select([self.rx], [], [], 2.0)[0]:
            before = fast.app_rx
            while (back := self.writer.fill(self.rx.fileno(), fast, now, self.key, relay.BATCH,
                                            relay.READ_BUDGET, self.wire_of)) is not None:
                self.handed_back += 1
                addr, d = back
                if self.role == "server":
                    assert addr is None
                    fast.send_target(self.key, d, now)
                else:
                    fast.send_app(addr, d, now)
            taken += fast.app_rx - before

    def wire(self, end: Any) -> list[bytes]:
        """The segments ``end`` sends, their timestamps left out (each server's clock offset is random)."""
        segs = [h + p for t in end.transmits(self.pairs[0].now) for h, p in run_segments(t.header, t.payloads)]
        return [s[:24] + bytes(8) + s[32:] if s[12] >> 4 == 8 else s for s in segs]

    def compare(self, same_records: bool = True) -> list[bytes]:
        """Both ends sent the same segments (or, where a datagram was handed back in between,
        records cut elsewhere: the same counts); returns the writer's end's segments."""
        fast, slow = self.ends
        out, twin = self.wire(fast), self.wire(slow)
        assert fast.drops == slow.drops
        assert (fast.app_rx, fast.app_rx_bytes) == (slow.app_rx, slow.app_rx_bytes)
        if same_records:
            assert out == twin
            assert [(c.tx_packets, c.tx_bytes, c.snd_nxt) for c in fast.connections()] == \
                   [(c.tx_packets, c.tx_bytes, c.snd_nxt) for c in slow.connections()]
        return out


@pytest.fixture(params=["server", "client"])
def wrig(request: pytest.FixtureRequest) -> Any:
    r = WriterRig(request.param)
    yield r
    r.close()


def test_writer_seals_as_the_endpoint_does(wrig: WriterRig) -> None:
    n = len(wrig.sources) - (1 if wrig.role == "client" else 0)  # the client keeps its last one new
    wrig.send([(i, b"first") for i in range(n)])  # new flows: handed back, send_app makes them
    first = wrig.compare()
    assert first and wrig.handed_back == (n if wrig.role == "client" else 0)
    wrig.handed_back = 0
    rng = random.Random(5)
    batch = [(rng.randrange(n), rng.randbytes(rng.choice((1200, 64, 7, 500, 1300)))) for _ in range(150)]
    wrig.send(batch)
    out = wrig.compare()
    assert len(out) > 20 and wrig.handed_back == 0
    # an oversized datagram: handed back, dropped and said (Oversized) by the endpoint
    limit = wrig.ends[0].max_datagram
    wrig.send([(0, b"x" * (limit + 1)), (0, b"after")])
    wrig.compare()
    assert wrig.ends[0].drops["oversized"] == 1 and wrig.handed_back == 1


def test_writer_keeps_order_with_what_the_endpoint_queued(wrig: WriterRig) -> None:
    """A datagram handed back and queued by the endpoint (a new flow's first) leaves before the
    writer's later ones on its connection; one handed back and dropped (oversized) changes nothing."""
    wrig.send([(0, b"a" * 100)])
    wrig.compare()
    limit = wrig.ends[0].max_datagram
    new = len(wrig.sources) - 1 if wrig.role == "client" else 0
    wrig.send([(0, b"b" * 100), (0, b"c" * (limit + 1)), (new, b"e" * 100), (0, b"d" * 100)])
    payload = b"".join(wrig.compare(same_records=False))  # records are cut where a datagram was handed back
    assert payload.index(b"b" * 100) < payload.index(b"e" * 100) < payload.index(b"d" * 100)
    assert b"c" * 100 not in payload


def test_writer_own_sends_that_fail_are_counted_and_the_sequence_goes_on(wrig: WriterRig) -> None:
    """A frame the kernel refuses (here: a socket with nowhere to send) is counted by errno, once
    per frame, and the connection moves on as if it had left, as the packet path does."""
    n = len(wrig.sources) - (1 if wrig.role == "client" else 0)
    wrig.send([(i, b"first") for i in range(n)])
    wrig.compare()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as nowhere:
        wrig.wire_of = lambda conn, now: (nowhere.fileno(), bytes(14), 64, LO, LO, *conn.wire_state(now))
        wrig.send([(0, b"a" * 1200), (0, b"b" * 1200), (0, b"c" * 1300)])
        errors = wrig.writer.take_errors()
    (conn,) = wrig.ends[0].connections()
    (twin,) = wrig.ends[1].connections()
    assert wrig.ends[0].transmits(wrig.pairs[0].now) == []  # none went back to the endpoint
    frames = len(wrig.ends[1].transmits(wrig.pairs[0].now))  # the twin's: one frame each on the packet path
    assert frames >= 2 and errors == [(errno.EDESTADDRREQ, frames)]
    assert (conn.tx_packets, conn.tx_bytes, conn.snd_nxt) == (twin.tx_packets, twin.tx_bytes, twin.snd_nxt)
    assert wrig.writer.take_errors() == []


def test_an_error_in_the_relays_sink_comes_out_after_the_run_is_given_back() -> None:
    """The reader gives the endpoint the segments it took before the error (steered_run) without
    calling it with the exception pending, and the caller gets the error itself."""
    r = Rig("client")
    try:
        open_flows(r)
        send_datagrams(r, 3)
        before = r.fast_conn.rx_packets
        for seg in r.outgoing():
            r.tx.sendto(seg, r.rx.getsockname())
        assert select.select([r.rx], [], [], 2.0)[0]

        def raising(conn: Connection, flow_id: int) -> None:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            r.reader.drain(r.rx.fileno(), socket.AF_INET, r.local[1], r.fast_end, r.pairs[0].now, False, None,
                           relay.BATCH, relay.READ_BUDGET, raising, True)
        assert r.fast_conn.rx_packets == before + 1  # the segment whose frame asked the sink: given back
    finally:
        r.close()


class RaisingFor:
    """An endpoint whose ``fast_flow`` raises for one source; everything else is ``end``'s."""

    def __init__(self, end: Any, bad: Any) -> None:
        self.end, self.bad = end, bad

    def __getattr__(self, name: str) -> Any:
        return getattr(self.end, name)

    def fast_flow(self, source: Any, now: float) -> Any:
        if source == self.bad:
            raise RuntimeError("boom")
        return self.end.fast_flow(source, now)


def test_an_error_in_the_endpoint_comes_out_after_what_was_done_is_given_back() -> None:
    """The writer gives the endpoint what it did before the error (flow_sent, sealed_run) without
    calling it with the exception pending, and the caller gets the error itself."""
    wrig = WriterRig("client")
    try:
        wrig.send([(i, b"first") for i in range(len(wrig.sources) - 1)])
        wrig.compare()
        fast, now = wrig.ends[0], wrig.pairs[0].now
        good, bad = wrig.sources[0], wrig.sources[1]
        good.sendto(b"a" * 100, wrig.rx.getsockname())
        bad.sendto(b"b" * 100, wrig.rx.getsockname())
        assert select.select([wrig.rx], [], [], 2.0)[0]
        before = fast.app_rx
        with pytest.raises(RuntimeError, match="boom"):
            wrig.writer.fill(wrig.rx.fileno(), RaisingFor(fast, bad.getsockname()), now, None, relay.BATCH,
                             relay.READ_BUDGET)
        assert fast.app_rx == before + 1  # the good flow's datagram: counted ...
        assert any(b"a" * 100 in s for s in wrig.wire(fast))  # ... and sealed into a segment
    finally:
        wrig.close()


def test_counters_past_63_bits(rig: Rig) -> None:
    """Record counters are 64-bit: a window whose top is past 2**63 (signed overflow) reads and
    writes back the same in both paths."""
    open_flows(rig)
    sealer = rig.conn(rig.sender)._sealer
    assert sealer is not None
    sealer.counter = 2**63 + 5
    send_datagrams(rig, 8)
    rig.deliver(rig.outgoing())
    sealer.counter = 2**64 - 3
    send_datagrams(rig, 2)
    rig.deliver(rig.outgoing())
    rig.compare()
    window = rig.fast_conn._opener.window  # type: ignore[union-attr]
    assert window.top >= 2**64 - 3 and rig.handed_back == 0


def test_a_segment_handed_back_keeps_the_destination_it_came_to() -> None:
    """A server's tunnel socket takes datagrams for every address of the host (one per client
    link, say), and each carries its own destination (IP_PKTINFO).  A segment handed back keeps
    its datagram's, not that of the datagram read after it in the same batch: a SYN that took the
    next one's would make a connection the client never sees and turn its retransmissions into
    replays of a tag seen elsewhere (``bad_tag``)."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = Rig.udp()
    try:
        rx.bind(("0.0.0.0", 0))  # every loopback address: 127.0.0.1, .2, .3
        rx.setblocking(False)
        rx.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        port = rx.getsockname()[1]
        pair = EndpointPair(ports=(port,), client_addr=LO, server_addr=LO)
        syn = struct.pack("!HHII", 5 << 12 | 0x02, 65535, 1, 0)  # the steered form of a bare SYN
        dsts = [bytes([127, 0, 0, 1 + i % 3]) for i in range(9)]
        for i, d in enumerate(dsts):
            tx.sendto(syn + bytes([i]), (socket.inet_ntoa(d), port))
        assert select.select([rx], [], [], 2.0)[0]
        reader, got = datapath.Reader(), []
        while (back := reader.drain(rx.fileno(), socket.AF_INET, port, pair.server, pair.now, True, None,
                                    relay.BATCH, relay.READ_BUDGET, None, True)) is not None:
            (laddr, lport), _remote, seg = back
            got.append((seg[-1], laddr, lport))
        assert got == [(i, d, port) for i, d in enumerate(dsts)]
    finally:
        rx.close()
        tx.close()
