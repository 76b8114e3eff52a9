"""The nft backend in network namespaces: the table keeps rsockd's connections (a SYN with the tag,
then its 4-tuple) from the kernel (no RST) and leaves everything else on the ports to it, the
packet socket and the SYN queue receive ours, the guard drops the kernel's segments on our
connections, marked sends are not tracked.

RST checks never wait for an absence: every probe ends with a SYN to a closed non-tunnel port,
and once the kernel's RST for it is back, the RSTs for everything sent before it would have
been too (one veth, in order).
"""

from __future__ import annotations

import dataclasses
import json
import random
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from rsockd.core import syntag
from rsockd.core.packet import ACK, PSH, RST, SYN, TcpHeader, build_options, parse_ip, parse_tcp, pseudo_sum
from rsockd.errors import PacketError, SteerError
from rsockd.steer import SteerPlan
from rsockd.steer.nft import (
    NftSteering,
    SynQueue,
    cleanup_stale,
    load_notrack,
    nft_available,
    ruleset,
    table_name,
    unload,
)
from tests.integration.test_cbpf_kernel import Sender, ip_packet, packed, pair_with_wrong_peers, segment, wrong_peers
from tests.netns import NetnsPair

PORTS = frozenset({443, *range(10001, 10011)})
LOCAL = 40000
CLOSED = 10500  # a port that is neither a tunnel port nor open
MARK = 0x72736B64
SO_MARK = 36
ETH_P_ALL = 3
SOL_PACKET, PACKET_IGNORE_OUTGOING = 263, 23

KEY = syntag.tag_key(b"k" * 32)

Probe = tuple[str, str, int, int]  # src, dst, sport, dport of a segment sent


def tagged_syn(src: str, dst: str, sport: int, dport: int, tag: bytes, *, key: bytes = KEY, slot_shift: int = 0,
               isn: int | None = None) -> bytes:
    """A SYN whose TSval is the tag of its ISN (of ``slot_shift`` slots from now).  The same
    ``isn`` makes the same tag: sent again from elsewhere, a replay."""
    isn = random.getrandbits(32) if isn is None else isn
    ts = syntag.syn_tag(key, isn, (syntag.slot_of(time.time()) + slot_shift) & syntag.SLOT_MASK)
    opts = build_options(mss=1460, sack_permitted=True, timestamps=(ts, 0), wscale=7)
    tcp = TcpHeader(sport, dport, isn, 0, SYN, 65535, opts).pack(tag, pseudo_sum(packed(src), packed(dst)))
    return ip_packet(src, dst, tcp)


@pytest.fixture(scope="module")
def net() -> Iterator[NetnsPair]:
    with pair_with_wrong_peers() as pair:
        x4, x6 = wrong_peers(pair)
        mac = json.loads(pair.run("c", ["ip", "-j", "link", "show", pair.dev["c"]]).stdout)[0]["address"]
        for addr in (x4, x6):  # the server answers the wrong peer at once, without ARP/ND
            pair.run("s", ["ip", "neigh", "replace", addr, "lladdr", mac, "dev", pair.dev["s"], "nud", "permanent"])
        yield pair


class Client:
    """The client namespace: raw senders and a capture of the TCP segments the server sends."""

    def __init__(self, net: NetnsPair) -> None:
        self.net = net
        with net.inside("c"):
            self.tx = Sender()
            self.cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        self.cap.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        self.cap.bind((net.dev["c"], ETH_P_ALL))
        self.frames: list[bytes] = []  # what the steering received while ``probe`` served its queue

    def close(self) -> None:
        self.tx.close()
        self.cap.close()

    def segments(self, until: bytes | tuple[int, int], timeout: float = 5) -> list[tuple[Probe, int, bytes]]:
        """Captured TCP segments ((src, dst, sport, dport), flags, payload) up to and including
        the first that carries ``until`` (a payload tag, or an RST for (sport, dport))."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            assert select.select([self.cap], [], [], max(0.0, deadline - time.monotonic()))[0], f"no {until!r}"
            frame = self.cap.recv(65536)
            try:
                ip, l4 = parse_ip(frame)
                if ip.proto != 6:
                    continue
                tcp, payload = parse_tcp(l4)
            except PacketError:
                continue
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            key = (socket.inet_ntop(fam, ip.src), socket.inet_ntop(fam, ip.dst), tcp.sport, tcp.dport)
            out.append((key, tcp.flags, bytes(payload)))
            if until in ((tcp.sport, tcp.dport), bytes(payload)) and (isinstance(until, bytes) or tcp.flags & RST):
                return out

    def probe(self, segs: list[tuple[Probe, int | bytes]], steering: NftSteering | None = None) -> set[Probe]:
        """Send ``segs`` ((src, dst, sport, dport), flags or a whole packet); return those the
        server answered with RST.  ``steering``: serve its SYN queue until every SYN sent got its
        verdict, before the end marker."""
        syn = _syn_queue(steering)
        before = syn.kept + syn.passed if syn is not None else 0
        for n, ((src, dst, sport, dport), flags) in enumerate(segs):
            self.tx.send(flags if isinstance(flags, bytes)
                         else segment(src, dst, sport, dport, b"<seg%03d>" % n, flags))
        if syn is not None and steering is not None:
            queued = sum(1 for (_s, _d, _sp, dport), f in segs if dport in steering.plan.tunnel_ports
                         and (isinstance(f, bytes) or f & (SYN | ACK) == SYN))
            deadline = time.monotonic() + 5
            while syn.kept + syn.passed < before + queued:
                assert time.monotonic() < deadline, "SYNs left without a verdict"
                select.select([syn], [], [], 0.5)
                self.frames += drain(steering)
        self.tx.send(segment(self.net.cli4, self.net.srv4, 40999, CLOSED, b"<end>"))
        rsts = {(k[1], k[0], k[3], k[2]) for k, flags, _ in self.segments((CLOSED, 40999)) if flags & RST}
        return {p for p, _ in segs if p in rsts}


def _syn_queue(steering: NftSteering | None) -> SynQueue | None:
    return next((rx for rx in steering.receivers() if isinstance(rx, SynQueue)), None) if steering else None


def drain(steering: NftSteering) -> list[bytes]:
    buf = bytearray(65536)
    return [bytes(pkt) for rx in steering.receivers() for pkt, _ in rx.packets(buf)]


def tags(frames: list[bytes]) -> set[int]:
    return {int(f[f.index(b"<seg") + 4 : f.index(b"<seg") + 7]) for f in frames if b"<seg" in f}


def out_rsts(net: NetnsPair) -> int:
    out = net.run("s", ["nstat", "-asz", "TcpOutRsts"]).stdout
    return int(next(line.split()[1] for line in out.splitlines() if line.startswith("TcpOutRsts")))


def queues(net: NetnsPair) -> set[int]:
    """The queue numbers bound in the server namespace."""
    out = net.run("s", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return {int(line.split()[0]) for line in out.splitlines() if line.strip()}


def tables(net: NetnsPair) -> str:
    return net.run("s", ["nft", "list", "tables"]).stdout


@pytest.fixture
def client(net: NetnsPair) -> Iterator[Client]:
    c = Client(net)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def plan(net: NetnsPair, request: pytest.FixtureRequest) -> SteerPlan:
    return SteerPlan(f"t{net.tag}-{request.node.name[5:15]}", "server", (net.dev["s"],), PORTS, syn_key=KEY)


@contextmanager
def attached(net: NetnsPair, plan: SteerPlan) -> Iterator[NftSteering]:
    """An attached ``NftSteering`` in the server namespace, always detached afterwards."""
    steering = NftSteering(plan)
    with net.inside("s"):
        steering.attach()
    try:
        yield steering
    finally:
        with net.inside("s"):
            steering.detach()


# ---------------------------------------------------------------------------------------------


def test_ruleset_json_names_table_sets_and_chains() -> None:
    plan = SteerPlan("a b/c", "client", ("eth0",), frozenset({80, 443, 444}), frozenset({40000}),
                     frozenset({"192.0.2.1", "2001:db8::1"}),
                     conns=frozenset({("192.0.2.9", 40000, "192.0.2.1", 443),
                                      ("2001:db8::9", 40000, "2001:db8::1", 80)}))
    cmds = ruleset(plan)
    assert table_name("a b/c") == "rsockd_a_b_c"
    assert [next(iter(c)) for c in cmds[:3]] == ["add", "delete", "add"]
    chains = [c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})]
    assert {(ch["name"], ch["hook"], ch["prio"]) for ch in chains} == {("prerouting", "prerouting", -300),
                                                                      ("output", "output", -300)}
    elems = {c["add"]["element"]["name"]: c["add"]["element"]["elem"] for c in cmds if "element" in c.get("add", {})}
    assert elems == {"tunnel_ports": [80, {"range": [443, 444]}], "local_ports": [40000],
                     "conns4": [{"concat": ["192.0.2.1", 443, "192.0.2.9", 40000]}],
                     "conns6": [{"concat": ["2001:db8::1", 80, "2001:db8::9", 40000]}]}
    with pytest.raises(SteerError, match="peer 'nope'"):
        ruleset(dataclasses.replace(plan, peers=frozenset({"nope"})))
    with pytest.raises(SteerError, match="address families differ"):
        ruleset(dataclasses.replace(plan, conns=frozenset({("2001:db8::9", 40000, "192.0.2.1", 443)})))
    server = ruleset(dataclasses.replace(plan, role="server", conns=frozenset(), conn_timeout=77))
    chains = [c["add"]["chain"]["name"] for c in server if "chain" in c.get("add", {})]
    assert chains == ["prerouting", "synqueue", "output"]
    sets = {c["add"]["set"]["name"]: c["add"]["set"] for c in server if "set" in c.get("add", {})}
    assert sets["conns4"]["timeout"] == 77 and "timeout" in sets["conns4"]["flags"]


@pytest.mark.root
def test_available_here() -> None:
    assert nft_available() is None


ISN_OURS = 0x40002


@pytest.mark.root
def test_server_keeps_only_its_connections_from_the_kernel(net: NetnsPair, client: Client, plan: SteerPlan) -> None:
    c4, c6, s4, s6 = net.cli4, net.cli6, net.srv4, net.srv6
    # Segments on the tunnel ports that are no connection of ours: the kernel's.
    probes: list[tuple[Probe, int | bytes]] = [
        ((c4, s4, 40001, 10001), SYN),
        ((c4, s4, 40001, 10002), ACK | PSH),
        ((c6, s6, 40001, 10003), SYN),
        ((c6, s6, 40001, 443), ACK),
        ((c4, s4, 40003, 10004), tagged_syn(c4, s4, 40003, 10004, b"<seg004>", key=syntag.tag_key(b"x" * 32))),
        ((c6, s6, 40005, 10005), tagged_syn(c6, s6, 40005, 10005, b"<seg006>", slot_shift=-3)),
    ]
    other: list[tuple[Probe, int | bytes]] = [((c4, s4, 40001, CLOSED + 1), SYN), ((c6, s6, 40001, 444), SYN)]
    # Ours: a SYN with the tag, then the rest of its connection.
    ours: list[tuple[Probe, int | bytes]] = [
        ((c4, s4, 40002, 10001), tagged_syn(c4, s4, 40002, 10001, b"<seg100>", isn=ISN_OURS)),
        ((c6, s6, 40002, 10003), tagged_syn(c6, s6, 40002, 10003, b"<seg101>")),
    ]
    later: list[tuple[Probe, int | bytes]] = [((c4, s4, 40002, 10001), ACK), ((c6, s6, 40002, 10003), ACK | PSH)]

    # Control: without the table the kernel answers every segment with RST.
    assert client.probe(probes + other + ours) == {p for p, _ in probes + other + ours}

    before = out_rsts(net)
    with attached(net, plan) as steering:
        assert table_name(plan.instance) in tables(net)
        assert steering.queue in queues(net)
        assert client.probe(probes + other + ours, steering) == {p for p, _ in probes + other}
        assert out_rsts(net) - before == len(probes + other) + 1  # + the end marker's
        # The tagged SYNs came through the queue; the tap also saw the probes that are not SYNs
        # (the endpoint counts those as no_connection and leaves them to the kernel).
        assert tags(client.frames + drain(steering)) == {1, 3, 100, 101}
        client.frames.clear()
        assert client.probe(later, steering) == set()
        assert tags(client.frames + drain(steering)) == {0, 1}
        counters = steering.counters()
        assert (counters["steered_v4"], counters["steered_v6"], counters["guard_dropped"]) == (1, 1, 0)
        assert counters["passed_probe"] == len(probes)
        assert steering.describe() == [{"interface": net.dev["s"], "mode": "nft"}]
        conns = net.run("s", ["nft", "list", "set", "inet", steering.table, "conns4"]).stdout
        assert f"{c4} . 40002 . {s4} . 10001" in conns
        # 40002's SYN again, from another port: a replay, so the kernel's (RST), and counted.
        replay = ((c4, s4, 40004, 10004), tagged_syn(c4, s4, 40004, 10004, b"<seg005>", isn=ISN_OURS))
        assert client.probe([replay], steering) == {replay[0]}
        assert steering.counters()["passed_probe"] == len(probes) + 1

        # update(): new ports in the table and in the receive filter, old ones released; the
        # connections stay.
        with net.inside("s"):
            steering.update(dataclasses.replace(plan, tunnel_ports=frozenset({20001})))
        client.frames.clear()
        moved: list[tuple[Probe, int | bytes]] = [
            ((c4, s4, 40001, 20001), ACK), ((c6, s6, 40001, 10001), SYN),
            ((c4, s4, 40006, 20001), tagged_syn(c4, s4, 40006, 20001, b"<seg002>"))]
        assert client.probe(moved, steering) == {moved[0][0], moved[1][0]}
        assert tags(client.frames + drain(steering)) == {0, 2}
        assert steering.counters()["steered_v4"] == 1  # named counters survive a set update
        socks = [rx.sock for rx in steering.receivers() if not isinstance(rx, SynQueue)]  # type: ignore[attr-defined]
        queue = steering.queue

    assert table_name(plan.instance) not in tables(net)
    assert all(s.fileno() == -1 for s in socks)
    assert queue not in queues(net)
    with net.inside("s"):
        steering.detach()  # again: nothing left, no error
    assert client.probe(ours[:1]) == {ours[0][0]}


@pytest.mark.root
def test_client_matches_peers_and_local_ports(net: NetnsPair, client: Client, plan: SteerPlan) -> None:
    c4, c6, s4, s6 = net.cli4, net.cli6, net.srv4, net.srv6
    x4, x6 = wrong_peers(net)
    plan = dataclasses.replace(plan, role="client", local_ports=frozenset({LOCAL}), peers=frozenset({c4, c6}),
                               conns=frozenset({(s4, LOCAL, c4, 10001), (s6, LOCAL, c6, 443)}))
    ours: list[tuple[Probe, int | bytes]] = [((c4, s4, 10001, LOCAL), SYN | ACK), ((c6, s6, 443, LOCAL), ACK | PSH)]
    other: list[tuple[Probe, int | bytes]] = [
        ((x4, s4, 10001, LOCAL), ACK),  # wrong peer
        ((x6, s6, 10001, LOCAL), ACK),
        ((c4, s4, CLOSED, LOCAL), ACK),  # not a tunnel port
        ((c6, s6, 10001, LOCAL + 1), ACK),  # not our local port
        ((c4, s4, 10002, LOCAL), ACK),  # the peer, a tunnel port, our local port, but no connection of ours
        ((c6, s6, 10001, LOCAL), SYN),
    ]
    with attached(net, plan) as steering:
        assert client.probe(ours + other) == {p for p, _ in other}
        assert tags(drain(steering)) == {0, 1, 6, 7}  # the capture sees the last two; the endpoint ignores them
        counters = steering.counters()
        assert (counters["steered_v4"], counters["steered_v6"]) == (1, 1)
        assert counters["passed_probe"] == 5  # every segment to our local port that is no connection of ours


@pytest.mark.root
def test_stale_table_is_replaced(net: NetnsPair, plan: SteerPlan) -> None:
    name = table_name(plan.instance)
    stale = f"add table inet {name}; add chain inet {name} stale; add set inet {name} peers4 {{ type ipv4_addr; }}"
    net.run("s", ["nft", stale])
    with net.inside("s"):
        assert cleanup_stale(plan.instance) is True
        assert cleanup_stale(plan.instance) is False
    assert name not in tables(net)
    net.run("s", ["nft", stale])
    with attached(net, plan):
        listing = net.run("s", ["nft", "list", "table", "inet", name]).stdout
        assert "chain stale" not in listing and "chain prerouting" in listing
    assert name not in tables(net)


@pytest.mark.root
def test_missing_interface_is_one_line_and_leaves_nothing(net: NetnsPair, plan: SteerPlan) -> None:
    steering = NftSteering(dataclasses.replace(plan, interfaces=("nosuch0",)))
    with net.inside("s"), pytest.raises(SteerError, match=r"^nft: interface nosuch0: No such device$"):
        steering.attach()
    assert table_name(plan.instance) not in tables(net)


@pytest.mark.root
def test_guard_drops_unmarked_rst_and_ack(net: NetnsPair, client: Client, plan: SteerPlan) -> None:
    with net.inside("s"):
        unmarked, marked = Sender(), Sender()
    for sock in (marked.s4, marked.s6):
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
    try:
        with attached(net, plan) as steering:
            # Two connections of ours (a tagged SYN would put them there, as the server test shows).
            t = steering.table
            net.run("s", ["nft", f"add element inet {t} conns4 {{ {net.cli4} . 40001 . {net.srv4} . 10001 }}; "
                                 f"add element inet {t} conns6 {{ {net.cli6} . 40001 . {net.srv6} . 10002 }}"])
            for n, flags in enumerate((RST, ACK, RST | ACK)):
                # The output hook runs inside sendto: a drop there is EPERM to the sender.
                with pytest.raises(PermissionError):
                    unmarked.send(segment(net.srv4, net.cli4, 10001, 40001, b"<kernel%d>" % n, flags))
                with pytest.raises(PermissionError):
                    unmarked.send(segment(net.srv6, net.cli6, 10002, 40001, b"<kernel%d>" % n, flags))
            assert steering.counters()["guard_dropped"] == 6
            unmarked.send(segment(net.srv4, net.cli4, 10001, 40002, b"<syn>", RST))  # no connection of ours: passes
            unmarked.send(segment(net.srv4, net.cli4, 40001, 10001, b"<other>", RST))  # not from a tunnel port
            marked.send(segment(net.srv6, net.cli6, 10001, 40001, b"<ours>", RST | ACK))
            payloads = {p for _, _, p in client.segments(b"<ours>")}
            assert {b"<syn>", b"<other>"} <= payloads
            assert not any(p.startswith(b"<kernel") for p in payloads)
            assert steering.counters()["guard_dropped"] == 6
    finally:
        unmarked.close()
        marked.close()


def ct_counters(net: NetnsPair, table: str) -> dict[str, int]:
    out = json.loads(net.run("s", ["nft", "-j", "list", "counters", "table", "inet", table]).stdout)
    return {o["counter"]["name"]: o["counter"]["packets"] for o in out["nftables"] if "counter" in o}


@pytest.mark.root
@pytest.mark.parametrize("how", ["notrack-only", "nft-backend"])
def test_marked_sends_are_not_tracked(net: NetnsPair, plan: SteerPlan, how: str) -> None:
    """A conntrack-using table after ours counts ``ct state new`` vs ``untracked`` for our sends."""
    probe = f"ctprobe_{net.tag}"
    net.run("s", ["nft", f"add table inet {probe}; add counter inet {probe} new; add counter inet {probe} untracked; "
                  f"add chain inet {probe} out {{ type filter hook output priority 0; }}; "
                  f"add rule inet {probe} out tcp dport {LOCAL} ct state new counter name new; "
                  f"add rule inet {probe} out tcp dport {LOCAL} ct state untracked counter name untracked"])
    with net.inside("s"):
        unmarked, marked = Sender(), Sender()
    for sock in (marked.s4, marked.s6):
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
    steering = NftSteering(plan)
    try:
        # Control: with conntrack active and no table of ours, a marked send is tracked.
        marked.send(segment(net.srv4, net.cli4, 10001, LOCAL, b"", SYN))
        assert ct_counters(net, probe) == {"new": 1, "untracked": 0}
        with net.inside("s"):
            if how == "notrack-only":
                load_notrack(plan.instance, MARK)
            else:
                steering.attach()
        marked.send(segment(net.srv4, net.cli4, 10002, LOCAL, b"", SYN))
        marked.send(segment(net.srv6, net.cli6, 10003, LOCAL, b"", SYN))
        assert ct_counters(net, probe) == {"new": 1, "untracked": 2}
        unmarked.send(segment(net.srv4, net.cli4, 10004, LOCAL, b"", SYN))
        assert ct_counters(net, probe) == {"new": 2, "untracked": 2}
    finally:
        unmarked.close()
        marked.close()
        with net.inside("s"):
            steering.detach()
            unload(plan.instance)
        net.run("s", ["nft", "delete", "table", "inet", probe])
    assert table_name(plan.instance) not in tables(net)
