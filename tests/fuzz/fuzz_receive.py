"""Fuzz the server's receive path as a whole: a ``ServerEndpoint`` with a live client connection.

    .venv/bin/python -m tests.fuzz.fuzz_receive -max_total_time=600

The first byte chooses what the rest is:

0. a whole IP packet, as the nft backend's packet socket yields it (``receive_packet``);
1. a UDP payload on a tunnel port, as the XDP rewrite leaves it (``receive_steered``);
2. frames the live client seals with the connection's key and sends: the fuzzer reaches what
   happens *after* authentication (HELLO/HELLO_ACK bodies, DATA, FLOW_CLOSE, CLOSE, unknown types);
3. frames the server's side of the connection seals towards the client (``Connection.receive``
   on the client).

A connection closed by an input is set up again before the next one.  Besides "never raises",
the endpoint's tables stay within their bounds.  Nothing leaves the process: the endpoint opens
no socket.
"""

from __future__ import annotations

import itertools

from tests.fuzz.harness import instrumented, main

with instrumented():
    from rsockd.core.endpoint import Policy, ServerEndpoint
    from rsockd.core.faketcp import Connection
    from rsockd.core.framing import Keyring, data_frame
    from rsockd.core.packet import ipv4_header, parse_tcp
    from rsockd.errors import PacketError
    from tests.unit.tunnelpair import checksummed, wire_segments

CLI = (bytes([10, 0, 0, 1]), 40001)
SRV = (bytes([10, 0, 0, 2]), 10001)
SERVER = ServerEndpoint(Policy(key="fuzz", backlog=64, max_flows=32))
SERVER.set_local_addresses({SRV[0]})
CLIENT = Connection(role="client", local=CLI, remote=SRV, keyring=Keyring.from_secret("fuzz"), client_id=b"fuzzing!")
CLOCK = itertools.count()


def now() -> float:
    return 1000.0 + next(CLOCK) * 0.001


def to_server(seg: bytes) -> None:
    seg = checksummed(seg, CLI[0], SRV[0])
    SERVER.receive_packet(memoryview(ipv4_header(CLI[0], SRV[0], len(seg)) + seg), now())


def to_client() -> None:
    for t in SERVER.transmits(now()):
        for seg in wire_segments(t):
            try:
                hdr, payload = parse_tcp(seg)
            except PacketError:
                continue
            if hdr.dport == CLI[1]:
                CLIENT.receive(hdr, payload, now())
    SERVER.deliveries()
    while SERVER.next_event() is not None:
        pass
    while CLIENT.next_event() is not None:
        pass


def pump() -> None:
    for _ in range(8):
        segs = CLIENT.segments_to_send()
        for s in segs:
            to_server(s)
        to_client()
        if not segs:
            return


def established() -> Connection | None:
    """The server's side of the live connection, set up anew when an input closed it."""
    if not CLIENT.established:
        CLIENT.close(now())
        CLIENT.segments_to_send()
        CLIENT.connect(now())
        pump()
    return next((c for c in SERVER.acceptor.connections.values() if c.established), None)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 4, data[1:]
    t = now()
    if mode == 0:
        SERVER.receive_packet(memoryview(body), t)
    elif mode == 1:
        SERVER.receive_steered(SRV, CLI, memoryview(body), t)
    else:
        server = established()
        if mode == 2 and CLIENT.established:
            seg = CLIENT.send_frames(body, t)
            if seg is not None:
                to_server(seg)
        elif mode == 3 and server is not None:
            seg = server.send_frames(body, t)
            if seg is not None:
                seg = checksummed(seg, SRV[0], CLI[0])
                hdr, payload = parse_tcp(seg)
                CLIENT.receive(hdr, payload, t)
    pump()
    policy = SERVER.policy
    assert len(SERVER.acceptor.pending) <= policy.backlog
    assert all(len(s.flows) <= policy.max_flows for s in SERVER.sessions.sessions.values())
    if next(CLOCK) % 1000 == 0:
        SERVER.handle_timer(now() + 1.0)  # expire flows


SEEDS = [b"\x02" + data_frame(1, b"hi"), b"\x03" + data_frame(1, b"back"), b"\x02\x06\x00\x01\x03",
         b"\x00" + ipv4_header(CLI[0], SRV[0], 20) + bytes(20), b"\x01\x50\x10" + bytes(10)]

if __name__ == "__main__":
    main(TestOneInput, SEEDS)
