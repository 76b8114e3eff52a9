"""The packet send path (``send_path = "packet"``) between real daemons: segments leave as
Ethernet frames, the kernel computes their checksums and splits batches into segments."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.integration.rig import LISTEN_PORT, RSOCKD, Rig, Rsockd
from tests.netns import NetnsPair

pytestmark = pytest.mark.root

PACKET = ["--send-path", "packet"]
NO_AF_PACKET = str(Path(__file__).with_name("no_af_packet.py"))


def burst(rig: Rig, count: int, sizes: list[int]) -> int:
    """``count`` datagrams sent at once from one app socket, their sizes cycling through
    ``sizes``; the echoes counted."""
    s = rig.app_socket()
    try:
        for i in range(count):
            s.sendto(i.to_bytes(4, "big") + bytes(sizes[i % len(sizes)] - 4), ("127.0.0.1", LISTEN_PORT))
        s.settimeout(2)
        seen = set()
        try:
            while len(seen) < count:
                seen.add(int.from_bytes(s.recv(65536)[:4], "big"))
        except TimeoutError:
            pass
        return len(seen)
    finally:
        s.close()


@pytest.mark.parametrize("backend, family, mtu", [("xdp", 4, 1500), ("xdp", 6, 1500), ("nft", 4, 1500),
                                                 ("xdp", 4, 9000)])
def test_bursts_cross_in_batches_and_every_segment_checks_out(tmp_path: Path, backend: str, family: int,
                                                              mtu: int) -> None:
    # tx offload off on both veths (the rig's default): the kernel computes the checksums the
    # packet path leaves to it, and the receivers verify them (XDP: the kernel's UDP checksum
    # of the rewritten segment; nft: rsockd's own check).  Jumbo frames: fewer segments fit in
    # one batch (an IP packet's 64 KiB).
    with Rig(tmp_path, backend=backend, family=family, server_args=PACKET, client_args=PACKET, mtu=mtu) as rig:
        server, client = rig.server, rig.client
        assert server is not None
        assert rig.echo_run(20, size=300).received == 20
        for d in (client, server):
            paths = {c["send_path"] for c in d.status("ports")["connections"]}
            assert paths == {"packet"}, (d.name, paths)
        size = client.status()["max_datagram"]
        got = burst(rig, 400, [size])
        # Runs of equal sizes, a shorter one after a run (it may end a batch), small ones that
        # share a record: the batches split where the sizes change.
        mixed = burst(rig, 400, [size, size, size, size - 300, size, size, 700, 700, 40, 40, 40, size])
        cst, sst = client.status(), server.status()
        # Bursts of full-size datagrams leave in batches, both ways (the echoes too).
        for name, st in (("client", cst), ("server", sst)):
            t = st["traffic"]
            assert t["tunnel_tx_batches"] > 0 and t["tunnel_tx_batched"] >= 2 * t["tunnel_tx_batches"], (name, t)
        bad = {k: v for st in (cst, sst) for k, v in st["drops"].items() if v}
        assert bad == {}, bad  # no bad_checksum, no bad_auth, no replay: every segment was whole
        assert not cst["tx_errors"] and not sst["tx_errors"]
        assert got >= 0.9 * 400 and mixed >= 0.9 * 400, (got, mixed)  # the app's UDP may lose a few
        out = client.ctl("status")
        assert "batched sends" in out.stdout, out.stdout


def wait_paths(d: Rsockd, want: str, timeout: float = 10) -> None:
    """Until every connection of ``d`` sends through ``want`` (the path is looked up every second)."""
    end = time.monotonic() + timeout
    while True:
        paths = {c["send_path"] for c in d.status("ports")["connections"]}
        if paths == {want}:
            return
        assert time.monotonic() < end, f"{d.name}: send paths {paths}, not {want}"
        time.sleep(0.05)


def test_a_next_hop_without_a_known_address_goes_raw_until_the_kernel_resolves_it(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="xdp", server_args=PACKET, client_args=PACKET) as rig:
        client, server = rig.client, rig.server
        assert server is not None
        wait_paths(client, "packet")
        # The neighbour entry goes: the next look-up finds no MAC address for the server, and
        # the connections fall back to raw sockets...
        rig.net.run("c", ["ip", "neigh", "del", rig.net.srv4, "dev", rig.net.dev["c"]])
        wait_paths(client, "raw")
        # ... whose sends make the kernel resolve it (ARP), and the next look-up finds it again.
        assert rig.echo_run(5).received == 5
        wait_paths(client, "packet")
        assert rig.echo_run(5).received == 5
        # Both changes of path fell between two sends: no segment left with a checksum meant
        # for the other path.
        bad = {k: v for d in (client, server) for k, v in d.status()["drops"].items() if v}
        assert bad == {}, bad


def test_check_says_whether_the_route_can_use_the_packet_path() -> None:
    with NetnsPair() as net:
        argv = [RSOCKD, "--check", "--role", "client", "-t", net.srv4, "--send-path", "packet"]
        mac = json.loads(net.run("s", ["ip", "-j", "link", "show", net.dev["s"]]).stdout)[0]["address"]
        ok = net.run("c", argv, check=False, timeout=60)
        assert f'ok    send_path = "packet": to {net.srv4} via {net.dev["c"]}, next hop {mac}' in ok.stdout, ok.stdout
        net.run("c", ["ip", "neigh", "del", net.srv4, "dev", net.dev["c"]])
        later = net.run("c", argv, check=False, timeout=60)
        assert f'warn  send_path = "packet": no Ethernet route with a known next hop to {net.srv4} yet' in later.stdout
        assert later.returncode == ok.returncode == 0, later.stdout


def test_without_packet_sockets_the_daemon_sends_raw_and_says_so_once(tmp_path: Path) -> None:
    # As under systemd with RestrictAddressFamilies= lacking AF_PACKET: a real seccomp filter.
    with Rig(tmp_path, backend="xdp", client_args=PACKET) as rig:
        first = rig.clients.pop()
        assert first.stop() == 0
        first.close()
        client = rig.add_client(name="sandboxed", prefix=[sys.executable, NO_AF_PACKET])
        rig.wait_up(client)
        assert rig.echo_run(10).received == 10
        # Three look-ups of the path later (one a second): still raw, and said once.
        until = client.status()["uptime"] + 3.5
        while client.status()["uptime"] < until:
            time.sleep(0.1)
        assert {c["send_path"] for c in client.status("ports")["connections"]} == {"raw"}
        assert rig.echo_run(10).received == 10
        log = client.log()
        want = (f"packet send path: cannot open a packet socket on {rig.net.dev['c']}: Address family not "
                "supported by protocol; sending through raw sockets meanwhile")
        assert log.count(want) == 1, log[-3000:]
        assert "Traceback" not in log
        assert client.status()["tx_errors"] == {}


def test_a_server_reached_through_a_gateway(tmp_path: Path) -> None:
    # c2 reaches the server's address on the other link through a gateway (the server host):
    # frames go to the gateway's MAC address, not the destination's.
    with Rig(tmp_path, backend="xdp", hosts=2, server_args=PACKET, client_args=PACKET) as rig:
        net = rig.net
        second = rig.clients.pop()
        assert second.stop() == 0
        second.close()
        gateway = rig.server_for("c2")  # the server host's address on c2's link
        net.run("c2", ["ip", "route", "add", net.srv4, "via", gateway])
        client = Rsockd(net, "c2", ["--role", "client", "-t", net.srv4, "-l", f"127.0.0.1:{LISTEN_PORT}",
                                    *rig.common(), *PACKET], tmp_path, "via-gateway").start()
        rig.clients.append(client)
        rig.wait_up(client)
        assert rig.echo_run(5, host="c2").received == 5
        wait_paths(client, "packet")
        assert rig.echo_run(5, host="c2").received == 5
        assert {c["peer"].rsplit(":", 1)[0] for c in client.status("ports")["connections"]} == {net.srv4}


def _paths_become(d: Rsockd, want: str, timeout: float = 12.0) -> set[str]:
    """Poll ``d``'s connections' send paths until they all are ``want`` (auto looks every 5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        paths = {c["send_path"] for c in d.status("ports")["connections"]}
        if paths == {want} or time.monotonic() > deadline:
            return paths
        time.sleep(0.2)


def test_auto_sends_packets_until_the_host_filters_its_egress(tmp_path: Path) -> None:
    # The default, send_path = "auto": the packet path on a host with nothing on its output and
    # postrouting hooks; raw sockets as soon as a firewall chain appears (the frames would skip
    # it); packets again when it goes.  Our own table (the notrack rules) does not count.
    with Rig(tmp_path, backend="xdp") as rig:
        client = rig.client
        assert _paths_become(client, "packet") == {"packet"}
        assert rig.echo_run(20).received == 20
        assert "send path: packet (auto: nothing on this host's egress for it to skip)" in client.log()
        fw = ["nft", "add table inet hostfw; add chain inet hostfw out { type filter hook output priority 0; }; "
              "add rule inet hostfw out counter"]
        rig.net.run("c", fw)
        try:
            assert _paths_become(client, "raw") == {"raw"}
            assert rig.echo_run(20).received == 20
            counted = json.loads(rig.net.run("c", ["nft", "-j", "list", "chain", "inet", "hostfw", "out"]).stdout)
            rule = next(i["rule"] for i in counted["nftables"] if "rule" in i)
            assert rule["expr"][0]["counter"]["packets"] >= 20  # the firewall sees the tunnel's segments now
            assert ("send path: raw sockets (auto: the packet path would skip nftables chain inet hostfw out on "
                    "the output hook)") in client.log()
        finally:
            rig.net.run("c", ["nft", "delete table inet hostfw"])
        assert _paths_become(client, "packet") == {"packet"}
        assert rig.echo_run(20).received == 20
        assert "Traceback" not in client.log()


@pytest.mark.parametrize("family", [4, 6])
def test_a_capture_takes_segments_whose_checksum_is_left_to_offload(tmp_path: Path, family: int) -> None:
    # With tx checksum offload on the veth, the packet path's segments cross it with their
    # checksum still to be filled in (CHECKSUM_PARTIAL); the nft backend's packet capture sees
    # them so (TP_STATUS_CSUMNOTREADY) and fills it in, where checking the field as it is would
    # drop every one as bad_checksum.
    with Rig(tmp_path, backend="nft", family=family, offload=True) as rig:
        assert {c["send_path"] for c in rig.client.status("ports")["connections"]} == {"packet"}
        assert rig.echo_run(50).received == 50
        for d in (rig.server, rig.client):
            assert d is not None
            assert d.status()["drops"]["bad_checksum"] == 0, d.name
