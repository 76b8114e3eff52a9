"""``rsockd``: wires config, steering, the relay, systemd notifications and the control socket.

Start-up order matters: sockets are bound first (every port the XDP program rewrites must have a
bound UDP socket, or the kernel answers with ICMP port unreachable), then stale state of this
instance is removed and steering attached, then the control socket listens, then READY=1.
Every exit path after attaching detaches (``finally``); SIGTERM/SIGINT stop cleanly, SIGHUP
reloads the configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..dataplane.relay import ClientRelay, Relay, ServerRelay
from ..errors import ConfigError, RsockdError, SteerError
from ..logs import setup as setup_logging
from ..steer import STEER_COUNTERS, Steering, SteerPlan
from ..steer.choose import choose_steering, cleanup_stale, unload_notrack
from .config import Config, load_invocation
from .control import ControlServer
from .notify import Notifier
from .status import build_info, connection_rows, merge_status, relay_status, worker_row
from .wiring import apply_live, policy_of
from .worker import Worker, WorkerGone, share, spawn, stop_all

LOG = logging.getLogger("rsockd")

#: Keys a reload applies in place; any other change rebuilds the relay and steering.
LIVE_KEYS = {"key", "keepalive", "dead_timeout", "syn_timeout", "reconnect_min", "reconnect_max", "log_level",
             "duration", "target", "hello_skew", "max_sessions", "max_flows", "max_conns_per_client", "backlog",
             "syn_rate", "syn_burst"}


def _stall() -> dict[str, Any]:
    time.sleep(2.0)
    return {"stalled": 2.0}


def conn_timeout(cfg: Config) -> int:
    """How long a server connection stays steered without a segment: well past the dead-peer
    timeout (keepalives refresh it long before), so steering never forgets a live connection."""
    return max(60, math.ceil(2 * cfg.dead_timeout))


class Daemon:
    def __init__(self, cfg: Config, argv: Sequence[str] = (), notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.argv = list(argv)  # re-read on SIGHUP
        self.notifier = notifier or Notifier()
        self.relay: Relay[Any] | None = None
        self.steering: Steering | None = None
        self.control: ControlServer | None = None
        self.plan: SteerPlan | None = None
        self.started = time.time()
        self._stop = asyncio.Event()
        self._watchdog: asyncio.TimerHandle | None = None
        self._status_timer: asyncio.TimerHandle | None = None
        self._tick_timer: asyncio.TimerHandle | None = None
        self._released: list[tuple[str, int, str, int]] = []  # server: ended connections, for steering
        self._reloading = False
        self.workers: list[Worker] = []
        self.exit_code = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        self._start_watchdog()
        try:
            await self._bring_up()
            commands = {"status": self.status, "ports": self.ports}
            if os.environ.get("RSOCKD_TEST_HOOKS") == "1":
                # Tests prove the watchdog runs on the event loop by blocking the loop (never in production).
                commands["debug-stall"] = _stall
            self.control = ControlServer(self.cfg.control_socket_path, commands)
            await self.control.start()
            self.notifier.ready(self.status_line())
            LOG.info("ready: %s", self.status_line())
            self._refresh_status()
            self._tick_steering()
            await self._stop.wait()
            LOG.info("stopping")
            self.notifier.stopping()
        finally:
            await self._tear_down()
        return self.exit_code

    async def _bring_up(self, keep: Relay[Any] | None = None) -> None:
        """Bind, attach, start.  ``keep``: a client relay whose identity (client id, flows) to carry
        over, so the server keeps the session and its flows."""
        cfg = self.cfg
        relay: Relay[Any]
        if cfg.role == "server":
            relay = ServerRelay(cfg, policy_of(cfg), share(cfg.ports, cfg.workers, 0))
        elif isinstance(keep, ClientRelay):
            relay = ClientRelay(cfg, policy_of(cfg), keep.client_id, keep.flows)
        else:
            relay = ClientRelay(cfg, policy_of(cfg))
        self.relay = relay
        relay.on_change = self._refresh_status
        relay.on_release = self._release
        if isinstance(relay, ServerRelay):
            relay.bind(self._server_interfaces())
            if cfg.workers > 1:
                if sys.platform != "linux":
                    raise RsockdError("workers: more than one worker is supported on Linux only")
                # Every steered port needs its bound socket before steering attaches.
                self.workers = await asyncio.get_running_loop().run_in_executor(None, spawn, cfg, relay.interfaces)
                for w in self.workers:
                    asyncio.get_running_loop().add_reader(w.sock.fileno(), self._worker_exited, w)
                LOG.info("%d workers: %s", cfg.workers, "; ".join(
                    f"{i} (pid {pid}) ports {','.join(map(str, ports))}" for i, pid, ports in
                    [(0, os.getpid(), relay.ports), *((w.index, w.pid, w.ports) for w in self.workers)]))
            plan = SteerPlan(cfg.instance, "server", relay.interfaces, frozenset(cfg.ports), mark=cfg.mark,
                             xdp_mode=cfg.xdp_mode, syn_rate=cfg.syn_rate, syn_burst=cfg.syn_burst,
                             receive_ports=frozenset(relay.ports) if self.workers else frozenset(),
                             syn_key=relay.endpoint.keyring.syn_key, conn_timeout=conn_timeout(cfg))
        else:
            assert isinstance(relay, ClientRelay)
            route = relay.route()
            if cfg.dev:
                route = dataclasses.replace(route, interface=cfg.dev[0])
            relay.bind(route)
            relay.interfaces = cfg.dev or relay.interfaces
            # the connections' 4-tuples are in the plan before any SYN leaves (relay.start, below)
            plan = SteerPlan(cfg.instance, "client", relay.interfaces, frozenset(cfg.ports),
                             local_ports=frozenset(relay.local_ports), peers=frozenset({relay.server_ip}),
                             mark=cfg.mark, xdp_mode=cfg.xdp_mode, conns=frozenset(relay.conn_tuples()))
        self.plan = plan
        if "tcp" in cfg.transports:
            self.steering = await self._attach(plan)
            relay.add_receivers(self.steering.receivers())
            if self.workers and self.steering.receivers():  # a capture backend: each worker opens its own
                for w in self.workers:
                    self._ask(w, "capture", plan)
            LOG.info("steering: %s on %s", self.steering.name,
                     ", ".join(f"{d['interface']} ({d['mode']})" for d in self.steering.describe()))
        if isinstance(relay, ClientRelay):
            relay.on_rebind = self._local_ports_changed
            relay.on_path_change = self._route_moved
            relay.start()

    def _worker_exited(self, w: Worker) -> None:
        """A worker's socketpair became readable outside a request: it has exited (or, after a
        timed-out request, answered late: it is treated as failed either way)."""
        why = "answered out of turn"
        if w.exited():
            try:
                why = f"exited with status {w.proc.wait(2.0)}"
            except subprocess.TimeoutExpired:
                why = "closed its channel"
        self._worker_failed(w, why)

    def _worker_failed(self, w: Worker, why: str) -> None:
        """A worker that exited or stopped answering takes the daemon down with it: its ports
        would be dead, and a restart by the service manager brings back a consistent service."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(w.sock.fileno())
        if self._stop.is_set() and self.exit_code == 0:  # stopping anyway: not a failure
            LOG.info("worker %d (pid %d) %s while stopping", w.index, w.pid, why)
            return
        if self.exit_code == 0:
            LOG.error("worker %d (pid %d, ports %s) %s; stopping (the service manager restarts rsockd)",
                      w.index, w.pid, ",".join(map(str, w.ports)), why)
        self.exit_code = 1
        self._stop.set()

    def _ask(self, w: Worker, *msg: Any) -> Any:
        """A request to a worker; ``WorkerGone`` (after stopping the daemon) when it cannot answer."""
        try:
            return w.request(*msg)
        except WorkerGone as e:
            self._worker_failed(w, f"did not answer {msg[0]!r}: {e}")
            raise

    def _stop_workers(self) -> None:
        workers, self.workers = self.workers, []
        loop = asyncio.get_running_loop()
        for w in workers:
            with contextlib.suppress(Exception):
                loop.remove_reader(w.sock.fileno())
        stop_all(workers)

    def _local_ports_changed(self) -> None:
        """The client rebound to a new address: steer its new local ports (no recompile)."""
        relay, plan = self.relay, self.plan
        assert isinstance(relay, ClientRelay) and plan is not None
        self.plan = dataclasses.replace(plan, local_ports=frozenset(relay.local_ports),
                                        conns=frozenset(relay.conn_tuples()))
        if self.steering is not None:
            try:
                self.steering.update(self.plan)
            except SteerError as e:
                LOG.error("steering the new local ports failed: %s; re-attaching", e)
                asyncio.get_running_loop().create_task(self._rebuild(self.cfg))

    def _route_moved(self) -> None:
        """The route to the server moved to another interface: attach there, keep the session."""
        asyncio.get_running_loop().create_task(self._rebuild(self.cfg))

    def _server_interfaces(self) -> tuple[str, ...]:
        from ..dataplane.platform import default_interfaces, interface_exists, interface_of

        cfg = self.cfg
        if cfg.dev:
            names = cfg.dev
        elif cfg.local_ip:
            found = interface_of(cfg.local_ip)
            if found is None:
                raise RsockdError(f"local_ip {cfg.local_ip} is not an address of this host")
            names = (found,)
        else:
            names = tuple(default_interfaces())
            if not names:
                raise RsockdError("no default route: set dev (the interface clients reach us on)")
        for name in names:
            if not interface_exists(name):
                raise RsockdError(f"dev: interface {name} does not exist")
        return names

    async def _attach(self, plan: SteerPlan) -> Steering:
        loop = asyncio.get_running_loop()
        removed = await loop.run_in_executor(None, cleanup_stale, plan.instance)
        for what in removed:
            LOG.warning("removed stale state of instance %s: %s", plan.instance, what)
        # bcc compiles in a child for seconds: keep systemd's start timeout ahead of it.
        self.notifier.extend_timeout(30)
        ticker = loop.call_later(10, self._extend_while_attaching)
        try:
            return await loop.run_in_executor(None, choose_steering, self.cfg.backend, plan)
        finally:
            ticker.cancel()

    def _extend_while_attaching(self) -> None:
        self.notifier.extend_timeout(30)
        asyncio.get_running_loop().call_later(10, self._extend_while_attaching)

    async def _tear_down(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for handle in (self._status_timer, self._tick_timer):
            if handle is not None:
                handle.cancel()
        if self.relay is not None:
            with contextlib.suppress(Exception):
                self.relay.close()
        self._stop_workers()
        try:
            self._detach()
        except Exception as e:  # keep going: the control socket must still be removed
            LOG.error("detaching steering failed: %s", e)
            self.steering = None
        if self.control is not None:
            await self.control.close()
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.cfg.control_socket_path))

    # -- reload ---------------------------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: re-read the config; apply live keys in place, rebuild for the rest."""
        if self._reloading or self.relay is None:
            return
        self._reloading = True
        self.notifier.reloading()
        try:
            try:
                new = load_invocation(self.argv).config
            except ConfigError as e:
                LOG.error("reload: %s; keeping the running configuration", e)
                return
            changed = {f.name for f in dataclasses.fields(Config) if getattr(new, f.name) != getattr(self.cfg, f.name)}
            if not changed:
                LOG.info("reload: configuration unchanged")
                return
            if changed <= LIVE_KEYS:
                self._apply_live(new, changed)
            else:
                LOG.info("reload: %s changed; re-attaching", ", ".join(sorted(changed - LIVE_KEYS)))
                await self._rebuild(new)
            LOG.info("reload: applied %s", ", ".join(sorted(changed)))
        finally:
            self._reloading = False
            self.notifier.ready(self.status_line())

    def _apply_live(self, new: Config, changed: set[str]) -> None:
        relay = self.relay
        assert relay is not None
        self.cfg = new
        apply_live(relay, new, changed)
        for w in self.workers:
            try:
                self._ask(w, "config", new, changed)
            except RsockdError as e:
                LOG.error("reload: worker %d: %s", w.index, e)
        if {"syn_rate", "syn_burst", "key"} & changed and self.plan is not None and self.steering is not None:
            syn_key = relay.endpoint.keyring.syn_key if self.plan.role == "server" else b""
            self.plan = dataclasses.replace(self.plan, syn_rate=new.syn_rate, syn_burst=new.syn_burst,
                                            syn_key=syn_key)
            self.steering.update(self.plan)

    async def _rebuild(self, new: Config) -> None:
        old_cfg = self.cfg
        old = self.relay
        if old is not None:
            old.close()
            self.relay = None
        self._stop_workers()
        self._detach()
        self.cfg = new
        try:
            await self._bring_up(keep=old)
        except RsockdError as e:
            LOG.error("reload: %s; going back to the previous configuration", e)
            if self.relay is not None:
                self.relay.close()
                self.relay = None
            self._stop_workers()
            self._detach()
            self.cfg = old_cfg
            await self._bring_up(keep=old)

    def _detach(self) -> None:
        steering, self.steering = self.steering, None
        if steering is not None:
            steering.detach()
            if steering.name == "xdp":
                unload_notrack(self.cfg.instance)

    # -- watchdog and status --------------------------------------------------------------------

    def _start_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return

        def tick() -> None:
            # Runs on the event loop: a blocked loop sends nothing and systemd notices.
            self.notifier.watchdog()
            self._watchdog = asyncio.get_running_loop().call_later(interval, tick)

        tick()

    def _release(self, conns: list[tuple[str, int, str, int]]) -> None:
        """Server connections ended: steering forgets their 4-tuples, in one go per loop pass."""
        if not self._released:
            asyncio.get_running_loop().call_soon(self._forget_released)
        self._released += conns

    def _forget_released(self) -> None:
        conns, self._released = self._released, []
        if self.steering is not None:
            try:
                self.steering.forget(conns)
            except Exception as e:  # the entries then age out; nothing else depends on it
                LOG.warning("steering: forgetting ended connections: %s", e)

    def _tick_steering(self) -> None:
        """Once a second: steering's time-dependent state (the SYN tag's slot)."""
        if self.steering is not None:
            try:
                self.steering.tick(time.time())
            except Exception as e:  # a failed map write must not stop the loop; the next tick tries again
                LOG.warning("steering: %s", e)
        self._tick_timer = asyncio.get_running_loop().call_later(1.0, self._tick_steering)

    def _refresh_status(self) -> None:
        if self._status_timer is not None:
            self._status_timer.cancel()
        self.notifier.status(self.status_line())
        self._status_timer = asyncio.get_running_loop().call_later(1.0, self._refresh_status)

    def status_line(self, st: dict[str, Any] | None = None) -> str:
        """systemd's STATUS line; ``st``: the relay status when the caller has it already."""
        relay = self.relay
        if relay is None:
            return "starting"
        backend = self.steering.name if self.steering else "udp only"
        if isinstance(relay, ServerRelay):
            st = st or self._relay_status()
            up = st["connections"]["by_state"].get("established", 0)
            workers = f", {self.cfg.workers} workers" if self.workers else ""
            return (f"server, {backend}{workers}: {up} connections up, {st['sessions']} sessions, "
                    f"{st['flows']} flows, {st['half_open']} half-open")
        assert isinstance(relay, ClientRelay)
        conns = relay.connections()
        up = sum(1 for c in conns if c.established)
        return f"client, {backend}: {up}/{len(conns)} connections up, {len(relay.endpoint.flows.by_id)} flows"

    def status(self) -> dict[str, Any]:
        relay = self.relay
        cfg = self.cfg
        out: dict[str, Any] = {
            "instance": cfg.instance, "pid": os.getpid(), "version": __version__, "role": cfg.role,
            "started": self.started, "uptime": round(time.time() - self.started, 3), "ports": list(cfg.ports),
            "transports": list(cfg.transports), "workers": cfg.workers, "build": build_info(),
        }
        steer: dict[str, int] = dict.fromkeys(STEER_COUNTERS, 0)
        if self.steering is not None:
            with contextlib.suppress(Exception):
                steer.update(self.steering.counters())
        out["backend"] = {
            "name": self.steering.name if self.steering else None,
            "interfaces": self.steering.describe() if self.steering else [],
        }
        out["steering"] = steer
        if relay is None:
            out["status"] = self.status_line()
            return out
        st = self._relay_status()
        if "receiver_dropped" in st:
            steer["receiver_dropped"] = steer.get("receiver_dropped", 0) + st.pop("receiver_dropped")
        out["status"] = self.status_line(st)
        out.update(st)
        out["mtu"] = relay.mtu
        out["max_datagram"] = relay.max_datagram
        return out

    def _relay_status(self) -> dict[str, Any]:
        """The relay's status, with every worker's added in and a ``by_worker`` breakdown."""
        assert self.relay is not None
        mine = relay_status(self.relay)
        if not self.workers:
            return mine
        theirs: list[dict[str, Any]] = []
        rows = [worker_row(0, os.getpid(), getattr(self.relay, "ports", ()), mine)]
        for w in self.workers:
            try:
                st = self._ask(w, "status")
            except RsockdError as e:
                rows.append({"index": w.index, "pid": w.pid, "ports": list(w.ports), "error": str(e)})
                continue
            theirs.append(st)
            rows.append(worker_row(w.index, w.pid, w.ports, st))
        out = merge_status(mine, theirs)
        out["by_worker"] = rows
        if any("receiver_dropped" in st for st in theirs):  # their own capture sockets (nft)
            out["receiver_dropped"] = sum(st.get("receiver_dropped", 0) for st in theirs)
        return out

    def ports(self) -> dict[str, Any]:
        relay = self.relay
        if relay is None:
            return {"connections": []}
        conns = connection_rows(relay)
        if self.workers:
            for c in conns:
                c["worker"] = 0
            for w in self.workers:
                with contextlib.suppress(RsockdError):
                    conns += [{**c, "worker": w.index} for c in self._ask(w, "ports")]
        return {"role": self.cfg.role, "connections": conns}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        inv = load_invocation(args)
    except ConfigError as e:
        print(f"rsockd: {e}", file=sys.stderr)
        return e.exit_code
    cfg = inv.config
    setup_logging(cfg.log_level)
    if inv.check:
        from ..cli.check import run_checks

        return run_checks(cfg)
    if os.geteuid() != 0:
        need = ("raw sockets, XDP/nftables need CAP_NET_RAW, CAP_NET_ADMIN, CAP_BPF" if sys.platform == "linux"
                else "raw sockets, /dev/bpf and pf need root")
        print(f"rsockd: must run as root ({need})", file=sys.stderr)
        return 4
    LOG.info("rsockd %s starting: instance %s, %s", __version__, cfg.instance, cfg.role)
    try:
        return asyncio.run(Daemon(cfg, args).run())
    except RsockdError as e:
        LOG.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
