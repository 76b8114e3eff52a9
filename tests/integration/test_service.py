"""The service: sd_notify lifecycle, watchdog, reload, control socket, rsockctl, --check."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
from pathlib import Path

import jsonschema
import pytest

from tests.integration.rig import RSOCKCTL, RSOCKD, Rig, Rsockd
from tests.netns import NetnsPair

pytestmark = pytest.mark.root

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "control.schema.json").read_text())


def kinds(messages: list[dict[str, str]]) -> list[str]:
    """The lifecycle words of a message list, STATUS/WATCHDOG/EXTEND left out."""
    out = []
    for m in messages:
        for k in ("READY", "RELOADING", "STOPPING"):
            if m.get(k) == "1":
                out.append(k)
    return out


def test_notify_lifecycle_watchdog_reload_and_stop(tmp_path: Path) -> None:
    env = {"WATCHDOG_USEC": "400000", "RSOCKD_TEST_HOOKS": "1"}
    with NetnsPair() as net:
        d = Rsockd(net, "s", ["--role", "server", "-t", "127.0.0.1:9000", "--dev", net.dev["s"], "--backend", "xdp"],
                   tmp_path, "server", env=env).start()
        try:
            d.wait_ready()
            # READY comes only once steering is attached and the control socket answers.
            link = json.loads(net.run("s", ["ip", "-j", "link", "show", net.dev["s"]]).stdout)[0]
            assert "xdp" in link, link
            assert d.status()["backend"]["name"] == "xdp"
            ready = next(m for m in d.notify.messages if m.get("READY") == "1")
            assert ready.get("STATUS", "").startswith("server, xdp:")
            assert any("EXTEND_TIMEOUT_USEC" in m for m in d.notify.messages[: d.notify.messages.index(ready)])

            # WATCHDOG every 0.2 s (half of WATCHDOG_USEC) ...
            start = d.notify.mark()
            for _ in range(8):
                d.notify.wait(lambda m: m.get("WATCHDOG") == "1", 2, "WATCHDOG", since=len(d.notify.messages))
            times = [t for m, t in zip(d.notify.messages, d.notify.times, strict=True) if m.get("WATCHDOG") == "1"]
            gaps = [b - a for a, b in zip(times[-7:], times[-6:], strict=False)]
            assert 0.15 < statistics.median(gaps) < 0.3, gaps
            # ... and none while the event loop is blocked for 2 s.
            before = d.notify.mark()
            d.status("debug-stall")
            d.notify.wait(lambda m: m.get("WATCHDOG") == "1", 2, "WATCHDOG", since=len(d.notify.messages))
            wd = [t for m, t in zip(d.notify.messages[before:], d.notify.times[before:], strict=True)
                  if m.get("WATCHDOG") == "1"]
            prior = [t for m, t in zip(d.notify.messages[:before], d.notify.times[:before], strict=True)
                     if m.get("WATCHDOG") == "1"][-1]
            assert wd[0] - prior > 1.8, "a WATCHDOG=1 was sent while the loop was blocked"
            assert start < before

            # SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
            mark = d.notify.mark()
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
            d.notify.wait(lambda m: m.get("READY") == "1", 10, "READY after reload", since=mark)
            reload_msgs = d.notify.messages[mark:]
            assert kinds(reload_msgs) == ["RELOADING", "READY"]
            rl = next(m for m in reload_msgs if m.get("RELOADING") == "1")
            assert int(rl["MONOTONIC_USEC"]) > 0

            mark = d.notify.mark()
            assert d.stop() == 0
            d.notify.drain(0.2)
            assert kinds(d.notify.messages[mark:]) == ["STOPPING"]
            assert kinds(d.notify.messages) == ["READY", "RELOADING", "READY", "STOPPING"]
        finally:
            d.close()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reload_keeps_sessions_for_live_keys_and_survives_a_broken_config(tmp_path: Path) -> None:
    sconf = write(tmp_path / "s.toml", 'key = "first"\nkeepalive = 5\nports = "10001-10004"\n')
    cconf = write(tmp_path / "c.toml", 'key = "first"\nkeepalive = 5\nports = "10001-10004"\n')
    with Rig(tmp_path, backend="xdp", server_args=["-f", str(sconf)], client_args=["-f", str(cconf)],
             cli_ports=False) as rig:
        assert rig.server is not None
        app = rig.app_socket()
        assert rig.echo_run(10, sock=app).received == 10
        before = {c["port"]: c["reconnects"] for c in rig.client.status("ports")["connections"]}
        for d, conf in ((rig.server, sconf), (rig.client, cconf)):
            write(conf, 'key = "second"\nkeepalive = 3\ndead_timeout = 12\nports = "10001-10004"\n')
            mark = d.notify.mark()
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
            d.notify.wait(lambda m: m.get("READY") == "1", 10, "READY", since=mark)
            assert "reload: applied dead_timeout, keepalive, key" in d.log()
        # Established connections keep the key of their hello: nothing reconnected, traffic flows.
        assert rig.echo_run(10, sock=app).received == 10
        st = rig.client.status("ports")["connections"]
        assert {c["port"]: c["reconnects"] for c in st} == before
        assert all(c["state"] == "established" for c in st)
        assert rig.server.status()["sessions"] == 1

        # A broken file: the daemon says why, keeps running with what it had.
        write(sconf, 'key = "second"\nports = "10010-10001"\n')
        mark = rig.server.notify.mark()
        assert rig.server.proc is not None
        rig.server.proc.send_signal(signal.SIGHUP)
        rig.server.notify.wait(lambda m: m.get("READY") == "1", 10, "READY", since=mark)
        assert 'ports: "10010-10001" is an empty range; keeping the running configuration' in rig.server.log()
        assert rig.echo_run(10, sock=app).received == 10

        # Ports change on both sides: steering is re-attached and the client reconnects.
        for d, conf in ((rig.server, sconf), (rig.client, cconf)):
            write(conf, 'key = "second"\nports = "10001-10003"\n')
            mark = d.notify.mark()
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
            d.notify.wait(lambda m: m.get("READY") == "1", 30, "READY", since=mark)
        rig.client.wait_status(r" 3/3 connections up", 30)
        assert rig.echo_run(10).received == 10
        assert rig.server.status()["ports"] == [10001, 10002, 10003]


def test_rsockctl_against_a_live_pair(tmp_path: Path) -> None:
    with Rig(tmp_path, backend="nft") as rig:
        assert rig.server is not None
        assert rig.echo_run(25, size=300).received == 25
        for d in (rig.server, rig.client):
            r = d.ctl("status")
            assert r.returncode == 0, r.stderr
            assert f"instance: {d.instance}" in r.stdout and "4/4 established" in r.stdout
            assert "backend: nft on" in r.stdout and "kernel RST/ACK suppressed: 0" in r.stdout
            assert "\033[" not in r.stdout  # not a terminal: no colour
            for cmd in ("status", "ports"):
                j = d.ctl("--json", cmd)
                assert j.returncode == 0
                jsonschema.validate(json.loads(j.stdout), SCHEMA)
            ports = d.ctl("ports")
            assert ports.returncode == 0 and ports.stdout.count("established") == 4
        st = json.loads(rig.client.ctl("status", "--json").stdout)["status"]
        assert st["traffic"]["from_app_packets"] == 25 and st["traffic"]["to_app_packets"] == 25
        srv = json.loads(rig.server.ctl("--json", "status").stdout)["status"]
        assert srv["traffic"]["to_app_packets"] == 25 and srv["sessions"] == 1
        ports = json.loads(rig.client.ctl("--json", "ports").stdout)["ports"]["connections"]
        assert sum(c["tx_bytes"] for c in ports) > 25 * 300

        # permission denied: an unprivileged user may not reach the socket
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", RSOCKCTL,
                            "--instance", rig.server.instance, "--runtime-dir", str(rig.server.runtime), "status"],
                           capture_output=True, text=True)
        assert r.returncode == 4, r
        assert "permission denied" in r.stderr and "sudo" in r.stderr
    # not running
    r = subprocess.run([RSOCKCTL, "--instance", "gone", "--runtime-dir", str(tmp_path / "run"), "status"],
                       capture_output=True, text=True)
    assert r.returncode == 3 and "not running" in r.stderr and str(tmp_path / "run" / "gone") in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def check(net: NetnsPair, *args: str) -> subprocess.CompletedProcess[str]:
    return net.run("s", [RSOCKD, "--check", "--role", "server", "-t", "127.0.0.1:9000", *args],
                   check=False, timeout=60)


def test_check_passes_on_a_good_host_and_names_each_problem(tmp_path: Path) -> None:
    with NetnsPair() as net:
        net.run("s", ["ip", "route", "add", "default", "dev", net.dev["s"]])
        ok = check(net)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "FAIL" not in ok.stdout and "rsockd would start" in ok.stdout
        assert f"interface {net.dev['s']} up with an address" in ok.stdout
        assert f"warn  interface {net.dev['s']}: GRO off" in ok.stdout  # a veth's default
        net.run("s", ["ethtool", "-K", net.dev["s"], "gro", "on"])
        assert f"ok    interface {net.dev['s']}: GRO on" in check(net).stdout

        nocap = net.run("s", ["capsh", "--drop=cap_net_raw", "--", "-c",
                              f"{RSOCKD} --check --role server -t 127.0.0.1:9000"], check=False, timeout=60)
        assert nocap.returncode == 1 and "FAIL  capability CAP_NET_RAW missing" in nocap.stdout, nocap.stdout

        cpus = os.cpu_count() or 1
        many = check(net, "--workers", str(cpus + 1), "--ports", f"10001-{10001 + cpus}")
        assert many.returncode == 0 and f"warn  workers = {cpus + 1} on {cpus} CPUs" in many.stdout, many.stdout
        assert f"ok    workers = {cpus} on {cpus} CPUs" in check(net, "--workers", str(cpus)).stdout

        noif = check(net, "--dev", "nosuch0")
        assert noif.returncode == 1 and "FAIL  interface nosuch0 does not exist" in noif.stdout

        with net.inside("s"):
            busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            busy.bind(("0.0.0.0", 10003))
        try:
            inuse = check(net)
            assert inuse.returncode == 1 and "tunnel ports not free: 10003/udp (in use)" in inuse.stdout
            # and the daemon itself refuses to start with the same clear error, leaving nothing attached
            d = net.run("s", [RSOCKD, "--role", "server", "-t", "127.0.0.1:9000", "--instance", "busy",
                              "--runtime-dir", str(tmp_path)], check=False, timeout=60)
            assert d.returncode == 1 and "server: port 10003/udp is already in use" in d.stderr
            assert "Traceback" not in d.stderr
        finally:
            busy.close()
        assert "xdp" not in net.run("s", ["ip", "link", "show", net.dev["s"]]).stdout

        with net.inside("s"):  # a service on a tunnel port's TCP side: port sharing, both backends
            web = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            web.bind(("0.0.0.0", 10004))
            web.listen()
        try:
            for backend in ("xdp", "nft"):
                shared = check(net, "--backend", backend)
                assert shared.returncode == 0, shared.stdout
                assert (f"ok    10004/tcp in use by a service of this host: shared with it (the {backend} "
                        "backend hands it every connection that is not rsockd's)") in shared.stdout, shared.stdout
        finally:
            web.close()

        bad = tmp_path / "bad.toml"
        bad.write_text('role = "server"\ntarget = "127.0.0.1:9000"\nports = "10010-10001"\n')
        broken = net.run("s", [RSOCKD, "--check", "-f", str(bad)], check=False)
        assert broken.returncode == 2 and broken.stderr.strip() == \
            f'rsockd: {bad}: ports: "10010-10001" is an empty range'


def test_firewall_dropping_the_tunnel_ports_is_named(tmp_path: Path) -> None:
    with NetnsPair() as net:
        net.run("s", ["ip", "route", "add", "default", "dev", net.dev["s"]])
        ruleset = "table inet fw {\n chain in {\n  type filter hook input priority 0; policy drop;\n" \
                  "  tcp dport 22 accept\n }\n}\n"
        net.run("s", ["nft", "-f", "-"], input=ruleset)
        r = check(net)
        assert r.returncode == 1 and "host firewall: input chain inet fw in drops by policy" in r.stdout
        assert "ufw allow 10001:10010" in r.stdout
        net.run("s", ["nft", "add rule inet fw in udp dport 10001-10010 accept"])
        r = check(net)
        assert "FAIL  host firewall" not in r.stdout


def test_daemon_refuses_without_root(tmp_path: Path) -> None:
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", RSOCKD, "--role",
                        "server", "-t", "127.0.0.1:9000"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 4 and "must run as root" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
