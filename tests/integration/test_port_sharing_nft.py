"""Port sharing with the nft backend, real daemons in namespaces: a tunnel port is an ordinary port
to everyone but rsockd's clients.  A kernel TCP service on a tunnel port serves kernel clients
while the tunnel carries traffic on the same port; a bare tunnel port refuses a connect() with
RST; SYNs without a good tag (wrong key, replayed from elsewhere, too old) reach the kernel, not
rsockd; an unsolicited segment to the client's port meets the client kernel's RST.

Every wait polls an event with a deadline; RST checks end with a marker (test_nft_steer.py).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rsockd.core.framing import Keyring
from rsockd.core.packet import ACK, RST, SYN, parse_ip, parse_tcp
from rsockd.errors import PacketError
from tests.integration.rig import Rig, nstat
from tests.integration.test_cbpf_kernel import Sender, segment
from tests.integration.test_nft_steer import Client, Probe, queues, tagged_syn

pytestmark = pytest.mark.root

SHARED = 10001  # a tunnel port that also has a kernel service
BARE = 10002  # a tunnel port with nothing of the kernel's on it
KEY = Keyring.from_secret(None).syn_key  # the rig's daemons run without a key: the default one


class TcpEcho:
    """A threaded kernel TCP echo service bound in the server namespace."""

    def __init__(self, rig: Rig, port: int) -> None:
        fam = socket.AF_INET6 if rig.family == 6 else socket.AF_INET
        with rig.net.inside("s"):
            self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((rig.server_addr, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.served = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                return
        self.served += 1

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def kernel_client(rig: Rig, port: int) -> socket.socket:
    fam = socket.AF_INET6 if rig.family == 6 else socket.AF_INET
    with rig.net.inside("c"):
        s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(5)
    return s


@pytest.fixture(params=[4, 6], ids=["v4", "v6"])
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    with Rig(tmp_path, backend="nft", family=request.param) as r:
        yield r


def test_kernel_service_and_tunnel_share_a_port(rig: Rig) -> None:
    assert rig.server is not None
    echo = TcpEcho(rig, SHARED)
    try:
        rsts = nstat(rig.net, "s", "TcpOutRsts")["TcpOutRsts"], nstat(rig.net, "c", "TcpOutRsts")["TcpOutRsts"]
        stop = threading.Event()
        errors: list[BaseException] = []
        done = [0]

        def kernel_traffic() -> None:  # kernel clients on the shared port, while the tunnel runs
            try:
                while not stop.is_set():
                    with kernel_client(rig, SHARED) as s:
                        s.connect((rig.server_addr, SHARED))
                        msg = b"hello %d" % done[0] * 100
                        s.sendall(msg)
                        got = b""
                        while len(got) < len(msg):
                            got += s.recv(65536)
                        assert got == msg
                    done[0] += 1
            except BaseException as e:  # reported by the test's thread
                errors.append(e)

        t = threading.Thread(target=kernel_traffic)
        t.start()
        try:
            res = rig.echo_run(200, size=300)
        finally:
            stop.set()
            t.join(10)
        assert not errors, errors
        assert res.received == 200, rig.server.log()[-2000:]
        assert done[0] >= 3 and echo.served >= 3
        n = rig.conns_per_client()
        assert rig.client.status()["connections"]["by_state"] == {"established": n}
        # The kernel's connections were not touched by rsockd, nor rsockd's by the kernel.
        after = nstat(rig.net, "s", "TcpOutRsts")["TcpOutRsts"], nstat(rig.net, "c", "TcpOutRsts")["TcpOutRsts"]
        assert after == rsts
        st = rig.server.status()
        assert st["steering"]["guard_dropped"] == 0
        assert st["steering"]["passed_probe"] >= 3 * 4  # each kernel connection's segments to the port
        assert st["drops"]["no_connection"] >= 3  # the capture saw them too, and answered none
    finally:
        echo.close()


def test_bare_tunnel_port_refuses_connect(rig: Rig) -> None:
    assert rig.server is not None
    before = rig.server.status()["steering"]["passed_probe"]
    with kernel_client(rig, BARE) as s, pytest.raises(ConnectionRefusedError):
        s.connect((rig.server_addr, BARE))
    assert rig.server.status()["steering"]["passed_probe"] == before + 1
    assert rig.echo_run(5).received == 5


def test_probe_syns_reach_the_kernel_not_rsockd(rig: Rig) -> None:
    assert rig.server is not None
    net = rig.net
    c, s = (net.cli6, net.srv6) if rig.family == 6 else (net.cli4, net.srv4)
    syns: list[tuple[Probe, int | bytes]] = [
        ((c, s, 41001, SHARED), tagged_syn(c, s, 41001, SHARED, b"<seg000>", key=b"\x01" * 16)),  # wrong key
        ((c, s, 41002, BARE), tagged_syn(c, s, 41002, BARE, b"<seg001>", key=KEY, as_if=(c, 41003))),  # replay
        ((c, s, 41004, BARE), tagged_syn(c, s, 41004, BARE, b"<seg002>", key=KEY, slot_shift=-3)),  # too old
    ]
    if rig.family == 4:  # replayed from another address: the client namespace's second one
        other = net.cli4.rsplit(".", 1)[0] + ".7"
        net.run("c", ["ip", "addr", "add", f"{other}/24", "dev", net.dev["c"]])
        syns.append(((other, s, 41005, BARE), tagged_syn(other, s, 41005, BARE, b"<seg003>", key=KEY,
                                                         as_if=(c, 41005))))
    before = rig.server.status()
    client = Client(net)
    try:
        assert rsts_for(client, syns) == {p for p, _ in syns}
        after = rig.server.status()
        assert after["half_open"] == before["half_open"] == 0
        assert after["connections"]["total"] == before["connections"]["total"]
        assert after["steering"]["passed_probe"] >= before["steering"]["passed_probe"] + len(syns)
        assert after["drops"]["bad_tag"] == before["drops"]["bad_tag"]  # never even offered to the endpoint
        # A SYN with a good tag is rsockd's: a SYN-ACK, no RST.  The untagged SYN after it in the
        # same queue is the marker: once its RST is back, the first one had its verdict.
        good: Probe = (c, s, 41010, BARE)
        marker: Probe = (c, s, 41011, BARE)
        synacks: set[Probe] = set()
        seen = rsts_for(client, [(good, tagged_syn(*good, b"", key=KEY)),
                                 (marker, tagged_syn(*marker, b"", key=b"\2" * 16))], want={marker, good},
                        synacks=synacks)
        assert seen == {marker} and synacks == {good}
    finally:
        client.close()
    assert rig.echo_run(5).received == 5


def rsts_for(client: Client, syns: list[tuple[Probe, int | bytes]], want: set[Probe] | None = None,
             timeout: float = 5, synacks: set[Probe] | None = None) -> set[Probe]:
    """Send ``syns`` (whole packets) from the client namespace; the ones the server answered with
    RST, once every one of ``want`` (default: all) has been answered (RST, or SYN-ACK collected in
    ``synacks``)."""
    want = {p for p, _ in syns} if want is None else want
    for _p, pkt in syns:
        assert isinstance(pkt, bytes)
        client.tx.send(pkt)
    got: set[Probe] = set()
    deadline = time.monotonic() + timeout
    while not want <= got | (synacks or set()):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([client.cap], [], [], left)[0], f"no RST for {want - got}"
        try:
            ip, l4 = parse_ip(client.cap.recv(65536))
            if ip.proto != 6:
                continue
            tcp, _ = parse_tcp(l4)
        except PacketError:
            continue
        fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        key = (socket.inet_ntop(fam, ip.dst), socket.inet_ntop(fam, ip.src), tcp.dport, tcp.sport)
        if tcp.flags & RST:
            got.add(key)
        elif tcp.flags & (SYN | ACK) == SYN | ACK and synacks is not None:
            synacks.add(key)
    return got


def test_unsolicited_segment_to_the_client_port_meets_its_kernel(rig: Rig) -> None:
    net = rig.net
    c, s = (net.cli6, net.srv6) if rig.family == 6 else (net.cli4, net.srv4)
    rows = rig.client.status("ports")["connections"]
    lport = rows[0]["local_port"]
    with net.inside("s"):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
    cap.bind((net.dev["s"], 0))
    with net.inside("s"):
        tx = Sender()
    try:
        # From the server's address but no connection of the client's: another port, and the
        # tunnel port of another of its connections.
        for sport in (12345, rows[1]["port"]):
            tx.send(segment(s, c, sport, lport, b"<probe>", ACK))
            assert _wait_rst(cap, (lport, sport)), f"no RST from the client's kernel for {sport} -> {lport}"
    finally:
        tx.close()
        cap.close()
    n = rig.conns_per_client()
    assert rig.client.status()["connections"]["by_state"] == {"established": n}
    assert rig.echo_run(10).received == 10
    assert rig.client.status()["steering"]["passed_probe"] >= 2


def _wait_rst(cap: socket.socket, ports: tuple[int, int], timeout: float = 5) -> bool:
    """Wait for a TCP RST from ``ports[0]`` to ``ports[1]`` on a packet socket."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([cap], [], [], left)[0]:
            break
        try:
            ip, l4 = parse_ip(cap.recv(65536))
            if ip.proto != 6:
                continue
            tcp, _ = parse_tcp(l4)
        except PacketError:
            continue
        if (tcp.sport, tcp.dport) == ports and tcp.flags & RST:
            return True
    return False


def test_stopped_server_leaves_ordinary_ports(rig: Rig) -> None:
    assert rig.server is not None
    assert queues(rig.net)
    assert rig.server.stop() == 0
    assert not queues(rig.net)
    assert "rsockd" not in rig.net.run("s", ["nft", "list", "tables"]).stdout
    with kernel_client(rig, BARE) as s, pytest.raises(ConnectionRefusedError):
        s.connect((rig.server_addr, BARE))
