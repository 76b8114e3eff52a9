"""A real rsockd server and client in a namespace pair, driven from the test.

Readiness is awaited on a fake NOTIFY_SOCKET (READY=1, then a STATUS line saying every
connection is up), never by sleeping.  The UDP echo target runs in a thread of the test process
on a socket made inside the server namespace.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rsockd.dataplane.relay import SO_RCVBUFFORCE
from rsockd.service.control import request
from tests.netns import NetnsPair

RSOCKD = str(Path(sys.executable).with_name("rsockd"))
RSOCKCTL = str(Path(sys.executable).with_name("rsockctl"))
ECHO_PORT = 9000
LISTEN_PORT = 30000


class Notify:
    """A unix datagram socket standing in for systemd's notification socket.

    Its queue holds ``net.unix.max_dgram_qlen`` (10) messages, and a daemon's message that finds
    it full is lost (the daemon does not block on it, as on systemd's).  So while a test waits on
    one daemon's socket, every other open one is read too: a client's STATUS must not be lost
    while the rig waits for the server's READY."""

    live: ClassVar[list[Notify]] = []  # every open one, read whenever any of them waits

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []
        self.times: list[float] = []
        Notify.live.append(self)

    def _take(self) -> None:
        data = self.sock.recv(65536).decode()
        self.messages.append(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))
        self.times.append(time.monotonic())

    def _read(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a message of this socket; one of another that comes first
        is kept in its own list."""
        end = time.monotonic() + timeout
        while True:
            socks = {n.sock: n for n in Notify.live if n.sock.fileno() >= 0}
            socks[self.sock] = self
            ready = select.select(list(socks), [], [], max(0.0, end - time.monotonic()))[0]
            for s in ready:
                socks[s]._take()
            if self.sock in ready:
                return True
            if not ready or time.monotonic() >= end:
                return False

    def mark(self) -> int:
        """A position: ``wait(..., since=mark)`` then looks only at later messages."""
        self.drain()
        return len(self.messages)

    def wait(self, pred: Callable[[dict[str, str]], bool], timeout: float, what: str = "",
             since: int = 0) -> dict[str, str]:
        """The first message after ``since`` (already received or new) matching ``pred``."""
        seen = since
        end = time.monotonic() + timeout
        while True:
            for m in self.messages[seen:]:
                if pred(m):
                    return m
            seen = len(self.messages)
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no notification {what} within {timeout}s; got {self.messages[-5:]}")
            self._read(left)

    def drain(self, timeout: float = 0.0) -> None:
        while self._read(timeout):
            pass

    def close(self) -> None:
        if self in Notify.live:
            Notify.live.remove(self)
        self.sock.close()


class Rsockd:
    """One rsockd process in a namespace."""

    def __init__(self, net: NetnsPair, side: str, args: Sequence[str], tmp: Path, name: str,
                 env: dict[str, str] | None = None, instance: str | None = None, prefix: Sequence[str] = ()) -> None:
        self.net, self.side, self.name = net, side, name
        self.prefix = list(prefix)  # a wrapper command the daemon runs under
        self.instance = instance or f"{net.tag}{name}"
        self.runtime = tmp / "run"
        self.user_args = list(args)
        self.args = ["--instance", self.instance, "--runtime-dir", str(self.runtime), *args]
        self.logpath = tmp / f"{name}.log"
        self.notify = Notify(tmp / f"{name}.notify")
        self.env = env or {}
        self.proc: subprocess.Popen[str] | None = None

    @property
    def control(self) -> str:
        return str(self.runtime / self.instance / "control.sock")

    def start(self) -> Rsockd:
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.path, **self.env}
        log = open(self.logpath, "a")  # noqa: SIM115 - the child holds it; closed when we stop it
        self.proc = subprocess.Popen(self.net.argv(self.side, [*self.prefix, RSOCKD, *self.args]), env=env, stdout=log,
                                     stderr=subprocess.STDOUT, text=True)
        log.close()
        return self

    def wait_ready(self, timeout: float = 40, since: int = 0) -> None:
        try:
            self.notify.wait(lambda m: m.get("READY") == "1", timeout, "READY=1", since)
        except TimeoutError:
            raise TimeoutError(f"{self.name} not ready: rc={self.proc and self.proc.poll()}\n{self.log()}") from None

    def wait_status(self, pattern: str, timeout: float = 20, since: int = 0) -> str:
        rx = re.compile(pattern)
        try:
            return self.notify.wait(lambda m: bool(rx.search(m.get("STATUS", ""))), timeout, pattern,
                                    since)["STATUS"]
        except TimeoutError:
            raise TimeoutError(f"{self.name}: no STATUS matching {pattern!r}\n{self.log()[-3000:]}") from None

    def status(self, command: str = "status") -> dict[str, Any]:
        resp = request(self.control, command)
        assert resp["ok"], resp
        data: dict[str, Any] = resp["data"]
        return data

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RSOCKCTL, "--instance", self.instance, "--runtime-dir", str(self.runtime), *args],
                              capture_output=True, text=True, timeout=20)

    def stop(self, timeout: float = 20) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stacks = _py_spy(self.proc.pid)
            self.proc.kill()
            self.proc.wait()
            msg = f"{self.name} did not stop within {timeout}s\n{self.log()[-3000:]}\n{stacks}"
            raise AssertionError(msg) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        try:
            return self.logpath.read_text()
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        self.kill()
        self.notify.close()


def _py_spy(pid: int) -> str:
    """Where a stuck daemon is (diagnostics only; empty when py-spy is not installed)."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        return ""
    r = subprocess.run([str(exe), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
    return r.stdout + r.stderr


class EchoServer:
    """A UDP echo on 127.0.0.1 (and ::1) inside a namespace, served by a thread of the test."""

    def __init__(self, net: NetnsPair, side: str = "s", port: int = ECHO_PORT) -> None:
        with net.inside(side):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", port))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self.sock.settimeout(0.2)
        self.received = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
            try:
                self.sock.sendto(data, addr)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


@dataclass
class EchoResult:
    sent: int
    received: int
    rtts: list[float] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return 1 - self.received / self.sent if self.sent else 0.0


def attached(net: NetnsPair, side: str = "s") -> dict[str, bool]:
    """What of ours is attached on ``side``'s veth and in its namespace: XDP, the TC guard, an nft table."""
    dev = net.dev[side]
    link = json.loads(net.run(side, ["ip", "-j", "-d", "link", "show", dev]).stdout)[0]
    tc = net.run(side, ["tc", "filter", "show", "dev", dev, "egress"]).stdout
    tables = net.run(side, ["nft", "list", "tables"]).stdout
    return {"xdp": "xdp" in link, "tc": "rsockd" in tc, "nft": "rsockd" in tables}


def address_of(net: NetnsPair, side: str, dev: str, family: int) -> str:
    """The first global address of ``family`` (4 or 6) on ``dev`` in namespace ``side``."""
    infos = json.loads(net.run(side, ["ip", "-j", "addr", "show", "dev", dev]).stdout)[0]["addr_info"]
    fam = "inet6" if family == 6 else "inet"
    return str(next(a["local"] for a in infos if a["family"] == fam and not a["local"].startswith("fe80")))


def nstat(net: NetnsPair, side: str, *names: str) -> dict[str, int]:
    out = net.run(side, ["nstat", "-asz", *names]).stdout
    vals = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            vals[parts[0]] = int(parts[1])
    return {n: vals.get(n, 0) for n in names}


class Rig:
    """Server + client daemons over a veth pair, with an echo target behind the server."""

    def __init__(self, tmp: Path, *, backend: str = "xdp", transport: str = "tcp", family: int = 4,
                 ports: str = "10001-10004", server_args: Sequence[str] = (), client_args: Sequence[str] = (),
                 offload: bool = False, hosts: int = 1, cli_ports: bool = True, wait: bool = True,
                 mtu: int = 1500, gro: bool = False, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.env = env  # for every daemon of the rig
        self.backend, self.transport, self.family, self.ports = backend, transport, family, ports
        self.server_args, self.client_args = list(server_args), list(client_args)
        self.nports = len(range(int(ports.split("-")[0]), int(ports.split("-")[-1]) + 1)) if "," not in ports \
            else len(ports.split(","))
        self.net = NetnsPair(offload=offload, mtu=mtu, gro=gro)
        self.hosts = hosts  # client hosts; the first is the pair's "c", others get their own veth
        self.cli_ports = cli_ports  # False: the ports come from the daemons' config files
        self.wait = wait  # False: only wait for READY, not for the connections to come up
        self.echo: EchoServer | None = None
        self.server: Rsockd | None = None
        self.clients: list[Rsockd] = []

    @property
    def client(self) -> Rsockd:
        return self.clients[0]

    @property
    def server_addr(self) -> str:
        return self.net.srv6 if self.family == 6 else self.net.srv4

    def server_for(self, host: str) -> str:
        """The server's address on the link of client host ``host``."""
        if host == "c":
            return self.server_addr
        return address_of(self.net, "s", self.net.dev["s" + host[1:]], self.family)

    def common(self) -> list[str]:
        ports = ["--ports", self.ports] if self.cli_ports else []
        return ["--backend", self.backend, "--type", self.transport, *ports]

    def __enter__(self) -> Rig:
        try:
            self.net.setup()
            self.net.run("s", ["ip", "route", "add", "default", "dev", self.net.dev["s"]])
            devs = [self.net.dev["s"]]
            for k in range(2, self.hosts + 1):
                self.net.add_host(f"c{k}")
                devs.append(self.net.dev[f"s{k}"])
            self.echo = EchoServer(self.net)
            self.server = Rsockd(self.net, "s", ["--role", "server", "-t", f"127.0.0.1:{ECHO_PORT}",
                                                 *(a for d in devs for a in ("--dev", d)), *self.common(),
                                                 *self.server_args], self.tmp, "server", env=self.env).start()
            for k in range(1, self.hosts + 1):
                self.add_client(host=f"c{k}" if k > 1 else "c", name=f"client{k}" if k > 1 else "client")
            self.server.wait_ready()
            for c in self.clients:
                if self.wait:
                    self.wait_up(c)
                else:
                    c.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def add_client(self, listen_port: int = LISTEN_PORT, name: str = "client", extra: Sequence[str] = (),
                   host: str = "c", prefix: Sequence[str] = ()) -> Rsockd:
        c = Rsockd(self.net, host, ["--role", "client", "-t", self.server_for(host), "-l",
                                    f"127.0.0.1:{listen_port}", *self.common(), *self.client_args, *extra],
                   self.tmp, name, env=self.env, prefix=prefix).start()
        self.clients.append(c)
        return c

    def conns_per_client(self) -> int:
        return self.nports * (2 if self.transport == "all" else 1)

    def wait_up(self, client: Rsockd, timeout: float = 40, since: int = 0) -> None:
        client.wait_ready(timeout, since)
        n = self.conns_per_client()
        client.wait_status(rf" {n}/{n} connections up", timeout, since)

    def restart_server(self, extra: Sequence[str] = ()) -> Rsockd:
        """Stop the server (cleanly) and start a new one of the same instance."""
        old = self.server
        assert old is not None
        assert old.stop() == 0, old.log()[-2000:]
        old.close()
        new = Rsockd(self.net, "s", [*old.user_args, *extra], self.tmp, old.name + "2", instance=old.instance,
                     env=self.env)
        self.server = new.start()
        return new

    def replace_crashed_server(self, name: str = "server2") -> Rsockd:
        """Start a new server of the instance whose server died, then bring the client back: it
        learns of the crash when it next sends (the new server answers with RSTs) and reconnects."""
        old = self.server
        assert old is not None
        new = Rsockd(self.net, "s", old.user_args, self.tmp, name, instance=old.instance, env=self.env)
        self.server = new.start()
        new.wait_ready()
        n = self.conns_per_client()
        mark = self.client.notify.mark()
        self.echo_run(2, timeout=0.3)
        self.client.wait_status(rf" [0-{n - 1}]/{n} connections up", 10, since=mark)
        self.client.wait_status(rf" {n}/{n} connections up", 20, since=mark)
        return new

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop_daemons(self) -> list[str]:
        """Stop every daemon; what went wrong (a non-zero exit, a daemon that would not stop)."""
        errors = []
        for d in [*self.clients, self.server]:
            if d is None:
                continue
            try:
                rc = d.stop()
                if rc != 0:
                    errors.append(f"{d.name} exited {rc}:\n{d.log()[-2000:]}")
            except AssertionError as e:
                errors.append(str(e))
            d.close()
        return errors

    def close(self) -> None:
        errors = self.stop_daemons()
        if self.echo is not None:
            self.echo.close()
        self.net.close()
        if errors and not sys.exc_info()[0]:
            raise AssertionError("\n".join(errors))

    def app_socket(self, family: int = socket.AF_INET, host: str = "c") -> socket.socket:
        with self.net.inside(host):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)  # bursts of replies must not overflow it
        return s

    def echo_run(self, count: int, size: int = 64, timeout: float = 1.0, sock: socket.socket | None = None,
                 port: int = LISTEN_PORT, host: str = "c") -> EchoResult:
        """Ping-pong ``count`` datagrams through the tunnel; a lost one costs ``timeout``."""
        s = sock or self.app_socket(host=host)
        s.settimeout(timeout)
        res = EchoResult(count, 0)
        try:
            for i in range(count):
                msg = i.to_bytes(4, "big") + os.urandom(max(0, size - 4))
                t0 = time.perf_counter()
                s.sendto(msg, ("127.0.0.1", port))
                deadline = t0 + timeout
                while True:
                    try:
                        data = s.recv(65536)
                    except TimeoutError:
                        break
                    if data == msg:
                        res.received += 1
                        res.rtts.append(time.perf_counter() - t0)
                        break
                    s.settimeout(max(0.001, deadline - time.perf_counter()))
                s.settimeout(timeout)
        finally:
            if sock is None:
                s.close()
        return res


def dump_json(data: object) -> str:
    return json.dumps(data, indent=1, sort_keys=True)
