"""Server workers (``workers = N``, rsockd/service/worker.py): each process serves every N-th tunnel
port, the daemon reports them all, and a worker's death takes the service down cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import jsonschema
import pytest

from tests.integration.rig import LISTEN_PORT, Rig, Rsockd, attached
from tests.integration.test_service import SCHEMA
from tests.netns import NetnsPair

pytestmark = pytest.mark.root


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_gone(pid: int, timeout: float = 10) -> bool:
    """Whether ``pid`` is gone (or a zombie of a parent that is gone too) within ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("backend", ["xdp", "nft"])
def test_workers_share_the_ports_and_carry_every_flow(tmp_path: Path, backend: str) -> None:
    with Rig(tmp_path, backend=backend, server_args=["--workers", "2"], hosts=2) as rig:
        server = rig.server
        assert server is not None and server.proc is not None and rig.echo is not None
        st = server.status()
        assert st["workers"] == 2
        rows = st["by_worker"]
        assert [r["ports"] for r in rows] == [[10001, 10003], [10002, 10004]]
        assert rows[0]["pid"] == server.proc.pid or parent_of(rows[0]["pid"]) == server.proc.pid
        child = rows[1]["pid"]
        assert child != rows[0]["pid"] and parent_of(child) == rows[0]["pid"]
        # Two clients, one connection per port each: every worker holds its two ports' four.
        assert [r["connections"] for r in rows] == [4, 4]
        assert st["connections"]["by_state"] == {"established": 8}
        assert st["sessions"] == 4  # each client has a session in each worker
        conns = server.status("ports")["connections"]
        assert len(conns) == 8
        assert all(c["port"] in rows[c["worker"]]["ports"] for c in conns)
        # Many flows from both clients: they spread over the four connections, so both workers
        # carry some; every datagram comes back.
        socks = {host: [rig.app_socket(host=host) for _ in range(12)] for host in ("c", "c2")}
        for host, ss in socks.items():
            for s in ss:
                assert rig.echo_run(3, sock=s, host=host).received == 3
        st = server.status()
        assert st["flows"] == 24 and rig.echo.received == 72
        assert all(r["flows"] > 0 for r in st["by_worker"]), st["by_worker"]
        assert st["traffic"]["to_app_packets"] == 72  # summed over the workers
        # Nothing dropped by any worker (segments of attempts refused before the server was
        # ready may still arrive late: those count as no_connection / rst_ignored).
        assert {k: v for k, v in st["drops"].items() if v and k not in ("no_connection", "rst_ignored")} == {}
        assert "2 workers" in server.notify.wait(lambda m: "workers" in m.get("STATUS", ""), 5)["STATUS"]
        out = server.ctl("status")
        assert out.returncode == 0 and "workers: 2" in out.stdout, out
        for cmd in ("status", "ports"):
            j = server.ctl("--json", cmd)
            assert j.returncode == 0
            jsonschema.validate(json.loads(j.stdout), SCHEMA)
        for ss in socks.values():
            for s in ss:
                s.close()
        # systemd stops a service by signalling its whole cgroup: that is no worker failure.
        os.kill(child, signal.SIGTERM)
        assert server.stop() == 0, server.log()[-2000:]
        assert "ERROR" not in server.log()
        assert wait_gone(child, 5), "the worker outlived the daemon"
        assert attached(rig.net) == {"xdp": False, "tc": False, "nft": False}
        assert not Path(server.control).exists()


def test_a_dead_worker_stops_the_daemon_and_leaves_nothing_attached(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="xdp", server_args=["--workers", "2"]) as rig:
        server = rig.server
        assert server is not None and server.proc is not None
        child = server.status()["by_worker"][1]["pid"]
        assert attached(rig.net) == {"xdp": True, "tc": True, "nft": True}  # nft: the notrack table
        os.kill(child, signal.SIGKILL)
        assert server.proc.wait(10) == 1
        log = server.log()
        assert f"worker 1 (pid {child}, ports 10002,10004) exited with status -9; stopping" in log, log[-2000:]
        assert "Traceback" not in log
        assert attached(rig.net) == {"xdp": False, "tc": False, "nft": False}
        assert not Path(server.control).exists()
        server.close()
        rig.server = None  # it exited 1 on purpose


def test_workers_die_with_a_killed_daemon_and_the_next_start_serves_again(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="xdp", server_args=["--workers", "2"]) as rig:
        server = rig.server
        assert server is not None and server.proc is not None
        child = server.status()["by_worker"][1]["pid"]
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        assert wait_gone(child), "the worker outlived its SIGKILLed daemon"
        new = rig.replace_crashed_server()
        assert "removed stale state" in new.log()
        assert rig.echo_run(10).received == 10
        assert [r["connections"] for r in new.status()["by_worker"]] == [2, 2]


def test_reload_reaches_the_workers_and_a_rebuild_restarts_them(tmp_path: Path) -> None:
    sconf = tmp_path / "s.toml"
    sconf.write_text('key = "first"\nports = "10001-10004"\nworkers = 2\n')
    with Rig(tmp_path, backend="xdp", server_args=["-f", str(sconf)], cli_ports=False,
             client_args=["--key", "first", "--ports", "10001-10004"]) as rig:
        server = rig.server
        assert server is not None and server.proc is not None
        old_child = server.status()["by_worker"][1]["pid"]

        def reload(text: str) -> None:
            sconf.write_text(text)
            mark = server.notify.mark()
            assert server.proc is not None
            server.proc.send_signal(signal.SIGHUP)
            server.notify.wait(lambda m: m.get("READY") == "1", 30, "READY", since=mark)

        # A live key: established connections keep theirs; a client with the new key gets in
        # on every port, so worker 1 has the new key too.
        reload('key = "second"\nports = "10001-10004"\nworkers = 2\n')
        assert "reload: applied key" in server.log()
        assert rig.echo_run(5).received == 5
        assert server.status()["by_worker"][1]["pid"] == old_child
        first = rig.client
        assert first.stop() == 0
        first.close()
        rig.clients.clear()
        rig.client_args = ["--key", "second", "--ports", "10001-10004"]
        second = rig.add_client(name="client2")
        rig.wait_up(second)
        assert [r["connections"] for r in server.status()["by_worker"]] == [2, 2]
        assert rig.echo_run(5).received == 5

        # Ports and workers change: the workers are replaced, one port each.
        cmark = second.notify.mark()
        reload('key = "second"\nports = "10001-10003"\nworkers = 3\n')
        rows = server.status()["by_worker"]
        assert [r["ports"] for r in rows] == [[10001], [10002], [10003]]
        assert wait_gone(old_child, 5)
        assert old_child not in [r["pid"] for r in rows]
        second.wait_status(r" 0/4 connections up", 30, since=cmark)  # the rebuild closed them all
        cmark = second.notify.mark()
        second.wait_status(r" 3/4 connections up", 30, since=cmark)  # the client still asks for 10004
        assert [r["connections"] for r in server.status()["by_worker"]] == [1, 1, 1]
        assert rig.echo_run(5).received == 5


def test_a_worker_that_cannot_bind_fails_the_start_cleanly(tmp_path: Path) -> None:
    with NetnsPair() as net:
        with net.inside("s"):
            taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            taken.bind(("0.0.0.0", 10004))  # worker 1's port
        d = Rsockd(net, "s", ["--role", "server", "-t", "127.0.0.1:9", "--dev", net.dev["s"], "--ports", "10001-10004",
                              "--workers", "2", "--backend", "xdp"], tmp_path, "server").start()
        try:
            assert d.proc is not None and d.proc.wait(30) != 0
            log = d.log()
            assert "worker 1: server: port 10004/udp is already in use" in log, log
            assert "Traceback" not in log
            assert attached(net) == {"xdp": False, "tc": False, "nft": False}
            assert not Path(d.control).exists()
        finally:
            taken.close()
            d.close()


def test_a_worker_reports_what_its_own_capture_queue_lost(tmp_path: Path) -> None:
    """nft: each worker receives through its own packet sockets.  When a worker falls behind and
    its socket's queue overflows, the kernel's drop count reaches the daemon's status."""
    # Jumbo frames: a few thousand segments fill the queue (64 MB of kernel memory) in well under
    # the REQUEST_TIMEOUT a stopped worker has before the daemon gives up on it.
    with Rig(tmp_path, backend="nft", server_args=["--workers", "2"], mtu=9000) as rig:
        server, client = rig.server, rig.client
        assert server is not None
        st = server.status()
        assert st["steering"]["receiver_dropped"] == 0
        child = st["by_worker"][1]["pid"]
        # An application socket whose flow worker 1 serves.
        sock = None
        for _ in range(24):
            s = rig.app_socket()
            before = server.status()["by_worker"][1]["flows"]
            assert rig.echo_run(1, sock=s).received == 1
            if server.status()["by_worker"][1]["flows"] > before:
                sock = s
                break
            s.close()
        assert sock is not None, "no flow of 24 landed on worker 1"
        payload = bytes(client.status()["max_datagram"])
        sock.setblocking(False)

        def sent() -> int:
            return int(client.status()["traffic"]["tunnel_tx_packets"])

        start = sent()
        os.kill(child, signal.SIGSTOP)
        try:
            # ~4,000 jumbo segments fill the queue; push three times that through the client.
            t0 = time.monotonic()
            while sent() - start < 12_000 and time.monotonic() - t0 < 3.0:
                for _ in range(100):
                    try:
                        sock.sendto(payload, ("127.0.0.1", LISTEN_PORT))
                    except BlockingIOError:
                        break
            pushed = sent() - start
        finally:
            os.kill(child, signal.SIGCONT)
        sock.close()
        assert pushed >= 12_000, f"the client carried only {pushed} segments in 3 s"
        st = server.status()
        lost = st["steering"]["receiver_dropped"]
        print(f"pushed {pushed} segments into the stopped worker's port; its queue lost {lost}")
        assert 0 < lost < pushed, (lost, pushed)
        assert server.status()["steering"]["receiver_dropped"] >= lost  # kept, not reset by reading
        assert rig.echo_run(3).received == 3  # and the worker serves again
        assert server.proc is not None and server.proc.poll() is None
