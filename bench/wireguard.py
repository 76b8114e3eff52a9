"""WireGuard across the benchmark's namespaces: iperf3 TCP through wireguard-go, straight over UDP and over rsockd.

    plain:   wg (client ns) --UDP--> <server veth address>:PLAIN_PORT  wg (server ns)
    rsockd:  wg (client ns) --UDP--> 127.0.0.1:30000 rsockd client ==fake TCP==> rsockd server
                                     --UDP--> 127.0.0.1:RSOCKD_PORT  wg (server ns)

wireguard-go is the userspace implementation, run in the foreground, so the figures never depend on
whether the kernel has a WireGuard module.  It keeps its control socket in
``/var/run/wireguard/<interface>.sock``, a directory every namespace shares: each interface name
carries the namespace pair's random tag, its side and its path, so two namespaces, two paths and two
concurrent runs never meet there.  ``WgTunnel.close`` removes every process, interface and socket
file it made, whatever happened before.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procstat import Snapshot
from bench.tools import stop
from tests.netns import NetnsPair

#: What WireGuard adds to an inner packet on the wire (UDP payload): type, receiver index and counter
#: (16 B) and the AEAD tag (16 B).  wireguard-go pads a packet to a multiple of 16 only up to the MTU,
#: so a tunnel of MTU m sends datagrams of at most m + 32 bytes.
WG_OVERHEAD = 32
RUN_DIR = Path("/var/run/wireguard")
IPERF_PORT = 5202
START_TIMEOUT = 10.0  # seconds for wireguard-go to open its interface and control socket
HANDSHAKE_TIMEOUT = 10.0  # seconds for the first ping through a fresh tunnel (handshake included)


class WgError(RuntimeError):
    """The WireGuard stage could not set up or measure a path (the message says which and why)."""


@dataclass(frozen=True)
class WgPath:
    """One way across: the interfaces' inner /24, the server-side listen port, where the client sends."""

    name: str  # "plain" or "rsockd"; its first letter goes into the interface names
    subnet: str  # "192.168.241": .1 is the client side, .2 the server side
    server_port: int  # UDP port the server-side wireguard-go listens on
    endpoint: tuple[str, int]  # the client-side peer's endpoint

    @property
    def client_addr(self) -> str:
        return f"{self.subnet}.1"

    @property
    def server_addr(self) -> str:
        return f"{self.subnet}.2"


def available() -> str | None:
    """Why the stage cannot run here, or None."""
    missing = [t for t in ("wireguard-go", "wg", "iperf3") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (scripts/setup installs wireguard-go, wireguard-tools, iperf3)"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun"
    return None


def version() -> str:
    r = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True, check=False, timeout=10)
    return r.stdout.splitlines()[0].strip() if r.stdout else "wireguard-go"


class _Daemon:
    """One foreground wireguard-go; its output is copied to a log by a thread, which also notices the
    line saying the control socket accepts requests (LOG_LEVEL=verbose prints it)."""

    def __init__(self, net: NetnsPair, side: str, ifname: str, log: Path) -> None:
        self.ifname = ifname
        self.logpath = log
        self.ready = threading.Event()
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "verbose"}
        # Its own session: a Ctrl-C at the terminal reaches the harness only, which then stops it in order.
        self.proc = subprocess.Popen(net.argv(side, ["wireguard-go", "-f", ifname]), env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        with open(self.logpath, "ab") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if b"UAPI listener started" in line:
                    self.ready.set()
        self.ready.set()  # it exited: wait_ready sees that

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout) or self.proc.poll() is not None:
            raise WgError(f"wireguard-go {self.ifname} did not start (rc={self.proc.poll()}): {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.logpath.read_text(errors="replace")[-1500:].strip()
        except OSError:
            return ""

    def stop(self) -> None:
        stop(self.proc)
        self._thread.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class WgTunnel:
    """wireguard-go on both sides of ``path``, configured as each other's peer, the tunnel up at ``mtu``.

    ``with WgTunnel(...) as t:`` starts both, waits for a ping through the tunnel (the handshake), and
    on leaving stops both processes and removes their interfaces and control sockets.
    """

    def __init__(self, net: NetnsPair, path: WgPath, mtu: int, tmp: Path) -> None:
        self.net, self.path, self.mtu, self.tmp = net, path, mtu, tmp
        # <tag>w<path><side>: 11 characters, within IFNAMSIZ; unique per run, path and namespace.
        self.ifname = {side: f"{net.tag}w{path.name[0]}{side}" for side in ("c", "s")}
        self.daemons: dict[str, _Daemon] = {}
        self._made_run_dir = False

    def __enter__(self) -> WgTunnel:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._made_run_dir = not RUN_DIR.exists()
        for side, ifname in self.ifname.items():
            if (RUN_DIR / f"{ifname}.sock").exists():
                raise WgError(f"{RUN_DIR / ifname}.sock exists already: another wireguard-go uses {ifname}")
            self.daemons[side] = _Daemon(self.net, side, ifname, self.tmp / f"wireguard-go-{ifname}.log")
        for d in self.daemons.values():
            d.wait_ready(START_TIMEOUT)
        keys = {side: self._keypair(side) for side in ("c", "s")}
        p = self.path
        self._wg("s", "set", self.ifname["s"], "private-key", str(keys["s"][0]), "listen-port", str(p.server_port),
                 "peer", keys["c"][1], "allowed-ips", f"{p.client_addr}/32")
        self._wg("c", "set", self.ifname["c"], "private-key", str(keys["c"][0]),
                 "peer", keys["s"][1], "allowed-ips", f"{p.server_addr}/32",
                 "endpoint", f"{p.endpoint[0]}:{p.endpoint[1]}")
        for side, addr in (("c", p.client_addr), ("s", p.server_addr)):
            ns, dev = self.net.ns[side], self.ifname[side]
            self._sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            self._sh(["ip", "-n", ns, "link", "set", dev, "mtu", str(self.mtu), "up"])
        # The first packet makes the client initiate the handshake; wireguard-go queues it meanwhile.
        r = self.net.run("c", ["ping", "-n", "-q", "-c", "1", "-i", "0.2", "-w", str(int(HANDSHAKE_TIMEOUT)),
                               p.server_addr], check=False, timeout=HANDSHAKE_TIMEOUT + 10)
        if r.returncode != 0:
            show = self.net.run("c", ["wg", "show", self.ifname["c"]], check=False, timeout=10)
            raise WgError(f"{p.name}: no ping through the tunnel within {HANDSHAKE_TIMEOUT:.0f} s (no handshake?)\n"
                          f"{show.stdout.strip()}\n{self.daemons['c'].log_tail()[-600:]}")

    def _keypair(self, side: str) -> tuple[Path, str]:
        """A private key file (0600, in the run's temporary directory) and its public key."""
        priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        path = self.tmp / f"{self.ifname[side]}-{secrets.token_hex(4)}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(priv + "\n")
        return path, pub

    def _wg(self, side: str, *args: str) -> None:
        self._sh(self.net.argv(side, ["wg", *args]))

    def _sh(self, argv: list[str]) -> None:
        r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=20)
        if r.returncode != 0:
            raise WgError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")

    def pids(self) -> dict[str, list[int]]:
        return {f"wireguard_{'client' if side == 'c' else 'server'}": [d.proc.pid] for side, d in self.daemons.items()}

    def close(self) -> None:
        """Stop both wireguard-go (closing its TUN deletes the interface, and it removes its socket); then
        remove whatever one that died hard left behind."""
        for d in self.daemons.values():
            d.stop()
        for side, ifname in self.ifname.items():
            (RUN_DIR / f"{ifname}.sock").unlink(missing_ok=True)
            subprocess.run(["ip", "-n", self.net.ns[side], "link", "del", ifname], capture_output=True, check=False,
                           timeout=20)
            for key in self.tmp.glob(f"{ifname}-*.key"):
                key.unlink(missing_ok=True)
        if self._made_run_dir:
            try:
                RUN_DIR.rmdir()  # only when empty: another program's wireguard may be using it by now
            except OSError:
                pass


def iperf3_tcp(net: NetnsPair, server_addr: str, secs: float, pids: dict[str, list[int]], out: Path) -> dict[str, Any]:
    """iperf3 TCP from the client namespace to ``server_addr`` in the server namespace for ``secs``, and the
    CPU that each of ``pids``, both iperf3 processes and other programs used meanwhile.  ``out``: its JSON."""
    srv = net.popen("s", ["iperf3", "-s", "-1", "-B", server_addr, "-p", str(IPERF_PORT), "--forceflush"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    cli: subprocess.Popen[str] | None = None
    try:
        _await_line(srv, "Server listening", 10.0)
        with open(out, "w") as f:
            cli = net.popen("c", ["iperf3", "-c", server_addr, "-p", str(IPERF_PORT), "-t", f"{secs:g}", "-J",
                                  "--connect-timeout", "5000"], stdout=f, stderr=subprocess.STDOUT)
        pids = {**pids, "iperf3_client": [cli.pid], "iperf3_server": [srv.pid]}
        before, t0 = Snapshot.take(pids), time.monotonic()
        # Wait for the client's exit without reaping it: a zombie's CPU times are still in /proc.
        fd = os.pidfd_open(cli.pid)
        try:
            if not select.select([fd], [], [], secs + 30)[0]:
                raise WgError(f"iperf3 to {server_addr}: no result within {secs + 30:.0f} s")
        finally:
            os.close(fd)
        cpu, wall = before.until(Snapshot.take(pids)), time.monotonic() - t0
    finally:
        for p in (cli, srv):
            if p is not None:
                stop(p)
        if srv.stdout is not None:
            srv.stdout.close()
    text = out.read_text(errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise WgError(f"iperf3 to {server_addr}: {text.strip()[-300:]}") from None
    end = data.get("end", {})
    recv, sent = end.get("sum_received", {}), end.get("sum_sent", {})
    if "error" in data or not recv.get("seconds"):
        raise WgError(f"iperf3 to {server_addr}: {data.get('error', 'no result')}")
    return {"mbit_s": round(float(recv["bits_per_second"]) / 1e6, 1), "bytes": int(recv.get("bytes", 0)),
            "seconds": round(float(recv["seconds"]), 3), "retransmits": sent.get("retransmits"),
            "cpu_cores": {k: round(v / wall, 3) for k, v in cpu.items()}}


def _await_line(proc: subprocess.Popen[str], text: str, timeout: float) -> None:
    """Read ``proc``'s output until a line holding ``text``; it exiting or ``timeout`` is an error."""
    assert proc.stdout is not None
    fd, buf = proc.stdout.fileno(), b""
    end = time.monotonic() + timeout
    while text.encode() not in buf:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise WgError(f"iperf3 server: no {text!r} within {timeout:.0f} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise WgError(f"iperf3 server exited (rc={proc.poll()}): {buf.decode(errors='replace')[-300:]}")
        buf += chunk
