"""The compiled wait loop (``_datapath.Serve``): what it does with each kind of ready socket.

Real sockets, a real epoll and the real reader and writer; the relay is a recorder of the calls
the loop makes back into it (``Relay._on_data``'s contract), and the endpoint one that takes no
flow itself, so every segment and datagram comes back.  The relay with its endpoint runs the
same loop in every integration test.
"""

from __future__ import annotations

import errno
import math
import select
import socket
import struct
import time
from typing import Any

import pytest

import rsockd
from rsockd.dataplane import relay as relay_mod

datapath = pytest.importorskip("rsockd.dataplane._datapath", reason="the compiled data path is not built (pure run)")
pytestmark = pytest.mark.skipif(rsockd.PURE, reason="RSOCKD_PURE: the package runs its source")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SYN = struct.pack("!HHII", 5 << 12 | 0x02, 65535, 1, 0)  # a bare SYN as steering hands it over: handed back


class Endpoint:
    """Takes no flow: every application datagram comes back to the relay."""

    def fast_flow(self, source: Any, now: float) -> None:
        return None


class Relay:
    """Records what the loop calls; ``on_pump`` runs at each ``_pump``."""

    def __init__(self) -> None:
        self.closing = False
        self._timer_at = math.inf
        self.calls: list[tuple[Any, ...]] = []
        self.handled: dict[int, socket.socket] = {}
        self.on_pump: list[Any] = []

    def _sink_of(self, conn: Any, flow_id: int) -> None:
        return None

    def _tunnel_back(self, back: Any, now: float) -> None:
        local, _remote, seg = back
        self.calls.append(("tunnel_back", local, seg[-1:]))

    def _tunnel_failed(self, err: OSError | None) -> None:
        self.calls.append(("tunnel_failed", err.errno if err else None))

    def _fill_back(self, key: Any, back: Any, now: float) -> None:
        self.calls.append(("fill_back", key, back[1]))

    def _fill_failed(self, key: Any, err: OSError | None) -> None:
        self.calls.append(("fill_failed", key, err.errno if err else None))

    def _handle(self, fd: int) -> None:
        self.calls.append(("handle", self.handled[fd].recv(100)))

    def _pump(self, now: float) -> None:
        assert isinstance(now, float) and abs(now - time.monotonic()) < 1.0  # time.monotonic()'s clock
        self.calls.append(("pump",))
        if self.on_pump:
            self.on_pump.pop(0)()


class Loop:
    def __init__(self) -> None:
        self.poll = select.epoll()
        self.serve = datapath.Serve(self.poll.fileno(), relay_mod.BATCH, relay_mod.READ_BUDGET)
        self.relay = Relay()
        self.reader, self.writer = datapath.Reader(), datapath.Writer()
        self.socks: list[socket.socket] = []

    def udp(self, host: str = "127.0.0.1") -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, 0))
        s.setblocking(False)
        self.socks.append(s)
        return s

    def watch(self, s: socket.socket) -> int:
        self.poll.register(s.fileno(), select.EPOLLIN)
        return s.fileno()

    def run(self, wait: float = 0.0) -> tuple[int, int]:
        return self.serve.run(self.relay, Endpoint(), self.reader, self.writer, time.monotonic() + wait, True,
                              True, None)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.poll.close()


def holds(calls: list[Any], run: list[Any]) -> bool:
    """Whether ``run`` is in ``calls``, one after the other."""
    return any(calls[i:i + len(run)] == run for i in range(len(calls)))


@pytest.fixture
def loop() -> Any:
    lp = Loop()
    yield lp
    lp.close()


def test_each_kind_of_socket_goes_where_the_python_loop_sends_it(loop: Loop) -> None:
    tunnel, app, other, tx = loop.udp("0.0.0.0"), loop.udp(), loop.udp(), loop.udp()
    tunnel.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    port = tunnel.getsockname()[1]
    loop.serve.tunnel(loop.watch(tunnel), socket.AF_INET, port, None)
    loop.serve.fill(loop.watch(app), None)
    loop.relay.handled[loop.watch(other)] = other
    for i in range(3):
        tx.sendto(SYN + bytes([i]), ("127.0.0.1", port))
    tx.sendto(b"hello", app.getsockname())
    tx.sendto(b"other", other.getsockname())
    assert select.select([tunnel, app, other], [], [], 2.0)[0]
    assert loop.run() == (1, 0)  # one round: nothing came after it
    calls = loop.relay.calls
    # each ready socket in turn: the reader's hand-backs then the pump, the writer's, the rest
    tunnel_calls = [("tunnel_back", (bytes([127, 0, 0, 1]), port), bytes([i])) for i in range(3)] + [("pump",)]
    fill_calls = [("fill_back", None, b"hello"), ("pump",)]
    assert holds(calls, tunnel_calls) and holds(calls, fill_calls), calls
    assert ("handle", b"other") in calls and len(calls) == 4 + 2 + 1


def test_a_forgotten_socket_goes_to_the_relays_own_handler(loop: Loop) -> None:
    app, tx = loop.udp(), loop.udp()
    fd = loop.watch(app)
    loop.serve.fill(fd, None)
    loop.serve.forget(fd)
    loop.relay.handled[fd] = app
    tx.sendto(b"x", app.getsockname())
    assert select.select([app], [], [], 2.0)[0]
    loop.run()
    assert loop.relay.calls == [("handle", b"x")]


def test_it_waits_for_the_next_datagram_itself_until_closing(loop: Loop) -> None:
    app, tx = loop.udp(), loop.udp()
    loop.serve.fill(loop.watch(app), ("k",))
    relay = loop.relay
    # each pump sends the next datagram, so the loop's own wait finds it; the third closes the relay
    relay.on_pump = [lambda: tx.sendto(b"2", app.getsockname()), lambda: tx.sendto(b"3", app.getsockname()),
                     lambda: setattr(relay, "closing", True)]
    tx.sendto(b"1", app.getsockname())
    assert select.select([app], [], [], 2.0)[0]
    assert loop.run(wait=5.0) == (1, 2)  # asyncio's wake-up, then two of its own; closing ends it at once
    assert [c for c in relay.calls if c[0] == "fill_back"] == [("fill_back", ("k",), d) for d in (b"1", b"2", b"3")]


def test_it_returns_at_the_endpoints_timer(loop: Loop) -> None:
    app, tx = loop.udp(), loop.udp()
    loop.serve.fill(loop.watch(app), None)
    loop.relay._timer_at = time.monotonic() + 0.05
    tx.sendto(b"1", app.getsockname())
    assert select.select([app], [], [], 2.0)[0]
    start = time.monotonic()
    assert loop.run(wait=5.0) == (1, 0)
    assert time.monotonic() - start < 2.0  # the timer's 50 ms, not the 5 s the relay allowed


def test_a_failed_read_is_counted_and_the_socket_read_on(loop: Loop) -> None:
    closed = loop.udp()
    dead = closed.getsockname()
    closed.close()
    target = loop.udp()
    target.connect(dead)
    target.send(b"to nobody")  # ICMP port unreachable: the next read fails with ECONNREFUSED
    peer = loop.udp()
    peer.connect(target.getsockname())
    loop.serve.fill(loop.watch(target), ("flow",))
    assert select.select([target], [], [], 2.0)[0]
    loop.run()
    assert loop.relay.calls == [("fill_failed", ("flow",), errno.ECONNREFUSED), ("pump",)]


def test_an_error_in_the_relay_ends_the_run_with_it(loop: Loop) -> None:
    app, tx = loop.udp(), loop.udp()
    loop.serve.fill(loop.watch(app), None)

    def fail(*_args: Any) -> None:
        raise RuntimeError("from the relay")

    loop.relay._fill_back = fail  # type: ignore[method-assign]
    tx.sendto(b"x", app.getsockname())
    assert select.select([app], [], [], 2.0)[0]
    with pytest.raises(RuntimeError, match="from the relay"):
        loop.run()
