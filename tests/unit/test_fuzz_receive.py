"""Fuzzing the receive path past the parsers: mutated and replayed segments of a live connection.

Random bytes rarely get past a checksum and never past a tag, so these tests start from the real
thing -- segments two connected ends produce -- and let hypothesis change them the way an on-path
attacker could (flip bytes, then fix the checksum; truncate; extend; change flags or sequence
numbers; replay an earlier segment; or send garbage instead).  Whatever happens, nothing raises,
and no datagram is ever delivered that the other end did not send, nor delivered twice.

The last tests drive the server's ``ServerEndpoint`` (both receive paths: whole IP packets as
the nft backend's packet socket yields them, and UDP payloads as the XDP rewrite leaves them)
with such traffic from a real client ``Connection``.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsockd.core.endpoint import Policy, ServerEndpoint
from rsockd.core.faketcp import Connection, State
from rsockd.core.framing import Hello, Keyring
from rsockd.core.packet import ipv4_header, parse_tcp, pseudo_sum, steer_rewrite, transport_checksum
from rsockd.core.session import SessionTable
from rsockd.errors import PacketError

from .tunnelpair import CLI, SRV, Pair, checksummed, wire_segments

Mutation = tuple[Any, ...]

mutations: st.SearchStrategy[Mutation | None] = st.one_of(
    st.none(),
    st.tuples(st.just("flip"), st.integers(0, 1500), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1500)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("flags"), st.integers(0, 0x1FF)),
    st.tuples(st.just("seq"), st.integers(-70000, 70000)),
    st.tuples(st.just("replay"), st.integers(0, 1000)),
    st.tuples(st.just("garbage"), st.binary(max_size=200)),
)
ops = st.lists(st.tuples(st.sampled_from(["c2s", "s2c"]), mutations, st.booleans()), max_size=25)


def _fix_checksum(seg: bytes, src: bytes, dst: bytes) -> bytes:
    if len(seg) < 20:
        return seg
    seg = seg[:16] + b"\0\0" + seg[18:]
    return seg[:16] + struct.pack("!H", transport_checksum(pseudo_sum(src, dst), seg)) + seg[18:]


def mutate(seg: bytes, m: Mutation | None, history: list[bytes], tcp: bool, src: bytes, dst: bytes) -> bytes:
    """``seg`` changed by ``m`` (checksum fixed afterwards, as an on-path attacker would)."""
    if m is None:
        return seg
    kind = m[0]
    if kind == "flip":
        i = m[1] % len(seg)
        seg = seg[:i] + bytes((seg[i] ^ m[2],)) + seg[i + 1 :]
    elif kind == "truncate":
        seg = seg[: m[1] % (len(seg) + 1)]
    elif kind == "extend":
        seg = seg + m[1]
    elif kind == "flags" and tcp and len(seg) >= 14:
        off = struct.unpack_from("!H", seg, 12)[0] & 0xF000
        seg = seg[:12] + struct.pack("!H", off | m[1]) + seg[14:]
    elif kind == "seq" and tcp and len(seg) >= 8:
        seq = (struct.unpack_from("!I", seg, 4)[0] + m[1]) & 0xFFFFFFFF
        seg = seg[:4] + struct.pack("!I", seq) + seg[8:]
    elif kind == "replay" and history:
        seg = history[m[1] % len(history)]
    elif kind == "garbage":
        seg = m[1]
    return _fix_checksum(seg, src, dst) if tcp else seg


def _deliver(p: Pair, direction: str, seg: bytes) -> None:
    """Hand one (possibly hostile) segment to the receiving end, as the relay would."""
    if p.transport == "udp":
        if direction == "c2s":
            p.to_server(seg)
        elif seg[:1] == b"\x01":
            p.to_client(seg)
        return
    try:
        hdr, _payload = parse_tcp(seg)
    except PacketError:
        return  # counted malformed by the receive path
    if direction == "c2s":
        p.to_server(seg, (CLI[0], hdr.sport))
    elif (hdr.sport, hdr.dport) == (SRV[1], CLI[1]):
        p.to_client(seg)


def _pump(p: Pair) -> None:
    """Move what both ends answered, through ``_deliver`` (an RST to a mutated port reaches nobody)."""
    for _ in range(20):
        out = [("c2s", s) for s in p.client.segments_to_send()]
        out += [("s2c", s) for s in p.server_segments()]
        if not out:
            return
        for direction, seg in out:
            _deliver(p, direction, seg)
        while p.client.next_event() is not None:
            pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["tcp", "udp"]), ops)
def test_hostile_changes_to_live_traffic_never_raise_nor_deliver_what_was_not_sent(
        transport: str, steps: list[tuple[str, Mutation | None, bool]]) -> None:
    p = Pair(transport=transport, client_key="k", server_key="k")
    server = p.establish()
    sent: dict[str, set[bytes]] = {"c2s": set(), "s2c": set()}
    history: list[bytes] = []
    for i, (direction, m, also_original) in enumerate(steps):
        datagram = b"dgram-%d" % i
        if direction == "c2s":
            seg = p.client.send_datagram(7, datagram, p.now)
            src, dst = CLI[0], SRV[0]
        else:
            conns = list(p.acceptor.connections.values())
            seg = conns[0].send_datagram(7, datagram, p.now) if conns else None
            src, dst = SRV[0], CLI[0]
        if seg is None:  # not established (reset by an earlier step): let time heal it
            p.advance(2.0)
            continue
        sent[direction].add(datagram)
        history.append(seg)
        hostile = mutate(seg, m, history, transport == "tcp", src, dst)
        _deliver(p, direction, hostile)
        if also_original and hostile != seg:
            _deliver(p, direction, seg)
        _pump(p)
    got_s = [d for _f, d in p.got_s]
    got_c = [d for _f, d in p.got_c]
    assert set(got_s) <= sent["c2s"] and len(got_s) == len(set(got_s)), got_s
    assert set(got_c) <= sent["s2c"] and len(got_c) == len(set(got_c)), got_c
    assert server.state in set(State)


@settings(max_examples=300, deadline=None)
@given(st.builds(Hello, client_id=st.binary(min_size=8, max_size=8), conn_index=st.integers(0, 0xFFFF),
                 conn_count=st.integers(0, 0xFFFF), nonce=st.binary(min_size=8, max_size=8),
                 timestamp_ns=st.integers(0, 2**64 - 1), capabilities=st.integers(0, 2**32 - 1),
                 version=st.integers(0, 255), flags=st.integers(0, 255)),
       st.floats(0, 2e9), st.integers(1, 4))
def test_any_authenticated_hello_is_admitted_or_refused(hello: Hello, wall: float, limit: int) -> None:
    """A client holding the key may still send nonsense in its hello: admission decides, never raises."""
    table = SessionTable(max_sessions=limit, max_conns_per_client=limit)
    conn = Connection(role="server", local=SRV, remote=CLI, keyring=Keyring.from_secret("k"))
    for _ in range(2):  # the second time it is a replay
        adm = table.admit(hello, conn, 1.0, wall)
        assert adm.ok == (adm.session is not None)
    table.expire(1e9, wall + 1e6)


# ---------------------------------------------------------------------------------------------
# The server endpoint, on both receive paths


def _endpoint_run(steps: list[tuple[str, Mutation | None, bool]], xdp: bool) -> None:
    server = ServerEndpoint(Policy(key="k"))
    server.set_local_addresses({SRV[0]})  # what a capture backend's attach would have found
    now = 1000.0
    client = Connection(role="client", local=CLI, remote=SRV, keyring=Keyring.from_secret("k"), client_id=b"fuzzing!")
    history: list[bytes] = []

    def to_server(seg: bytes) -> None:
        if xdp:
            try:
                dgram = steer_rewrite(seg)
            except PacketError:
                return
            server.receive_steered(SRV, CLI, memoryview(dgram)[8:], now)
        else:
            server.receive_packet(memoryview(ipv4_header(CLI[0], SRV[0], len(seg)) + seg), now)

    def to_client() -> None:
        for t in server.transmits(now):
            for seg in wire_segments(t):
                try:
                    hdr, payload = parse_tcp(seg)
                except PacketError:
                    continue
                client.receive(hdr, payload, now)
        server.deliveries()
        while server.next_event() is not None:
            pass

    client.connect(now)
    for i, (_direction, m, also_original) in enumerate([("c2s", None, False)] * 3 + steps):
        segs = client.segments_to_send()
        seg = client.send_datagram(1 + i % 3, b"x" * (i % 50), now)
        segs += [seg] if seg is not None else []
        for s in segs:
            s = checksummed(s, CLI[0], SRV[0])
            history.append(s)
            hostile = mutate(s, m, history, True, CLI[0], SRV[0])
            to_server(hostile)
            if also_original and hostile != s:
                to_server(s)
        to_client()
        while client.next_event() is not None:
            pass
        now += 0.5
        client.handle_timer(now)
        server.handle_timer(now)
    assert all(isinstance(v, int) and v >= 0 for v in server.drops.values())
    assert len(server.acceptor.pending) <= server.policy.backlog
    if all(m is None for _d, m, _o in steps) and steps:
        assert server.app_tx > 0  # the harness really gets traffic through


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.booleans())
def test_the_server_endpoint_takes_hostile_traffic_on_both_receive_paths(
        steps: list[tuple[str, Mutation | None, bool]], xdp: bool) -> None:
    _endpoint_run(steps, xdp)


def test_the_server_answers_a_hello_within_the_round_trip() -> None:
    """SYN, then ACK + HELLO: each answered by the endpoint's own processing only (the HELLO_ACK
    leaves with the transmits of the batch that carried the hello)."""
    server = ServerEndpoint(Policy())
    server.set_local_addresses({SRV[0]})
    now = 1000.0
    client = Connection(role="client", local=CLI, remote=SRV, keyring=Keyring.from_secret(None))
    client.connect(now)
    for _ in range(3):
        for seg in client.segments_to_send():
            seg = checksummed(seg, CLI[0], SRV[0])
            server.receive_packet(memoryview(ipv4_header(CLI[0], SRV[0], len(seg)) + seg), now)
        for t in server.transmits(now):
            for seg in wire_segments(t):
                hdr, payload = parse_tcp(seg)
                client.receive(hdr, payload, now)
    assert client.state == State.ESTABLISHED
