"""nftables steering backend (Linux, no bcc): a table keeps rsockd's own connections from the
kernel's TCP stack and leaves it everything else on the ports (port sharing); an ``AF_PACKET``
socket with a classic BPF filter, and the server's SYN queue, hand ours to us.

Everything lives in one table, ``inet rsockd_<instance>``, loaded in one libnftables JSON
transaction (atomic: either all of it or nothing).  The transaction starts with
``add table; delete table; add table`` so that a stale table of the same instance, left by a
daemon that was killed, is replaced rather than merged with.

    set tunnel_ports, local_ports (inet_service, interval)
    set conns4, conns6  (saddr . sport . daddr . dport of arriving segments; server: timeout, size CONNS_MAX)
    counter steered_v4, steered_v6, guard_dropped, passed_probe
    chain prerouting  (filter hook prerouting priority raw = -300)
        server: meta mark == <mark>, SYN without ACK  update @conns4/@conns6 {4-tuple}; drop
        not a SYN without ACK (server), 4-tuple in @conns4/6  [server: update]  counter steered_v4/v6  drop
        server: SYN without ACK, dport @tunnel_ports, fib daddr local  jump synqueue
        dport @tunnel_ports (server) / @local_ports (client), fib daddr local  counter passed_probe
    chain synqueue (server)
        queue num <N> bypass   (nft_queue; else xtables NFQUEUE --queue-bypass through nft_compat)
    chain output      (filter hook output priority raw)
        meta mark == <mark>  notrack
        meta mark != <mark>, reversed 4-tuple in @conns4/6  counter guard_dropped  drop

The SYN queue (``SynQueue``, ``nfqueue.py``): the daemon reads each SYN held there and checks
its ISN's tag (``core/syntag.py``).  A good one gets ``NF_REPEAT`` with our mark, so the chain
runs again, adds its 4-tuple to the set and drops it; only then does the queue reader hand it
to the endpoint, so the connection is steered before rsockd answers.  Any other gets
``NF_ACCEPT``: the kernel answers it (RST on a closed port, SYN-ACK from a service there) and
it counts as ``passed_probe``.  ``bypass``: while nobody reads the queue (daemon stopped, queue
not yet bound) the kernel gets the SYNs.  The queue number is ``QUEUE_FIRST`` + crc32 of the
table name modulo ``QUEUE_SPAN``, or the next one free (``pick_queue``).  The client adds its
connections' 4-tuples itself (``SteerPlan.conns``), before it sends their SYNs.

Packet taps run before netfilter, so the ``AF_PACKET`` receiver sees the segments the
``prerouting`` chain then drops - and, on a shared port, the kernel's own traffic too, which the
endpoint counts (``no_connection``) and never answers.  The server's filter leaves out SYNs
without ACK (they come through the queue).  ``steered_v4``/``steered_v6`` count the drops,
i.e. the segments kept from the kernel.  The rules use named sets, so ``update`` rewrites the
set contents without touching the chains (and the counters keep counting).

Priority -300 is before conntrack (-200): the dropped segments never reach conntrack, and the
``notrack`` rule takes effect for our marked raw sends, so a host firewall that drops INVALID
in output cannot drop them (the replies arrive as tunnel segments the host never tracks).

A libnftables context talks to the network namespace it was created in; a ``NftSteering``
creates its context in ``attach`` and uses it for its life.

``load_notrack``/``unload`` load just the notrack part into the same table name, for the XDP
backend.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import re
import socket
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

from .. import caps
from ..core import syntag
from ..core.packet import ACK, PROTO_TCP, SYN, parse_ip, parse_options, parse_tcp
from ..errors import PacketError, SteerError
from . import PacketSocketReceiver, Receiver, SteerPlan, cbpf, nfqueue, split_peers
from .nfqueue import NfQueue

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

#: The sets; ``conns4``/``conns6`` hold rsockd's connections as 4-tuples in arrival order
#: (source address . source port . destination address . destination port).
SETS = {"tunnel_ports": "inet_service", "local_ports": "inet_service",
        "conns4": ["ipv4_addr", "inet_service", "ipv4_addr", "inet_service"],
        "conns6": ["ipv6_addr", "inet_service", "ipv6_addr", "inet_service"]}
COUNTERS = ("steered_v4", "steered_v6", "guard_dropped", "passed_probe")
CONNS_MAX = 65536  # server: connections the sets hold; a tagged SYN beyond it is dropped, not steered
SYN_CHAIN = "synqueue"
# Queue numbers: QUEUE_FIRST + crc32(table name) % QUEUE_SPAN, or the next one free in the span.
QUEUE_FIRST, QUEUE_SPAN = 29000, 4000

_FAMILIES = (("ip", "conns4", "steered_v4"), ("ip6", "conns6", "steered_v6"))
# flags & (syn|ack) == syn: a connection's first segment (not a SYN-ACK).
_SYN_ONLY = _match({"&": [_tcp("flags"), {"|": ["syn", "ack"]}]}, "syn")
_NOT_SYN_ONLY = _match({"&": [_tcp("flags"), {"|": ["syn", "ack"]}]}, "syn", "!=")


def _tuple(proto: str, reverse: bool = False) -> Json:
    """The 4-tuple of a segment as the sets hold it; ``reverse``: of a segment we send."""
    fields = (("daddr", "dport", "saddr", "sport") if reverse else ("saddr", "sport", "daddr", "dport"))
    return {"concat": [_addr(proto, fields[0]), _tcp(fields[1]), _addr(proto, fields[2]), _tcp(fields[3])]}


def _notrack_rule(table: str, mark: int) -> Json:
    return _rule(table, "output", _match(_MARK, mark), {"notrack": None})


def notrack_ruleset(instance: str, mark: int) -> list[Json]:
    """The whole transaction for a notrack-only table (used with the XDP backend)."""
    _check_mark(mark)
    name = table_name(instance)
    return [*_replace_table(name), _chain(name, "output", "output"), _notrack_rule(name, mark)]


def conn_elements(conns: Iterable[tuple[str, int, str, int]]) -> tuple[list[Json], list[Json]]:
    """Client: the 4-tuples of ``conns`` as elements of ``conns4`` and ``conns6``."""
    v4: list[Json] = []
    v6: list[Json] = []
    for laddr, lport, raddr, rport in sorted(conns):
        try:
            r, lo = ipaddress.ip_address(raddr), ipaddress.ip_address(laddr)
        except ValueError:
            raise SteerError(f"nft: connection {raddr}:{rport} -> {laddr}:{lport}: not an IP address") from None
        if r.version != lo.version:
            raise SteerError(f"nft: connection {raddr} -> {laddr}: address families differ")
        (v4 if r.version == 4 else v6).append({"concat": [str(r), rport, str(lo), lport]})
    return v4, v6


def set_elements(plan: SteerPlan) -> list[Json]:
    """Commands that fill the sets userspace owns from ``plan`` (libnftables rejects an empty
    ``elem``).  The server's connection sets are the kernel's: its SYN rule fills them."""
    name = table_name(plan.instance)
    content: dict[str, list[Any]] = {"tunnel_ports": _port_elems(plan.tunnel_ports)}
    if plan.role == "client":
        content["local_ports"] = _port_elems(plan.local_ports)
        content["conns4"], content["conns6"] = conn_elements(plan.conns)
    return [{"add": {"element": {"family": FAMILY, "table": name, "name": s, "elem": elems}}}
            for s, elems in content.items() if elems]


def _user_sets(role: str) -> list[str]:
    """The sets ``update`` refills (the server's connection sets are left alone)."""
    return ["tunnel_ports", "local_ports"] + (["conns4", "conns6"] if role == "client" else [])


def ruleset(plan: SteerPlan) -> list[Json]:
    """The whole transaction that loads the table for ``plan`` (replacing any table of the
    same name).  The server's ``synqueue`` chain is left empty: ``queue_rule`` fills it once the
    queue is bound."""
    _check_mark(plan.mark)
    split_peers(plan.peers, "nft")
    name = table_name(plan.instance)
    server = plan.role == "server"
    cmds = _replace_table(name)
    for s, kind in SETS.items():
        body: Json = {"family": FAMILY, "table": name, "name": s, "type": kind}
        if kind == "inet_service":
            body["flags"] = ["interval"]
        elif server:  # filled and refreshed by the rules, forgotten when idle
            body.update(flags=["timeout"], timeout=plan.conn_timeout, size=CONNS_MAX)
        cmds.append({"add": {"set": body}})
    cmds += [{"add": {"counter": {"family": FAMILY, "table": name, "name": c}}} for c in COUNTERS]
    cmds += set_elements(plan)

    mark = _match(_MARK, plan.mark)
    cmds.append(_chain(name, "prerouting", "prerouting"))
    if server:
        cmds.append({"add": {"chain": {"family": FAMILY, "table": name, "name": SYN_CHAIN}}})
        # A SYN whose tag the queue reader found good comes back with our mark (NF_REPEAT): its
        # connection joins the set, and the SYN reached rsockd through the queue.
        for proto, conns, _counter in _FAMILIES:
            cmds.append(_rule(name, "prerouting", mark, _SYN_ONLY,
                              {"set": {"op": "update", "elem": _tuple(proto), "set": "@" + conns}}))
        cmds.append(_rule(name, "prerouting", mark, _SYN_ONLY, _DROP))
    for proto, conns, counter in _FAMILIES:
        ours = [_NOT_SYN_ONLY, _match(_tuple(proto), "@" + conns)]
        refresh = [{"set": {"op": "update", "elem": _tuple(proto), "set": "@" + conns}}] if server else []
        cmds.append(_rule(name, "prerouting", *(ours if server else ours[1:]), *refresh, {"counter": counter}, _DROP))
    if server:
        cmds.append(_rule(name, "prerouting", _SYN_ONLY, _match(_tcp("dport"), "@tunnel_ports"), _LOCAL,
                          {"jump": {"target": SYN_CHAIN}}))
    ports = "@tunnel_ports" if server else "@local_ports"
    cmds.append(_rule(name, "prerouting", _match(_tcp("dport"), ports), _LOCAL, {"counter": "passed_probe"}))

    cmds += [_chain(name, "output", "output"), _notrack_rule(name, plan.mark)]
    for proto, conns, _counter in _FAMILIES:
        cmds.append(_rule(name, "output", _match(_MARK, plan.mark, "!="), _match(_tuple(proto, True), "@" + conns),
                          {"counter": "guard_dropped"}, _DROP))
    return cmds


def queue_rule(instance: str, queue: int) -> list[Json]:
    """The ``synqueue`` chain's rule, with nftables' own ``queue`` (``nft_queue``): hold each SYN
    for queue ``queue``; ``bypass``: to the kernel when nobody reads it."""
    return [_rule(table_name(instance), SYN_CHAIN, {"queue": {"num": queue, "flags": ["bypass"]}})]


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


def receiver_filter(plan: SteerPlan, syns: bool = True) -> cbpf.Program:
    """The classic BPF filter of the packet sockets (L3 first: ``SOCK_DGRAM``); ``syns=False``:
    without SYNs (the server's come through the SYN queue).  Raises a one-line ``SteerError``
    for a bad peer address or a plan the filter cannot express."""
    split_peers(plan.peers, "nft")
    ports = plan.receive_ports or plan.tunnel_ports
    try:
        return cbpf.tunnel_filter(plan.role, ports, plan.local_ports, plan.peers, l3_offset=0, link="raw",
                                  syns=syns)
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
# The SYN queue


def pick_queue(instance: str, taken: set[int]) -> Iterable[int]:
    """The queue numbers to try for ``instance``, in order: from ``QUEUE_FIRST`` + crc32 of its
    table name modulo ``QUEUE_SPAN`` on through the span, skipping those ``taken``.  Two
    instances in one network namespace then rarely try the same first number, and a clash (the
    kernel refuses a second binding) moves on to the next."""
    first = zlib.crc32(table_name(instance).encode()) % QUEUE_SPAN
    for i in range(QUEUE_SPAN):
        n = QUEUE_FIRST + (first + i) % QUEUE_SPAN
        if n not in taken:
            yield n


def bind_queue(instance: str) -> NfQueue:
    """Bind this instance's SYN queue (``pick_queue``).  Raises ``SteerError``."""
    last: OSError | None = None
    for n in itertools.islice(pick_queue(instance, nfqueue.bound_queues()), 16):
        try:
            return NfQueue(n)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EBUSY):  # EPERM: bound by another socket
                raise SteerError(f"nft: SYN queue {n}: {e.strerror}") from None
            last = e
    raise SteerError(f"nft: no free SYN queue number near {next(iter(pick_queue(instance, set())))}: {last}")


class SynQueue:
    """The server's SYN queue as a ``Receiver``: each SYN to a tunnel port waits in the kernel
    until its verdict.  One whose TSval is its tag (``core/syntag.py``) comes back with our
    mark (``NF_REPEAT``), so the chain adds its connection to the set and drops it, and is then
    yielded to the endpoint (after the verdict: the connection is steered before rsockd
    answers).  Any other is the kernel's (``NF_ACCEPT``).  ``ports``: yield only SYNs to these
    (a server with workers: the daemon's own share); empty: all."""

    shared = True

    def __init__(self, queue: NfQueue, key: bytes, mark: int, ports: frozenset[int] = frozenset()) -> None:
        self.queue = queue
        self.key = key
        self.mark = mark
        self.ports = ports
        self.kept = 0  # SYNs with the tag
        self.passed = 0  # SYNs given to the kernel
        self.seen = syntag.SeenSyns()
        self._rbuf = bytearray(65536)

    def fileno(self) -> int:
        return self.queue.fileno()

    def tagged(self, pkt: bytes, wall: float) -> int | None:
        """The destination port of ``pkt`` (an IP packet) if it is a SYN whose TSval is its tag
        and no other 4-tuple sent that tag first, else None."""
        try:
            ip, l4 = parse_ip(memoryview(pkt))
        except PacketError:
            return None
        if ip.proto != PROTO_TCP or ip.fragment or len(l4) < 20 or l4[13] & (SYN | ACK) != SYN:
            return None
        try:
            hdr, _ = parse_tcp(l4)
            ts = parse_options(hdr.options).timestamps
        except PacketError:
            return None
        if ts is None or not syntag.tag_ok(self.key, hdr.seq, ts[0], wall):
            return None
        # a tag is the 4-tuple's it came from first: the same SYN from elsewhere is a replay
        if not self.seen.claim(hdr.seq, ts[0], (ip.src, hdr.sport, ip.dst, hdr.dport), wall):
            return None
        return hdr.dport

    def packets(self, buf: bytearray) -> Iterator[tuple[memoryview, bool]]:
        queue = self.queue
        pkts = queue.read(self._rbuf)
        if not pkts:
            return
        wall = time.time()
        verdicts: list[bytes] = []
        ours: list[bytes] = []
        for p in pkts:
            dport = None if p.truncated else self.tagged(p.payload, wall)
            if dport is None:
                verdicts.append(nfqueue.verdict(queue.queue, p.packet_id, nfqueue.NF_ACCEPT))
                self.passed += 1
                continue
            verdicts.append(nfqueue.verdict(queue.queue, p.packet_id, nfqueue.NF_REPEAT, self.mark))
            self.kept += 1
            if not self.ports or dport in self.ports:
                ours.append(p.payload)
        queue.send(verdicts)
        view = memoryview(buf)
        for pkt in ours:
            n = len(pkt)
            buf[:n] = pkt
            yield view[:n], False  # the queue fills a checksum left to offload in before the copy

    def close(self) -> None:
        self.queue.close()


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
        self._syn: SynQueue | None = None
        self._passed = 0  # SYNs given to the kernel by queues closed since

    @property
    def table(self) -> str:
        return table_name(self.plan.instance)

    @property
    def queue(self) -> int | None:
        """The server's SYN queue number (None: a client, or not attached)."""
        return self._syn.queue.queue if self._syn is not None else None

    def attach(self) -> None:
        """Open the receivers and the SYN queue, then load the table (replacing a stale one) and
        the queue rule.  Raises ``SteerError``; on failure nothing of ours is left."""
        plan = self.plan
        self._close_sockets()  # attached before: start over
        if not plan.interfaces:
            raise SteerError(f"nft: table {FAMILY} {self.table}: no interface to receive on")
        server = plan.role == "server"
        try:
            cmds = ruleset(plan)
            program = receiver_filter(plan, syns=not server)
            self._ctx = _context()
            for iface in plan.interfaces:
                self._socks[iface] = open_receiver(iface, program)
            if server:
                self._syn = SynQueue(bind_queue(plan.instance), plan.syn_key, plan.mark, plan.receive_ports)
            _run(self._ctx, cmds, f"table {FAMILY} {self.table}")
            if self._syn is not None:
                self._add_queue_rule(self._syn.queue.queue)
        except SteerError:
            self._close_sockets()
            if self._ctx is not None:
                try:
                    _delete(self._ctx, self.table)
                except SteerError:
                    pass
            raise
        LOG.info("nft: table %s %s loaded%s; receiving on %s", FAMILY, self.table,
                 f", SYN queue {self.queue}" if self._syn is not None else "", ", ".join(plan.interfaces))

    def _add_queue_rule(self, queue: int) -> None:
        """nftables' ``queue`` where the kernel has it, else xtables' NFQUEUE through nft_compat."""
        try:
            _run(self._ctx, queue_rule(self.plan.instance, queue), "queue rule")
            return
        except SteerError as native:
            try:
                nfqueue.add_xt_queue_rule(self.table, SYN_CHAIN, queue)
            except OSError as e:
                raise SteerError(f"nft: table {FAMILY} {self.table}: cannot queue SYNs ({native}; "
                                 f"xt NFQUEUE: {e.strerror}): the kernel needs nft_queue or "
                                 "nft_compat with xt_NFQUEUE") from None
        LOG.debug("nft: no nft_queue here; SYNs are queued by xt NFQUEUE (nft_compat)")

    def update(self, plan: SteerPlan) -> None:
        """Apply a changed plan: set contents in one transaction (the whole table, counters
        restarting, when the role, mark, instance or connection timeout changed), new filters on
        the receivers, receivers opened and closed as interfaces come and go, the SYN key.  Call
        it in the namespace of ``attach`` (new receivers are opened there)."""
        if self._ctx is None:
            self.plan = plan
            return
        old = self.plan
        if (plan.role, plan.instance) != (old.role, old.instance):
            self.detach()
            self.plan = plan
            self.attach()
            return
        program = receiver_filter(plan, syns=plan.role != "server")
        added: dict[str, socket.socket] = {}
        try:
            for iface in plan.interfaces:
                if iface not in self._socks:
                    added[iface] = open_receiver(iface, program)
            if (plan.mark, plan.conn_timeout) != (old.mark, old.conn_timeout):
                cmds = ruleset(plan)
            else:
                name = table_name(plan.instance)
                cmds = [{"flush": {"set": {"family": FAMILY, "table": name, "name": s}}}
                        for s in _user_sets(plan.role)]
                cmds += set_elements(plan)
            _run(self._ctx, cmds, f"table {FAMILY} {table_name(plan.instance)}")
            if self._syn is not None and cmds[0].get("add") == _table(self.table):
                self._add_queue_rule(self._syn.queue.queue)
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
        if self._syn is not None:
            self._syn.key, self._syn.mark, self._syn.ports = plan.syn_key, plan.mark, plan.receive_ports
        self.plan = plan

    def receivers(self) -> list[Receiver]:
        out: list[Receiver] = [PacketSocketReceiver(s, shared=True) for s in self._socks.values()]
        if self._syn is not None:
            out.append(self._syn)
        return out

    def counters(self) -> dict[str, int]:
        """``steered_v4``/``steered_v6``: segments the table kept from the kernel (and the
        receivers were offered); ``guard_dropped``; ``passed_probe``: segments to the ports that
        were not rsockd's (SYNs without the tag among them), left to the kernel; extra
        ``receiver_dropped``: segments lost because a receiver's queue was full."""
        for sock in self._socks.values():
            self._collect_stats(sock)
        out = dict.fromkeys(COUNTERS, 0)
        out["receiver_dropped"] = self._rx_dropped
        if self._ctx is None:
            return out
        res = _run(self._ctx, [{"list": {"counters": {"family": FAMILY, "table": self.table}}}],
                   f"table {FAMILY} {self.table}")
        for obj in (res or {}).get("nftables", []):
            c = obj.get("counter")
            if c and c.get("name") in out:
                out[c["name"]] = int(c.get("packets", 0))
        out["passed_probe"] += self._passed + (self._syn.passed if self._syn is not None else 0)
        return out

    def describe(self) -> list[dict[str, str]]:
        return [{"interface": iface, "mode": "nft"} for iface in self.plan.interfaces]

    def tick(self, wall: float) -> None:
        pass  # nothing here depends on the time

    def forget(self, conns: Iterable[tuple[str, int, str, int]]) -> None:
        if self._ctx is None:
            return
        for local, lport, peer, pport in conns:
            name = "conns6" if ":" in local else "conns4"
            elem = {"concat": [peer, pport, local, lport]}
            # one command each: a delete of an element already gone (its timeout) fails alone
            self._ctx.json_cmd({"nftables": [{"delete": {"element": {
                "family": FAMILY, "table": self.table, "name": name, "elem": [elem]}}}]})

    def detach(self) -> None:
        """Close the receivers and the SYN queue and delete the table; idempotent."""
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
        if self._syn is not None:
            self._passed += self._syn.passed
            self._syn.close()
            self._syn = None
