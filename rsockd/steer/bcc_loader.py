"""``python -m rsockd.steer.bcc_loader``: compile, load, pin, fill and attach; then exit.

Run by ``XdpSteering.attach`` as a short-lived child, so the ~200 MB bcc/LLVM leaves with it.
Reads ONE JSON request on stdin::

    {"instance": "rsockd", "pin_dir": "/sys/fs/bpf/rsockd/rsockd", "interfaces": ["eth0"],
     "xdp_mode": "auto|native|skb", "mark": 1920166756, "instance_tag": 1234,
     "ports": {"10001": 1}, "peers": ["192.0.2.1"], "guard": true,
     "syn_rate": 2000, "syn_burst": 200, "syn_key": "00112233445566778899aabbccddeeff", "slot": 27633123,
     "conns": ["<hex of a conns key>"]}

(``syn_rate``/``syn_burst`` may be left out: 0, no SYN limit; ``syn_key``, ``slot`` and ``conns``
too: a zero key and slot, no connections.)

and writes ONE JSON line on stdout::

    {"ok": true, "compile_s": 1.4, "load_s": 1.6, "rss_mb": 180.0,
     "attached": [{"interface": "eth0", "ifindex": 2, "mode": "native", "prog_id": 42}],
     "guard": [{"interface": "eth0", "ifindex": 2, "prog_id": 43}]}
    {"ok": false, "error": "eth0: attach XDP (native): Operation not supported (...)"}

Order matters: the maps are pinned and filled *before* anything is attached, so the program
never runs with an empty config.  XDP is attached with ``XDP_FLAGS_UPDATE_IF_NOEXIST``: a
program rsockd does not own is never replaced.  On any failure everything this run attached or
pinned is undone before the reply.  Expected failures are one line, never a traceback;
compiler and verifier messages go to stderr, which the daemon logs.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.resources
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..errors import SteerError
from ..netlink import Host, Link
from . import bpfsys
from .bpfsys import MAP_NAMES, PinnedMaps
from .xdp import (
    GUARD_PROG_NAME,
    XDP_PROG_NAME,
    bcc_available,
    clsact_add,
    drop_empty_clsact,
    filter_del,
    guard_add,
    guard_handle,
)
from .xdplink import XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_MODE_FLAGS, TcFilter, xdp_set

SOURCES = ("rsockd.h", "ingress.c", "egress.c")  # compiled as one text, in this order (see rsockd.h)


class LoaderError(Exception):
    """An expected failure: its message is the reply's one line."""


@dataclass(frozen=True)
class Request:
    instance: str
    pin_dir: str
    interfaces: tuple[str, ...]
    xdp_mode: str
    mark: int
    instance_tag: int
    ports: dict[int, int]
    peers: tuple[str, ...]
    guard: bool
    syn_rate: int = 0
    syn_burst: int = 0
    syn_key: bytes = bytes(16)
    slot: int = 0
    conns: tuple[bytes, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Request:
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise LoaderError(f"request is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise LoaderError("request is not a JSON object")

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            value = raw.get(key)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                raise LoaderError(f"request: {key} is missing or not a {getattr(kind, '__name__', kind)}")
            return value

        interfaces = get("interfaces", list)
        if not interfaces or not all(isinstance(i, str) and i for i in interfaces):
            raise LoaderError("request: interfaces must be a non-empty list of names")
        mode = get("xdp_mode", str)
        if mode not in ("auto", "native", "skb"):
            raise LoaderError(f"request: xdp_mode {mode!r} is not auto, native or skb")
        try:
            ports = {int(k): int(v) for k, v in get("ports", dict).items()}
        except (TypeError, ValueError):
            raise LoaderError("request: ports must map port numbers to flag bits") from None
        peers = get("peers", list)
        if not all(isinstance(p, str) for p in peers):
            raise LoaderError("request: peers must be a list of addresses")
        syn = {}
        for key in ("syn_rate", "syn_burst"):
            value = raw.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFFFFFF:
                raise LoaderError(f"request: {key} must be an integer in 0..4294967295")
            syn[key] = value
        try:
            syn_key = bytes.fromhex(raw.get("syn_key", "00" * 16))
            conns = tuple(bytes.fromhex(k) for k in raw.get("conns", []))
        except (TypeError, ValueError, AttributeError):
            raise LoaderError("request: syn_key and conns must be hex strings") from None
        if len(syn_key) != 16 or any(len(k) != ctypes.sizeof(bpfsys.RsockdConn) for k in conns):
            raise LoaderError("request: syn_key must be 16 bytes, each conns key "
                              f"{ctypes.sizeof(bpfsys.RsockdConn)} bytes")
        slot = raw.get("slot", 0)
        if not isinstance(slot, int) or isinstance(slot, bool) or slot < 0:
            raise LoaderError("request: slot must be a non-negative integer")
        return cls(
            instance=get("instance", str),
            pin_dir=get("pin_dir", str),
            interfaces=tuple(interfaces),
            xdp_mode=mode,
            mark=get("mark", int),
            instance_tag=get("instance_tag", int),
            ports=ports,
            peers=tuple(peers),
            guard=bool(raw.get("guard", True)),
            syn_rate=syn["syn_rate"],
            syn_burst=syn["syn_burst"],
            syn_key=syn_key,
            slot=slot,
            conns=conns,
        )


# ---------------------------------------------------------------------------------------------
# Compile


def source_dir() -> Path:
    """Where the C sources are: the installed package data, else the repository's ``bpf/``."""
    try:
        files = importlib.resources.files("rsockd.bpf")
        if isinstance(files, Path) and (files / SOURCES[0]).is_file():
            return files
        if all((files / name).is_file() for name in SOURCES):
            # packaged somewhere that is not a directory (a zip): bcc needs real files
            tmp = Path(tempfile.mkdtemp(prefix="rsockd-bpf-"))
            for name in SOURCES:
                (tmp / name).write_text((files / name).read_text())
            return tmp
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "bpf"


def compile_programs() -> tuple[Any, Any, Any]:
    """Compile and load both programs with bcc; returns (BPF object, xdp fn, guard fn)."""
    reason = bcc_available()  # the same checks the daemon made, for clear messages
    if reason:
        raise LoaderError(reason)
    try:
        from bcc import BPF  # the only bcc import in rsockd
    except ImportError as e:
        raise LoaderError(f"bcc cannot be imported: {e}") from None
    src = source_dir()
    try:
        text = "".join(f'#line 1 "{src / name}"\n' + (src / name).read_text() for name in SOURCES)
    except OSError as e:
        raise LoaderError(f"cannot read the BPF sources in {src}: {e.strerror}") from None
    try:
        bpf = BPF(text=text, cflags=[f"-I{src}"])
    except Exception:
        raise LoaderError(f"bcc could not compile {src}/ingress.c, egress.c (compiler messages in the log)") from None
    fns = []
    for name, kind in ((XDP_PROG_NAME, BPF.XDP), (GUARD_PROG_NAME, BPF.SCHED_CLS)):
        try:
            fns.append(bpf.load_func(name, kind))
        except Exception as e:
            raise LoaderError(f"the kernel refused to load {name}: {e}") from None
    return bpf, fns[0], fns[1]


# ---------------------------------------------------------------------------------------------
# Load


class Undo:
    """What this run did, to be undone in reverse order when a later step fails."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, step: Callable[[], object]) -> None:
        self.steps.append((what, step))

    def run(self) -> None:
        while self.steps:
            what, step = self.steps.pop()
            try:
                step()
            except OSError as e:
                print(f"bcc loader: undoing {what}: {bpfsys.os_error_text(e)}", file=sys.stderr)


def attach_xdp(link: Link, fd: int, mode: str) -> str:
    """Attach in ``mode``; under ``auto`` native first, then skb.  Returns the mode used."""
    errors: list[str] = []
    for m in ("native", "skb") if mode == "auto" else (mode,):
        try:
            xdp_set(link.index, fd, XDP_MODE_FLAGS[m] | XDP_FLAGS_UPDATE_IF_NOEXIST,
                    what=f"{link.name}: attach XDP ({m})")
            return m
        except OSError as e:
            errors.append(bpfsys.os_error_text(e))
            if e.errno in (errno.EBUSY, errno.EEXIST):
                break  # a program is there already: another mode will not help
    raise LoaderError("; ".join(errors))


def _lookup_links(host: Host, names: tuple[str, ...]) -> list[Link]:
    links = []
    for name in names:
        link = host.link(name)
        if link is None:
            raise LoaderError(f"interface {name} does not exist")
        for mode, prog_id in link.xdp.items():
            raise LoaderError(f"{name} already has an XDP program ({mode}, id {prog_id}) that is not "
                              "this instance's: rsockd does not replace it")
        links.append(link)
    return links


def load(req: Request) -> dict[str, Any]:
    """Do the work; returns the success reply.  Raises ``LoaderError``; undoes on failure."""
    started = time.monotonic()
    with Host() as host:
        links = _lookup_links(host, req.interfaces)  # before the slow compile
        bpf, xdp_fn, guard_fn = compile_programs()
        compile_s = time.monotonic() - started
        undo = Undo()
        try:
            reply = _install(host, req, links, bpf, xdp_fn, guard_fn, undo)
        except (LoaderError, SteerError, OSError) as e:
            undo.run()
            raise LoaderError(bpfsys.os_error_text(e) if isinstance(e, OSError) else str(e)) from None
        except BaseException:
            undo.run()
            raise
    reply.update(
        compile_s=round(compile_s, 3),
        load_s=round(time.monotonic() - started, 3),
        rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    return reply


def _install(host: Host, req: Request, links: list[Link], bpf: Any, xdp_fn: Any, guard_fn: Any,
             undo: Undo) -> dict[str, Any]:
    try:
        bpfsys.ensure_bpffs(bpfsys.BPFFS)
    except OSError as e:
        raise LoaderError(f"cannot mount bpffs at {bpfsys.BPFFS}: {e.strerror}") from None
    bpfsys.remove_pins(req.pin_dir)  # stale pins of this instance
    with PinnedMaps.from_fds({name: bpf[name].map_fd for name in MAP_NAMES}) as maps:
        undo.push(f"pins in {req.pin_dir}", lambda: bpfsys.remove_pins(req.pin_dir))
        try:
            maps.pin(req.pin_dir)
        except OSError as e:
            raise LoaderError(f"cannot pin the maps in {req.pin_dir}: {e.strerror}") from None
        # fill before attaching: the program never sees an empty config
        maps.write_config(mark=req.mark, instance_tag=req.instance_tag, syn_rate=req.syn_rate,
                          syn_burst=req.syn_burst)
        maps.write_ports(req.ports)
        maps.write_peers(req.peers)
        maps.write_syntag(req.syn_key, req.slot)
        maps.add_conns(req.conns)

    xdp_id = bpfsys.prog_info(xdp_fn.fd).id
    guard_id = bpfsys.prog_info(guard_fn.fd).id
    attached = []
    for link in links:
        mode = attach_xdp(link, xdp_fn.fd, req.xdp_mode)
        undo.push(f"XDP on {link.name}", _xdp_detacher(link, mode, xdp_fn.fd))
        attached.append({"interface": link.name, "ifindex": link.index, "mode": mode, "prog_id": xdp_id})

    guard = []
    if req.guard:
        handle = guard_handle(req.instance_tag)
        for link in links:
            if clsact_add(host, link.index):
                undo.push(f"clsact on {link.name}", _clsact_dropper(host, link))
            f = guard_add(host, link.index, handle, guard_fn.fd)
            undo.push(f"guard on {link.name}", _filter_remover(host, f))
            guard.append({"interface": link.name, "ifindex": link.index, "prog_id": guard_id})
    return {"ok": True, "pin_dir": req.pin_dir, "attached": attached, "guard": guard}


# Undo steps bind their arguments now, not when they run.
def _xdp_detacher(link: Link, mode: str, fd: int) -> Callable[[], object]:
    return lambda: xdp_set(link.index, -1, XDP_MODE_FLAGS[mode], expected_fd=fd)


def _clsact_dropper(host: Host, link: Link) -> Callable[[], object]:
    return lambda: drop_empty_clsact(host, link.index)


def _filter_remover(host: Host, f: TcFilter) -> Callable[[], object]:
    return lambda: filter_del(host, f)


# ---------------------------------------------------------------------------------------------


def _reply_channel() -> TextIO:
    """A private copy of stdout for the one reply line; fd 1 then points at stderr, so nothing
    a library prints can corrupt the reply."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return out


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Get ``sig`` when the daemon that started us dies.  A loader left compiling after its daemon
    was SIGKILLed would attach later, behind the back of the next start's clean-up; a worker
    left running would hold its ports."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the daemon died before prctl() took effect
        os._exit(1)


def main() -> int:
    die_with_parent()
    out = _reply_channel()
    try:
        reply = load(Request.parse(sys.stdin.read()))
    except LoaderError as e:
        reply = {"ok": False, "error": str(e)}
    except Exception as e:  # a bug: the traceback goes to stderr (logged by the daemon)
        traceback.print_exc()
        reply = {"ok": False, "error": f"bcc loader failed: {type(e).__name__}: {e}"}
    out.write(json.dumps(reply) + "\n")
    out.flush()
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
