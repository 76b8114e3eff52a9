"""Port sharing with real daemons: a tunnel port behaves like an ordinary port of the host.

A real kernel TCP service on a tunnel port serves kernel clients while the tunnel carries
traffic on the same port; a port with nothing bound refuses a connect() with RST; a SYN
without the key's tag (a probe, a replay from other ports or addresses, an old one) gets the
kernel's RST and nothing from rsockd; the client's local ports answer strangers as the kernel
does and its connections stay up.  docs/security.md, "What an active prober sees".

Both backends, IPv4 and IPv6; after a clean stop the ports are plain ports of the host.
"""

from __future__ import annotations

import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rsockd.core import syntag
from rsockd.core.framing import Keyring
from rsockd.core.packet import ACK, SYN, TcpHeader, build_options, pack_address, pseudo_sum
from tests.integration.rig import Rig, attached, nstat
from tests.netns import NetnsPair

pytestmark = [pytest.mark.root, pytest.mark.slow]

KEY = "port-sharing-test"
TAG_KEY = Keyring.from_secret(KEY).syn_key
SHARED, BARE = 10001, 10002  # a tunnel port with a service on its TCP side, and one with nothing
RST = 0x04
WAIT = 5.0

CASES = [pytest.param((backend, family), id=f"{backend}-v{family}") for backend in ("xdp", "nft") for family in (4, 6)]


def wait_for(what: str, pred: Callable[[], bool], timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


class TcpEcho:
    """A kernel TCP echo service in a namespace (the "nginx on 443" of these tests)."""

    def __init__(self, net: NetnsPair, side: str, family: int, port: int) -> None:
        fam = socket.AF_INET6 if family == 6 else socket.AF_INET
        with net.inside(side):
            self.sock = socket.socket(fam, socket.SOCK_STREAM)
            if fam == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))  # rsockd holds no TCP socket here
            self.sock.listen(64)
        self.served = 0
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop:
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(WAIT)
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


def kernel_client(net: NetnsPair, family: int) -> socket.socket:
    """A kernel TCP socket of the client namespace (not connected yet)."""
    with net.inside("c"):
        s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    return s


class Wire:
    """Raw TCP segments from one namespace, and the TCP segments that arrive on its veth."""

    def __init__(self, net: NetnsPair, side: str) -> None:
        self.net, self.side = net, side
        self.raw: dict[str, socket.socket] = {}
        with net.inside(side):
            self.cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
            self.cap.bind((net.dev[side], 0x0003))

    def send(self, src: str, dst: str, seg: bytes) -> None:
        s = self.raw.get(src)
        if s is None:
            fam = socket.AF_INET6 if ":" in src else socket.AF_INET
            with self.net.inside(self.side):
                s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_TCP)  # the kernel adds the IP header
                s.bind((src, 0))
            self.raw[src] = s
        s.sendto(seg, (dst, 0))

    def wait(self, want: Callable[[int, int, int], bool], timeout: float = WAIT) -> list[tuple[int, int, int]]:
        """Incoming TCP segments as (sport, dport, flags), up to the first ``want`` accepts."""
        seen: list[tuple[int, int, int]] = []
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.cap], [], [], left)[0]:
                raise AssertionError(f"no matching segment within {timeout} s; saw {seen}")
            pkt, addr = self.cap.recvfrom(65535)
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            if pkt[0] >> 4 == 4 and pkt[9] == 6:
                l4 = pkt[(pkt[0] & 15) * 4:]
            elif pkt[0] >> 4 == 6 and pkt[6] == 6:
                l4 = pkt[40:]
            else:
                continue
            got = (int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big"), l4[13])
            seen.append(got)
            if want(*got):
                return seen

    def close(self) -> None:
        for s in (self.cap, *self.raw.values()):
            s.close()


def syn(src: str, dst: str, sport: int, dport: int, isn: int, tsval: int | None) -> bytes:
    """A SYN with Linux's options; ``tsval`` None: without the timestamp option."""
    opts = build_options(mss=1400, sack_permitted=True, timestamps=None if tsval is None else (tsval, 0), wscale=7)
    return TcpHeader(sport, dport, isn, 0, SYN, 64240, opts).pack(b"", psum=pseudo_sum(pack_address(src),
                                                                                        pack_address(dst)))


def tag(slot: int = 0, key: bytes = TAG_KEY) -> tuple[int, int]:
    """A random ISN and the TSval that is its tag under ``key``, for the current slot plus ``slot``."""
    isn = random.getrandbits(32)
    return isn, syntag.syn_tag(key, isn, (syntag.slot_of(time.time()) + slot) & syntag.SLOT_MASK)


@pytest.fixture(params=CASES)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    backend, family = request.param
    with Rig(tmp_path, backend=backend, family=family, server_args=["--key", KEY],
             client_args=["--key", KEY]) as r:
        yield r
        for d in (r.server, *r.clients):
            assert d is not None
            bad = [line for line in d.log().splitlines() if line.startswith("ERROR") or "Traceback" in line]
            assert not bad, bad


def _addrs(rig: Rig) -> tuple[str, str]:
    net = rig.net
    return (net.cli6, net.srv6) if rig.family == 6 else (net.cli4, net.srv4)


def test_a_kernel_service_shares_a_tunnel_port(rig: Rig) -> None:
    """A TCP echo bound on the server's tunnel port SHARED serves kernel clients while the tunnel
    carries datagrams on the same port; the guard drops none of the service's segments."""
    _cli, srv = _addrs(rig)
    service = TcpEcho(rig.net, "s", rig.family, SHARED)
    results: list[bytes] = []
    errors: list[BaseException] = []

    def kernel_clients() -> None:
        try:
            for i in range(20):
                with kernel_client(rig.net, rig.family) as s:
                    s.connect((srv, SHARED))
                    msg = f"hello {i} ".encode() * 50
                    s.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        chunk = s.recv(65536)
                        assert chunk, "the service closed early"
                        got += chunk
                    results.append(got)
        except BaseException as e:
            errors.append(e)

    try:
        before = rig.server.status()["steering"]  # type: ignore[union-attr]
        t = threading.Thread(target=kernel_clients)
        t.start()
        res = rig.echo_run(200, size=300)
        t.join(30)
        assert not errors, errors
        assert len(results) == 20 and all(r.startswith(b"hello") for r in results)
        assert res.received == 200, rig.client.log()[-2000:]
        wait_for("the service saw every client off", lambda: service.served == 20)
        st = rig.server.status()  # type: ignore[union-attr]
        after = st["steering"]
        # each kernel connection's segments went to the kernel (3 handshake/FIN + data at least)
        assert after["passed_probe"] - before["passed_probe"] >= 20 * 4, (before, after)
        assert after["guard_dropped"] == 0
        assert st["connections"]["by_state"] == {"established": rig.conns_per_client()}
        assert rig.client.status()["connections"]["by_state"] == {"established": rig.conns_per_client()}
        out = rig.server.ctl("status")  # type: ignore[union-attr]
        assert "probes to the kernel" in out.stdout and "handed to the kernel" in out.stdout, out.stdout
    finally:
        service.close()


def test_a_bare_tunnel_port_refuses_a_connect(rig: Rig) -> None:
    _cli, srv = _addrs(rig)
    rsts = nstat(rig.net, "s", "TcpOutRsts")["TcpOutRsts"]
    with kernel_client(rig.net, rig.family) as s, pytest.raises(ConnectionRefusedError):
        s.connect((srv, BARE))
    assert nstat(rig.net, "s", "TcpOutRsts")["TcpOutRsts"] == rsts + 1
    assert rig.echo_run(20).received == 20  # the tunnel on the same port is up throughout


def test_untagged_replayed_and_old_syns_get_the_kernels_rst(rig: Rig) -> None:
    """Every SYN rsockd must not answer: the kernel's RST (TcpOutRsts grows by one each) and
    no SYN-ACK; rsockd's connections do not change; passed_probe counts them."""
    net = rig.net
    cli, srv = _addrs(rig)
    other = (net.cli6.rsplit(":", 1)[0] + ":77") if rig.family == 6 else net.cli4.rsplit(".", 1)[0] + ".77"
    net.run("c", ["ip", "addr", "add", f"{other}/{64 if rig.family == 6 else 24}", "dev", net.dev["c"]])
    server = rig.server
    assert server is not None
    wire = Wire(net, "c")
    try:
        st0 = server.status()
        rsts = nstat(net, "s", "TcpOutRsts")["TcpOutRsts"]
        # the control: a tagged SYN is rsockd's (SYN-ACK), not the kernel's; its tag is 45004's now
        good = tag()
        wire.send(cli, srv, syn(cli, srv, 45004, SHARED, *good))
        seen = wire.wait(lambda sp, dp, fl: sp == SHARED and dp == 45004)
        assert seen[-1][2] & (SYN | ACK) == SYN | ACK, seen
        probes = [
            (cli, 45000, (12345, None)),  # no timestamp, so no tag
            (cli, 45005, (12345, 999)),  # a timestamp that is not the tag
            (cli, 45001, good),  # 45004's SYN, replayed from another port
            (other, 45004, good),  # ... from another address
            (cli, 45002, tag(slot=-3)),  # 3 slots old
            (cli, 45003, tag(key=Keyring.from_secret(None).syn_key)),  # the default key
        ]
        for src, sport, (isn, ts) in probes:
            wire.send(src, srv, syn(src, srv, sport, SHARED, isn, ts))
            seen = wire.wait(lambda sp, dp, fl, sport=sport: sp == SHARED and dp == sport)
            flags = seen[-1][2]
            assert flags & RST and not flags & SYN, (src, sport, seen)
        assert nstat(net, "s", "TcpOutRsts")["TcpOutRsts"] == rsts + len(probes)
        st = server.status()
        assert st["steering"]["passed_probe"] >= st0["steering"]["passed_probe"] + len(probes)
        assert st["steering"]["guard_dropped"] == 0
        assert st["drops"].get("bad_tag", 0) == st0["drops"].get("bad_tag", 0)  # none reached rsockd
        n = rig.conns_per_client()
        assert st["connections"]["by_state"].get("established") == n
        assert st["sessions"] == st0["sessions"]
        assert rig.echo_run(10).received == 10
    finally:
        wire.close()


def test_the_clients_ports_answer_strangers_like_the_kernel(rig: Rig) -> None:
    """An unsolicited segment to the client's local tunnel port (from the server's address but
    another port, or from a stranger's port) is answered by the client's kernel with RST; the
    client's connections stay up."""
    net = rig.net
    cli, srv = _addrs(rig)
    client = rig.client
    local = client.status()["local_ports"]
    assert local, client.status()
    wire = Wire(net, "s")
    try:
        before = client.status()["steering"]
        rsts = nstat(net, "c", "TcpOutRsts")["TcpOutRsts"]
        psum = pseudo_sum(pack_address(srv), pack_address(cli))
        # from the server's address and tunnel port BARE to the local port paired with SHARED
        # (ports[0]), which is not one of the client's connections; then a stranger's SYN
        ack = TcpHeader(BARE, local[0], 1, 1, ACK, 512).pack(b"x" * 10, psum=psum)
        wire.send(srv, cli, ack)
        wire.wait(lambda sp, dp, fl: sp == local[0] and dp == BARE and bool(fl & RST))
        wire.send(srv, cli, TcpHeader(47000, local[1], 7, 0, SYN, 64240).pack(b"", psum=psum))
        wire.wait(lambda sp, dp, fl: sp == local[1] and dp == 47000 and bool(fl & RST))
        assert nstat(net, "c", "TcpOutRsts")["TcpOutRsts"] == rsts + 2
        after = client.status()["steering"]
        # xdp's client rule matches segments from the server's tunnel ports (the first one); nft's
        # every segment to the client's local ports (both)
        assert after["passed_probe"] == before["passed_probe"] + (1 if rig.backend == "xdp" else 2)
        assert after["guard_dropped"] == 0
        n = rig.conns_per_client()
        assert client.status()["connections"]["by_state"] == {"established": n}
        assert rig.echo_run(20).received == 20
    finally:
        wire.close()


def test_a_stopped_server_leaves_ordinary_ports(rig: Rig) -> None:
    """Nothing of rsockd is left in the kernel's way: no program, no table, no queue."""
    server = rig.server
    assert server is not None
    assert server.stop() == 0
    assert not any(attached(rig.net, "s").values())
    assert "rsockd" not in rig.net.run("s", ["nft", "list", "tables"]).stdout
    assert not rig.net.run("s", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.strip()
    _, srv = _addrs(rig)
    with kernel_client(rig.net, rig.family) as s, pytest.raises(ConnectionRefusedError):
        s.connect((srv, BARE))


def test_a_connection_that_ends_gives_its_tuple_back_to_the_kernel(rig: Rig) -> None:
    """When rsockd's connection ends (here the client leaves cleanly), the server's steering
    forgets its 4-tuple: a late segment of it meets the kernel's RST (TcpOutRsts counts only
    the kernel's), not rsockd's, and a kernel connection may use the tuple again."""
    net = rig.net
    cli, srv = _addrs(rig)
    server, client = rig.server, rig.client
    assert server is not None
    row = next(c for c in client.status("ports")["connections"] if c["port"] == SHARED)
    lport = row["local_port"]
    assert client.stop() == 0
    wait_for("the server's connections to end", lambda: server.status()["connections"]["total"] == 0, 10)
    wire = Wire(net, "c")
    try:
        rsts = nstat(net, "s", "TcpOutRsts")["TcpOutRsts"]
        late = TcpHeader(lport, SHARED, 1, 1, ACK, 512).pack(b"late", psum=pseudo_sum(pack_address(cli),
                                                                                   pack_address(srv)))
        wire.send(cli, srv, late)
        wire.wait(lambda sp, dp, fl: sp == SHARED and dp == lport and bool(fl & RST))
        assert nstat(net, "s", "TcpOutRsts")["TcpOutRsts"] == rsts + 1
        assert server.status()["steering"]["guard_dropped"] == 0
    finally:
        wire.close()
