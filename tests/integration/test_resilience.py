"""Faults of the network and the processes around the tunnel.  Each test says what the user sees
and bounds the time until traffic resumes by itself."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from tests.integration.rig import ECHO_PORT, EchoServer, Rig, Rsockd, attached
from tests.netns import NetnsPair

pytestmark = [pytest.mark.root, pytest.mark.slow]


def resume_time(rig: Rig, limit: float, sock: object = None) -> float:
    """Seconds until an echo gets through again (probing every 0.2 s); fails after ``limit``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if rig.echo_run(1, timeout=0.2, sock=sock).received:  # type: ignore[arg-type]
            return time.monotonic() - t0
    raise AssertionError(f"traffic did not resume within {limit} s")


def test_link_down_and_up(tmp_path: Path) -> None:
    """User sees: datagrams lost while the link is down; traffic resumes within 2 s of it coming back."""
    with Rig(tmp_path, backend="xdp") as rig:
        app = rig.app_socket()
        assert rig.echo_run(5, sock=app).received == 5
        dev = rig.net.dev["c"]
        rig.net.run("c", ["ip", "link", "set", dev, "down"])
        assert rig.echo_run(3, timeout=0.2, sock=app).received == 0
        time.sleep(3)  # the outage itself, not a synchronisation
        rig.net.run("c", ["ip", "link", "set", dev, "up"])
        took = resume_time(rig, 10, app)
        print(f"resumed {took:.2f} s after link up")
        assert took < 2
        assert rig.echo_run(20, sock=app).received == 20
        assert rig.client.status()["flows"] == 1  # the same flow throughout


def test_client_address_change(tmp_path: Path) -> None:
    """User sees: a gap of about a second; the client reconnects from its new address by itself and
    the server keeps the session and its flow (same flow, no new session)."""
    with Rig(tmp_path, backend="xdp") as rig:
        net = rig.net
        app = rig.app_socket()
        assert rig.echo_run(5, sock=app).received == 5
        old = net.cli4
        new = old.rsplit(".", 1)[0] + ".77"
        dev = net.dev["c"]
        # As a DHCP client does on a new lease.  (Adding the new one first would make it a secondary
        # that the kernel deletes together with the old primary.)
        net.run("c", ["ip", "addr", "del", f"{old}/24", "dev", dev])
        net.run("c", ["ip", "addr", "add", f"{new}/24", "dev", dev])
        took = resume_time(rig, 10, app)
        print(f"resumed {took:.2f} s after the address change")
        assert took < 4
        assert "local address changed from" in rig.client.log()
        assert rig.echo_run(20, sock=app).received == 20
        st = rig.server.status()  # type: ignore[union-attr]
        assert st["sessions"] == 1 and st["flows"] == 1
        assert st["peers"] == [new]
        assert rig.client.status()["connections"]["by_state"] == {"established": 4}


def test_mtu_lowered_mid_run(tmp_path: Path) -> None:
    """User sees: datagrams above the new limit are dropped, counted, and the log names the new
    inner MTU once; smaller ones keep flowing."""
    with Rig(tmp_path, backend="nft") as rig:
        net = rig.net
        assert rig.echo_run(3, size=1400).received == 3
        mark = rig.client.notify.mark()
        for side in "cs":
            net.run(side, ["ip", "link", "set", net.dev[side], "mtu", "1200"])
        deadline = time.monotonic() + 5
        while rig.client.status()["max_datagram"] != 1123 and time.monotonic() < deadline:
            rig.client.notify.drain(0.2)  # a second: the path is re-read each second
        assert rig.client.status()["max_datagram"] == 1123  # 1200 - 77
        assert rig.echo_run(2, size=1400, timeout=0.3).received == 0
        assert rig.echo_run(10, size=1100).received == 10
        st = rig.client.status()
        assert st["drops"]["oversized"] == 2
        log = rig.client.log()
        assert "path MTU changed from 1500 to 1200" in log and "set the application's MTU to 1123" in log
        assert mark >= 0


def test_target_down_and_back(tmp_path: Path) -> None:
    """User sees: datagrams to a dead target are lost (counted as target send errors); as soon as
    the target is back, the same flow works again."""
    with Rig(tmp_path, backend="xdp") as rig:
        assert rig.echo is not None and rig.server is not None
        app = rig.app_socket()
        assert rig.echo_run(5, sock=app).received == 5
        rig.echo.close()
        assert rig.echo_run(3, timeout=0.3, sock=app).received == 0
        rig.echo = EchoServer(rig.net, port=ECHO_PORT)
        took = resume_time(rig, 5, app)
        assert took < 1
        st = rig.server.status()
        assert st["tx_errors"].get("target_econnrefused", 0) >= 1
        assert st["flows"] == 1


def test_client_restart(tmp_path: Path) -> None:
    """User sees: the application's datagrams are lost while the client restarts; traffic resumes
    once it is ready (a new session on the server; the old one expires)."""
    with Rig(tmp_path, backend="xdp") as rig:
        assert rig.echo_run(5).received == 5
        old = rig.client
        assert old.stop() == 0
        old.close()
        new = Rsockd(rig.net, "c", old.user_args, tmp_path, "client2", instance=old.instance).start()
        rig.clients[0] = new
        t0 = time.monotonic()
        rig.wait_up(new)
        print(f"client back up {time.monotonic() - t0:.1f} s after its restart")
        assert rig.echo_run(10).received == 10
        assert rig.server.status()["sessions"] >= 1  # type: ignore[union-attr]


def test_sigkill_at_random_moments_of_startup_and_shutdown(tmp_path: Path) -> None:
    """Whatever moment a daemon dies at, the next start of the instance cleans up and works."""
    rng = random.Random(7)
    args = ["--role", "server", "-t", f"127.0.0.1:{ECHO_PORT}", "--backend", "xdp"]
    with NetnsPair() as net:
        args += ["--dev", net.dev["s"]]
        moments = []
        for i in range(6):
            d = Rsockd(net, "s", args, tmp_path, f"victim{i}", instance="victim").start()
            assert d.proc is not None
            if i % 2 == 0:  # during start-up: before, during and after the bcc compile
                delay = rng.uniform(0.0, 3.5)
                time.sleep(delay)  # the random moment is the point of the test
                moments.append(f"start+{delay:.2f}s")
            else:  # during shutdown: SIGTERM, then SIGKILL a few milliseconds into the clean-up
                d.wait_ready()
                d.proc.send_signal(signal.SIGTERM)
                delay = rng.uniform(0.0, 0.05)
                time.sleep(delay)
                moments.append(f"stop+{delay * 1000:.0f}ms")
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
            d.close()
        good = Rsockd(net, "s", args, tmp_path, "survivor", instance="victim").start()
        try:
            good.wait_ready()
            assert attached(net) == {"xdp": True, "tc": True, "nft": True}
            assert good.status()["backend"]["name"] == "xdp"
        finally:
            assert good.stop() == 0
            good.close()
        print("killed at", ", ".join(moments))
        assert attached(net) == {"xdp": False, "tc": False, "nft": False}
