"""Server workers: ``workers = N`` runs the server as N processes, each owning a share of the
tunnel ports (docs/design.md, "Workers").

Worker 0 is the daemon itself: it attaches steering, serves the control socket and talks to
systemd.  Workers 1..N-1 are child processes (``python -m rsockd.service`` with
``RSOCKD_WORKER_FD`` set) that bind their own ports' sockets and run a ``ServerRelay`` of their own;
they never touch steering.  A client opens one connection per server port, so its connections
spread over the workers by port: no connection moves between processes, a worker needs no shared
state, and which worker serves a connection is known from its port alone.

Parent and child speak over a socketpair: 4-byte length + pickle, strictly request/reply from
the parent (both ends are this program, started by the same user).  A child stops when the
socketpair closes and ignores SIGTERM/SIGINT/SIGHUP (the daemon decides); ``PR_SET_PDEATHSIG``
kills it when the daemon dies.  The daemon stops (and systemd restarts it) when a child dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from ..dataplane.relay import ServerRelay
from ..errors import RsockdError
from ..steer import PacketSocketReceiver, SteerPlan
from .config import Config
from .status import connection_rows, relay_status
from .wiring import apply_live, policy_of

LOG = logging.getLogger(__name__)

WORKER_ENV = "RSOCKD_WORKER_FD"
_LEN = struct.Struct("!I")
START_TIMEOUT = 30.0  # a child imports, binds and answers well within this
REQUEST_TIMEOUT = 5.0  # a worker that cannot answer within this is wedged: the daemon stops (its watchdog)


def share(ports: Iterable[int], workers: int, index: int) -> tuple[int, ...]:
    """Worker ``index``'s tunnel ports: every ``workers``-th port of the sorted range."""
    return tuple(sorted(ports))[index::workers]


class WorkerGone(RsockdError):
    """A worker did not answer: it exited or stopped responding."""


def send_msg(sock: socket.socket, msg: Any) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_msg(sock: socket.socket, timeout: float | None) -> Any:
    """One message; ``WorkerGone`` on EOF or when none arrives within ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([sock], [], [], left)[0]:
                    raise WorkerGone("no answer")
            try:
                chunk = sock.recv(n - len(buf))
            except BlockingIOError:
                continue
            except OSError as e:
                raise WorkerGone(e.strerror or str(e)) from None
            if not chunk:
                raise WorkerGone("closed")
            buf += chunk
        return buf

    (size,) = _LEN.unpack(exactly(_LEN.size))
    return pickle.loads(exactly(size))


# ---------------------------------------------------------------------------------------------
# The daemon's side


@dataclass
class Spec:
    """What a child needs to start: sent as its first message."""

    config: Config
    index: int
    interfaces: tuple[str, ...]


class Worker:
    """The daemon's handle on one child worker."""

    def __init__(self, index: int, ports: tuple[int, ...], proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.index = index
        self.ports = ports
        self.proc = proc
        self.sock = sock

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, *msg: Any, timeout: float = REQUEST_TIMEOUT) -> Any:
        try:
            send_msg(self.sock, msg)
        except OSError as e:
            raise WorkerGone(f"worker {self.index}: {e.strerror}") from None
        kind, data = recv_msg(self.sock, timeout)
        if kind == "error":
            raise RsockdError(data)
        return data

    def exited(self) -> bool:
        """True when the child has gone (its end of the socketpair is closed)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def stop(self, timeout: float = 5.0) -> int | None:
        """Close the socketpair (the child closes its connections and exits); kill it after ``timeout``."""
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            LOG.warning("worker %d (pid %d) did not stop within %g s; killing it", self.index, self.pid, timeout)
            self.proc.kill()
            return self.proc.wait()


def spawn(cfg: Config, interfaces: tuple[str, ...]) -> list[Worker]:
    """Start workers 1..N-1 and wait until each has bound its ports.  On any failure every
    started child is stopped and ``RsockdError`` says which worker failed and why."""
    started: list[Worker] = []
    try:
        for index in range(1, cfg.workers):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with theirs:
                env = {**os.environ, WORKER_ENV: str(theirs.fileno())}
                try:
                    proc = subprocess.Popen([sys.executable, "-m", "rsockd.service"], env=env,
                                            stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
                except OSError as e:
                    mine.close()
                    raise RsockdError(f"worker {index}: cannot start {sys.executable}: {e.strerror}") from None
            w = Worker(index, share(cfg.ports, cfg.workers, index), proc, mine)
            started.append(w)
            send_msg(mine, ("start", Spec(cfg, index, interfaces)))
        for w in started:
            try:
                kind, data = recv_msg(w.sock, START_TIMEOUT)
            except WorkerGone as e:
                raise RsockdError(f"worker {w.index} (pid {w.pid}) failed to start: {e}") from None
            if kind == "error":
                raise RsockdError(f"worker {w.index}: {data}")
    except BaseException:
        stop_all(started)
        raise
    return started


def stop_all(workers: list[Worker]) -> None:
    for w in workers:  # close every socketpair first: the children stop in parallel
        with contextlib.suppress(OSError):
            w.sock.close()
    for w in workers:
        w.stop()


# ---------------------------------------------------------------------------------------------
# The child's side


class Child:
    """A worker process: a ``ServerRelay`` on its share of the ports, answering the daemon."""

    def __init__(self, sock: socket.socket, spec: Spec) -> None:
        self.sock = sock
        self.spec = spec
        self.cfg = spec.config
        self.ports = share(self.cfg.ports, self.cfg.workers, spec.index)
        self._stop = asyncio.Event()
        self._capture: list[socket.socket] = []
        self._capture_dropped = 0
        self.relay: ServerRelay | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # The daemon decides when a worker stops (it closes the socketpair): systemd's SIGTERM to
        # the whole cgroup, or a terminal's SIGINT, must not make a worker look as if it died.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda: None)
        relay = ServerRelay(self.cfg, policy_of(self.cfg), self.ports)
        try:
            try:
                relay.bind(self.spec.interfaces)
            except RsockdError as e:
                send_msg(self.sock, ("error", str(e)))
                return 1
            send_msg(self.sock, ("bound", None))
            self.relay = relay
            loop.add_reader(self.sock.fileno(), self._on_request)
            await self._stop.wait()
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.sock.fileno())
            relay.close()
            for s in self._capture:
                s.close()
        return 0

    def _on_request(self) -> None:
        try:
            msg = recv_msg(self.sock, REQUEST_TIMEOUT)
        except WorkerGone:  # the daemon closed its end (stopping) or died
            self._stop.set()
            return
        try:
            reply = ("ok", self._handle(msg))
        except (RsockdError, OSError) as e:
            reply = ("error", f"worker {self.spec.index}: {e}")
        with contextlib.suppress(OSError):
            send_msg(self.sock, reply)

    def _handle(self, msg: tuple[Any, ...]) -> Any:
        kind = msg[0]
        relay = self.relay
        assert relay is not None
        if kind == "status":
            st = relay_status(relay)
            if self._capture:  # our own packet sockets' losses: the daemon adds them to its steering's
                from ..steer.nft import receiver_drops

                self._capture_dropped += sum(receiver_drops(s) for s in self._capture)
                st["receiver_dropped"] = self._capture_dropped
            return st
        if kind == "ports":
            return connection_rows(relay)
        if kind == "capture":  # the daemon attached a capture backend: receive our ports' segments
            plan: SteerPlan = msg[1]
            self._open_capture(replace(plan, receive_ports=frozenset(self.ports)))
            return None
        if kind == "config":
            new, changed = msg[1], msg[2]
            apply_live(relay, new, changed)
            self.cfg = new
            return None
        raise RsockdError(f"unknown request {kind!r}")

    def _open_capture(self, plan: SteerPlan) -> None:
        from ..steer import nft

        if self._capture:
            raise RsockdError("capture already open")
        program = nft.receiver_filter(plan)
        for iface in plan.interfaces:
            self._capture.append(nft.open_receiver(iface, program))
        assert self.relay is not None
        # SYNs included: the daemon's SYN queue checks their tags, the sets follow (docs/design.md).
        self.relay.add_receivers([PacketSocketReceiver(s, shared=True) for s in self._capture])


def child_main() -> int:
    """Entry of a worker process (``RSOCKD_WORKER_FD`` names its end of the socketpair)."""
    from ..logs import setup as setup_logging
    from ..steer.bcc_loader import die_with_parent

    die_with_parent(signal.SIGKILL)
    sock = socket.socket(fileno=int(os.environ.pop(WORKER_ENV)))
    try:
        kind, spec = recv_msg(sock, START_TIMEOUT)
    except WorkerGone:
        return 1
    assert kind == "start" and isinstance(spec, Spec)
    setup_logging(spec.config.log_level, prefix=f"worker {spec.index}: ")
    try:
        return asyncio.run(Child(sock, spec).run())
    except RsockdError as e:
        LOG.error("%s", e)
        return e.exit_code
