"""Soak: a real rsockd pair under mixed traffic for a long time, with reloads and forced reconnects (issue 8).

    sudo .venv/bin/python -m bench.soak                      30 minutes, xdp, the figures as a table
    sudo .venv/bin/python -m bench.soak --minutes 2.5 --event-every 30 --sample-every 5
    sudo .venv/bin/python -m bench.soak --help               every knob

A server and a client daemon run in a namespace pair (``tests.integration.rig.Rig``) with the UDP
echo of the rig behind the server.  Through the tunnel, threads of this process keep up:

- ``bulk``: a windowed echo of large datagrams (closed loop: as fast as the tunnel goes), both ways;
- ``paced``: an open-loop stream of mid-size datagrams at a fixed rate, echoed back (both ways);
- ``ping``: small datagrams one at a time (latency, loss);
- ``churn``: a new flow (a new source port) every few seconds, a few datagrams of any size up to the
  largest the tunnel carries, then closed: flows come and go, and idle ones expire (``duration``).

Every ``event_every`` seconds something happens, in turn: a reload of both daemons (SIGHUP after
changing the key in their config files -- established connections keep the key of their hello --
or the keepalive), then a forced reconnect (an RST at exactly the expected sequence number,
``bench.hostile.exact_rst``, at the client or at the server).  The daemons themselves live through
the whole soak, so their memory and descriptors form one series each (a crash and restart is
covered by tests/integration/test_faults.py).

Every ``sample_every`` seconds: VmRSS (``/proc/PID/status``) and the open descriptors
(``/proc/PID/fd``) of both daemons, with their connection and flow counts and what each stream
moved.  The verdict: after the warm-up, neither RSS nor descriptors grow -- the median of the last
third of the samples is at most the median of the first third plus a tolerance (RSS: 3 MB or 5 %;
descriptors: 4, as churned flows hold a socket each until they expire) -- every stream kept
moving to the end, the daemons are alive and neither log holds a traceback.  Exit status 1 when
the verdict fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import hostile
from bench.procstat import rss_mb, tree
from tests.integration.rig import LISTEN_PORT, Rig, Rsockd

KEYS = ("soak-key-one", "soak-key-two")
KEEPALIVES = (5, 3)


# ---------------------------------------------------------------------------------------------
# Traffic through the tunnel


def payload(seq: int, size: int) -> bytes:
    """A datagram that says which one it is and whose every byte can be checked."""
    head = seq.to_bytes(8, "big")
    return (head * (size // 8 + 1))[: max(size, 8)]


class Stream(threading.Thread):
    """One kind of application traffic (a thread): counts datagrams and bytes sent, echoed and bad."""

    def __init__(self, name: str, sock: socket.socket, dst: tuple[str, int] = ("127.0.0.1", LISTEN_PORT)) -> None:
        super().__init__(name=name, daemon=True)
        self.sock, self.dst = sock, dst
        self.sent = self.received = self.bytes = self.corrupt = 0
        self.errors: list[str] = []
        self.halt = threading.Event()
        self.running = threading.Event()  # cleared: pause (send nothing) until set again
        self.running.set()

    def paused(self) -> bool:
        """Block while paused; True when the loop should start over (it was paused, or must stop)."""
        if self.running.is_set():
            return False
        while not self.running.wait(0.1):
            if self.halt.is_set():
                break
        return True

    def check(self, data: bytes) -> bool:
        if len(data) >= 8 and data == payload(int.from_bytes(data[:8], "big"), len(data)):
            self.received += 1
            self.bytes += len(data)
            return True
        self.corrupt += 1
        return False

    def counts(self) -> dict[str, int]:
        return {"sent": self.sent, "received": self.received, "bytes": self.bytes, "corrupt": self.corrupt}

    def stop(self) -> None:
        self.halt.set()
        self.join(5)
        self.sock.close()

    def run(self) -> None:
        try:
            self.loop()
        except OSError as e:  # the socket closed under us at the end; anything else is reported
            if not self.halt.is_set():
                self.errors.append(f"{type(e).__name__}: {e}")

    def loop(self) -> None:
        raise NotImplementedError


class EchoWindow(Stream):
    """Closed-loop bulk: ``window`` datagrams of ``size`` bytes in flight through the echo, as fast as
    the tunnel answers.  A silence of ``timeout`` counts what is in flight as lost and refills."""

    def __init__(self, name: str, sock: socket.socket, size: int = 1200, window: int = 16,
                 timeout: float = 0.2) -> None:
        super().__init__(name, sock)
        self.size, self.window, self.timeout = size, window, timeout

    def loop(self) -> None:
        s = self.sock
        s.settimeout(self.timeout)
        inflight = seq = 0
        while not self.halt.is_set():
            if self.paused():
                inflight = 0
                continue
            while inflight < self.window:
                s.sendto(payload(seq, self.size), self.dst)
                seq += 1
                inflight += 1
                self.sent += 1
            try:
                data = s.recv(65536)
            except TimeoutError:
                inflight = 0
                continue
            self.check(data)
            inflight = max(0, inflight - 1)


class Paced(Stream):
    """Open-loop: ``rate`` datagrams/s of ``size`` bytes, whatever comes back; a second thread counts
    the echoes."""

    def __init__(self, name: str, sock: socket.socket, size: int = 800, rate: float = 300.0) -> None:
        super().__init__(name, sock)
        self.size, self.rate = size, rate
        self.reader = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        self.sock.settimeout(0.2)
        while not self.halt.is_set():
            try:
                self.check(self.sock.recv(65536))
            except TimeoutError:
                continue
            except OSError:
                return

    def loop(self) -> None:
        self.reader.start()
        t0, sent0 = time.monotonic(), 0
        while not self.halt.is_set():
            if self.paused():
                t0, sent0 = time.monotonic(), self.sent
                continue
            self.sock.sendto(payload(self.sent, self.size), self.dst)
            self.sent += 1
            ahead = (self.sent - sent0) / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                self.halt.wait(ahead)

    def stop(self) -> None:
        self.halt.set()
        self.reader.join(5)
        super().stop()


class Pinger(Stream):
    """One small datagram at a time (``Rig.echo_run``), ``rate`` per second; the last 1000 round trips kept."""

    def __init__(self, name: str, rig: Rig, size: int = 64, rate: float = 10.0) -> None:
        super().__init__(name, rig.app_socket())
        self.rig, self.size, self.rate = rig, size, rate
        self.rtts: list[float] = []

    def loop(self) -> None:
        while not self.halt.is_set():
            if self.paused():
                continue
            t0 = time.monotonic()
            r = self.rig.echo_run(1, size=self.size, timeout=1.0, sock=self.sock)
            self.sent += 1
            self.received += r.received
            self.bytes += r.received * self.size
            self.rtts = [*self.rtts[-999:], *r.rtts]
            self.halt.wait(max(0.0, 1 / self.rate - (time.monotonic() - t0)))


class Churn(Stream):
    """A new flow every ``every`` seconds: a fresh socket, ``count`` echoes of random sizes up to
    ``largest``, closed.  Counts the flows whose every datagram came back."""

    def __init__(self, name: str, rig: Rig, largest: int, every: float = 2.0, count: int = 4, seed: int = 1) -> None:
        super().__init__(name, rig.app_socket())
        self.rig, self.largest, self.every, self.count = rig, largest, every, count
        self.rng = random.Random(seed)
        self.flows = self.flows_ok = 0

    def loop(self) -> None:
        while not self.halt.wait(self.every):
            if self.paused():
                continue
            s = self.rig.app_socket()
            ok = 0
            try:
                for _ in range(self.count):
                    size = self.rng.randrange(8, self.largest + 1)
                    got = self.rig.echo_run(1, size=size, sock=s).received
                    ok += got
                    self.bytes += got * size
            finally:
                s.close()
            self.sent += self.count
            self.received += ok
            self.flows += 1
            self.flows_ok += ok == self.count

    def counts(self) -> dict[str, int]:
        return {**super().counts(), "flows": self.flows, "flows_ok": self.flows_ok}


# ---------------------------------------------------------------------------------------------
# Samples and the verdict


def fds(pid: int) -> int:
    """Open descriptors of ``pid`` and its descendants."""
    n = 0
    for p in tree(pid):
        try:
            n += len(os.listdir(f"/proc/{p}/fd"))
        except FileNotFoundError:
            continue
    return n


@dataclass
class Sample:
    t: float  # seconds since the soak began
    rss_mb: dict[str, float]  # daemon -> VmRSS
    fds: dict[str, int]
    conns_up: int  # client connections established
    flows: dict[str, int]
    streams: dict[str, dict[str, int]]
    event: str = ""  # what happened since the previous sample


@dataclass
class Verdict:
    ok: bool
    reasons: list[str]
    growth: dict[str, float]  # series -> median(last third) - median(first third)
    slope_per_min: dict[str, float]  # series -> least-squares slope after the warm-up


def _slope(ts: Sequence[float], ys: Sequence[float]) -> float:
    if len(ts) < 2:
        return 0.0
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den if den else 0.0


def verdict(samples: Sequence[Sample], warmup: float, *, rss_tol_mb: float = 3.0, rss_tol_share: float = 0.05,
            fd_tol: int = 4) -> Verdict:
    """Does any series grow after ``warmup`` seconds?  See the module docstring."""
    after = [s for s in samples if s.t >= warmup]
    reasons: list[str] = []
    growth: dict[str, float] = {}
    slopes: dict[str, float] = {}
    if len(after) < 3:
        return Verdict(False, [f"only {len(after)} samples after the warm-up"], growth, slopes)
    third = max(1, len(after) // 3)
    first, last = after[:third], after[-third:]
    for who in after[0].rss_mb:
        for kind, get, tol in (
            ("rss_mb", lambda s, w=who: s.rss_mb[w], max(rss_tol_mb, rss_tol_share * after[0].rss_mb[who])),
            ("fds", lambda s, w=who: float(s.fds[w]), float(fd_tol)),
        ):
            name = f"{who}.{kind}"
            g = statistics.median(get(s) for s in last) - statistics.median(get(s) for s in first)
            growth[name] = round(g, 2)
            slopes[name] = round(_slope([s.t for s in after], [get(s) for s in after]) * 60, 3)
            if g > tol:
                reasons.append(f"{name} grew by {g:.1f} after the warm-up (tolerance {tol:.1f})")
    return Verdict(not reasons, reasons, growth, slopes)


# ---------------------------------------------------------------------------------------------
# The soak


@dataclass
class Options:
    minutes: float = 30.0
    event_every: float = 30.0  # seconds between events (reload, reconnect, in turn): each kind every minute
    sample_every: float = 10.0
    warmup: float = 0.0  # seconds; 0: a fifth of the soak, at least 20 s
    backend: str = "xdp"
    family: int = 4
    ports: str = "10001-10004"
    duration: int = 10  # idle flow expiry, seconds (churned flows expire during the soak)
    seed: int = 1
    progress: Callable[[str], None] | None = None


@dataclass
class Result:
    samples: list[Sample]
    verdict: Verdict
    events: list[tuple[float, str]]
    problems: list[str]
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict.ok and not self.problems


def _write_config(path: Path, key: str, keepalive: int) -> None:
    path.write_text(f'key = "{key}"\nkeepalive = {keepalive}\n')


class Soak:
    def __init__(self, tmp: Path, o: Options) -> None:
        self.tmp, self.o = tmp, o
        self.conf = {"server": tmp / "server.toml", "client": tmp / "client.toml"}
        self.key_i = self.ka_i = 0
        for p in self.conf.values():
            _write_config(p, KEYS[0], KEEPALIVES[0])
        common = ["--duration", str(o.duration)]
        self.rig = Rig(tmp, backend=o.backend, family=o.family, ports=o.ports,
                       server_args=["-f", str(self.conf["server"]), *common],
                       client_args=["-f", str(self.conf["client"]), *common])
        self.rng = random.Random(o.seed)
        self.events: list[tuple[float, str]] = []
        self.problems: list[str] = []
        self.lanes: hostile.Setup | None = None
        self.streams: list[Stream] = []
        self.t0 = 0.0

    def say(self, msg: str) -> None:
        if self.o.progress is not None:
            self.o.progress(f"[{time.monotonic() - self.t0:6.1f} s] {msg}")

    @property
    def daemons(self) -> dict[str, Rsockd]:
        assert self.rig.server is not None
        return {"server": self.rig.server, "client": self.rig.client}

    # -- events

    def reload(self) -> str:
        """Change the key (both daemons, or the new connections could not agree) or the keepalive."""
        if len(self.events) % 4 == 0:
            self.key_i += 1
            what = f"reload: key -> {KEYS[self.key_i % 2]}"
        else:
            self.ka_i += 1
            what = f"reload: keepalive -> {KEEPALIVES[self.ka_i % 2]}"
        marks = {}
        for name, d in self.daemons.items():
            _write_config(self.conf[name], KEYS[self.key_i % 2], KEEPALIVES[self.ka_i % 2])
            marks[name] = d.notify.mark()
            assert d.proc is not None
            d.proc.send_signal(signal.SIGHUP)
        for name, d in self.daemons.items():
            d.notify.wait(lambda m: m.get("READY") == "1", 20, "READY=1 after the reload", marks[name])
        return what

    def reconnect(self) -> str:
        """An RST at exactly the expected sequence number, at the client or at the server, in turn.

        Traffic pauses for it: on a busy connection the expected number moves on before the RST
        arrives (and a stale one is rightly ignored, RFC 5961).
        """
        assert self.lanes is not None
        at_client = len(self.events) % 4 == 1
        victim, peer, lane = self.lanes.storm.lane("client" if at_client else "server")
        n = self.rig.conns_per_client()
        for _attempt in range(5):
            for s in self.streams:
                s.running.clear()
            try:
                victim.refresh(peer.control)
                index = self.rng.randrange(len(victim.live))
                self._still(victim, peer, index)
                mark = self.rig.client.notify.mark()
                t = hostile.exact_rst(victim, peer, lane, index)
            finally:  # at the server, the client learns of the reset when it next sends (the server answers RST)
                for s in self.streams:
                    s.running.set()
            try:
                self.rig.client.wait_status(rf" [0-{n - 1}]/{n} connections up", 10, since=mark)
                break
            except TimeoutError:
                continue
        else:
            raise TimeoutError("five exact RSTs reset nothing")
        self.rig.client.wait_status(rf" {n}/{n} connections up", 60, since=mark)
        return f"reconnect: exact RST at the {'client' if at_client else 'server'} (port {t.dport})"

    @staticmethod
    def _still(victim: hostile.Victim, peer: hostile.Victim, index: int, timeout: float = 3.0) -> None:
        """Wait until live connection ``index`` of ``victim`` receives nothing more (its ack stands)."""
        end = time.monotonic() + timeout
        victim.refresh(peer.control)
        last = victim.live[index].rcv_nxt
        while time.monotonic() < end:
            time.sleep(0.02)
            victim.refresh(peer.control)
            if victim.live[index].rcv_nxt == last:
                return
            last = victim.live[index].rcv_nxt

    # -- sampling

    def sample(self, event: str) -> Sample:
        pids = {name: d.proc.pid for name, d in self.daemons.items() if d.proc is not None}
        st = {name: d.status() for name, d in self.daemons.items()}
        return Sample(
            t=round(time.monotonic() - self.t0, 1),
            rss_mb={n: rss_mb(p)["rss_mb"] for n, p in pids.items()},
            fds={n: fds(p) for n, p in pids.items()},
            conns_up=st["client"]["connections"]["by_state"].get("established", 0),
            flows={n: int(s["flows"]) for n, s in st.items()},
            streams={s.name: s.counts() for s in self.streams},
            event=event,
        )

    def start_traffic(self) -> None:
        rig = self.rig
        largest = int(rig.client.status()["max_datagram"])
        self.streams = [
            EchoWindow("bulk", rig.app_socket(), size=min(1200, largest), window=16),
            EchoWindow("bulk-small", rig.app_socket(), size=100, window=8),
            Paced("paced", rig.app_socket(), size=800, rate=300),
            Pinger("ping", rig, rate=10),
            Churn("churn", rig, largest=largest, every=2.0, seed=self.o.seed),
        ]
        for s in self.streams:
            s.start()

    def run(self) -> Result:
        o = self.o
        warmup = o.warmup or max(20.0, o.minutes * 60 / 5)
        samples: list[Sample] = []
        with self.rig as rig:
            net = rig.net
            assert rig.server is not None
            self.lanes = hostile.setup(net.ns["s"], net.dev["s"], rig.server.control, net.ns["c"], net.dev["c"],
                                       rig.client.control)
            try:
                self.t0 = time.monotonic()
                self.start_traffic()
                end = self.t0 + o.minutes * 60
                next_sample = self.t0
                next_event = self.t0 + o.event_every
                pending = ""
                while True:
                    now = time.monotonic()
                    if now >= next_sample:
                        samples.append(self.sample(pending))
                        self.say(_line(samples[-1]))
                        pending = ""
                        next_sample += o.sample_every
                    if now >= end:
                        break
                    if now >= next_event and now + 15 < end:  # no event too close to the end
                        what = self.reload() if len(self.events) % 2 == 0 else self.reconnect()
                        self.events.append((round(now - self.t0, 1), what))
                        pending = f"{pending}; {what}" if pending else what
                        self.say(what)
                        next_event += o.event_every
                    time.sleep(max(0.0, min(next_sample, next_event, end) - time.monotonic()))
                final = {s.name: s.counts() for s in self.streams}
                self.check_end(samples, final)
            finally:
                for s in self.streams:
                    s.stop()
                self.lanes.close()
                for name, d in self.daemons.items():
                    if d.proc is None or d.proc.poll() is not None:
                        self.problems.append(f"{name} is not running")
                    if "Traceback" in d.log():
                        self.problems.append(f"{name} logged a traceback")
        streams: dict[str, dict[str, Any]] = {s.name: {**s.counts(), "errors": s.errors} for s in self.streams}
        return Result(samples, verdict(samples, warmup), self.events, self.problems, streams)

    def check_end(self, samples: Sequence[Sample], final: dict[str, dict[str, int]]) -> None:
        """Every stream moved in the last two sample periods, and nothing came back corrupted."""
        if len(samples) >= 3:
            before = samples[-3].streams
            for name, c in final.items():
                if c["received"] <= before.get(name, {}).get("received", 0):
                    self.problems.append(f"stream {name} stopped moving")
        for name, c in final.items():
            if c["corrupt"]:
                self.problems.append(f"stream {name}: {c['corrupt']} datagrams came back corrupted")
        for s in self.streams:
            self.problems += [f"stream {s.name}: {e}" for e in s.errors]


def _line(s: Sample) -> str:
    moved = " ".join(f"{k}={v['received']}" for k, v in s.streams.items())
    return (f"rss server {s.rss_mb['server']:.1f} MB client {s.rss_mb['client']:.1f} MB; fds {s.fds['server']}/"
            f"{s.fds['client']}; up {s.conns_up}; flows {s.flows['server']}/{s.flows['client']}; {moved}"
            + (f"  <- {s.event}" if s.event else ""))


def render(r: Result) -> str:
    lines = ["    t  rss_srv  rss_cli  fd_srv  fd_cli  up  flows  bulk_MB  event"]
    prev_bytes = 0
    for s in r.samples:
        b = s.streams.get("bulk", {}).get("bytes", 0)
        lines.append(f"{s.t:5.0f}  {s.rss_mb['server']:7.1f}  {s.rss_mb['client']:7.1f}  {s.fds['server']:6d}  "
                     f"{s.fds['client']:6d}  {s.conns_up:2d}  {s.flows['server']:5d}  {(b - prev_bytes) / 1e6:7.1f}"
                     f"  {s.event}")
        prev_bytes = b
    v = r.verdict
    lines.append("growth after the warm-up (median of the last third minus the first): "
                 + ", ".join(f"{k} {g:+.1f}" for k, g in v.growth.items()))
    lines.append("slope per minute: " + ", ".join(f"{k} {g:+.2f}" for k, g in v.slope_per_min.items()))
    lines.append("streams: " + "; ".join(f"{k} " + " ".join(f"{a}={b}" for a, b in c.items() if a != "errors")
                                          for k, c in r.streams.items()))
    lines.append(f"events: {len(r.events)}: " + ", ".join(f"{t:.0f}s {w}" for t, w in r.events))
    lines.append("PASS" if r.ok else "FAIL: " + "; ".join(v.reasons + r.problems))
    return "\n".join(lines)


def to_json(r: Result) -> dict[str, Any]:
    return {"ok": r.ok, "verdict": {"ok": r.verdict.ok, "reasons": r.verdict.reasons, "growth": r.verdict.growth,
                                    "slope_per_min": r.verdict.slope_per_min},
            "problems": r.problems, "events": r.events, "streams": r.streams,
            "samples": [vars(s) for s in r.samples]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--event-every", type=float, default=30.0, help="seconds between reloads/reconnects (in turn)")
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds not judged; 0: a fifth of the soak (>= 20 s)")
    ap.add_argument("--backend", choices=("xdp", "nft"), default="xdp")
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.soak: must run as root (network namespaces, XDP)", file=sys.stderr)
        return 2
    o = Options(minutes=args.minutes, event_every=args.event_every, sample_every=args.sample_every,
                warmup=args.warmup, backend=args.backend, family=args.family, seed=args.seed,
                progress=None if args.json else lambda m: print(m, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="rsockd-soak-") as tmp:
        result = Soak(Path(tmp), o).run()
    print(json.dumps(to_json(result)) if args.json else render(result), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
