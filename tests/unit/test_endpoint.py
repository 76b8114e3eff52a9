"""The endpoints' policy, driven against each other in memory (``tunnelpair.EndpointPair``).

A real ``ClientEndpoint`` with a connection per server port against a real ``ServerEndpoint``:
admission and refusal, replacement, the reconnect after a server restart, flows moving to another
connection, idle expiry, data packed into runs, and live reconfiguration.  Pure: no sockets.
"""

from __future__ import annotations

from rsockd.core import framing
from rsockd.core.endpoint import (
    ConnectionDown,
    ConnectionUp,
    FlowGone,
    FlowOpened,
    HelloRefused,
    Oversized,
    Policy,
    ServerEndpoint,
)
from rsockd.core.faketcp import Connection, State, Timing
from rsockd.core.framing import Keyring
from rsockd.core.packet import ipv4_header, parse_tcp

from .tunnelpair import APP, CLI, SRV, EndpointPair, wire_segments

FAST = Timing(keepalive=1.0, dead_timeout=3.0, reconnect_min=0.5, reconnect_max=2.0)


def _key_of(p: EndpointPair) -> tuple[bytes, int]:
    keys = [e.key for e in p.events_s if isinstance(e, FlowOpened)]
    assert len(keys) == 1, keys
    return keys[0]


def test_every_connection_is_admitted_into_one_session_and_flows_go_both_ways() -> None:
    p = EndpointPair()
    p.start()
    assert p.up() == 3 and p.up(p.server) == 3
    assert sum(isinstance(e, ConnectionUp) for e in p.events_c) == 3
    ups = [e for e in p.events_s if isinstance(e, ConnectionUp)]
    assert len(ups) == 3 and {e.client_id for e in ups} == {b"client01"}
    session = p.server.sessions.sessions[b"client01"]
    assert sorted(session.connections) == [0, 1, 2]
    p.client.send_app(APP, b"ping", p.now)
    p.pump()
    key = _key_of(p)
    assert p.target_got == [(key, b"ping")] and key[0] == b"client01"
    p.server.send_target(key, b"pong", p.now)
    p.pump()
    assert p.app_got == [(APP, b"pong")]
    assert p.client.app_rx == p.server.app_tx == 1 and p.server.app_rx == p.client.app_tx == 1


def test_a_burst_leaves_as_records_in_one_run_and_arrives_whole() -> None:
    p = EndpointPair()
    p.start()
    sent = [b"%03d" % i + b"x" * 97 for i in range(40)]
    for d in sent:
        p.client.send_app(APP, d, p.now)
    transmits = p.client.transmits(p.now)
    # 40 datagrams of one flow: packed into a few records of up to the largest datagram, all but
    # the last equally long, so they leave as one run (one GSO send on the packet path)
    assert len(transmits) == 1
    run = transmits[0]
    assert 3 <= len(run.payloads) <= 5 and len({len(x) for x in run.payloads[:-1]}) == 1
    assert len(run.payloads[-1]) <= len(run.payloads[0])
    segs = wire_segments(run)
    seqs = [parse_tcp(s)[0].seq for s in segs]
    assert all((b - a) % 2**32 == len(x) for a, b, x in zip(seqs, seqs[1:], run.payloads, strict=False))
    for s in segs:
        p.arrive(p.server, run, s)
    p.collect()
    assert [d for _k, d in p.target_got] == sent


def test_a_refused_hello_is_an_event_and_the_client_keeps_trying() -> None:
    p = EndpointPair(client_policy=Policy(timing=FAST), server_policy=Policy(timing=FAST, max_sessions=0))
    p.start()
    refused = [e for e in p.events_s if isinstance(e, HelloRefused)]
    assert len(refused) == 3 and all(e.reason == "session limit reached" for e in refused)
    assert p.up() == 0 and not p.server.acceptor.connections
    p.advance(1.5)
    assert len([e for e in p.events_s if isinstance(e, HelloRefused)]) > 3  # the client came back
    assert p.server.drops["limit"] > 3


def test_a_restarted_client_replaces_its_old_connections_silently() -> None:
    p = EndpointPair()
    p.start()
    old = list(p.server.acceptor.connections.values())
    p.client = p.new_client(b"client01")  # same id and ports, the server is not told
    p.now += 0.01
    p.start()
    assert p.up() == 3 and p.up(p.server) == 3
    assert all(c.state == State.CLOSED and c.close_reason == "replaced" for c in old)
    assert not [e for e in p.events_s if isinstance(e, ConnectionDown)]  # retired, not closed
    session = p.server.sessions.sessions[b"client01"]
    assert set(session.connections.values()) == set(p.server.acceptor.connections.values())
    assert not set(old) & set(p.server.connections())


def test_after_a_server_restart_every_connection_learns_it_within_one_round_trip() -> None:
    p = EndpointPair(client_policy=Policy(timing=FAST), server_policy=Policy(timing=FAST))
    p.start()
    p.advance(0.2)
    p.server = p.new_server()  # all state lost
    p.client.send_app(APP, b"lost", p.now)
    p.pump()  # no time passes: the RST to the data, then the keepalives' RSTs
    downs = [e for e in p.events_c if isinstance(e, ConnectionDown)]
    assert len(downs) == 3 and all(e.reason == "reset" for e in downs)
    assert p.server.drops["no_connection"] >= 3
    p.advance(1.5)
    assert p.up() == 3 and p.up(p.server) == 3
    p.client.send_app(APP, b"again", p.now)
    p.pump()
    assert [d for _k, d in p.target_got] == [b"again"]


def test_a_flow_moves_to_another_connection_when_its_own_dies_and_keeps_its_key() -> None:
    p = EndpointPair(client_policy=Policy(timing=FAST), server_policy=Policy(timing=FAST))
    p.start()
    p.client.send_app(APP, b"one", p.now)
    p.pump()
    key = _key_of(p)
    first = p.client.flows.by_addr[APP].conn
    assert first is not None
    cut = first.remote[1]

    def blackhole(direction: str, seg: bytes) -> list[bytes]:
        hdr = parse_tcp(seg)[0]
        return [] if cut in (hdr.sport, hdr.dport) else [seg]

    p.wire = blackhole
    p.advance(3.5)  # dead_timeout without a record on that port's connection
    assert not first.established and p.up() == 2
    p.client.send_app(APP, b"two", p.now)
    p.pump()
    second = p.client.flows.by_addr[APP].conn
    assert second is not None and second is not first and second.established
    assert p.target_got[-1] == (key, b"two")  # the same flow on the server: same socket there
    p.server.send_target(key, b"back", p.now)
    p.pump()
    assert p.app_got[-1] == (APP, b"back")  # the reply follows the flow to its new connection


def test_idle_flows_expire_on_both_sides() -> None:
    p = EndpointPair(client_policy=Policy(idle=2.0), server_policy=Policy(idle=2.0))
    p.start()
    p.client.send_app(APP, b"once", p.now)
    p.pump()
    key = _key_of(p)
    p.advance(3.5)
    assert not p.client.flows.by_id
    assert FlowGone(key) in p.events_s
    assert not p.server.sessions.sessions[b"client01"].flows


def test_oversized_datagrams_are_counted_and_said_once() -> None:
    p = EndpointPair()
    p.start()
    limit = p.client.max_datagram
    for _ in range(2):
        p.client.send_app(APP, b"x" * (limit + 1), p.now)
    p.client.send_app(APP, b"x" * limit, p.now)
    p.pump()
    assert [e for e in p.events_c if isinstance(e, Oversized)] == [Oversized(limit + 1, limit, 1500)]
    assert p.client.drops["oversized"] == 2 and [len(d) for _k, d in p.target_got] == [limit]
    assert limit == 1500 - 20 - 32 - framing.RECORD_OVERHEAD - framing.DATA_OVERHEAD


def test_reconfigure_a_new_key_takes_new_connections_and_established_ones_keep_theirs() -> None:
    p = EndpointPair(client_policy=Policy(key="a"), server_policy=Policy(key="a"))
    p.start()
    slow = Timing(keepalive=9.0)
    p.server.reconfigure(Policy(key="b", timing=slow))
    p.client.reconfigure(Policy(key="b", timing=slow))
    assert all(c.timing is slow for c in p.client.connections() + p.server.connections())
    p.client.send_app(APP, b"still", p.now)
    p.pump()
    assert [d for _k, d in p.target_got] == [b"still"]  # established: the key of their hello
    stale = p.new_client(b"client02", Policy(key="a"))  # a client still on the old key
    stale.connect(p.now)
    for t in stale.transmits(p.now):
        for seg in wire_segments(t):
            p.arrive(p.server, t, seg)
    # Its SYNs carry the old key's tag: the server never answers them (the kernel would get them).
    assert p.server.drops["bad_tag"] >= 3 and not list(p.server.transmits(p.now))
    assert b"client02" not in p.server.sessions.sessions
    p.client.close_connections(p.now)
    p.pump()
    p.now += 0.01
    p.client.bind(bytes([10, 0, 0, 1]), [41001, 41002, 41003])  # new connections: the new key
    p.client.connect(p.now)
    p.pump()
    assert p.up() == 3


def test_a_captured_segment_is_checked_unless_its_checksum_is_still_to_be_filled() -> None:
    # A capture backend hands over whole IP packets: a wrong checksum is a drop, except where the
    # capture says the sender's device is still to fill it in (a local sender with offload).
    server = ServerEndpoint(Policy(key="k"), mtu=1500)
    server.set_local_addresses({SRV[0]})
    client = Connection(role="client", local=CLI, remote=SRV, keyring=Keyring.from_secret("k"),
                        client_id=b"check-me")
    client.connect(1000.0)
    (syn,) = client.segments_to_send()
    bad = bytearray(syn)
    bad[16:18] = b"\x12\x34"  # not the checksum of this segment
    pkt = ipv4_header(CLI[0], SRV[0], len(bad)) + bytes(bad)
    server.receive_packet(memoryview(pkt), 1000.0)
    assert server.drops["bad_checksum"] == 1 and not server.acceptor.pending
    server.receive_packet(memoryview(pkt), 1000.0, unfilled=True)
    assert server.drops["bad_checksum"] == 1 and len(server.acceptor.pending) == 1
