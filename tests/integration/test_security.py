"""The authentication boundary (docs/security.md): without the key nothing reaches the target,
unauthenticated state is bounded and short-lived, and captured segments replayed are dropped."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from rsockd.dataplane.rawsock import SO_MARK
from rsockd.service.config import DEFAULT_MARK
from tests.integration.rig import Rig

pytestmark = pytest.mark.root


def test_a_client_without_the_key_never_reaches_the_target(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="xdp", server_args=["--key", "right", "--syn-timeout", "2", "--backlog", "8"],
             client_args=["--key", "wrong"], wait=False) as rig:
        assert rig.server is not None and rig.echo is not None
        app = rig.app_socket()
        app.settimeout(0.1)
        half_open = []
        end = time.monotonic() + 8
        while time.monotonic() < end:  # the client keeps trying (and sending data) all along
            app.sendto(b"let me in", ("127.0.0.1", 30000))
            st = rig.server.status()
            half_open.append(st["half_open"])
            assert st["sessions"] == 0 and st["flows"] == 0
            try:
                app.recv(100)
                raise AssertionError("a reply came back through the tunnel")
            except TimeoutError:
                pass
        st = rig.server.status()
        assert rig.echo.received == 0
        # Its SYNs carry the wrong key's tag: the steering hands them to the kernel (port
        # sharing), which resets them as for a closed port; rsockd never holds one half-open.
        assert st["steering"]["passed_probe"] >= 4 and max(half_open) == 0
        assert st["drops"]["bad_auth"] == 0 and st["drops"]["bad_tag"] == 0
        conns = rig.client.status("ports")["connections"]
        assert all(c["state"] != "established" for c in conns)
        # Each attempt was reset (by the server's kernel), so the client went round again.
        assert sum(c["reconnects"] for c in conns) >= 4
        assert "handshake timeout" not in rig.server.log()  # quiet: unauthenticated peers are not logged


def test_captured_segments_replayed_are_dropped(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="xdp", server_args=["--key", "k"], client_args=["--key", "k"]) as rig:
        assert rig.server is not None and rig.echo is not None
        net = rig.net
        pcap = tmp_path / "c2s.pcap"
        # On the client's side: on the server's, XDP has rewritten them before any capture tap.
        # tcpdump stops by itself after 20: terminating it races its reading of the capture ring.
        argv = ["tcpdump", "--immediate-mode", "-U", "-n", "-c", "20", "-i", net.dev["c"], "-w", str(pcap),
                f"tcp and src host {net.cli4} and greater 80"]
        cap = net.popen("c", argv, stderr=subprocess.PIPE)
        assert cap.stderr is not None and "listening on" in cap.stderr.readline()
        try:
            assert rig.echo_run(20, size=300).received == 20
            assert cap.wait(10) == 0
        finally:
            if cap.poll() is None:
                cap.kill()
                cap.wait()
        pkts = [bytes(p[IP]) for p in rdpcap(str(pcap)) if TCP in p and len(p[TCP].payload) > 0]
        assert len(pkts) == 20
        before = rig.server.status()["drops"]["replay"]
        echoed = rig.echo.received
        # Re-sent from the client's host as if from the path: with the daemon's mark, or the client's
        # own egress guard would drop them first.
        with net.inside("c"):
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        raw.setsockopt(socket.SOL_SOCKET, SO_MARK, DEFAULT_MARK)
        for p in pkts:
            raw.sendto(p, (net.srv4, 0))
        raw.close()
        # The replays are processed in order; an echo after them proves they were all read.
        assert rig.echo_run(1).received == 1
        st = rig.server.status()
        assert st["drops"]["replay"] - before >= len(pkts) - 1
        assert rig.echo.received == echoed + 1  # nothing replayed reached the target
        assert st["connections"]["by_state"] == {"established": 4}
