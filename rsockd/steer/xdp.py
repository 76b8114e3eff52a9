"""XDP ingress rewrite + TC egress guard: the Linux steering backend (daemon side).

The daemon never imports bcc.  ``attach`` runs ``python -m rsockd.steer.bcc_loader`` — a
short-lived child that compiles ``bpf/ingress.c`` + ``bpf/egress.c``, loads them, pins the maps
under ``/sys/fs/bpf/rsockd/<instance>/``, fills them and attaches — then opens the pinned maps
with ``bpfsys``.  Everything after that (``update``, ``counters``, ``detach``) is ``bpf(2)`` and
rtnetlink from this process.

Programs attached through netlink stay attached when the process that attached them dies.
Each carries its owner in its ``config`` map (``instance_tag``), so ``cleanup_stale`` can find
an instance's leftovers by walking the links of the network namespace even after SIGKILL, when
the pins may be gone with the mount namespace (``ip netns exec``).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..caps import CAP_NET_ADMIN, CAP_SYS_ADMIN, effective_caps
from ..core import syntag
from ..core.framing import Keyring
from ..errors import SteerError
from ..netlink import Host
from . import STEER_COUNTERS, SteerPlan, bpfsys, xdplink
from .bpfsys import (
    CONFIG_TAG_END,
    PORT_LOCAL,
    PORT_PEER,
    PORT_SERVER,
    PROG_PREFIX,
    BpfMap,
    PinnedMaps,
    RsockdConfig,
    conn_key,
)
from .xdplink import ETH_P_ALL, TC_PARENT_EGRESS, TC_PARENT_INGRESS, XDP_MODE_FLAGS, TcFilter

LOG = logging.getLogger(__name__)

LOADER_MODULE = "rsockd.steer.bcc_loader"
XDP_PROG_NAME = "rsockd_xdp"
GUARD_PROG_NAME = "rsockd_guard"
#: tc priority of the guard filter on clsact egress ("rs"); its handle comes from the tag.
GUARD_PRIO = 0x7273

_INSTANCE_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_GONE = (errno.ENOENT, errno.ENODEV, errno.ESRCH)


def instance_tag(name: str) -> int:
    """The owner tag of an instance: the first 8 bytes of BLAKE2s(name), read big-endian.

    Stored as the u64 ``rsockd_config.instance_tag`` (host order in the map, like every
    integer there), so ``config`` says which instance a program belongs to.
    """
    return int.from_bytes(hashlib.blake2s(name.encode()).digest()[:8], "big")


def guard_handle(tag: int) -> int:
    """The cls_bpf handle of an instance's guard filter: distinct instances, distinct handles."""
    return (tag & 0xFFFFFFFF) or 1


def plan_ports(plan: SteerPlan) -> dict[int, int]:
    """The ``ports`` map contents of a plan (port -> PORT_* bits)."""
    ports: dict[int, int] = {}
    if plan.role == "server":
        for p in plan.tunnel_ports:
            ports[p] = ports.get(p, 0) | PORT_SERVER
    else:
        for p in plan.tunnel_ports:
            ports[p] = ports.get(p, 0) | PORT_PEER
        for p in plan.local_ports:
            ports[p] = ports.get(p, 0) | PORT_LOCAL
    return ports


def _plan_peers(plan: SteerPlan) -> list[str]:
    return sorted(plan.peers) if plan.role == "client" else []


def plan_syn_limit(plan: SteerPlan) -> tuple[int, int]:
    """``(syn_rate, syn_burst)`` for the config map: a server's limit; a client has none
    (it never receives a SYN without ACK on a steered port)."""
    return (plan.syn_rate, plan.syn_burst) if plan.role == "server" else (0, 0)


def plan_syn_key(plan: SteerPlan) -> bytes:
    """The SYN tag key the server's program checks: the plan's, else the default key's."""
    return plan.syn_key or Keyring.from_secret(None).syn_key


def plan_conns(plan: SteerPlan) -> set[bytes]:
    """The ``conns`` keys of a client's connections: their segments as they arrive from the server."""
    if plan.role != "client":
        return set()
    return {conn_key(server, local, port, lport) for local, lport, server, port in plan.conns}


def _check_instance(name: str) -> None:
    # the name becomes a path under /sys/fs/bpf
    if not _INSTANCE_RE.fullmatch(name):
        raise SteerError(f"instance name {name!r} must be 1-64 of A-Z a-z 0-9 _ . @ -")


def bcc_available() -> str | None:
    """None when the XDP backend can work here, else a one-line reason (for the nft fallback)."""
    if importlib.util.find_spec("bcc") is None:
        return "bcc is not installed (Debian: python3-bpfcc)"
    release = os.uname().release
    if not (os.path.isdir(f"/lib/modules/{release}/build") or os.path.exists("/sys/kernel/kheaders.tar.xz")):
        return f"no kernel headers at /lib/modules/{release}/build (Debian: linux-headers-{release})"
    caps = effective_caps()
    missing = [name for name, bit in (("CAP_SYS_ADMIN", CAP_SYS_ADMIN), ("CAP_NET_ADMIN", CAP_NET_ADMIN))
               if not caps >> bit & 1]
    if missing:
        return f"loading XDP needs {' and '.join(missing)} (run as root)"
    return None


# ---------------------------------------------------------------------------------------------
# Finding and removing programs by owner


@dataclass(frozen=True)
class _Prog:
    """An attached program we looked at: its info and the owner tag in its config map."""

    fd: int
    info: bpfsys.ProgInfo
    tag: int | None


def _open_prog(prog_id: int) -> _Prog | None:
    """Open a program by id if it is one of ours (``rsockd_*``); None otherwise or when gone."""
    try:
        fd = bpfsys.prog_get_fd_by_id(prog_id)
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise
    try:
        info = bpfsys.prog_info(fd)
        if not info.name.startswith(PROG_PREFIX):
            os.close(fd)
            return None
        return _Prog(fd, info, _config_tag(info.map_ids))
    except BaseException:
        os.close(fd)
        raise


def _config_tag(map_ids: tuple[int, ...]) -> int | None:
    for map_id in map_ids:
        try:
            m = BpfMap.from_id(map_id)
        except OSError:
            continue
        with m:
            # any size that holds the tag: a program an older rsockd loaded has a shorter config
            if m.info.name == "config" and m.info.key_size == 4 and m.info.value_size >= CONFIG_TAG_END:
                raw = m.lookup(bytes(4))
                return _u64_at(raw, RsockdConfig.instance_tag.offset) if raw else None
    return None


def _u64_at(raw: bytes, offset: int) -> int:
    return ctypes.c_uint64.from_buffer_copy(raw, offset).value


def _sweep(host: Host, want: Callable[[_Prog], bool]) -> list[str]:
    """Detach every XDP program and egress guard filter of this netns that ``want`` claims."""
    removed: list[str] = []
    for link in host.links():
        for mode, prog_id in sorted(link.xdp.items()):
            prog = _open_prog(prog_id)
            if prog is None:
                continue
            try:
                if want(prog):
                    # REPLACE with the expected fd: never removes a program that replaced ours
                    xdplink.xdp_set(link.index, -1, XDP_MODE_FLAGS[mode], expected_fd=prog.fd,
                                    what=f"{link.name}: detach XDP ({mode})")
                    removed.append(f"{link.name}: xdp {mode} program {prog.info.name} id {prog_id}")
            except OSError as e:
                if e.errno not in (*_GONE, errno.EEXIST):
                    raise
            finally:
                os.close(prog.fd)
        dropped = False
        for f in xdplink.filters(link.index, TC_PARENT_EGRESS):
            if f.kind != "bpf" or not f.prog_id:
                continue
            prog = _open_prog(f.prog_id)
            if prog is None:
                continue
            try:
                if want(prog):
                    filter_del(host, f)
                    removed.append(f"{link.name}: tc egress filter {f.name} prio {f.prio} id {f.prog_id}")
                    dropped = True
            except OSError as e:
                if e.errno not in _GONE:
                    raise
            finally:
                os.close(prog.fd)
        if dropped:
            drop_empty_clsact(host, link.index)
    return removed


# -- the TC guard through pyroute2 (listing filters is xdplink's: pyroute2 0.7 drops TCA_BPF_ID)


def clsact_add(host: Host, ifindex: int) -> bool:
    """Add the clsact qdisc; False when the link already has one."""
    try:
        host.call(f"ifindex {ifindex}: add clsact", host.ipr.tc, "add", "clsact", ifindex)
    except FileExistsError:
        return False
    return True


def guard_add(host: Host, ifindex: int, handle: int, fd: int) -> TcFilter:
    """Add the guard, program ``fd``, as a direct-action ``cls_bpf`` filter on clsact egress."""
    host.call(f"ifindex {ifindex}: add tc filter {GUARD_PROG_NAME}", host.ipr.tc, "add-filter", "bpf", ifindex,
              handle, parent=TC_PARENT_EGRESS, prio=GUARD_PRIO, protocol=ETH_P_ALL, fd=fd, name=GUARD_PROG_NAME,
              direct_action=True)
    return TcFilter(ifindex, TC_PARENT_EGRESS, GUARD_PRIO, handle, ETH_P_ALL, "bpf", GUARD_PROG_NAME)


def filter_del(host: Host, f: TcFilter) -> None:
    host.call(f"ifindex {f.ifindex}: delete tc filter {f.name or f.kind}", host.ipr.tc, "del-filter", f.kind,
              f.ifindex, f.handle, parent=f.parent, prio=f.prio, protocol=f.protocol)


def drop_empty_clsact(host: Host, ifindex: int) -> bool:
    """Delete the link's clsact qdisc when no filter is left on it; True when deleted."""
    # ifindex 0 is never a link here, and pyroute2's "del" would delete the qdiscs of every link
    if ifindex <= 0 or xdplink.filters(ifindex, TC_PARENT_EGRESS) or xdplink.filters(ifindex, TC_PARENT_INGRESS):
        return False
    try:
        host.call(f"ifindex {ifindex}: delete clsact", host.ipr.tc, "del", "clsact", ifindex)
    except OSError as e:
        if e.errno in (*_GONE, errno.EINVAL):
            return False
        raise
    return True


def cleanup_stale(instance: str) -> list[str]:
    """Remove what an earlier run of ``instance`` left in this network namespace.

    Finds attached ``rsockd_*`` programs whose ``config`` map carries the instance's tag (XDP on
    any link, guard filters on clsact egress), detaches them, and removes the instance's pins.
    Returns one line per thing removed.
    """
    _check_instance(instance)
    tag = instance_tag(instance)
    try:
        with Host() as host:
            removed = _sweep(host, lambda p: p.tag == tag)
    except OSError as e:
        raise SteerError(f"removing stale programs of instance {instance}: {bpfsys.os_error_text(e)}") from None
    directory = bpfsys.pin_dir(instance)
    try:
        if bpfsys.remove_pins(directory):
            removed.append(f"pins {directory}")
    except OSError as e:
        raise SteerError(f"{directory}: cannot remove stale pins: {e.strerror}") from None
    return removed


# ---------------------------------------------------------------------------------------------
# The backend


class XdpSteering:
    """The ``Steering`` backend built on XDP (ingress) and a TC egress guard."""

    name = "xdp"

    def __init__(self, plan: SteerPlan, *, python: str = sys.executable, timeout: float = 60) -> None:
        self.python = python
        self.timeout = timeout
        self._set_plan(plan)
        self._maps: PinnedMaps | None = None
        self._ports: dict[int, int] = {}
        self._conns: set[bytes] = set()  # the conns entries the plan put there (client)
        self._slot = -1  # the slot last written to syntag
        self._attached: list[dict[str, Any]] = []
        self._guard: list[dict[str, Any]] = []
        #: what the last loader run reported (compile time, loader RSS, ...)
        self.load_report: dict[str, Any] = {}

    def _set_plan(self, plan: SteerPlan) -> None:
        _check_instance(plan.instance)
        self.plan = plan
        self.tag = instance_tag(plan.instance)
        self.pin_dir = bpfsys.pin_dir(plan.instance)

    # -- attach

    def request(self) -> dict[str, Any]:
        """The loader request for the current plan."""
        plan = self.plan
        syn_rate, syn_burst = plan_syn_limit(plan)
        return {
            "instance": plan.instance,
            "pin_dir": self.pin_dir,
            "interfaces": list(plan.interfaces),
            "xdp_mode": plan.xdp_mode,
            "mark": plan.mark,
            "instance_tag": self.tag,
            "ports": {str(p): f for p, f in sorted(plan_ports(plan).items())},
            "peers": _plan_peers(plan),
            "guard": True,
            "syn_rate": syn_rate,
            "syn_burst": syn_burst,
            "syn_key": plan_syn_key(plan).hex(),
            "slot": syntag.slot_of(time.time()),
            "conns": sorted(k.hex() for k in plan_conns(plan)),
        }

    def attach(self) -> None:
        """Remove stale state of this instance, then compile, load and attach (in a child)."""
        if self._maps is not None:
            self.detach()
        if not self.plan.interfaces:
            raise SteerError("xdp steering needs at least one interface")
        for line in cleanup_stale(self.plan.instance):
            LOG.info("removed stale %s", line)
        request = self.request()
        reply = self._run_loader(request)
        self._attached = list(reply.get("attached", []))
        self._guard = list(reply.get("guard", []))
        self.load_report = reply
        try:
            self._maps = PinnedMaps.open(self.pin_dir)
            if self._maps.read_config().instance_tag != self.tag:
                raise SteerError(f"{self.pin_dir}: pinned maps belong to another instance")
        except BaseException:
            self.detach()
            raise
        self._ports = plan_ports(self.plan)
        self._conns = plan_conns(self.plan)
        self._slot = request["slot"]
        LOG.info(
            "xdp attached: %s; guard on %s (compile %.1f s)",
            ", ".join(f"{a['interface']} ({a['mode']})" for a in self._attached),
            ", ".join(g["interface"] for g in self._guard) or "nothing",
            float(reply.get("compile_s", 0.0)),
        )

    def _loader_env(self) -> dict[str, str]:
        # the child must import this very rsockd, installed or not
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        return env

    def _run_loader(self, request: dict[str, Any]) -> dict[str, Any]:
        argv = [self.python, "-m", LOADER_MODULE]
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, input=json.dumps(request), capture_output=True, text=True,
                                  timeout=self.timeout, env=self._loader_env(), check=False)
        except subprocess.TimeoutExpired:
            self._cleanup_after_failure()
            raise SteerError(f"bcc loader did not finish within {self.timeout:g} s") from None
        except OSError as e:
            raise SteerError(f"cannot run the bcc loader with {self.python}: {e.strerror}") from None
        stderr = proc.stderr.strip().splitlines()
        reply = _last_json_line(proc.stdout)
        ok = bool(reply and reply.get("ok"))
        for line in stderr[-40:] if not ok else stderr:
            LOG.log(logging.DEBUG if ok else logging.WARNING, "bcc loader: %s", line)
        if reply is None or not ok:
            self._cleanup_after_failure()
            if reply is not None:
                raise SteerError(str(reply.get("error", "bcc loader failed")))
            last = stderr[-1] if stderr else "no output"
            raise SteerError(f"bcc loader exited with status {proc.returncode}: {last}")
        LOG.debug("bcc loader finished in %.1f s", time.monotonic() - started)
        return reply

    def _cleanup_after_failure(self) -> None:
        # The loader undoes its own work; this covers a loader that crashed or was killed.
        try:
            for line in cleanup_stale(self.plan.instance):
                LOG.warning("removed after a failed load: %s", line)
        except SteerError as e:
            LOG.error("%s", e)

    # -- running

    def update(self, plan: SteerPlan) -> None:
        """Apply a changed plan.  Ports, peers, mark, SYN limit, SYN tag key and the client's
        connections change in place; interfaces, mode or instance changes re-attach."""
        old = self.plan
        if (plan.instance, plan.interfaces, plan.xdp_mode) != (old.instance, old.interfaces, old.xdp_mode):
            attached = self._maps is not None
            self.detach()
            self._set_plan(plan)
            if attached:
                self.attach()
            return
        self.plan = plan
        if self._maps is None:
            return
        ports = plan_ports(plan)
        try:
            self._maps.write_ports(ports, previous=self._ports)
            self._ports = ports
            self._maps.write_peers(_plan_peers(plan))
            if (plan.mark, plan_syn_limit(plan)) != (old.mark, plan_syn_limit(old)):
                self._write_config()
            if plan_syn_key(plan) != plan_syn_key(old):
                self._write_syntag(time.time())
            # new connections in before old ones leave (a rebind keeps none, but a plan may)
            conns = plan_conns(plan)
            self._maps.add_conns(sorted(conns - self._conns))
            self._maps.delete_conns(sorted(self._conns - conns))
            self._conns = conns
        except OSError as e:
            raise SteerError(f"updating the BPF maps of instance {plan.instance}: {bpfsys.os_error_text(e)}") from None

    def _write_config(self) -> None:
        assert self._maps is not None
        syn_rate, syn_burst = plan_syn_limit(self.plan)
        self._maps.write_config(mark=self.plan.mark, instance_tag=self.tag, syn_rate=syn_rate, syn_burst=syn_burst)

    def _write_syntag(self, wall: float) -> None:
        assert self._maps is not None
        slot = syntag.slot_of(wall)
        self._maps.write_syntag(plan_syn_key(self.plan), slot)
        self._slot = slot

    def tick(self, wall: float) -> None:
        """Keep the SYN tag's slot current (written when it changes, every 64 s)."""
        if self._maps is None or syntag.slot_of(wall) == self._slot:
            return
        try:
            self._write_syntag(wall)
        except OSError as e:
            LOG.warning("writing the SYN tag slot: %s", bpfsys.os_error_text(e))

    def forget(self, conns: Iterable[tuple[str, int, str, int]]) -> None:
        if self._maps is None:
            return
        try:
            self._maps.delete_conns({conn_key(peer, local, pport, lport) for local, lport, peer, pport in conns})
        except OSError as e:
            LOG.warning("forgetting connections in conns: %s", bpfsys.os_error_text(e))

    def receivers(self) -> list[Any]:
        return []  # steered segments arrive on the daemon's UDP sockets

    def counters(self) -> dict[str, int]:
        if self._maps is None:
            return dict.fromkeys(STEER_COUNTERS, 0)
        try:
            return self._maps.stats()
        except OSError as e:
            LOG.warning("reading BPF counters: %s", e)
            return dict.fromkeys(STEER_COUNTERS, 0)

    def describe(self) -> list[dict[str, str]]:
        return [{"interface": str(a["interface"]), "mode": str(a["mode"])} for a in self._attached]

    # -- detach

    def detach(self) -> None:
        """Detach our programs (XDP in its mode, the guard filter and an emptied clsact), unpin,
        close.  Idempotent; state already gone is not an error."""
        ids = {int(a["prog_id"]) for a in self._attached} | {int(g["prog_id"]) for g in self._guard}
        problems: list[str] = []
        if ids:
            try:
                with Host() as host:
                    for line in _sweep(host, lambda p: p.info.id in ids):
                        LOG.info("detached %s", line)
            except OSError as e:
                problems.append(bpfsys.os_error_text(e))
        self._attached, self._guard = [], []
        if self._maps is not None:
            self._maps.close()
            self._maps = None
        try:
            bpfsys.remove_pins(self.pin_dir)
        except OSError as e:
            problems.append(f"{self.pin_dir}: {e.strerror}")
        if problems:
            raise SteerError(f"detaching instance {self.plan.instance}: {problems[0]}")


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None
