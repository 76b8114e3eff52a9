"""The fake-TCP state machine, two ends driven against each other in memory."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsockd.core import syntag
from rsockd.core.endpoint import ConnectionUp, HelloRefused
from rsockd.core.faketcp import (
    TRANSITIONS,
    Acceptor,
    ConnectionClosed,
    FlowClosed,
    State,
    Timing,
    seq_after,
)
from rsockd.core.framing import FrameType, Keyring
from rsockd.core.packet import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TcpHeader,
    build_options,
    parse_options,
    parse_tcp,
    pseudo_sum,
)

from .tunnelpair import CLI, SRV, Pair


def tagged(isn: int, now: float, key: str | None = None) -> bytes:
    """The options of a SYN with ``isn`` that a client with ``key`` sends at ``now`` (clock offset 0):
    MSS, and the timestamp whose value is the tag."""
    ts = syntag.syn_tag(Keyring.from_secret(key).syn_key, isn, syntag.slot_of(now))
    return build_options(mss=1460, timestamps=(ts, 0))


def test_transition_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(State)
    for moves in TRANSITIONS.values():
        assert all(isinstance(v, State) for v in moves.values())


def test_handshake_looks_like_linux() -> None:
    p = Pair()
    srv = p.establish()
    syn = parse_tcp(p.log[0][1])[0]
    assert syn.flags == SYN
    # MSS, SACK_PERM, TS, NOP, WS: the exact order and padding Linux uses (20 bytes).
    assert syn.options[:4] == b"\x02\x04\x05\xb4" and syn.options[4:8] == b"\x04\x02\x08\x0a"
    assert syn.options[16:] == b"\x01\x03\x03\x07"
    synack = parse_tcp(p.log[1][1])[0]
    assert synack.flags == SYN | ACK and synack.ack == (syn.seq + 1) & 0xFFFFFFFF
    opts = parse_options(synack.options)
    assert opts.sack_permitted and opts.wscale == 7 and opts.timestamps is not None
    assert opts.timestamps[1] == parse_options(syn.options).timestamps[0]  # type: ignore[index]
    third = parse_tcp(p.log[2][1])[0]
    assert third.flags == ACK and third.ack == (synack.seq + 1) & 0xFFFFFFFF
    assert srv.established and p.client.established
    assert srv.hello is not None and srv.hello.client_id == b"client01"


def test_data_both_ways_and_seq_advances_by_payload() -> None:
    p = Pair()
    srv = p.establish()
    before = p.client.snd_nxt
    seg = p.send_c(7, b"hello")
    p.to_server(seg)
    assert p.got_s == [(7, b"hello")]
    hdr, payload = parse_tcp(seg)
    assert hdr.seq == before and p.client.snd_nxt == (before + len(payload)) & 0xFFFFFFFF
    assert hdr.flags == ACK | PSH and hdr.ack == p.client.rcv_nxt
    assert parse_options(hdr.options).timestamps is not None  # negotiated, so on every segment
    reply = srv.send_datagram(7, b"world" * 100, p.now)
    assert reply is not None
    p.to_client(reply)
    assert p.got_c == [(7, b"world" * 100)]
    # the server's next segment acknowledges everything the client sent
    assert parse_tcp(reply)[0].ack == p.client.snd_nxt


def test_loss_and_reordering_deliver_the_rest_once() -> None:
    p = Pair()
    p.establish()
    segs = [p.send_c(1, f"d{i}".encode()) for i in range(60)]
    kept = [s for i, s in enumerate(segs) if i % 5 != 0]
    random.Random(3).shuffle(kept)
    for s in kept:
        p.to_server(s)
    expected = sorted(f"d{i}".encode() for i in range(60) if i % 5 != 0)
    assert sorted(d for _f, d in p.got_s) == expected
    assert p.drops_s["replay"] == 0 and p.drops_s["bad_auth"] == 0
    srv = p.server_conn()
    assert srv.rcv_nxt == p.client.snd_nxt  # ack = highest sequence seen, holes or not


def test_pure_acks_keep_a_one_way_transfer_acknowledged() -> None:
    p = Pair(timing=Timing(ack_every=8, ack_delay=0.02))
    p.establish()
    for _ in range(32):
        p.to_server(p.send_c(1, b"x" * 100))
    acks = [parse_tcp(s)[0] for s in p.server_segments()]
    assert len(acks) == 4 and all(a.flags == ACK for a in acks)
    p.to_server(p.send_c(1, b"tail"))
    p.advance(0.1)  # the delayed ACK covers the tail
    last = parse_tcp([s for d, s in p.log if d == "s2c"][-1])[0]
    assert last.ack == p.client.snd_nxt


def test_keepalive_then_dead_peer_then_reconnect() -> None:
    t = Timing(keepalive=2.0, dead_timeout=7.0, reconnect_min=1.0)
    p = Pair(timing=t)
    p.establish()
    p.advance(2.5)
    kinds = [p.frames_of(s) for d, s in p.log if d == "c2s"]
    assert [FrameType.KEEPALIVE] in kinds
    assert p.client.established  # keepalives both ways keep it up
    cut = {"on": True}
    p.wire = lambda d, s: [] if cut["on"] else [s]
    p.advance(6.0)
    assert p.client.established
    p.advance(1.5)
    closed = [e for e in p.events_c if isinstance(e, ConnectionClosed)]
    assert closed and closed[0].reason == "dead" and closed[0].reconnect_at is not None
    assert 0.8 <= closed[0].reconnect_at - p.now + 1.5 <= 2.5  # type: ignore[operator]
    cut["on"] = False
    p.advance(3.0)
    assert p.client.established and p.client.reconnects == 1


def test_server_rst_closes_client_which_reconnects() -> None:
    p = Pair(timing=Timing(reconnect_min=0.5))
    srv = p.establish()
    rst = TcpHeader(SRV[1], CLI[1], srv.snd_nxt, srv.rcv_nxt, RST | ACK, 0).pack(b"", pseudo_sum(SRV[0], CLI[0]))
    p.to_client(rst)
    ev = [e for e in p.events_c if isinstance(e, ConnectionClosed)]
    assert ev and ev[0].reason == "reset"
    p.advance(1.0)
    assert p.client.established


def test_client_rst_closes_server_connection() -> None:
    p = Pair()
    srv = p.establish()
    rst = TcpHeader(CLI[1], SRV[1], p.client.snd_nxt, 0, RST, 0).pack(b"", pseudo_sum(CLI[0], SRV[0]))
    p.to_server(rst)
    assert srv.state == State.CLOSED and not p.acceptor.connections


def test_blind_rsts_are_ignored_or_challenged() -> None:
    p = Pair()
    srv = p.establish()
    psum = pseudo_sum(SRV[0], CLI[0])
    far = TcpHeader(SRV[1], CLI[1], (srv.snd_nxt + 0x40000000) & 0xFFFFFFFF, 0, RST, 0).pack(b"", psum)
    p.to_client(far)
    assert p.client.established and p.drops_c["rst_ignored"] == 1
    assert not p.client.segments_to_send()
    near = TcpHeader(SRV[1], CLI[1], (srv.snd_nxt + 1000) & 0xFFFFFFFF, 0, RST, 0).pack(b"", psum)
    p.to_client(near)
    assert p.client.established and p.drops_c["rst_ignored"] == 2
    challenge = [parse_tcp(s)[0] for s in p.client.segments_to_send()]
    assert len(challenge) == 1 and challenge[0].flags == ACK  # RFC 5961 §3.2 challenge ACK


def test_client_close_sends_fin_with_close_record() -> None:
    p = Pair()
    srv = p.establish()
    p.client.close(p.now)
    p.pump()
    fin = parse_tcp([s for d, s in p.log if d == "c2s"][-2])[0]
    assert fin.flags & FIN
    assert srv.state == State.CLOSED and srv.close_reason == "peer closed"
    assert p.client.state == State.CLOSED and p.client.get_timer() is None  # no reconnect after close()


def test_server_close_makes_client_reconnect() -> None:
    p = Pair(timing=Timing(reconnect_min=0.5))
    srv = p.establish()
    srv.close(p.now)
    p.pump()
    ev = [e for e in p.events_c if isinstance(e, ConnectionClosed)]
    assert ev and ev[0].reason == "peer closed" and ev[0].reconnect_at is not None
    assert srv.state == State.CLOSED
    p.advance(1.0)
    assert p.client.established


def test_reconnect_backoff_doubles_and_caps() -> None:
    t = Timing(rto=0.5, retries=1, reconnect_min=0.5, reconnect_max=4.0)
    p = Pair(timing=t)
    p.wire = lambda d, s: []  # the server never answers
    p.client.connect(p.now)
    delays = []
    for _ in range(8):
        start = p.now
        while not any(isinstance(e, ConnectionClosed) for e in p.events_c):
            p.advance(0.1)
        ev = p.events_c.pop()
        assert isinstance(ev, ConnectionClosed) and ev.reason == "syn timeout"
        assert ev.reconnect_at is not None
        delays.append(ev.reconnect_at - p.now)
        p.events_c.clear()
        assert p.now - start < 10
    assert delays[0] == pytest.approx(0.5, rel=0.21)
    assert delays[1] == pytest.approx(1.0, rel=0.21)
    assert delays[2] == pytest.approx(2.0, rel=0.21)
    assert all(d <= 4.0 for d in delays) and delays[-1] >= 3.2


def test_syn_backlog_full_drops_and_counts_then_expires() -> None:
    drops: dict[str, int] = {}
    acc = Acceptor(keyring=Keyring.from_secret(None), backlog=4, timing=Timing(syn_timeout=3.0))
    psum = pseudo_sum(CLI[0], SRV[0])
    for port in range(30000, 30010):
        syn = TcpHeader(port, SRV[1], port, 0, SYN, 64240, tagged(port, 10.0)).pack(b"", psum)
        hdr, payload = parse_tcp(syn)
        acc.segment(SRV, (CLI[0], port), hdr, payload, 10.0)
    drops = dict(acc.drops)
    assert len(acc.pending) == 4 and drops["backlog_full"] == 6
    for c in acc.all():
        c.handle_timer(13.5)
        while (ev := c.next_event()) is not None:
            if isinstance(ev, ConnectionClosed):
                acc.forget(c)
    assert not acc.pending


def test_wrong_key_syn_is_never_answered() -> None:
    p = Pair(client_key="right", server_key="wrong")
    p.client.connect(p.now)
    p.pump()
    p.advance(10)
    assert not p.client.established and p.drops_s["bad_tag"] >= 3
    assert not p.acceptor.pending and not [s for d, s in p.log if d == "s2c"]  # silence: the kernel's to answer


def test_untagged_syn_is_left_alone_and_each_accepted_slot_works() -> None:
    acc = Acceptor(keyring=Keyring.from_secret("k"))
    psum = pseudo_sum(CLI[0], SRV[0])
    now = 6400.0 + 10  # wall clock (offset 0): slot 100
    for port, options, ok in [(30000, build_options(mss=1460), False),
                              (30001, build_options(mss=1460, timestamps=(12345, 0)), False),
                              (30002, tagged(30002, now, "other"), False),
                              (30003, tagged(30003, now - 64, "k"), True),
                              (30004, tagged(30004, now + 64, "k"), True),
                              (30005, tagged(30005, now - 128, "k"), False),
                              (30006, tagged(99, now, "k"), False)]:  # another ISN's tag
        hdr, payload = parse_tcp(TcpHeader(port, SRV[1], port, 0, SYN, 64240, options).pack(b"", psum))
        conn, _ = acc.segment(SRV, (CLI[0], port), hdr, payload, now)
        assert (conn is not None) == ok, port
    assert acc.drops["bad_tag"] == 5 and len(acc.pending) == 2 and not acc.segments_to_send()


def test_a_tagged_syn_replayed_from_another_address_is_left_alone() -> None:
    acc = Acceptor(keyring=Keyring.from_secret("k"))
    now = 6400.0
    for src, ok in [(CLI, True), (CLI, True), ((bytes([10, 0, 0, 66]), CLI[1]), False), ((CLI[0], 5555), False)]:
        syn = TcpHeader(src[1], SRV[1], 4242, 0, SYN, 64240, tagged(4242, now, "k"))
        seg = syn.pack(b"", pseudo_sum(src[0], SRV[0]))
        hdr, payload = parse_tcp(seg)
        conn, _ = acc.segment(SRV, src, hdr, payload, now)
        assert (conn is not None) == ok, src  # the same SYN again from the same place: a retransmission
    assert acc.drops["bad_tag"] == 2


def test_wrong_key_hello_is_rejected() -> None:
    p = Pair(client_key="right", server_key="wrong")
    p.client.keyring.syn_key = Keyring.from_secret("wrong").syn_key  # a SYN that guessed the tag
    p.client.connect(p.now)
    p.pump()
    assert not p.client.established
    assert p.drops_s["bad_auth"] >= 1
    assert not any(isinstance(e, (ConnectionUp, HelloRefused)) for e in p.events_s)  # no hello got to admission
    p.advance(20)  # the server's syn_timeout ends each attempt with an RST; the client retries
    closes = [e for e in p.events_c if isinstance(e, ConnectionClosed)]
    assert len(closes) >= 2 and all(e.reconnect_at is not None for e in closes)
    assert not p.client.established and p.drops_s["bad_auth"] >= 4
    assert not p.acceptor.connections and len(p.acceptor.pending) <= 1
    p.client.close(p.now)  # stop reconnecting: the server's unauthenticated entry must expire
    p.advance(p.timing.syn_timeout + 0.5)
    assert not p.acceptor.pending


def test_same_key_works_and_no_key_uses_default() -> None:
    p = Pair(client_key="k", server_key="k")
    p.establish()
    q = Pair()
    q.establish()
    assert Keyring.from_secret(None).is_default


def test_replayed_segment_is_rejected() -> None:
    p = Pair()
    p.establish()
    seg = p.send_c(3, b"once")
    p.to_server(seg)
    p.to_server(seg)
    assert p.got_s == [(3, b"once")]
    assert p.drops_s["replay"] == 1


def test_replayed_hello_in_a_new_connection_is_refused() -> None:
    p = Pair()
    p.establish()
    hello_seg = next(s for d, s in p.log if d == "c2s" and FrameType.HELLO in p.frames_of(s))
    hello_payload = bytes(parse_tcp(hello_seg)[1])
    # An attacker opens its own TCP connection from elsewhere and replays the captured hello.
    evil = (bytes([10, 0, 0, 66]), 5555)
    psum = pseudo_sum(evil[0], SRV[0])
    isn = 500  # the attacker knows the default key (as everybody does), so it can make a tagged SYN
    p.to_server(TcpHeader(evil[1], SRV[1], isn, 0, SYN, 64240, tagged(isn, p.now)).pack(b"", psum), src=evil)
    pend = next(c for c in p.acceptor.pending.values() if c.remote == evil)
    synack_seq = (pend.snd_nxt - 1) & 0xFFFFFFFF
    p.to_server(TcpHeader(evil[1], SRV[1], isn + 1, synack_seq + 1, ACK, 502).pack(b"", psum), src=evil)
    seg = TcpHeader(evil[1], SRV[1], isn + 1, synack_seq + 1, ACK | PSH, 502).pack(hello_payload, psum)
    p.to_server(seg, src=evil)
    assert p.drops_s["refused"] == 1
    assert pend.state == State.CLOSED
    assert len(p.sessions.sessions[b"client01"].connections) == 1


def test_lost_hello_ack_is_answered_again() -> None:
    dropped = {"n": 0}

    def lose_first_hello_ack(d: str, s: bytes) -> list[bytes]:
        if d == "s2c" and len(parse_tcp(s)[1]) and dropped["n"] == 0:
            dropped["n"] = 1
            return []
        return [s]

    p = Pair(wire=lose_first_hello_ack)
    p.client.connect(p.now)
    p.pump()
    assert not p.client.established
    p.advance(1.5)
    assert p.client.established and dropped["n"] == 1
    assert len(p.acceptor.connections) == 1


def test_reconnect_on_same_tuple_replaces_the_old_server_connection() -> None:
    p = Pair(timing=Timing(reconnect_min=0.5))
    old = p.establish()
    p.client = p.new_client()  # the client restarts on the same port; the server is not told
    p.now += 0.01
    p.client.connect(p.now)
    p.pump()
    assert p.client.established
    new = p.server_conn()
    assert new is not old
    p.to_server(p.send_c(9, b"after"))
    assert p.got_s[-1] == (9, b"after")


def test_flow_close_frame_becomes_an_event() -> None:
    p = Pair()
    srv = p.establish()
    srv.close_flow(42, p.now)
    p.pump()
    assert FlowClosed(42) in p.events_c


@pytest.mark.parametrize("key", [None, "secret"])
def test_udp_transport_handshake_data_and_replay(key: str | None) -> None:
    p = Pair(transport="udp", client_key=key, server_key=key)
    srv = p.establish()
    assert p.log[0][1][0] == 0x01  # the udp marker, not a data offset nibble
    seg = p.send_c(5, b"over udp")
    p.to_server(seg)
    p.to_server(seg)
    assert p.got_s == [(5, b"over udp")] and p.drops_s["replay"] == 1
    reply = srv.send_datagram(5, b"back", p.now)
    assert reply is not None
    p.to_client(reply)
    assert p.got_c == [(5, b"back")]


def test_udp_transport_reconnect_with_new_nonce() -> None:
    p = Pair(transport="udp", timing=Timing(reconnect_min=0.5))
    old = p.establish()
    p.client = p.new_client()
    p.now += 0.01
    p.client.connect(p.now)
    p.pump()
    assert p.client.established and p.server_conn() is not old


def test_seq_after_wraps() -> None:
    assert seq_after(5, 0xFFFFFFF0) and not seq_after(0xFFFFFFF0, 5) and not seq_after(7, 7)


def test_isn_near_wrap_still_works() -> None:
    p = Pair()
    p.client.rng = random.Random(0)
    p.client.rng.getrandbits = lambda k: (0xFFFFFFF0 if k == 32 else random.getrandbits(k))  # type: ignore[method-assign]
    srv = p.establish()
    for _ in range(10):
        p.to_server(p.send_c(1, bytes(7)))
    assert len(p.got_s) == 10 and srv.rcv_nxt == p.client.snd_nxt and p.client.snd_nxt < 0x1000


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([ACK, ACK | PSH, ACK | FIN, RST, RST | ACK, SYN, 0]))
def test_garbage_payloads_are_counted_never_raised(payload: bytes, flags: int) -> None:
    p = Pair()
    srv = p.establish()
    seg = TcpHeader(CLI[1], SRV[1], p.client.snd_nxt, p.client.rcv_nxt, flags, 100).pack(
        payload, pseudo_sum(CLI[0], SRV[0]))
    before = sum(p.drops_s.values())
    p.to_server(seg)
    assert p.got_s == []
    if payload and flags & ACK and not flags & (RST | SYN):
        assert sum(p.drops_s.values()) > before
    assert srv.state in (State.ESTABLISHED, State.CLOSED)
