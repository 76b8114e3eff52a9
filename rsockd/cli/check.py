"""``rsockd --check``: a preflight that loads nothing permanent.

One line per check, ``ok``/``warn``/``FAIL`` with what to do about it.  Exit 0 only when the
daemon would start (warnings do not block).
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..caps import CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN, effective_caps
from ..service.config import Config, format_ports


@dataclass
class Result:
    level: str  # ok | warn | FAIL
    what: str
    fix: str = ""


def check_python() -> list[Result]:
    out = [Result("ok", f"python {sys.version.split()[0]}")]
    from .. import PURE, compiled

    if compiled():
        out.append(Result("ok", "core compiled (mypyc)"))
    else:
        out.append(Result("ok", "core interpreted" + (" (RSOCKD_PURE or a stale build)" if PURE else ""),
                          "a build with mypyc compiles it: a fifth less CPU per datagram (docs/bench.md)"))
    if sys.platform == "linux":  # the .deb has the reader with its core interpreted
        from ..service.status import build_info

        build = build_info()
        if build["reader"] == "compiled":
            out.append(Result("ok", "tunnel socket reader compiled (C), record tags "
                              + ("four at a time (AVX2)" if build["tags_at_once"] == 4 else "one at a time")))
        elif PURE:
            out.append(Result("ok", "tunnel socket reader interpreted (RSOCKD_PURE or a stale build)"))
        else:
            out.append(Result("warn", "tunnel socket reader not built: Python reads the tunnel sockets",
                              "a build with a C compiler makes it: half the CPU per datagram with xdp "
                              "(docs/bench.md)"))
    for mod, pkg, need in (("sdnotify", "python3-sdnotify", False),
                           ("nftables", "python3-nftables", False), ("bcc", "python3-bpfcc", False)):
        if importlib.util.find_spec(mod) is None:
            out.append(Result("FAIL" if need else "warn", f"python module {mod} missing", f"apt install {pkg}"))
        else:
            out.append(Result("ok", f"python module {mod}"))
    return out


def check_caps() -> list[Result]:
    caps = effective_caps()
    out = []
    for bit, name, fix in ((CAP_NET_RAW, "CAP_NET_RAW", "raw sockets"), (CAP_NET_ADMIN, "CAP_NET_ADMIN",
                           "XDP/TC attach, nftables, SO_MARK")):
        if caps >> bit & 1:
            out.append(Result("ok", f"capability {name}"))
        else:
            out.append(Result("FAIL", f"capability {name} missing ({fix})", "run as root or grant it"))
    if caps >> CAP_BPF & 1 or caps >> CAP_SYS_ADMIN & 1:
        out.append(Result("ok", "capability CAP_BPF"))
    else:
        out.append(Result("warn", "capability CAP_BPF/CAP_SYS_ADMIN missing: will use the nft backend",
                          "run as root for the xdp backend"))
    return out


#: What to do when a backend is unavailable.
_BACKEND_FIX = {"xdp": "install python3-bpfcc and kernel headers, or backend = nft",
                "nft": "apt install nftables python3-nftables",
                "bpfdev": "run as root on macOS"}


@functools.cache
def _backends(backend: str) -> dict[str, str | None]:
    """The candidates for ``backend``, in the daemon's order, each with why it is unavailable
    (None: usable), asked the way the daemon asks (``rsockd.steer.choose``); raises ``SteerError``.
    Asked once: ``check_backend`` and ``check_ports`` both need it."""
    from ..steer.choose import candidates, unavailable

    return {name: unavailable(name) for name in candidates(backend)}


def check_backend(cfg: Config) -> list[Result]:
    """The backend the daemon would attach."""
    from ..errors import SteerError

    try:
        why = _backends(cfg.backend)
    except SteerError as e:
        return [Result("FAIL", str(e), "backend = auto")]
    names = list(why)
    usable = [name for name in names if why[name] is None]
    if not usable:
        if len(names) == 1:
            return [Result("FAIL", f"backend {names[0]}: {why[names[0]]}", _BACKEND_FIX[names[0]])]
        return [Result("FAIL", "no backend: " + "; ".join(f"{n}: {why[n]}" for n in names),
                       "install python3-bpfcc + headers or nftables")]
    if usable[0] != names[0]:
        return [Result("warn", f"{names[0]} backend unavailable ({why[names[0]]}): will use the {usable[0]} backend")]
    if usable[0] == "xdp":
        return [Result("ok", "bcc and kernel headers: xdp backend available")]
    return [Result("ok", f"{usable[0]} backend available")]


def check_network(cfg: Config) -> list[Result]:
    from ..dataplane.platform import (
        default_interfaces,
        interface_addresses,
        interface_exists,
        interface_gro,
        resolve,
        route_to,
    )
    from ..errors import RsockdError

    out = []
    try:
        if cfg.role == "client":
            assert cfg.server is not None
            server = resolve(cfg.server)
            route = route_to(server)
            names: tuple[str, ...] = cfg.dev or (route.interface,)
            out.append(Result("ok", f"route to server {server} via {route.interface} from {route.source}"))
        else:
            names = cfg.dev or tuple(default_interfaces())
            if not names:
                return [Result("FAIL", "no interface: no default route and no dev", "set dev")]
    except RsockdError as e:
        return [Result("FAIL", str(e), "check the address and routes")]
    for name in names:
        if not interface_exists(name):
            out.append(Result("FAIL", f"interface {name} does not exist", "set dev to an existing interface"))
        elif not interface_addresses(name):
            out.append(Result("FAIL", f"interface {name} has no address", "configure an address"))
        else:
            out.append(Result("ok", f"interface {name} up with an address"))
            gro = interface_gro(name)
            if gro is False:
                out.append(Result("warn", f"interface {name}: GRO off: tunnel segments are read one at a time",
                                  f"ethtool -K {name} gro on (physical NICs have it on; a veth does not)"))
            elif gro:
                out.append(Result("ok", f"interface {name}: GRO on (a connection's segments are read in runs)"))
    return out


def _port_free(fam: int, kind: int, host: str, port: int) -> str | None:
    try:
        with socket.socket(fam, kind) as s:
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
    except OSError as e:
        return "in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
    return None


#: Backends that share the tunnel ports' TCP side with a service of the host (port sharing,
#: docs/security.md): they hand the kernel every segment that is not of rsockd's connections.
SHARING_BACKENDS = frozenset({"xdp", "nft"})


def _chosen_backend(cfg: Config) -> str | None:
    """The backend the daemon would attach (the first usable candidate), or None."""
    from ..errors import SteerError

    try:
        return next((n for n, why in _backends(cfg.backend).items() if why is None), None)
    except SteerError:
        return None


def check_ports(cfg: Config) -> list[Result]:
    out = []
    if cfg.role == "server":
        # The daemon binds only the UDP side of a tunnel port (where steered segments land); a
        # TCP listener there is a service the port is shared with.
        busy, shared = [], []
        for port in cfg.ports:
            why = _port_free(socket.AF_INET, socket.SOCK_DGRAM, cfg.local_ip or "0.0.0.0", port)
            if why:
                busy.append(f"{port}/udp ({why})")
            if _port_free(socket.AF_INET, socket.SOCK_STREAM, cfg.local_ip or "0.0.0.0", port):
                shared.append(port)
        if busy:
            out.append(Result("FAIL", f"tunnel ports not free: {', '.join(busy)}",
                              "stop what uses them or change ports"))
        else:
            out.append(Result("ok", f"tunnel ports {format_ports(cfg.ports)} free (udp)"))
        if shared:
            tcp = ", ".join(f"{p}/tcp" for p in shared)
            backend = _chosen_backend(cfg)
            if backend in SHARING_BACKENDS:
                out.append(Result("ok", f"{tcp} in use by a service of this host: shared with it (the "
                                        f"{backend} backend hands it every connection that is not rsockd's)"))
            else:
                out.append(Result("warn", f"{tcp} in use by a service of this host: the {backend or 'chosen'} "
                                          "backend takes every segment on the port, so that service gets none",
                                  "backend = xdp, or change ports"))
    else:
        assert cfg.listen is not None
        host, port = cfg.listen
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        why = _port_free(fam, socket.SOCK_DGRAM, host, port)
        out.append(Result("FAIL", f"listen {host}:{port}/udp {why}", "change listen") if why
                   else Result("ok", f"listen {host}:{port}/udp free"))
    return out


def check_firewall(cfg: Config) -> list[Result]:
    """Does an nftables input chain with policy drop let the tunnel ports in as UDP?"""
    try:
        out = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return [Result("ok", "host firewall: nft not available, not checked")]
    if out.returncode != 0:
        return [Result("warn", f"host firewall: cannot read the ruleset ({out.stderr.strip()[:80]})")]
    try:
        items = json.loads(out.stdout).get("nftables", [])
    except json.JSONDecodeError:
        return [Result("warn", "host firewall: unreadable nft output")]
    drops = [i["chain"] for i in items if "chain" in i and i["chain"].get("hook") == "input"
             and i["chain"].get("policy") == "drop"]
    if not drops:
        return [Result("ok", "host firewall: no input chain drops by policy")]
    text = out.stdout
    ports = set(cfg.ports) if cfg.role == "server" else set()
    spec = format_ports(cfg.ports)
    ufw = spec.replace("-", ":")  # ufw writes a range as 10001:10010
    if cfg.role == "client" or (any(str(p) in text for p in ports) and '"udp"' in text):
        return [Result("warn", "host firewall: an input chain drops by default; make sure it accepts the tunnel "
                               "ports as udp too (segments arrive as UDP after the XDP rewrite)",
                       f"e.g. ufw allow {ufw}")]
    names = ", ".join(f"{c['family']} {c['table']} {c['name']}" for c in drops)
    return [Result("FAIL", f"host firewall: input chain {names} drops by policy and does not accept "
                           f"udp {spec}",
                   f"allow tcp and udp {spec} (e.g. ufw allow {ufw})")]


def check_workers(cfg: Config) -> list[Result]:
    if cfg.workers == 1:
        return []
    if sys.platform != "linux":
        return [Result("FAIL", f"workers = {cfg.workers}: more than one worker is supported on Linux only",
                       "set workers = 1")]
    cpus = os.cpu_count() or 1
    if cfg.workers > cpus:
        return [Result("warn", f"workers = {cfg.workers} on {cpus} CPUs: they compete for the CPUs",
                       f"workers = {cpus} at most")]
    return [Result("ok", f"workers = {cfg.workers} on {cpus} CPUs")]


def check_send_path(cfg: Config) -> list[Result]:
    """send_path = "packet" (or "auto" choosing it): a client says whether its route to the server
    can use it now; "auto" says what it chooses and why."""
    if cfg.send_path == "raw" or (cfg.send_path == "auto" and sys.platform != "linux"):
        return []
    if sys.platform != "linux":
        return [Result("FAIL", 'send_path = "packet" is supported on Linux only', 'send_path = "raw"')]
    if cfg.send_path == "auto":
        from ..dataplane.sendpath import egress_hooks

        bypassed = egress_hooks()
        if bypassed is not None:
            return [Result("ok", f'send_path = "auto": raw sockets, as the packet path would skip {bypassed}')]
    name = f'send_path = "{cfg.send_path}"' + (": packet frames" if cfg.send_path == "auto" else "")
    if cfg.role != "client":
        return [Result("ok", f"{name}: each client's route is looked up when it connects")]
    from ..core.packet import pack_address
    from ..dataplane.packetsend import resolve_all
    from ..dataplane.platform import resolve

    assert cfg.server is not None
    server = resolve(cfg.server)
    dst = pack_address(server)
    route = resolve_all([dst], cfg.mark)[dst]
    if route is None:
        level = "ok" if cfg.send_path == "auto" else "warn"
        return [Result(level, f"{name}: no Ethernet route with a known next hop to {server} yet; "
                       "raw sockets until there is", "fine when the next hop is not resolved yet")]
    return [Result("ok", f"{name}: to {server} via {route.ifname}, next hop {route.dst_mac.hex(':')}")]


CHECKS: list[Callable[[Config], list[Result]]] = [
    lambda cfg: [Result("ok", f"config valid ({cfg.config_path or 'command line'})")],
    lambda cfg: check_python(),
    lambda cfg: check_caps(),
    check_backend,
    check_network,
    check_ports,
    check_firewall,
    check_workers,
    check_send_path,
]


def run_checks(cfg: Config) -> int:
    failed = False
    for check in CHECKS:
        try:
            results = check(cfg)
        except Exception as e:  # a check that breaks says so instead of a traceback
            results = [Result("FAIL", f"{getattr(check, '__name__', 'check')}: {e}")]
        for r in results:
            failed |= r.level == "FAIL"
            print(f"{r.level:4}  {r.what}" + (f"  -> {r.fix}" if r.fix and r.level != "ok" else ""))
    print("rsockd would start" if not failed else "rsockd would NOT start")
    return 1 if failed else 0
