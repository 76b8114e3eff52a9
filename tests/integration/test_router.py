"""A server on a host that forwards: other hosts' TCP connections routed through it on ports of
the tunnel range are theirs, not the tunnel's (ingress match and egress guard both)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tests.integration.rig import Rig, address_of

pytestmark = pytest.mark.root

BEHIND_PORT = 10002  # a tunnel port, served by a TCP service on the host behind the server


class TcpEcho:
    """A TCP echo on ``port`` of host ``side``, both families: each connection gets back what it
    sent, once the sender has shut down its side."""

    def __init__(self, rig: Rig, side: str, port: int) -> None:
        self.socks = []
        with rig.net.inside(side):
            for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                s = socket.socket(fam, socket.SOCK_STREAM)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
                s.listen()
                self.socks.append(s)
        self.threads = [threading.Thread(target=self._serve, args=(s,), daemon=True) for s in self.socks]
        for t in self.threads:
            t.start()

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(10)
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                conn.sendall(data)

    def close(self) -> None:
        for s in self.socks:
            s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self.threads:
            t.join(5)


def tcp_roundtrip(rig: Rig, side: str, addr: str, port: int, payload: bytes) -> bytes:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with rig.net.inside(side):
        s = socket.socket(fam, socket.SOCK_STREAM)
    with s:
        s.settimeout(5)
        s.connect((addr, port))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


@pytest.mark.parametrize("backend", ["xdp", "nft"])
def test_connections_routed_through_the_server_to_its_ports_are_left_alone(tmp_path: Path, backend: str) -> None:
    # c --- s (rsockd server, forwarding) --- c2 (no daemon: a plain host with a TCP service)
    with Rig(tmp_path, backend=backend, hosts=2) as rig:
        net, server = rig.net, rig.server
        assert server is not None
        assert rig.clients[1].stop() == 0
        net.run("s", ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        behind, gateway = {}, {}
        for fam in (4, 6):
            behind[fam] = address_of(net, "c2", net.dev["c2"], fam)
            gateway[fam] = address_of(net, "s", net.dev["s2"], fam)
            net.run("c", ["ip", f"-{fam}", "route", "add", behind[fam], "via", net.srv4 if fam == 4 else net.srv6])
            net.run("c2", ["ip", f"-{fam}", "route", "add", net.cli4 if fam == 4 else net.cli6, "via", gateway[fam]])
        echo = TcpEcho(rig, "c2", BEHIND_PORT)
        try:
            before = server.status()
            for fam in (4, 6):
                payload = bytes(range(256)) * 400  # 100 kB: many segments each way, ACKs and a FIN
                assert tcp_roundtrip(rig, "c", behind[fam], BEHIND_PORT, payload) == payload, fam
            after = server.status()
        finally:
            echo.close()
        steer = {k: after["steering"][k] - before["steering"].get(k, 0) for k in after["steering"]}
        drops = {k: after["drops"][k] - before["drops"].get(k, 0) for k in after["drops"]}
        # The kernel forwarded every segment both ways: none was taken for the tunnel, and the
        # guard let the forwarded ACKs from port 10002 out.
        assert steer["guard_dropped"] == 0, steer
        if backend == "xdp":
            # every segment from c to c2:10002 (both families) was looked up and left to the kernel
            assert steer["passed_transit"] >= 2 * 3, steer
            assert steer["steered_v4"] == steer["steered_v6"] == 0, steer
            out = server.ctl("status")
            assert "routed through" in out.stdout and "to other hosts, left to the kernel" in out.stdout, out
        else:
            assert drops["not_local"] >= 2 * 3, drops  # the packet socket saw them, and let them be
        assert {k: v for k, v in drops.items() if v and k != "not_local"} == {}, drops
        # The tunnel itself still works on the same host.
        assert rig.echo_run(5).received == 5
        assert rig.server.status()["steering"]["passed_transit"] == after["steering"]["passed_transit"]
