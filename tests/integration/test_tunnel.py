"""Real daemons in namespaces: UDP through the tunnel, and proof the kernel stayed silent."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from scapy.layers.inet import TCP
from scapy.utils import rdpcap

from rsockd.core.packet import SYN, TcpHeader, ipv4_header, pack_address, pseudo_sum
from tests.integration.rig import Rig, nstat

pytestmark = pytest.mark.root

MATRIX = [(b, t, f) for b in ("xdp", "nft") for t in ("tcp", "udp", "all") for f in (4, 6)]


@pytest.mark.parametrize("backend, transport, family", MATRIX, ids=[f"{b}-{t}-v{f}" for b, t, f in MATRIX])
def test_echo_through_the_tunnel(tmp_path: Path, backend: str, transport: str, family: int) -> None:
    with Rig(tmp_path, backend=backend, transport=transport, family=family) as rig:
        res = rig.echo_run(50, size=200)
        assert res.received == 50, rig.client.log()[-2000:]
        big = rig.echo_run(5, size=1300)
        assert big.received == 5
        st = rig.server.status()  # type: ignore[union-attr]
        assert st["backend"]["name"] == (backend if transport != "udp" else None)
        assert st["sessions"] == 1 and st["flows"] >= 1
        cst = rig.client.status()
        assert cst["connections"]["by_state"] == {"established": rig.conns_per_client()}
        assert cst["traffic"]["from_app_packets"] >= 55 and cst["traffic"]["to_app_packets"] >= 55
        bad = {k: v for k, v in cst["drops"].items() if v} | {k: v for k, v in st["drops"].items() if v}
        assert not bad, bad


def capture_first_rst(rig: Rig, side: str, pcap: Path) -> subprocess.Popen[str]:
    """tcpdump that stops at the first TCP RST crossing ``side``'s veth; returns once listening."""
    argv = ["tcpdump", "--immediate-mode", "-U", "-n", "-c", "1", "-i", rig.net.dev[side], "-w", str(pcap),
            "(tcp[tcpflags] & tcp-rst != 0) or (ip6[6] == 6 and ip6[40+13] & 4 != 0)"]
    p = rig.net.popen(side, argv, stderr=subprocess.PIPE)
    assert p.stderr is not None
    line = p.stderr.readline()
    assert "listening on" in line, line
    return p


def marker_rst(rig: Rig) -> None:
    """A SYN from the client to a port nothing steers: the server's kernel answers with an RST."""
    net = rig.net
    with net.inside("c"):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    src, dst = pack_address(net.cli4), pack_address(net.srv4)
    syn = TcpHeader(MARK_SPORT, MARK_DPORT, 1, 0, SYN, 64240).pack(b"", pseudo_sum(src, dst))
    raw.sendto(ipv4_header(src, dst, len(syn)) + syn, (net.srv4, 0))
    raw.close()


MARK_SPORT, MARK_DPORT = 40404, 10999


@pytest.mark.parametrize("backend", ["xdp", "nft"])
def test_the_kernel_sends_no_rst_or_ack_for_tunnel_ports(tmp_path: Path, backend: str) -> None:
    with Rig(tmp_path, backend=backend) as rig:
        net = rig.net
        base = {s: nstat(net, s, "TcpOutRsts", "TcpOutSegs") for s in "cs"}
        caps = {s: capture_first_rst(rig, s, tmp_path / f"rst-{s}.pcap") for s in "cs"}
        try:
            _no_rst_during_traffic(rig, base, caps, tmp_path)
        finally:
            for p in caps.values():  # never leave a capture waiting for its packet
                if p.poll() is None:
                    p.kill()
                    p.wait()


def _no_rst_during_traffic(rig: Rig, base: dict[str, dict[str, int]], caps: dict[str, subprocess.Popen[str]],
                           tmp_path: Path) -> None:
    """Traffic, then the checks: no kernel-made TCP segment, and each capture's one RST is the marker."""
    net = rig.net
    res = rig.echo_run(300, size=500, timeout=0.5)
    assert res.received == 300
    after = {s: nstat(net, s, "TcpOutRsts", "TcpOutSegs") for s in "cs"}
    # Raw-socket sends do not count as TcpOutSegs: any growth would be a kernel-made segment.
    assert after == base, (base, after)
    assert rig.server.status()["steering"]["guard_dropped"] == 0  # type: ignore[union-attr]
    assert rig.client.status()["steering"]["guard_dropped"] == 0
    # The control case ends both captures: a kernel RST for a port that is not steered.  Had the
    # kernel sent any RST during the traffic, that would have been each capture's one packet.
    marker_rst(rig)
    for side, p in caps.items():
        assert p.wait(timeout=10) == 0
        pkts = rdpcap(str(tmp_path / f"rst-{side}.pcap"))
        assert len(pkts) == 1 and pkts[0][TCP].sport == MARK_DPORT and pkts[0][TCP].dport == MARK_SPORT, (
            side, pkts[0].summary())
    assert nstat(net, "s", "TcpOutRsts")["TcpOutRsts"] == base["s"]["TcpOutRsts"] + 1


def echoed(app: socket.socket, sent: set[bytes]) -> set[bytes]:
    """The distinct datagrams ``app`` receives until it has as many as ``sent`` (2 s for each)."""
    app.settimeout(2)
    got: set[bytes] = set()
    while len(got) < len(sent):
        got.add(app.recv(65536))
    return got


def burst_held_at_server(rig: Rig, app: socket.socket) -> None:
    """200 datagrams of 1104 bytes sent while the server is stopped, so that the client's
    segments wait in the server's tunnel socket (where GRO coalesces them); all come back."""
    server, client = rig.server, rig.client
    assert server is not None and server.proc is not None
    before = client.status()["traffic"]["tunnel_tx_packets"]
    sent = {i.to_bytes(4, "big") + os.urandom(1100) for i in range(200)}
    server.proc.send_signal(signal.SIGSTOP)
    try:
        for msg in sorted(sent):
            app.sendto(msg, ("127.0.0.1", 30000))
        deadline = time.monotonic() + 10  # each look is a round trip to the client's control socket
        while client.status()["traffic"]["tunnel_tx_packets"] - before < len(sent):
            assert time.monotonic() < deadline, "the client did not send every datagram"
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert echoed(app, sent) == sent


def burst_held_at_client(rig: Rig, app: socket.socket) -> int:
    """300 datagrams of 64 bytes sent while the client is stopped (they wait in its socket
    buffer); all come back.  The segments the client sent for them."""
    client = rig.client
    assert client.proc is not None
    before = client.status()["traffic"]["tunnel_tx_packets"]
    sent = {i.to_bytes(4, "big") + bytes(60) for i in range(300)}
    client.proc.send_signal(signal.SIGSTOP)
    try:
        for msg in sorted(sent):
            app.sendto(msg, ("127.0.0.1", 30000))
    finally:
        client.proc.send_signal(signal.SIGCONT)
    assert echoed(app, sent) == sent
    segments: int = client.status()["traffic"]["tunnel_tx_packets"] - before
    return segments


def test_segments_that_arrive_together_are_read_together(tmp_path: Path) -> None:
    """With GRO on the interface (as physical NICs have it), a connection's segments that wait for
    the server are coalesced after the XDP rewrite and read in runs; their records are checked
    (four at a time where the CPU can) and every datagram comes back intact, none counted forged."""
    with Rig(tmp_path, backend="xdp", gro=True) as rig:
        app = rig.app_socket()
        assert rig.echo_run(1, sock=app).received == 1
        burst_held_at_server(rig, app)
        assert rig.server is not None
        st = rig.server.status()
        batches, batched = st["traffic"]["tunnel_rx_batches"], st["traffic"]["tunnel_rx_batched"]
        assert batches > 0 and batched >= 200 // 2 and batched > 4 * batches, (batches, batched)
        assert not {k: v for k, v in st["drops"].items() if v}


def test_datagrams_that_keep_coming_wake_the_relay_and_the_loop_still_runs(tmp_path: Path) -> None:
    """While datagrams keep coming, each wakes the relay in its own wait, not asyncio
    (docs/design.md, "Wake-ups"); the event loop still runs in between: the watchdog it sends
    keeps its pace and the control socket answers."""
    # WATCHDOG=1 every 0.8 s (more often would fill the notification socket's queue before the test reads it)
    with Rig(tmp_path, backend="xdp", env={"WATCHDOG_USEC": "1600000"}) as rig:
        client = rig.client
        app = rig.app_socket()
        before = client.status()["traffic"]
        mark = client.notify.mark()
        pings, end = 0, time.monotonic() + 3.0
        while time.monotonic() < end:
            assert rig.echo_run(50, sock=app).received == 50  # one in flight, back to back
            pings += 50
            asked = time.monotonic()
            client.status()
            assert time.monotonic() - asked < 0.5
            client.notify.drain()
        after = client.status()["traffic"]
        own, woken = (after[k] - before[k] for k in ("wakeups_own", "wakeups_loop"))
        assert own >= pings and own > 4 * woken, (pings, own, woken)  # two wake-ups a ping: request, reply
        beats = [t for m, t in zip(client.notify.messages[mark:], client.notify.times[mark:], strict=True)
                 if m.get("WATCHDOG") == "1"]
        assert len(beats) >= 3 and max(b - a for a, b in itertools.pairwise(beats)) < 1.3, beats


PURE_CASES = [("xdp", "packet", 4), ("xdp", "raw", 4), ("xdp", "raw", 6), ("nft", "packet", 6)]


@pytest.mark.parametrize("backend, send_path, family", PURE_CASES, ids=[f"{b}-{p}-v{f}" for b, p, f in PURE_CASES])
def test_the_interpreted_path_carries_bursts_both_ways(tmp_path: Path, backend: str, send_path: str,
                                                       family: int) -> None:
    """``RSOCKD_PURE=1``: the package's source, no compiled core, reader or writer (macOS's path,
    and a build without a compiler).  The relay's own loops read the tunnel sockets (GRO's runs
    cut in Python), the application socket and the target's; the send path is Python's.  A
    burst held up at the server and one held up at the client come through intact."""
    with Rig(tmp_path, backend=backend, family=family, gro=True, env={"RSOCKD_PURE": "1"},
             server_args=["--send-path", send_path], client_args=["--send-path", send_path]) as rig:
        server, client = rig.server, rig.client
        assert server is not None
        for d in (server, client):
            assert d.status()["build"] == {"core": "interpreted", "reader": "python", "tags_at_once": 1}
        app = rig.app_socket()
        assert rig.echo_run(20, size=200, sock=app).received == 20
        burst_held_at_server(rig, app)
        if backend == "xdp" and send_path == "packet":  # on a veth, only a GSO send's segments meet in GRO
            traffic = server.status()["traffic"]
            assert traffic["tunnel_rx_batched"] > 2 * traffic["tunnel_rx_batches"] > 0, traffic
        assert burst_held_at_client(rig, app) < 300 // 2  # the application's datagrams share segments
        for d in (server, client):
            assert not {k: v for k, v in d.status()["drops"].items() if v}


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_small_datagrams_queued_together_share_segments(tmp_path: Path, transport: str) -> None:
    """Datagrams that queue up while the daemon is busy go out as several frames per segment."""
    with Rig(tmp_path, backend="xdp", transport=transport) as rig:
        app = rig.app_socket()
        assert rig.echo_run(1, sock=app).received == 1
        segments = burst_held_at_client(rig, app)
        # 300 frames of 71 bytes fit about 20 to a 1500-byte packet: expect a few dozen segments.
        assert segments <= 40, segments
