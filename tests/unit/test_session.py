"""Flows, sessions, connection choice, hello admission and limits."""

from __future__ import annotations

import random
from collections import Counter

from rsockd.core.faketcp import Connection, State
from rsockd.core.framing import Hello, Keyring
from rsockd.core.session import FlowTable, SessionTable, rendezvous

KEYRING = Keyring.from_secret(None)


def conn(index: int, up: bool = True) -> Connection:
    c = Connection(role="client", local=(b"\x0a\0\0\x01", 40000 + index), remote=(b"\x0a\0\0\x02", 10001 + index),
                   keyring=KEYRING, conn_index=index)
    c.state = State.ESTABLISHED if up else State.CLOSED
    return c


def test_rendezvous_is_stable_and_moves_only_the_dead_connections_flows() -> None:
    conns = [conn(i) for i in range(10)]
    before = {f: rendezvous(f, conns) for f in range(2000)}
    counts = Counter(c.conn_index for c in before.values() if c)
    assert min(counts.values()) > 120  # spread over all ten
    assert {f: rendezvous(f, conns) for f in range(2000)} == before
    conns[3].state = State.CLOSED
    after = {f: rendezvous(f, conns) for f in range(2000)}
    moved = [f for f in before if before[f] is not after[f]]
    assert moved and all(before[f] is conns[3] for f in moved)
    assert rendezvous(1, [conn(0, up=False)]) is None


def test_flow_table_ids_routes_limits_and_expiry() -> None:
    t = FlowTable(max_flows=3, idle=10)
    a = t.lookup(("127.0.0.1", 5000), 0.0)
    b = t.lookup(("127.0.0.1", 5001), 1.0)
    assert a and b and a.flow_id != b.flow_id and t.lookup(("127.0.0.1", 5000), 2.0) is a
    t.lookup(("127.0.0.1", 5002), 2.0)
    assert t.lookup(("127.0.0.1", 5003), 2.0) is None and t.drops["limit"] == 1
    conns = [conn(i) for i in range(4)]
    first = t.route(a, conns)
    assert first is not None and t.route(a, conns) is first
    first.state = State.CLOSED
    second = t.route(a, conns)
    assert second is not None and second is not first  # fail-over keeps the flow id
    gone = t.expire(11.5)  # b was last active at 1.0, the others at 2.0
    assert [f.flow_id for f in gone] == [b.flow_id]
    assert t.lookup(("127.0.0.1", 5001), 11.5) is not None  # its address gets a new flow


def hello(cid: bytes, idx: int, ts: float) -> Hello:
    return Hello(cid, idx, 4, random.randbytes(8), int(ts * 1e9))


def test_admission_skew_replay_and_limits() -> None:
    s: SessionTable = SessionTable(max_sessions=2, max_conns_per_client=2, hello_skew=60)
    now, wall = 5.0, 1_000_000.0
    assert s.admit(hello(b"A" * 8, 0, wall), conn(0), now, wall).ok
    assert not s.admit(hello(b"A" * 8, 0, wall), conn(0), now, wall).ok  # same timestamp again
    assert not s.admit(hello(b"A" * 8, 1, wall - 61), conn(1), now, wall).ok  # too old
    assert not s.admit(hello(b"A" * 8, 1, wall + 61), conn(1), now, wall).ok  # from the future
    assert s.drops["refused"] == 3
    assert s.admit(hello(b"A" * 8, 1, wall), conn(1), now, wall).ok
    assert not s.admit(hello(b"A" * 8, 2, wall), conn(2), now, wall).ok  # 2 connections per client
    assert s.admit(hello(b"B" * 8, 0, wall), conn(0), now, wall).ok
    assert not s.admit(hello(b"C" * 8, 0, wall), conn(0), now, wall).ok  # 2 sessions
    assert s.drops["limit"] == 2


def test_reconnect_replaces_connection_and_flows_survive() -> None:
    s: SessionTable = SessionTable(max_flows=2, idle=30)
    wall = 1_000_000.0
    c0 = conn(0)
    adm = s.admit(hello(b"A" * 8, 0, wall), c0, 1.0, wall)
    assert adm.ok and adm.session is not None
    flow, created = s.flow(adm.session, 7, 1.0)
    assert flow is not None and created
    c0b = conn(0)
    adm2 = s.admit(hello(b"A" * 8, 0, wall + 1), c0b, 2.0, wall + 1)
    assert adm2.ok and adm2.replaced is c0 and adm2.session is adm.session
    again, created = s.flow(adm2.session, 7, 2.0)  # type: ignore[arg-type]
    assert again is flow and not created
    flow.conn = c0
    c0.state = State.CLOSED
    assert adm.session.route(flow) is c0b  # the flow follows the session's live connection
    s.flow(adm.session, 8, 2.0)
    assert s.flow(adm.session, 9, 2.0) == (None, False) and s.drops["limit"] == 1


def test_idle_flows_and_abandoned_sessions_expire() -> None:
    s: SessionTable = SessionTable(idle=10, linger=20)
    wall = 1_000_000.0
    c = conn(0)
    sess = s.admit(hello(b"A" * 8, 0, wall), c, 0.0, wall).session
    assert sess is not None
    s.flow(sess, 1, 0.0)
    s.flow(sess, 2, 8.0)
    flows, dead = s.expire(12.0, wall)
    assert flows == [(b"A" * 8, 1)] and not dead
    s.remove_connection(c)
    flows, dead = s.expire(40.0, wall)
    assert flows == [(b"A" * 8, 2)] and dead == [sess] and not s.sessions
