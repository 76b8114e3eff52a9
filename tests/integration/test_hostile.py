"""Hostile input against a live pair (issue 8, item 2): a storm of crafted segments while real traffic runs.

``bench.hostile`` fires at least a million crafted segments at the server and the client (each
category of the issue in turn, IPv4 and IPv6) while two application flows echo through the
tunnel.  Neither daemon may crash or log a traceback, the tunnel keeps carrying traffic (its
throughput during the storm is printed as a share of the quiet run's), memory stays bounded, no
connection is reset by the storm, and what was sent is accounted for: every category grew the
counters it is meant to -- rsockd's drop reasons in ``rsockctl status``, or, with the xdp backend,
the kernel's ``UdpInCsumErrors`` for bad checksums (the XDP rewrite turns a bad TCP checksum into a
bad UDP one, which the kernel's UDP layer drops before rsockd sees it).

Accounting: the storm runs category by category and records what every counter gained in each
(``bench.hostile.summarize``); rsockd's drops, the steering drops and the kernel's UDP checksum
and queue drops must account for at least 90 % of what was sent, and with what is *meant* to be
taken without a drop (duplicate ACKs, SYNs that open a half-open connection) and what the
kernel's TCP gets (wrong ports, spoofed peers) at least 97 %.

The other tests prove RFC 5961 from both sides -- an RST at exactly the expected sequence number
resets a connection, and the tunnel recovers by itself -- check that SYN-ACKs go where their SYN
came from, and pin two flaws the storm's design had to steer around as strict xfails until the fix
lands in rsockd/: a blind two-segment reset, and the nft backend taking segments addressed to
other hosts.

``RSOCKD_HOSTILE_COUNT`` and ``RSOCKD_HOSTILE_RATE`` change the storm's size and pace.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bench import hostile
from bench.procstat import rss_mb
from bench.soak import EchoWindow
from rsockd.core import syntag
from rsockd.core.framing import Keyring
from rsockd.core.packet import ACK, RST, SYN, build_options, parse_ip, parse_tcp
from tests.integration.rig import Rig, Rsockd

F = TypeVar("F", bound=Callable[..., Any])
REPO = Path(__file__).resolve().parents[2]
TAG_KEY = Keyring.from_secret(None).syn_key
COUNT = int(os.environ.get("RSOCKD_HOSTILE_COUNT", "1000000"))
RATE = float(os.environ.get("RSOCKD_HOSTILE_RATE", "40000"))
QUIET = 5.0  # seconds of the quiet measurement
RSS_BOUND_MB = 20.0


def root_slow(test: F) -> F:
    return pytest.mark.root(pytest.mark.slow(test))  # type: ignore[no-any-return]


def _alive_and_clean(d: Rsockd) -> None:
    assert d.proc is not None and d.proc.poll() is None, f"{d.name} died:\n{d.log()[-3000:]}"
    log = d.log()
    assert "Traceback" not in log and "Exception" not in log, f"{d.name} logged an exception:\n{log[-5000:]}"


def _echoed(streams: list[EchoWindow]) -> int:
    return sum(s.bytes for s in streams)


def _storm_argv(rig: Rig, count: int, rate: float) -> list[str]:
    net = rig.net
    assert rig.server is not None
    return [sys.executable, "-m", "bench.hostile", "--json", "--count", str(count), "--rate", str(rate),
            "--server-ns", net.ns["s"], "--server-dev", net.dev["s"], "--server-control", rig.server.control,
            "--client-ns", net.ns["c"], "--client-dev", net.dev["c"], "--client-control", rig.client.control]


@root_slow
@pytest.mark.parametrize(("backend", "family"), [("xdp", 4), ("nft", 6)])
def test_a_million_hostile_segments_while_traffic_flows(tmp_path: Path, backend: str, family: int,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with Rig(tmp_path, backend=backend, family=family) as rig:
        server, client = rig.server, rig.client
        assert server is not None and server.proc is not None and client.proc is not None
        streams = [EchoWindow(f"legit{i}", rig.app_socket(socket.AF_INET), size=1000, window=16) for i in range(2)]
        for s in streams:
            s.start()
        try:
            time.sleep(1.0)  # warm-up: flows created, windows full (a measurement interval, not a wait)
            b0, t0 = _echoed(streams), time.monotonic()
            time.sleep(QUIET)
            quiet = (_echoed(streams) - b0) / (time.monotonic() - t0)
            assert quiet > 0, "no legitimate traffic before the storm"
            rss0 = {d.name: rss_mb(d.proc.pid)["rss_mb"] for d in (server, client) if d.proc}
            reconnects0 = [c["reconnects"] for c in client.status("ports")["connections"]]

            b0, t0 = _echoed(streams), time.monotonic()
            proc = subprocess.Popen(_storm_argv(rig, COUNT, RATE), cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            peak = dict(rss0)
            try:
                while proc.poll() is None:  # sample memory while the storm runs
                    for d in (server, client):
                        assert d.proc is not None
                        peak[d.name] = max(peak[d.name], rss_mb(d.proc.pid)["rss_mb"])
                    try:
                        proc.wait(1.0)
                    except subprocess.TimeoutExpired:
                        pass
            finally:
                if proc.poll() is None:
                    proc.kill()
                out, err = proc.communicate()
            storm_secs = time.monotonic() - t0
            during = (_echoed(streams) - b0) / storm_secs
            assert proc.returncode == 0, err[-3000:]
            summary = json.loads(out)
        finally:
            for s in streams:
                s.stop()
        rss1 = {d.name: rss_mb(d.proc.pid)["rss_mb"] for d in (server, client) if d.proc}
        after = rig.echo_run(20)
        reconnects1 = [c["reconnects"] for c in client.status("ports")["connections"]]
        st_s, st_c = server.status(), client.status()

        figures = "\n".join([
            f"\n== hostile storm, {backend} backend, IPv{family} tunnel",
            hostile.render(summary),
            f"storm: {summary['sent']} segments, {summary['pps']}/s while sending, {storm_secs:.1f} s wall "
            "(settling between categories included)",
            f"legitimate echo: quiet {quiet * 8 / 1e6:.1f} Mbit/s, during the storm {during * 8 / 1e6:.1f} Mbit/s "
            f"= {during / quiet:.0%} of quiet; after the storm {after.received}/{after.sent} echoed",
            "RSS before/peak/after (MB): " + ", ".join(f"{n} {rss0[n]:.1f}/{peak[n]:.1f}/{rss1[n]:.1f}" for n in rss0),
            "drops by reason: server " + json.dumps({k: v for k, v in st_s["drops"].items() if v})
            + ", client " + json.dumps({k: v for k, v in st_c["drops"].items() if v}),
            "steering: server " + json.dumps({k: v for k, v in st_s["steering"].items() if v})
            + ", client " + json.dumps({k: v for k, v in st_c["steering"].items() if v}),
        ])
        with capsys.disabled():  # the figures belong in the suite's output, passing or not
            print(figures, flush=True)

        for d in (server, client):
            _alive_and_clean(d)
        assert summary["sent"] >= COUNT
        assert during > 0 and after.received == after.sent, "the tunnel stopped carrying traffic"
        assert all(s.corrupt == 0 for s in streams)
        assert reconnects1 == reconnects0, "the storm reset a connection"
        for n in rss0:
            assert peak[n] - rss0[n] < RSS_BOUND_MB, f"{n}: RSS grew from {rss0[n]} to {peak[n]} MB"
        # Every category grew a counter it is meant to (on the daemon it was aimed at).
        for p in summary["phases"]:
            names = hostile.expected(backend, p["category"])
            for lane in p["sent"]:
                grew = [k for k in names if p["delta"].get(f"{lane}/{k}", 0) > 0]
                assert grew, f"{p['category']} at the {lane}: none of {names} grew: {p['delta']}"
            assert p["covered_share"] >= 0.9, p
        assert summary["accounted_share"] >= 0.9, summary["accounted_share"]
        assert summary["covered_share"] >= 0.97, summary["covered_share"]
        if backend == "xdp":  # bad TCP checksums die in the kernel's UDP layer, not in rsockd
            phase = next(p for p in summary["phases"] if p["category"] == "bad_checksum")
            bad, sent = phase["delta"], phase["sent"]
            # ... except SYNs over the server's SYN rate, which XDP drops before any checksum is looked at,
            # and (port sharing) segments of no connection of rsockd's, which the kernel's TCP gets and drops
            server_bad = (bad.get("server/kernel.udp_csum_errors", 0) + bad.get("server/steer.syn_limited", 0)
                          + bad.get("server/steer.passed_probe", 0))
            assert server_bad >= 0.99 * sent["server"], bad
            assert bad.get("client/kernel.udp_csum_errors", 0) >= 0.99 * sent["client"], bad


def _lanes(rig: Rig) -> hostile.Setup:
    net = rig.net
    assert rig.server is not None
    return hostile.setup(net.ns["s"], net.dev["s"], rig.server.control, net.ns["c"], net.dev["c"],
                         rig.client.control)


@root_slow
@pytest.mark.parametrize("backend", ["xdp", "nft"])
def test_an_rst_at_exactly_the_expected_sequence_resets_and_the_tunnel_recovers(tmp_path: Path,
                                                                                backend: str) -> None:
    """RFC 5961 §3.2: only an RST at exactly RCV.NXT resets.  It does, from either side, and the
    client reconnects by itself."""
    with Rig(tmp_path, backend=backend) as rig:
        app = rig.app_socket()
        assert rig.echo_run(10, sock=app).received == 10
        s = _lanes(rig)
        try:
            storm = s.storm
            for side in ("client", "server"):
                victim, peer, lane = storm.lane(side)
                before = [c["reconnects"] for c in rig.client.status("ports")["connections"]]
                mark = rig.client.notify.mark()
                t = hostile.exact_rst(victim, peer, lane, 1)
                if side == "server":  # the client learns of it when it next sends: the server answers RST
                    rig.echo_run(4, timeout=0.3, sock=app)
                rig.client.wait_status(r" 3/4 connections up", 10, since=mark)
                rig.client.wait_status(r" 4/4 connections up", 15, since=mark)
                after = [c["reconnects"] for c in rig.client.status("ports")["connections"]]
                assert sum(after) - sum(before) == 1, (side, before, after)
                assert rig.echo_run(20, sock=app).received == 20
                print(f"exact RST at the {side} (port {t.dport}): reset, reconnected, echo works")
        finally:
            s.close()
        for d in (rig.server, rig.client):
            assert d is not None
            _alive_and_clean(d)


def _stays_up(victim: hostile.Victim, peer: hostile.Victim, t: hostile.Tuple4, why: str) -> None:
    """The connection of ``t``'s ports stays on the victim's live list, unreset, for a second
    (the status is read every 0.1 s: a reset would show within that)."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        victim.refresh(peer.control)
        assert any((v.sport, v.dport) == (t.sport, t.dport) for v in victim.live), why
        time.sleep(0.1)


@root_slow
@pytest.mark.parametrize("side", ["client", "server"])
def test_two_blind_segments_cannot_reset_a_connection(tmp_path: Path, side: str) -> None:
    """A blind attacker who knows the 4-tuple but not the sequence numbers: a bare ACK far ahead
    (half of all guesses are "ahead"), then an RST at the number that ACK would have made current."""
    with Rig(tmp_path, backend="xdp") as rig:
        s = _lanes(rig)
        try:
            victim, peer, lane = s.storm.lane(side)
            t = hostile.blind_reset(victim, peer, lane, 1)
            _stays_up(victim, peer, t, "reset by two blind segments")
        finally:
            s.close()


@root_slow
@pytest.mark.parametrize("backend", ["xdp", "nft"])
def test_a_segment_addressed_to_another_host_does_not_touch_our_connection(tmp_path: Path, backend: str) -> None:
    """An RST with the live tuple's ports and exactly the expected sequence number, but addressed to
    another host on the link (the server's MAC, a foreign IP).  The kernel would drop it as not
    ours; so must rsockd.  (A host's own kernel answers of this shape reach the server when
    someone spoofs the server's ports towards the client.)"""
    with Rig(tmp_path, backend=backend) as rig:
        s = _lanes(rig)
        try:
            victim, peer, lane = s.storm.lane("server")
            victim.refresh(peer.control)
            t = victim.live[1]
            foreign = victim.spoof[4][0]
            lane.sock.send(lane.ether(hostile.tcp(t.src, foreign, t.sport, t.dport, t.rcv_nxt, 0, RST)))
            _stays_up(victim, peer, t, "reset by a foreign RST")
        finally:
            s.close()


@root_slow
def test_every_syn_ack_goes_back_to_the_address_of_its_syn(tmp_path: Path) -> None:
    """A burst of SYNs from 50 spoofed tuples, each tuple again and again with a new initial sequence
    number (each SYN replaces the tuple's half-open connection).  Every SYN-ACK the server sends --
    captured on the client's end of the link, where the spoofed addresses lead -- must go to the
    address of the SYN it answers.  (Until be57b15 the relay kept send functions in a table keyed
    by ``id(conn)``: a replaced half-open connection left its entry behind, and a later connection
    that reused the id sent its SYN-ACK to the old peer -- 2780 of 3008 here.)"""
    with Rig(tmp_path, backend="nft") as rig:  # nft: no SYN rate limit in front of the daemon
        s = _lanes(rig)
        net = rig.net
        with net.inside("c"):
            cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
            cap.bind((net.dev["c"], 0))
        cap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        cap.setblocking(False)
        try:
            srv = s.storm.server
            owner: dict[int, bytes] = {}  # source port of a SYN -> the address it came from
            frames = []
            slot = syntag.slot_of(time.time())
            for i in range(3000):
                addr, port = srv.spoof[4][i % 50 % len(srv.spoof[4])], 30000 + i % 50
                owner[port] = addr
                # the SYN tag of the default key (the rig has no key): SYNs the server answers
                isn = 0x10000 * i + port
                opts = build_options(mss=1460, sack_permitted=True, timestamps=(syntag.syn_tag(TAG_KEY, isn, slot), 0),
                                     wscale=7)
                frames.append(s.storm.to_server.ether(
                    hostile.tcp(addr, srv.addrs[4], port, 10001, isn, 0, SYN, options=opts)))
            pool = hostile.FramePool(frames)
            for _ in range(0, len(frames), 64):
                pool.send(s.storm.to_server, 64, {})
                time.sleep(0.005)  # about the daemon's pace: nothing lost to a full queue
            wrong = total = 0
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    pkt = cap.recv(2048)
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                ip, l4 = parse_ip(pkt)
                if ip.proto != 6:
                    continue
                hdr, _ = parse_tcp(l4)
                if hdr.flags & (SYN | ACK) == SYN | ACK and hdr.dport in owner:
                    total += 1
                    wrong += ip.dst != owner[hdr.dport]
            print(f"{total} SYN-ACKs captured, {wrong} sent to another address than their SYN's")
            assert total >= 1000
            assert wrong == 0
        finally:
            cap.close()
            s.close()


def test_frame_pool_sends_every_frame_in_turn() -> None:
    """The pool cycles through its frames and tallies them by kind (no namespace needed: a socketpair)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        pool = hostile.FramePool([struct.pack("!I", i) for i in range(5)], ["", "syn", "", "dup_ack", ""])

        class Fake:
            sock = a
            errors = 0

        kinds: dict[str, int] = {}
        assert pool.send(Fake(), 12, kinds) == 12  # type: ignore[arg-type]
        got = [struct.unpack("!I", b.recv(16))[0] for _ in range(12)]
        assert got == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
        assert kinds == {"": 7, "syn": 3, "dup_ack": 2}
    finally:
        a.close()
        b.close()
