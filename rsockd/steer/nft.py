"""nftables steering backend (Linux, no bcc): a table keeps tunnel segments from the kernel's
TCP stack, an ``AF_PACKET`` socket with a classic BPF filter hands them to us.

Everything lives in one table, ``inet rsockd_<instance>``, loaded in one libnftables JSON
transaction (atomic: either all of it or nothing).  The transaction starts with
``add table; delete table; add table`` so that a stale table of the same instance, left by a
daemon that was killed, is replaced rather than merged with.

    set tunnel_ports, local_ports (inet_service, interval), peers4, peers6
    counter steered_v4, steered_v6, guard_dropped
    chain prerouting  (filter hook prerouting priority raw = -300)
        tunnel segments (the match rule of docs/design.md)  counter steered_v4/v6  drop
    chain output      (filter hook output priority raw)
        meta mark == <mark>  notrack
        kernel RST/ACK from a tunnel port (mirrored rule)  meta mark != <mark>  counter guard_dropped  drop

Packet taps run before netfilter, so the ``AF_PACKET`` receiver sees the segments the
``prerouting`` chain then drops; ``steered_v4``/``steered_v6`` count the drops, i.e. the
segments kept from the kernel.  The rules use named sets, so ``update`` rewrites the set
contents without touching the chains (and the counters keep counting).

Priority -300 is before conntrack (-200): the dropped segments never reach conntrack, and the
``notrack`` rule takes effect for our marked raw sends, so a host firewall that drops INVALID
in output cannot drop them (the replies arrive as tunnel segments the host never tracks).

A libnftables context talks to the network namespace it was created in; a ``NftSteering``
creates its context in ``attach`` and uses it for its life.

``load_notrack``/``unload`` load just the notrack part into the same table name, for the XDP
backend.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
from collections.abc import Iterable
from typing import Any

from .. import caps
from ..errors import SteerError
from . import PacketSocketReceiver, Receiver, SteerPlan, cbpf, split_peers

LOG = logging.getLogger(__name__)

FAMILY = "inet"
PRIORITY_RAW = -300  # NF_IP_PRI_RAW: after defragmentation (-400), before conntrack (-200)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
RCVBUF = 32 << 20  # bursts of a few 10k segments while the event loop is busy

_TPACKET_STATS = struct.Struct("II")  # tp_packets, tp_drops (reading resets them)

Json = dict[str, Any]


def table_name(instance: str) -> str:
    """``rsockd_<instance>`` with every character outside [A-Za-z0-9_] replaced by ``_``."""
    return "rsockd_" + re.sub(r"[^A-Za-z0-9_]", "_", instance)


# ---------------------------------------------------------------------------------------------
# The ruleset, as libnftables JSON (pure)


def _table(name: str) -> Json:
    return {"table": {"family": FAMILY, "name": name}}


def _replace_table(name: str) -> list[Json]:
    """Create-or-flush: ``add`` is a no-op for an existing table, so the ``delete`` always has
    something to delete and the final ``add`` starts empty (nft 1.0.6 has no ``destroy``)."""
    return [{"add": _table(name)}, {"delete": _table(name)}, {"add": _table(name)}]


def _chain(table: str, name: str, hook: str) -> Json:
    # nft 1.0.6 JSON spells the priority "prio"; "policy" must be given with "hook".
    return {"add": {"chain": {"family": FAMILY, "table": table, "name": name, "type": "filter",
                              "hook": hook, "prio": PRIORITY_RAW, "policy": "accept"}}}


def _rule(table: str, chain: str, *expr: Json) -> Json:
    return {"add": {"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": list(expr)}}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _tcp(field: str) -> Json:
    return {"payload": {"protocol": "tcp", "field": field}}


def _addr(proto: str, field: str) -> Json:
    return {"payload": {"protocol": proto, "field": field}}


_MARK: Json = {"meta": {"key": "mark"}}
_NFPROTO: Json = {"meta": {"key": "nfproto"}}
# flags & (rst|ack) != 0: any of the two set.
_RST_OR_ACK = _match({"&": [_tcp("flags"), {"|": ["rst", "ack"]}]}, 0, "!=")
_DROP: Json = {"drop": None}
# Only segments addressed to this host: a host that also forwards traffic keeps forwarding
# transit segments on the same ports.
_LOCAL: Json = {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}

SETS = {"tunnel_ports": "inet_service", "local_ports": "inet_service", "peers4": "ipv4_addr",
        "peers6": "ipv6_addr"}
COUNTERS = ("steered_v4", "steered_v6", "guard_dropped")


def _notrack_rule(table: str, mark: int) -> Json:
    return _rule(table, "output", _match(_MARK, mark), {"notrack": None})


def notrack_ruleset(instance: str, mark: int) -> list[Json]:
    """The whole transaction for a notrack-only table (used with the XDP backend)."""
    _check_mark(mark)
    name = table_name(instance)
    return [*_replace_table(name), _chain(name, "output", "output"), _notrack_rule(name, mark)]


def set_elements(plan: SteerPlan) -> list[Json]:
    """Commands that fill the four sets from ``plan`` (libnftables rejects an empty ``elem``)."""
    name = table_name(plan.instance)
    peers4, peers6 = split_peers(plan.peers, "nft")
    content: dict[str, list[Any]] = {
        "tunnel_ports": _port_elems(plan.tunnel_ports),
        "local_ports": _port_elems(plan.local_ports) if plan.role == "client" else [],
        "peers4": [str(a) for a in peers4] if plan.role == "client" else [],
        "peers6": [str(a) for a in peers6] if plan.role == "client" else [],
    }
    return [{"add": {"element": {"family": FAMILY, "table": name, "name": s, "elem": elems}}}
            for s, elems in content.items() if elems]


def ruleset(plan: SteerPlan) -> list[Json]:
    """The whole transaction that loads the table for ``plan`` (replacing any table of the
    same name)."""
    _check_mark(plan.mark)
    name = table_name(plan.instance)
    cmds = _replace_table(name)
    for s, kind in SETS.items():
        body: Json = {"family": FAMILY, "table": name, "name": s, "type": kind}
        if kind == "inet_service":
            body["flags"] = ["interval"]
        cmds.append({"add": {"set": body}})
    cmds += [{"add": {"counter": {"family": FAMILY, "table": name, "name": c}}} for c in COUNTERS]
    cmds += set_elements(plan)

    unmarked = _match(_MARK, plan.mark, "!=")
    guard: Json = {"counter": "guard_dropped"}
    cmds.append(_chain(name, "prerouting", "prerouting"))
    if plan.role == "server":
        for fam, counter in (("ipv4", "steered_v4"), ("ipv6", "steered_v6")):
            cmds.append(_rule(name, "prerouting", _match(_NFPROTO, fam), _match(_tcp("dport"), "@tunnel_ports"),
                              _LOCAL, {"counter": counter}, _DROP))
        cmds += [_chain(name, "output", "output"), _notrack_rule(name, plan.mark),
                 _rule(name, "output", _match(_tcp("sport"), "@tunnel_ports"), _RST_OR_ACK, unmarked, guard, _DROP)]
        return cmds
    for proto, peers, counter in (("ip", "@peers4", "steered_v4"), ("ip6", "@peers6", "steered_v6")):
        cmds.append(_rule(name, "prerouting", _match(_addr(proto, "saddr"), peers),
                          _match(_tcp("sport"), "@tunnel_ports"), _match(_tcp("dport"), "@local_ports"),
                          _LOCAL, {"counter": counter}, _DROP))
    cmds += [_chain(name, "output", "output"), _notrack_rule(name, plan.mark)]
    for proto, peers in (("ip", "@peers4"), ("ip6", "@peers6")):
        cmds.append(_rule(name, "output", _match(_addr(proto, "daddr"), peers),
                          _match(_tcp("sport"), "@local_ports"), _match(_tcp("dport"), "@tunnel_ports"),
                          _RST_OR_ACK, unmarked, guard, _DROP))
    return cmds


def _port_elems(ports: Iterable[int]) -> list[Any]:
    return [a if a == b else {"range": [a, b]} for a, b in cbpf.port_ranges(ports)]


def _check_mark(mark: int) -> None:
    if not 0 < mark <= 0xFFFFFFFF:
        raise SteerError(f"nft: mark {mark:#x} must be a non-zero 32-bit value")


# ---------------------------------------------------------------------------------------------
# Talking to libnftables


def _context() -> Any:
    """A libnftables context (JSON output) bound to the current network namespace."""
    try:
        import nftables
    except ImportError:
        raise SteerError("nft: python3-nftables is not installed") from None
    if not caps.has(caps.CAP_NET_ADMIN):
        # Checked first: without it libnftables also prints its own complaint to stderr.
        raise SteerError("nft: no CAP_NET_ADMIN (run as root)")
    try:
        ctx = nftables.Nftables()
    except OSError as err:
        raise SteerError(f"nft: cannot load libnftables: {err}") from None
    ctx.set_json_output(True)
    return ctx


def _nft_error(err: str) -> str:
    """The first line of a libnftables error, without its ``internal:0:0-0: Error:`` prefix."""
    for line in err.splitlines():
        if "Error:" in line and "Parsing command array" not in line:
            return line.split("Error:", 1)[1].strip()
    return err.strip().splitlines()[0] if err.strip() else "failed"


def _run(ctx: Any, cmds: list[Json], what: str) -> Any:
    rc, out, err = ctx.json_cmd({"nftables": cmds})
    if rc != 0:
        raise SteerError(f"nft: {what}: {_nft_error(err)}")
    return out


def _tables(ctx: Any) -> set[str]:
    out = _run(ctx, [{"list": {"tables": {"family": FAMILY}}}], "list tables")
    return {o["table"]["name"] for o in (out or {}).get("nftables", []) if "table" in o}


def _delete(ctx: Any, name: str) -> bool:
    """Delete table ``name`` if it exists; True if it did.  Idempotent."""
    present = name in _tables(ctx)
    _run(ctx, [{"add": _table(name)}, {"delete": _table(name)}], f"table {FAMILY} {name}")
    return present


def load_notrack(instance: str, mark: int) -> None:
    """Load ``inet rsockd_<instance>`` with only the output notrack rule (for the XDP backend),
    replacing any table of that name.  Raises ``SteerError``."""
    _run(_context(), notrack_ruleset(instance, mark), f"table {FAMILY} {table_name(instance)}")


def unload(instance: str) -> bool:
    """Delete the instance's table; True if there was one.  Never raises for a missing table."""
    return _delete(_context(), table_name(instance))


def cleanup_stale(instance: str) -> bool:
    """At start: remove a table left by an earlier daemon of this instance (True if found)."""
    found = unload(instance)
    if found:
        LOG.info("removed stale nft table %s %s", FAMILY, table_name(instance))
    return found


def nft_available() -> str | None:
    """None if this backend can work here, else a one-line reason."""
    try:
        ctx = _context()
    except SteerError as err:
        return str(err)
    rc, _out, msg = ctx.json_cmd({"nftables": [{"list": {"tables": {"family": FAMILY}}}]})
    if rc != 0:
        return f"nft: nf_tables unusable: {_nft_error(msg)}"
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0).close()
    except OSError as err:
        return f"nft: no AF_PACKET sockets: {err.strerror}"
    return None


# ---------------------------------------------------------------------------------------------
# Receivers


def receiver_drops(sock: socket.socket) -> int:
    """Segments a receiver's full queue lost since the last call (reading resets the kernel's count)."""
    try:
        _packets, drops = _TPACKET_STATS.unpack(sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size))
    except OSError:
        return 0
    return int(drops)


def receiver_filter(plan: SteerPlan) -> cbpf.Program:
    """The classic BPF filter of the packet sockets (L3 first: ``SOCK_DGRAM``).  Raises a
    one-line ``SteerError`` for a bad peer address or a plan the filter cannot express."""
    split_peers(plan.peers, "nft")
    ports = plan.receive_ports or plan.tunnel_ports
    try:
        return cbpf.tunnel_filter(plan.role, ports, plan.local_ports, plan.peers, l3_offset=0, link="raw")
    except ValueError as err:
        raise SteerError(f"nft: receive filter: {err}") from None


def open_receiver(interface: str, program: cbpf.Program) -> socket.socket:
    """A non-blocking ``AF_PACKET``/``SOCK_DGRAM`` socket on ``interface`` delivering what
    ``program`` accepts.  Created with protocol 0 so it receives nothing until the filter is in
    place and it is bound.  Raises ``SteerError``."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    except OSError as err:
        raise SteerError(f"nft: interface {interface}: packet socket: {err.strerror}") from None
    try:
        cbpf.attach_filter(sock, program)
        try:
            # Our own sends leave through the same interface; don't queue copies of them.
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError:
            LOG.debug("PACKET_IGNORE_OUTGOING unsupported (kernel < 4.20)")
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setblocking(False)
        sock.bind((interface, ETH_P_ALL))
    except (OSError, ValueError) as err:
        sock.close()
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise SteerError(f"nft: interface {interface}: {reason}") from None
    return sock


# ---------------------------------------------------------------------------------------------
# The backend


class NftSteering:
    """The ``nft`` steering backend (see the module docstring)."""

    name = "nft"

    def __init__(self, plan: SteerPlan) -> None:
        self.plan = plan
        self._ctx: Any = None
        self._socks: dict[str, socket.socket] = {}
        self._rx_dropped = 0

    @property
    def table(self) -> str:
        return table_name(self.plan.instance)

    def attach(self) -> None:
        """Open the receivers, then load the table (replacing a stale one).  Raises
        ``SteerError``; on failure nothing of ours is left."""
        plan = self.plan
        self._close_sockets()  # attached before: start over
        if not plan.interfaces:
            raise SteerError(f"nft: table {FAMILY} {self.table}: no interface to receive on")
        try:
            cmds = ruleset(plan)
            program = receiver_filter(plan)
            self._ctx = _context()
            for iface in plan.interfaces:
                self._socks[iface] = open_receiver(iface, program)
            _run(self._ctx, cmds, f"table {FAMILY} {self.table}")
        except SteerError:
            self._close_sockets()
            if self._ctx is not None:
                try:
                    _delete(self._ctx, self.table)
                except SteerError:
                    pass
            raise
        LOG.info("nft: table %s %s loaded; receiving on %s", FAMILY, self.table, ", ".join(plan.interfaces))

    def update(self, plan: SteerPlan) -> None:
        """Apply a changed plan: set contents in one transaction (the whole table, counters
        restarting, when the role, mark or instance changed), new filters on the receivers,
        receivers opened and closed as interfaces come and go.  Call it in the namespace of
        ``attach`` (new receivers are opened there)."""
        if self._ctx is None:
            self.plan = plan
            return
        old = self.plan
        program = receiver_filter(plan)
        added: dict[str, socket.socket] = {}
        try:
            for iface in plan.interfaces:
                if iface not in self._socks:
                    added[iface] = open_receiver(iface, program)
            if (plan.role, plan.mark, plan.instance) != (old.role, old.mark, old.instance):
                cmds = ruleset(plan)
                if plan.instance != old.instance:
                    cmds = [{"add": _table(table_name(old.instance))}, {"delete": _table(table_name(old.instance))},
                            *cmds]
            else:
                name = table_name(plan.instance)
                cmds = [{"flush": {"set": {"family": FAMILY, "table": name, "name": s}}} for s in SETS]
                cmds += set_elements(plan)
            _run(self._ctx, cmds, f"table {FAMILY} {table_name(plan.instance)}")
        except SteerError:
            for s in added.values():
                s.close()
            raise
        for iface, sock in list(self._socks.items()):
            if iface in plan.interfaces:
                try:
                    cbpf.attach_filter(sock, program)
                except OSError as err:
                    raise SteerError(f"nft: interface {iface}: filter: {err.strerror}") from None
            else:
                self._collect_stats(sock)
                sock.close()
                del self._socks[iface]
        self._socks.update(added)
        self.plan = plan

    def receivers(self) -> list[Receiver]:
        return [PacketSocketReceiver(s) for s in self._socks.values()]

    def counters(self) -> dict[str, int]:
        """``steered_v4``/``steered_v6``: segments the table kept from the kernel (and the
        receivers were offered); ``guard_dropped``; extra ``receiver_dropped``: segments lost
        because a receiver's queue was full."""
        for sock in self._socks.values():
            self._collect_stats(sock)
        out = dict.fromkeys(COUNTERS, 0)
        out["receiver_dropped"] = self._rx_dropped
        if self._ctx is None:
            return out
        res = _run(self._ctx, [{"list": {"table": {"family": FAMILY, "name": self.table}}}],
                   f"table {FAMILY} {self.table}")
        for obj in (res or {}).get("nftables", []):
            c = obj.get("counter")
            if c and c.get("name") in out:
                out[c["name"]] = int(c.get("packets", 0))
        return out

    def describe(self) -> list[dict[str, str]]:
        return [{"interface": iface, "mode": "nft"} for iface in self.plan.interfaces]

    def tick(self, wall: float) -> None:
        pass  # nothing here depends on the time

    def detach(self) -> None:
        """Close the receivers and delete the table; idempotent."""
        self._close_sockets()
        ctx = self._ctx if self._ctx is not None else _context()
        _delete(ctx, self.table)
        self._ctx = None

    def _collect_stats(self, sock: socket.socket) -> None:
        self._rx_dropped += receiver_drops(sock)

    def _close_sockets(self) -> None:
        for sock in self._socks.values():
            self._collect_stats(sock)
            sock.close()
        self._socks.clear()
