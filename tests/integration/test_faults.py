"""Restarts, resets, several clients, idle expiry, crashes: the tunnel recovers by itself."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsockd.core.packet import ACK, RST, TcpHeader, ipv4_header, pack_address, pseudo_sum
from rsockd.dataplane.rawsock import SO_MARK
from rsockd.service.config import DEFAULT_MARK
from tests.integration.rig import Rig, attached

pytestmark = pytest.mark.root


def test_server_restart_mid_traffic_client_reconnects_and_flows_resume(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="xdp") as rig:
        app = rig.app_socket()
        assert rig.echo_run(20, sock=app).received == 20
        flows_before = rig.client.status()["flows"]
        mark = rig.client.notify.mark()
        t0 = time.monotonic()
        rig.restart_server()
        rig.client.wait_status(r" [0-3]/4 connections up", 10, since=mark)  # it noticed
        rig.server.wait_ready()  # type: ignore[union-attr]
        rig.client.wait_status(r" 4/4 connections up", 30, since=mark)
        recovered = time.monotonic() - t0
        res = rig.echo_run(20, sock=app)  # the same application socket: the same flow id
        assert res.received == 20
        assert rig.client.status()["flows"] == flows_before
        conns = rig.client.status("ports")["connections"]
        assert all(c["reconnects"] >= 1 for c in conns)
        assert recovered < 20, recovered
        print(f"recovered {recovered:.1f} s after the restart began")


def inject_rst(rig: Rig, conn: dict[str, object]) -> None:
    """An RST from the server's address and port with exactly the client's expected sequence number.

    Sent from the server's namespace with the daemon's mark, as if from the path: unmarked, the
    server's own egress guard would drop it (that is its job).
    """
    net = rig.net
    with net.inside("s"):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw.setsockopt(socket.SOL_SOCKET, SO_MARK, DEFAULT_MARK)
    src, dst = pack_address(net.srv4), pack_address(net.cli4)
    sport = int(str(conn["peer"]).rsplit(":", 1)[1])
    rst = TcpHeader(sport, int(conn["local_port"]), int(conn["ack"]), 0, RST | ACK, 0)  # type: ignore[call-overload]
    seg = rst.pack(b"", pseudo_sum(src, dst))
    raw.sendto(ipv4_header(src, dst, len(seg)) + seg, (net.cli4, 0))
    raw.close()


def test_injected_rst_resets_one_connection_only(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="xdp") as rig:
        app = rig.app_socket()
        assert rig.echo_run(10, sock=app).received == 10
        before = rig.client.status("ports")["connections"]
        victim = before[1]
        mark = rig.client.notify.mark()
        inject_rst(rig, victim)
        rig.client.wait_status(r" 3/4 connections up", 10, since=mark)
        rig.client.wait_status(r" 4/4 connections up", 10, since=mark)
        conns = rig.client.status("ports")["connections"]
        assert [c["reconnects"] - b["reconnects"] for c, b in zip(conns, before, strict=True)] == [0, 1, 0, 0]
        assert rig.echo_run(20, sock=app).received == 20
        assert "reset" in rig.client.log()


def test_blind_rst_with_a_wrong_sequence_is_ignored(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="nft") as rig:
        conn = rig.client.status("ports")["connections"][0]
        inject_rst(rig, {**conn, "ack": (int(conn["ack"]) + 5_000_000) & 0xFFFFFFFF})
        assert rig.echo_run(5).received == 5
        st = rig.client.status()
        assert st["drops"]["rst_ignored"] >= 1 and st["connections"]["by_state"] == {"established": 4}


def test_two_client_hosts_at_once(tmp_path: Path) -> None:
    """Two client hosts on two links of one server (the server attaches to both interfaces)."""
    with Rig(tmp_path, backend="xdp", hosts=2) as rig:
        a = rig.echo_run(30, host="c")
        b = rig.echo_run(30, host="c2")
        assert (a.received, b.received) == (30, 30)
        assert {d["interface"] for d in rig.server.status()["backend"]["interfaces"]} == {  # type: ignore[union-attr]
            rig.net.dev["s"], rig.net.dev["s2"]}
        st = rig.server.status()  # type: ignore[union-attr]
        assert st["sessions"] == 2 and st["connections"]["by_state"] == {"established": 8}


def test_idle_flows_expire_on_both_sides(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="nft", server_args=["--duration", "2"], client_args=["--duration", "2"]) as rig:
        socks = [rig.app_socket() for _ in range(3)]
        for s in socks:
            assert rig.echo_run(2, sock=s).received == 2
        assert rig.client.status()["flows"] == 3 and rig.server.status()["flows"] == 3  # type: ignore[union-attr]
        t0 = time.monotonic()
        smark, cmark = rig.server.notify.mark(), rig.client.notify.mark()  # type: ignore[union-attr]
        rig.server.wait_status(r", 0 flows", 10, since=smark)  # type: ignore[union-attr]
        rig.client.wait_status(r", 0 flows", 10, since=cmark)
        assert 1.5 < time.monotonic() - t0 < 6
        assert rig.echo_run(2, sock=socks[0]).received == 2  # a new flow for the same address


@pytest.mark.parametrize("backend", ["xdp", "nft"])
def test_sigkill_leaves_state_that_the_next_start_removes(tmp_path: Path, backend: str) -> None:
    with Rig(tmp_path, backend=backend) as rig:
        net = rig.net
        assert attached(net, "s") == {"xdp": backend == "xdp", "tc": backend == "xdp", "nft": True}
        server = rig.server
        assert server is not None and server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        assert attached(net, "s") == {"xdp": backend == "xdp", "tc": backend == "xdp", "nft": True}
        # The control socket of the dead daemon is still on disk; the next start replaces it.
        assert Path(server.control).exists()
        new = rig.replace_crashed_server()
        assert "removed stale state" in new.log()
        assert rig.echo_run(10).received == 10
        assert new.stop() == 0
        assert attached(net, "s") == {"xdp": False, "tc": False, "nft": False}
        assert not Path(new.control).exists()
        rig.server = None


def test_normal_stop_leaves_nothing_attached(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="xdp") as rig:
        assert attached(rig.net, "c") == {"xdp": True, "tc": True, "nft": True}
        for d in [*rig.clients, rig.server]:
            assert d is not None and d.stop() == 0
        for side in "cs":
            assert attached(rig.net, side) == {"xdp": False, "tc": False, "nft": False}
            assert rig.net.run(side, ["tc", "qdisc", "show", "dev", rig.net.dev[side]]).stdout.count("clsact") == 0
        assert not list((tmp_path / "run").glob("*/control.sock"))
        bpffs = Path("/sys/fs/bpf/rsockd")
        assert not any(p.name.startswith(rig.net.tag) for p in bpffs.iterdir()) if bpffs.exists() else True


PINS_SCRIPT = """
import os
from rsockd.steer import bpfsys
os.system("mount --make-rprivate /")
bpfsys.ensure_bpffs() or os.system("mount -t bpf bpf /sys/fs/bpf")  # a fresh, private bpffs either way
for inst in ("a", "b"):
    os.makedirs(bpfsys.pin_dir(inst))
root = os.path.dirname(bpfsys.pin_dir("a"))
assert bpfsys.remove_pins(bpfsys.pin_dir("a"))
print(sorted(os.listdir(root)))
assert bpfsys.remove_pins(bpfsys.pin_dir("b"))
print(os.path.exists(root))
"""


def test_the_last_instance_to_go_removes_the_pin_root(tmp_path: Path) -> None:
    """Pins live in /sys/fs/bpf/rsockd/<instance>/: the root goes with the last instance
    (run in a private mount namespace with a bpffs of its own, so the host's is untouched)."""
    r = subprocess.run(["unshare", "-m", sys.executable, "-c", PINS_SCRIPT], capture_output=True, text=True,
                       timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["['b']", "False"]
