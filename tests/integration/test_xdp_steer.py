"""The XDP data plane for real: bpf/ingress.c + egress.c attached through XdpSteering on a veth
pair in network namespaces, fed crafted TCP segments from raw sockets.

The daemon side (XdpSteering) runs in tests/integration/xdp_helper.py under ``ip netns exec``,
where a daemon would run: its own mount namespace, so bpffs is mounted there and vanishes with
it, as after a SIGKILL in production.  Sockets are made in the namespaces by this process
(setns on the main thread, then back).  The test process is pinned to one CPU so that segments
sent one after the other arrive in that order; "X did not happen" is then proven by a later
segment's effect arriving, not by waiting.

Byte-exactness is against ``rsockd.core.packet.steer_rewrite()``, the Python statement of the rewrite.

Port sharing: the server steers a SYN only with the SYN tag (``rsockd.core.syntag``, the plan's
key: the default key's here unless a test sets one) and any other segment only of a 4-tuple a
tagged SYN opened (``open_tuple``); the client only its plan's connections.  The rest is the
kernel's, and so are its answers.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rsockd.core import syntag
from rsockd.core.framing import Keyring
from rsockd.core.packet import (
    ACK,
    IPV4_HEADER,
    PSH,
    SYN,
    TCP_HEADER,
    TcpHeader,
    build_options,
    ipv6_header,
    pack_address,
    parse_ip,
    parse_meta,
    parse_tcp,
    pseudo_sum,
    steer_rewrite,
)
from rsockd.errors import PacketError
from rsockd.steer import bpfsys
from rsockd.steer.xdp import bcc_available
from tests.netns import NetnsPair

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("xdp_helper.py")
MARK = 0x72736B64
RST = 0x04
WAIT = 5.0  # seconds for anything that should happen (it happens in milliseconds)

P1, P2, P3, UNMAPPED = 10001, 10002, 10003, 10099  # server side
PEER_PORT, PEER2, OTHER_PORT, LOCAL_PORT = 10001, 10002, 10077, 40123  # client side


@pytest.fixture(scope="module", autouse=True)
def requirements_and_one_cpu() -> Iterator[None]:
    if os.geteuid() == 0:
        reason = bcc_available()
        if reason:
            pytest.skip(f"XDP backend unavailable: {reason}")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    yield
    os.sched_setaffinity(0, before)


# ---------------------------------------------------------------------------------------------
# Tools


class HelperError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


class Helper:
    """xdp_helper.py running in one namespace; ``call`` sends one command, returns the result."""

    def __init__(self, net: NetnsPair, side: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = net.popen(side, [sys.executable, str(HELPER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env, cwd=str(REPO))

    def call(self, op: str, timeout: float = 90, **kw: Any) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"helper did not answer {op} within {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"helper exited during {op} (status {self.proc.poll()})"
        reply = json.loads(line)
        if not reply["ok"]:
            raise HelperError(reply["type"], reply["error"])
        return reply["result"]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def norm(addr: str) -> str:
    return str(ipaddress.ip_address(addr))


def segment(src: str, dst: str, sport: int, dport: int, *, flags: int = ACK | PSH, payload: bytes = b"",
            options: bytes = b"", seq: int = 1000, ack: int = 2000, window: int = 512, urgent: int = 0) -> bytes:
    """A TCP segment with a correct checksum."""
    psum = pseudo_sum(pack_address(src), pack_address(dst))
    return TcpHeader(sport, dport, seq, ack, flags, window, options, urgent).pack(payload, psum=psum)


def corrupt_checksum(seg: bytes) -> bytes:
    return seg[:16] + bytes([seg[16] ^ 0x5A]) + seg[17:]


class Sender:
    """Raw sockets in one namespace: IPv4 with our own header (IPPROTO_RAW), IPv6 raw TCP (bound
    to the source address, checksum from Python), IPv6 with our own header (IPPROTO_RAW)."""

    def __init__(self, net: NetnsPair, side: str) -> None:
        self.net, self.side = net, side
        self.socks: dict[Any, socket.socket] = {}
        with net.inside(side):
            self.raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            for s in (self.raw4, self.raw6):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)  # past our own guard, if any

    def v4(self, src: str, dst: str, seg: bytes, *, options: bytes = b"", frag: int = 0x4000) -> None:
        ihl = 5 + len(options) // 4
        hdr = IPV4_HEADER.pack(0x40 | ihl, 0, 0, 0, frag, 64, 6, 0, pack_address(src), pack_address(dst))
        # IP_HDRINCL: the kernel fills the total length, id and checksum
        self.raw4.sendto(hdr + options + seg, (dst, 0))

    def v6(self, src: str, dst: str, seg: bytes) -> None:
        s = self.socks.get(src)
        if s is None:
            with self.net.inside(self.side):
                s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
                s.bind((src, 0))
            self.socks[src] = s
        s.sendto(seg, (dst, 0))

    def v6_ext(self, src: str, dst: str, seg: bytes, ext_type: int, ext: bytes) -> None:
        """``seg`` behind one extension header ``ext`` (its first byte is set to TCP)."""
        body = bytes([6]) + ext[1:] + seg
        self.raw6.sendto(ipv6_header(pack_address(src), pack_address(dst), len(body), proto=ext_type) + body, (dst, 0))

    def close(self) -> None:
        for s in (self.raw4, self.raw6, *self.socks.values()):
            s.close()


@dataclass(frozen=True)
class Seen:
    src: str
    sport: int
    dst: str
    dport: int
    flags: int


class Capture:
    """An AF_PACKET socket on one namespace's veth: the TCP segments that arrive there."""

    def __init__(self, net: NetnsPair, side: str) -> None:
        with net.inside(side):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.sock.bind((net.dev[side], 0x0003))

    def wait(self, want: Callable[[Seen], bool], timeout: float = WAIT) -> list[Seen]:
        """Every incoming TCP segment up to and including the first ``want`` accepts."""
        seen: list[Seen] = []
        self.sock.settimeout(timeout)
        while True:
            try:
                frame, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                raise AssertionError(f"no matching segment within {timeout} s; saw {seen}") from None
            if addr[2] == socket.PACKET_OUTGOING or frame[12:14] not in (b"\x08\x00", b"\x86\xdd"):
                continue
            try:
                ip, l4 = parse_ip(frame[14:])
            except PacketError:
                continue
            if ip.proto != 6 or len(l4) < 20:
                continue
            sport, dport, _seq, _ack, offflags, *_ = TCP_HEADER.unpack_from(l4)
            s = Seen(str(ipaddress.ip_address(ip.src)), sport, str(ipaddress.ip_address(ip.dst)), dport,
                     offflags & 0x1FF)
            seen.append(s)
            if want(s):
                return seen

    def close(self) -> None:
        self.sock.close()


def nstat(net: NetnsPair, side: str) -> dict[str, int]:
    out = net.run(side, ["nstat", "-asz"]).stdout
    return {p[0]: int(p[1]) for p in (line.split() for line in out.splitlines()) if p and not p[0].startswith("#")}


def udp_socket(net: NetnsPair, side: str, family: int, addr: str, port: int) -> socket.socket:
    with net.inside(side):
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
    s.settimeout(WAIT)
    return s


def recv_all(sock: socket.socket, n: int) -> list[tuple[bytes, tuple[str, int]]]:
    out = []
    for _ in range(n):
        data, addr = sock.recvfrom(65535)
        out.append((data, (norm(addr[0]), addr[1])))
    return out


def assert_nothing_queued(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recvfrom(65535)
    finally:
        sock.settimeout(WAIT)


def xdp_of(net: NetnsPair, side: str, dev: str) -> dict[str, Any] | None:
    link = json.loads(net.run(side, ["ip", "-j", "link", "show", "dev", dev]).stdout)[0]
    xdp = link.get("xdp")
    return xdp if isinstance(xdp, dict) else None


def assert_nothing_attached(net: NetnsPair, side: str, helper: Helper, instance: str) -> None:
    dev = net.dev[side]
    assert xdp_of(net, side, dev) is None
    assert xdp_of(net, side, "lo") is None
    assert net.run(side, ["tc", "filter", "show", "dev", dev, "egress"]).stdout.strip() == ""
    assert "clsact" not in net.run(side, ["tc", "qdisc", "show", "dev", dev]).stdout
    assert helper.call("pins", instance=instance) is False


def random_segments(rng: random.Random, src: str, dst: str, sport: int, dport: int, n: int,
                    syn: bool = True) -> list[bytes]:
    """Segments exercising the checksum update: every flag, urgent and window value, odd and
    even lengths, with and without options.  ``syn=False``: none opens a connection (SYN
    without ACK), which the server steers only with the SYN tag."""
    option_sets = [b"", build_options(timestamps=(rng.getrandbits(32), rng.getrandbits(32))),
                   build_options(mss=1460, sack_permitted=True, timestamps=(1, 0), wscale=7), bytes([1, 1, 1, 0])]
    segs = []
    for i in range(n):
        size = rng.choice([0, 1, 2, 3, 17, 100, 511, 1024, 1399]) if i % 3 else rng.randrange(0, 1400)
        flags = rng.getrandbits(9)
        if not syn and flags & SYN and not flags & ACK:
            flags |= ACK
        segs.append(segment(src, dst, sport, dport, flags=flags, payload=rng.randbytes(size),
                            options=rng.choice(option_sets), seq=rng.getrandbits(32), ack=rng.getrandbits(32),
                            window=rng.getrandbits(16), urgent=rng.getrandbits(16)))
    return segs


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


DEFAULT_TAG_KEY = Keyring.from_secret(None).syn_key


def tagged_syn(src: str, dst: str, sport: int, dport: int, *, key: bytes = DEFAULT_TAG_KEY, slot: int = 0,
               isn: int | None = None, base: int | None = None) -> bytes:
    """A SYN (Linux's options) whose TSval is the SYN tag of its ISN under ``key``, for the slot
    ``base`` (the current one when None) plus ``slot``.  The same ``isn`` and ``slot`` make the
    same tag (a replay)."""
    isn = random.getrandbits(32) if isn is None else isn
    base = syntag.slot_of(time.time()) if base is None else base
    ts = syntag.syn_tag(key, isn, (base + slot) & syntag.SLOT_MASK)
    opts = build_options(mss=1460, sack_permitted=True, timestamps=(ts, 0), wscale=7)
    return segment(src, dst, sport, dport, flags=SYN, seq=isn, ack=0, options=opts)


# ---------------------------------------------------------------------------------------------
# Server role, native mode: one attachment shared by the tests below (in file order)


@dataclass
class Env:
    net: NetnsPair
    helper: Helper
    send: Sender
    cap: Capture
    instance: str
    plan: dict[str, Any]
    attach_result: dict[str, Any]
    socks: dict[Any, socket.socket] = field(default_factory=dict)
    strangers: dict[int, str] = field(default_factory=dict)  # family -> a non-peer address of the server

    def counters(self) -> dict[str, int]:
        result: dict[str, int] = self.helper.call("counters")
        return result

    def addrs(self, family: int) -> tuple[str, str]:
        """(client, server) addresses of ``family``."""
        net = self.net
        return (net.cli4, net.srv4) if family == 4 else (net.cli6, net.srv6)

    def send_from_client(self, family: int, seg: bytes) -> None:
        src, dst = self.addrs(family)
        (self.send.v4 if family == 4 else self.send.v6)(src, dst, seg)

    def open_tuple(self, family: int, sport: int, port: int) -> None:
        """Make (client:sport, server:port) one of rsockd's connections: a tagged SYN, received."""
        src, dst = self.addrs(family)
        syn = tagged_syn(src, dst, sport, port)
        self.send_from_client(family, syn)
        assert recv_all(self.socks[(family, port)], 1) == [(steer_rewrite(syn)[8:], (norm(src), sport))]

    def close(self) -> None:
        """Close the sockets, then detach and stop the helper (detached even when closing fails)."""
        try:
            for s in self.socks.values():
                s.close()
            self.send.close()
            self.cap.close()
        finally:
            try:
                self.helper.call("detach")
            finally:
                self.helper.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Env]:
    with NetnsPair() as net:
        instance = "test-" + net.tag
        plan = {"instance": instance, "role": "server", "interfaces": [net.dev["s"]], "tunnel_ports": [P1, P2],
                "mark": MARK, "xdp_mode": "native"}
        helper = Helper(net, "s")
        send, cap = Sender(net, "c"), Capture(net, "c")
        env = Env(net, helper, send, cap, instance, plan, {})
        try:
            env.attach_result = helper.call("attach", plan=plan)
            env.socks = {
                (4, P1): udp_socket(net, "s", socket.AF_INET, "0.0.0.0", P1),
                (6, P1): udp_socket(net, "s", socket.AF_INET6, "::", P1),
                (4, P2): udp_socket(net, "s", socket.AF_INET, "0.0.0.0", P2),
                (4, P3): udp_socket(net, "s", socket.AF_INET, "0.0.0.0", P3),
            }
            yield env
        finally:
            env.close()


def test_server_attached_native(server: Env) -> None:
    r = server.attach_result
    assert r["describe"] == [{"interface": server.net.dev["s"], "mode": "native"}]
    xdp = xdp_of(server.net, "s", server.net.dev["s"])
    assert xdp is not None and xdp["mode"] == 1 and xdp["prog"]["name"] == "rsockd_xdp"  # 1: native (driver)
    guard = server.net.run("s", ["tc", "filter", "show", "dev", server.net.dev["s"], "egress"]).stdout
    assert "rsockd_guard" in guard and "direct-action" in guard
    assert r["bcc_imported"] is False
    print(f"compile {r['report']['compile_s']} s, loader total {r['report']['load_s']} s, "
          f"loader RSS {r['report']['rss_mb']} MB, daemon side RSS after attach {r['rss_mb']:.1f} MB")
    assert r["rss_mb"] < 60


@pytest.mark.parametrize("family", [4, 6])
def test_server_steers_exactly_what_steer_rewrite_says(server: Env, family: int) -> None:
    net = server.net
    src, dst = (net.cli4, net.srv4) if family == 4 else (net.cli6, net.srv6)
    server.open_tuple(family, 40000 + family, P1)
    segs = random_segments(random.Random(family), src, dst, 40000 + family, P1, 60, syn=False)
    before = server.counters()
    for seg in segs:
        (server.send.v4 if family == 4 else server.send.v6)(src, dst, seg)
    got = recv_all(server.socks[(family, P1)], len(segs))
    assert sorted(got) == sorted((steer_rewrite(seg)[8:], (norm(src), 40000 + family)) for seg in segs)
    # and the receiver's parser reads back what was sent
    for seg in segs[:5]:
        sent, sent_payload = parse_tcp(seg)
        meta, payload = parse_meta(steer_rewrite(seg)[8:])
        assert (meta.seq, meta.ack, meta.flags, meta.window, meta.options, bytes(payload)) == (
            sent.seq, sent.ack, sent.flags, sent.window, sent.options, bytes(sent_payload))
    assert delta(before, server.counters()) == {f"steered_v{family}": len(segs)}


@pytest.mark.parametrize("family", [4, 6])
def test_server_a_tagged_syn_opens_its_tuple_and_nothing_else(server: Env, family: int) -> None:
    """The tag is checked in BPF exactly as rsockd.core.syntag states it: the slots beside the
    current one pass, slot - 3 does not; a tag belongs to the 4-tuple it came from first (the
    same SYN replayed from another port is the kernel's); the key.  What the kernel gets it answers: RST, which the
    guard lets leave."""
    src, dst = server.addrs(family)
    sock = server.socks[(family, P1)]
    conns_before = set(server.helper.call("conns"))
    before, rsts = server.counters(), nstat(server.net, "s")["TcpOutRsts"]
    isn0 = random.getrandbits(32)
    # the slot the attachment holds: this module's shared one never ticks, so it may be a slot
    # behind the clock by now
    base = server.helper.call("syntag")["slot"]
    steered = [tagged_syn(src, dst, 42000, P1, slot=-1, isn=isn0, base=base),
               tagged_syn(src, dst, 42001, P1, slot=1, base=base)]
    for syn in steered:
        server.send_from_client(family, syn)
    assert sorted(recv_all(sock, 2)) == sorted((steer_rewrite(s)[8:], (norm(src), parse_tcp(s)[0].sport))
                                               for s in steered)
    assert set(server.helper.call("conns")) - conns_before == {bpfsys.conn_key(src, dst, 42000, P1).hex(),
                                                                bpfsys.conn_key(src, dst, 42001, P1).hex()}
    probes = {  # sport -> the SYN
        42002: segment(src, dst, 42002, P1, flags=SYN, seq=12345),  # untagged
        42003: tagged_syn(src, dst, 42003, P1, slot=-3, base=base),  # too old
        42004: tagged_syn(src, dst, 42004, P1, slot=-1, isn=isn0, base=base),  # 42000's SYN, from another port
        42005: tagged_syn(src, dst, 42005, P1, key=bytes(16), base=base),  # another key
    }
    for port, syn in probes.items():
        server.send_from_client(family, syn)
        server.cap.wait(lambda s, port=port: s.dport == port and bool(s.flags & RST))  # P1/tcp: nothing bound
    # an established-looking segment of no connection: the kernel's too
    server.send_from_client(family, segment(src, dst, 42006, P1, flags=ACK, payload=b"stranger"))
    server.cap.wait(lambda s: s.dport == 42006 and bool(s.flags & RST))
    assert_nothing_queued(sock)
    assert nstat(server.net, "s")["TcpOutRsts"] == rsts + 5  # port P1/tcp has nothing bound
    assert delta(before, server.counters()) == {f"steered_v{family}": 2, "passed_probe": 5}
    assert set(server.helper.call("conns")) - conns_before == {bpfsys.conn_key(src, dst, 42000, P1).hex(),
                                                                bpfsys.conn_key(src, dst, 42001, P1).hex()}


def test_server_a_new_key_applies_in_place(server: Env) -> None:
    src, dst = server.addrs(4)
    key = Keyring.from_secret("another").syn_key
    before = syntag.slot_of(time.time())
    server.helper.call("update", plan=server.plan | {"syn_key": key.hex()})
    assert before <= server.helper.call("syntag")["slot"] <= syntag.slot_of(time.time())
    try:
        server.send_from_client(4, tagged_syn(src, dst, 42100, P1))  # the old key's tag: the kernel's
        server.cap.wait(lambda s: s.dport == 42100 and bool(s.flags & RST))
        syn = tagged_syn(src, dst, 42101, P1, key=key)
        server.send_from_client(4, syn)
        assert recv_all(server.socks[(4, P1)], 1)[0][0] == steer_rewrite(syn)[8:]
        assert_nothing_queued(server.socks[(4, P1)])
    finally:
        server.helper.call("update", plan=server.plan)


@pytest.mark.parametrize("family", [4, 6])
def test_server_bad_tcp_checksum_becomes_bad_udp_checksum(server: Env, family: int) -> None:
    net = server.net
    src, dst = (net.cli4, net.srv4) if family == 4 else (net.cli6, net.srv6)
    send = server.send.v4 if family == 4 else server.send.v6
    name = "UdpInCsumErrors" if family == 4 else "Udp6InCsumErrors"
    server.open_tuple(family, 40100, P1)
    bad = segment(src, dst, 40100, P1, payload=b"bad checksum")
    good = segment(src, dst, 40100, P1, payload=b"good checksum")
    errors = nstat(net, "s")[name]
    send(src, dst, corrupt_checksum(bad))
    send(src, dst, good)
    assert recv_all(server.socks[(family, P1)], 1) == [(steer_rewrite(good)[8:], (norm(src), 40100))]
    assert nstat(net, "s")[name] == errors + 1
    assert_nothing_queued(server.socks[(family, P1)])


def test_server_unmapped_port_is_left_to_tcp(server: Env) -> None:
    net = server.net
    before, rsts = server.counters(), nstat(net, "s")["TcpOutRsts"]
    server.send.v4(net.cli4, net.srv4, segment(net.cli4, net.srv4, 40200, UNMAPPED, flags=SYN))
    # not rewritten: TCP answers (a rewritten one would have drawn an ICMP port unreachable)
    server.cap.wait(lambda s: s.sport == UNMAPPED and s.dport == 40200 and bool(s.flags & RST))
    assert nstat(net, "s")["TcpOutRsts"] == rsts + 1
    assert delta(before, server.counters()) == {}


def test_server_bad_data_offset_passes_and_is_counted(server: Env) -> None:
    net = server.net
    server.open_tuple(4, 40300, P1)
    before = server.counters()
    short = bytearray(segment(net.cli4, net.srv4, 40300, P1, payload=b"x" * 8))
    short[12] = 4 << 4  # data offset 4 < 5
    past = bytearray(segment(net.cli4, net.srv4, 40300, P1))
    past[12] = 15 << 4  # 60-byte header in a 20-byte segment
    for seg in (short, past):
        server.send.v4(net.cli4, net.srv4, bytes(seg))
    server.send.v6(net.cli6, net.srv6, bytes(short))
    # a well-formed one after them: once it is here, the others have been through XDP
    good = segment(net.cli4, net.srv4, 40300, P1, payload=b"after")
    server.send.v4(net.cli4, net.srv4, good)
    assert recv_all(server.socks[(4, P1)], 1)[0][0] == steer_rewrite(good)[8:]
    assert delta(before, server.counters()) == {"passed_malformed": 3, "steered_v4": 1}
    assert_nothing_queued(server.socks[(4, P1)])
    assert_nothing_queued(server.socks[(6, P1)])


def test_server_ip_options_pass_and_the_guard_drops_the_kernels_rst(server: Env) -> None:
    net = server.net
    server.open_tuple(4, 40400, P1)
    server.open_tuple(6, 40401, P1)
    before, rsts = server.counters(), nstat(net, "s")["TcpOutRsts"]
    # IPv4 options (NOP NOP NOP EOL): left to the kernel, whose TCP answers RST from tunnel port P1
    server.send.v4(net.cli4, net.srv4, segment(net.cli4, net.srv4, 40400, P1, flags=ACK), options=bytes([1, 1, 1, 0]))
    # IPv6 destination options (PadN): the same
    server.send.v6_ext(net.cli6, net.srv6, segment(net.cli6, net.srv6, 40401, P1, flags=ACK), 60,
                       bytes([0, 0, 1, 4, 0, 0, 0, 0]))
    # control: RST from an unmapped port leaves; the two from P1, made before it, did not
    server.send.v4(net.cli4, net.srv4, segment(net.cli4, net.srv4, 40402, UNMAPPED, flags=ACK))
    seen = server.cap.wait(lambda s: s.sport == UNMAPPED and s.dport == 40402)
    assert [s for s in seen if s.sport == P1] == []
    assert nstat(net, "s")["TcpOutRsts"] == rsts + 3
    assert delta(before, server.counters()) == {"passed_ip_options": 2, "guard_dropped": 2}


def test_server_first_fragment_passes_and_is_counted(server: Env) -> None:
    net = server.net
    server.open_tuple(4, 40500, P1)
    before = server.counters()
    seg = segment(net.cli4, net.srv4, 40500, P1, payload=b"y" * 40)
    server.send.v4(net.cli4, net.srv4, seg[:24], frag=0x2000)  # MF, offset 0: a first fragment
    good = segment(net.cli4, net.srv4, 40500, P1, payload=b"after")
    server.send.v4(net.cli4, net.srv4, good)
    assert recv_all(server.socks[(4, P1)], 1)[0][0] == steer_rewrite(good)[8:]
    assert delta(before, server.counters()) == {"passed_fragment": 1, "steered_v4": 1}


def test_server_update_changes_ports_in_place(server: Env) -> None:
    net = server.net
    server.open_tuple(4, 40600, P2)
    s2 = segment(net.cli4, net.srv4, 40600, P2, payload=b"to P2")
    server.send.v4(net.cli4, net.srv4, s2)
    assert recv_all(server.socks[(4, P2)], 1)[0][0] == steer_rewrite(s2)[8:]

    server.helper.call("update", plan=server.plan | {"tunnel_ports": [P1, P3]})
    server.open_tuple(4, 40600, P3)
    s3 = segment(net.cli4, net.srv4, 40600, P3, payload=b"to P3")
    server.send.v4(net.cli4, net.srv4, s3)
    assert recv_all(server.socks[(4, P3)], 1)[0][0] == steer_rewrite(s3)[8:]
    server.send.v4(net.cli4, net.srv4, segment(net.cli4, net.srv4, 40601, P2, flags=ACK))
    server.cap.wait(lambda s: s.sport == P2 and s.dport == 40601 and bool(s.flags & RST))  # P2: plain TCP now
    assert_nothing_queued(server.socks[(4, P2)])


def test_server_syn_admission_limits_syns_and_nothing_else(server: Env) -> None:
    """rate 1/s, burst 4 per CPU: from a full bucket exactly 4 tagged SYNs pass, on both families
    (one bucket per CPU, not per family); SYN+ACK, ACK and data segments are never limited, and
    untagged SYNs (the kernel's) take no token."""
    net = server.net
    cpus = bpfsys.online_cpus()
    for sport in (41100, 41101, 41102):  # their connections, opened before the limit
        server.open_tuple(4, sport, P1)
    server.open_tuple(6, 41299, P1)
    server.helper.call("update", plan=server.plan | {"tunnel_ports": [P1, P3], "syn_rate": 1, "syn_burst": 4 * cpus})
    cfg = server.helper.call("config")
    assert (cfg["syn_rate"], cfg["syn_burst"], cfg["syn_cpus"], cfg["mark"]) == (1, 4 * cpus, cpus, MARK)

    before = server.counters()
    sock4, sock6 = server.socks[(4, P1)], server.socks[(6, P1)]
    # untagged SYNs first: they go to the kernel and leave the bucket full
    for i in range(5):
        server.send.v4(net.cli4, net.srv4, segment(net.cli4, net.srv4, 41400 + i, P1, flags=SYN, seq=i))
    # every segment leaves this (pinned) CPU, and veth runs XDP on the sender's CPU: one bucket
    syns = [tagged_syn(net.cli4, net.srv4, 41000 + i, P1) for i in range(12)]
    others = [segment(net.cli4, net.srv4, 41100, P1, flags=SYN | ACK),
              segment(net.cli4, net.srv4, 41101, P1, flags=ACK),
              segment(net.cli4, net.srv4, 41102, P1, flags=ACK | PSH, payload=b"data")]
    for seg in syns + others:
        server.send.v4(net.cli4, net.srv4, seg)
    for i in range(3):
        server.send.v6(net.cli6, net.srv6, tagged_syn(net.cli6, net.srv6, 41200 + i, P1))
    marker6 = segment(net.cli6, net.srv6, 41299, P1, flags=ACK, payload=b"v6 marker")
    server.send.v6(net.cli6, net.srv6, marker6)

    got = recv_all(sock4, 4 + len(others))
    assert sorted(got) == sorted((steer_rewrite(seg)[8:], (norm(net.cli4), parse_tcp(seg)[0].sport))
                                 for seg in syns[:4] + others)
    assert recv_all(sock6, 1)[0][0] == steer_rewrite(marker6)[8:]  # the bucket is empty: no v6 SYN
    assert_nothing_queued(sock4)
    assert_nothing_queued(sock6)
    assert delta(before, server.counters()) == {"steered_v4": 4 + len(others), "steered_v6": 1,
                                                "syn_limited": len(syns) - 4 + 3, "passed_probe": 5}

    # 0: no limit, in place
    server.helper.call("update", plan=server.plan | {"tunnel_ports": [P1, P3], "syn_rate": 0})
    assert server.helper.call("config")["syn_rate"] == 0
    late = tagged_syn(net.cli6, net.srv6, 41300, P1)
    server.send.v6(net.cli6, net.srv6, late)
    assert recv_all(sock6, 1)[0][0] == steer_rewrite(late)[8:]


def test_server_detach_leaves_nothing(server: Env) -> None:
    server.helper.call("detach")
    assert_nothing_attached(server.net, "s", server.helper, server.instance)
    server.helper.call("detach")  # idempotent
    assert server.helper.call("counters") == dict.fromkeys(server.counters(), 0)


# ---------------------------------------------------------------------------------------------
# Client role, skb (generic) mode


@pytest.fixture(scope="module")
def client() -> Iterator[Env]:
    with NetnsPair() as net:
        # a second address on the server side: a host that is NOT a peer
        strangers = {4: net.srv4.rsplit(".", 1)[0] + ".3", 6: net.srv6.rsplit(":", 1)[0] + ":3"}
        net.run("s", ["ip", "addr", "add", f"{strangers[4]}/24", "dev", net.dev["s"]])
        net.run("s", ["ip", "addr", "add", f"{strangers[6]}/64", "dev", net.dev["s"], "nodad"])
        smac = json.loads(net.run("s", ["ip", "-j", "link", "show", net.dev["s"]]).stdout)[0]["address"]
        for addr in strangers.values():
            net.run("c", ["ip", "neigh", "replace", addr, "lladdr", smac, "dev", net.dev["c"], "nud", "permanent"])
        instance = "test-" + net.tag
        # one connection per family, server port PEER_PORT; PEER2 is a server port with none
        plan = {"instance": instance, "role": "client", "interfaces": [net.dev["c"]],
                "tunnel_ports": [PEER_PORT, PEER2], "local_ports": [LOCAL_PORT], "peers": [net.srv4, net.srv6],
                "mark": MARK, "xdp_mode": "skb",
                "conns": [[net.cli4, LOCAL_PORT, net.srv4, PEER_PORT], [net.cli6, LOCAL_PORT, net.srv6, PEER_PORT]]}
        helper = Helper(net, "c")
        send, cap = Sender(net, "s"), Capture(net, "s")
        env = Env(net, helper, send, cap, instance, plan, {}, strangers=strangers)
        try:
            env.attach_result = helper.call("attach", plan=plan)
            env.socks = {
                4: udp_socket(net, "c", socket.AF_INET, net.cli4, LOCAL_PORT),
                6: udp_socket(net, "c", socket.AF_INET6, net.cli6, LOCAL_PORT),
            }
            with net.inside("c"):  # the client reserves the TCP side of its local port too
                env.socks["tcp"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                env.socks["tcp"].bind((net.cli4, LOCAL_PORT))
            yield env
        finally:
            env.close()


def test_client_attached_skb(client: Env) -> None:
    assert client.attach_result["describe"] == [{"interface": client.net.dev["c"], "mode": "skb"}]
    xdp = xdp_of(client.net, "c", client.net.dev["c"])
    assert xdp is not None and xdp["mode"] == 2  # 2: generic (skb)


@pytest.mark.parametrize("family", [4, 6])
def test_client_steers_segments_from_a_peer(client: Env, family: int) -> None:
    net = client.net
    src, dst = (net.srv4, net.cli4) if family == 4 else (net.srv6, net.cli6)
    segs = random_segments(random.Random(10 + family), src, dst, PEER_PORT, LOCAL_PORT, 20)
    before = client.counters()
    for seg in segs:
        (client.send.v4 if family == 4 else client.send.v6)(src, dst, seg)
    got = recv_all(client.socks[family], len(segs))
    assert sorted(got) == sorted((steer_rewrite(seg)[8:], (norm(src), PEER_PORT)) for seg in segs)
    assert delta(before, client.counters()) == {f"steered_v{family}": len(segs)}


@pytest.mark.parametrize("family", [4, 6])
def test_client_segments_of_no_connection_are_the_kernels(client: Env, family: int) -> None:
    """Port sharing on the client: only its connections' segments are steered.  Anything else
    to its local port - from a stranger, from another server port - reaches the kernel, which
    answers RST (the port is bound, not listening), and the guard lets that RST leave."""
    net = client.net
    peer, dst = (net.srv4, net.cli4) if family == 4 else (net.srv6, net.cli6)
    stranger = client.strangers[family]
    send = client.send.v4 if family == 4 else client.send.v6
    before, rsts = client.counters(), nstat(net, "c")["TcpOutRsts"]
    send(stranger, dst, segment(stranger, dst, PEER_PORT, LOCAL_PORT, flags=ACK, payload=b"stranger"))
    send(peer, dst, segment(peer, dst, PEER2, LOCAL_PORT, flags=ACK, payload=b"no connection"))
    send(peer, dst, segment(peer, dst, OTHER_PORT, LOCAL_PORT, flags=ACK, payload=b"control"))
    seen = client.cap.wait(lambda s: s.sport == LOCAL_PORT and s.dport == OTHER_PORT and bool(s.flags & RST))
    assert {(s.dst, s.dport) for s in seen if s.flags & RST} == {(norm(stranger), PEER_PORT), (norm(peer), PEER2),
                                                                 (norm(peer), OTHER_PORT)}
    assert nstat(net, "c")["TcpOutRsts"] == rsts + 3
    # the stranger and the non-peer port do not match the client's rule at all; PEER2 does
    assert delta(before, client.counters()) == {"passed_probe": 1}
    assert_nothing_queued(client.socks[family])


def test_client_the_guard_drops_the_kernels_rst_of_a_connection(client: Env) -> None:
    """A segment of the client's connection that reaches the kernel anyway (IPv4 options): the
    kernel's RST for it is dropped."""
    net = client.net
    before, rsts = client.counters(), nstat(net, "c")["TcpOutRsts"]
    seg = segment(net.srv4, net.cli4, PEER_PORT, LOCAL_PORT, flags=ACK)
    client.send.v4(net.srv4, net.cli4, seg, options=bytes([1, 1, 1, 0]))
    client.send.v4(net.srv4, net.cli4, segment(net.srv4, net.cli4, OTHER_PORT, LOCAL_PORT, flags=ACK))
    seen = client.cap.wait(lambda s: s.dport == OTHER_PORT and bool(s.flags & RST))
    assert [s for s in seen if s.dport == PEER_PORT] == []
    assert nstat(net, "c")["TcpOutRsts"] == rsts + 2
    assert delta(before, client.counters()) == {"passed_ip_options": 1, "guard_dropped": 1}


def test_client_update_moves_the_connections(client: Env) -> None:
    """A rebind: the new 4-tuple is steered, the old one is the kernel's."""
    net = client.net
    moved = client.plan | {"conns": [[net.cli4, LOCAL_PORT, net.srv4, PEER2]]}
    client.helper.call("update", plan=moved)
    try:
        assert client.helper.call("conns") == [bpfsys.conn_key(net.srv4, net.cli4, PEER2, LOCAL_PORT).hex()]
        now_ours = segment(net.srv4, net.cli4, PEER2, LOCAL_PORT, payload=b"new")
        client.send.v4(net.srv4, net.cli4, segment(net.srv4, net.cli4, PEER_PORT, LOCAL_PORT, flags=ACK))
        client.cap.wait(lambda s: s.dport == PEER_PORT and bool(s.flags & RST))
        client.send.v4(net.srv4, net.cli4, now_ours)
        assert recv_all(client.socks[4], 1)[0][0] == steer_rewrite(now_ours)[8:]
        assert_nothing_queued(client.socks[4])
    finally:
        client.helper.call("update", plan=client.plan)


def test_client_detach_leaves_nothing(client: Env) -> None:
    client.helper.call("detach")
    assert_nothing_attached(client.net, "c", client.helper, client.instance)


# ---------------------------------------------------------------------------------------------
# Leftovers and failures


def test_leftovers_of_a_killed_daemon_are_removed() -> None:
    with NetnsPair() as net:
        dev = net.dev["s"]
        instance = "test-" + net.tag
        plan = {"instance": instance, "role": "server", "interfaces": [dev, "lo"], "tunnel_ports": [P1],
                "xdp_mode": "auto"}
        first = Helper(net, "s")
        try:
            result = first.call("attach", plan=plan)
            # auto: native where the driver has it (veth), generic where not (lo)
            assert result["describe"] == [{"interface": dev, "mode": "native"}, {"interface": "lo", "mode": "skb"}]
        finally:
            first.kill()  # SIGKILL: nothing detached, and the pins die with its mount namespace
        assert xdp_of(net, "s", dev) is not None and xdp_of(net, "s", "lo") is not None

        # The next attach of the same instance removes them (it would fail on "already has an
        # XDP program" otherwise: foreign programs are never replaced).
        second = Helper(net, "s")
        try:
            second.call("attach", plan=plan | {"interfaces": [dev]})
            assert xdp_of(net, "s", "lo") is None
            assert xdp_of(net, "s", dev) is not None
        finally:
            second.kill()

        third = Helper(net, "s")
        try:
            # another instance's cleanup does not touch them
            assert third.call("cleanup_stale", instance=instance + "-other") == []
            before = net.run("s", ["ip", "-d", "link", "show", "dev", dev]).stdout
            before += net.run("s", ["tc", "filter", "show", "dev", dev, "egress"]).stdout
            removed = third.call("cleanup_stale", instance=instance)
            assert any(line.startswith(f"{dev}: xdp native program rsockd_xdp") for line in removed), (removed, before)
            assert any(line.startswith(f"{dev}: tc egress filter rsockd_guard") for line in removed), (removed, before)
            assert_nothing_attached(net, "s", third, instance)
            assert third.call("cleanup_stale", instance=instance) == []
        finally:
            third.close()


def test_failed_attach_leaves_nothing() -> None:
    with NetnsPair() as net:
        dev = net.dev["s"]
        instance = "test-" + net.tag
        helper = Helper(net, "s")
        try:
            plan = {"instance": instance, "role": "server", "interfaces": [dev, "nosuchdev0"], "tunnel_ports": [P1]}
            with pytest.raises(HelperError) as err:
                helper.call("attach", plan=plan)
            assert err.value.kind == "SteerError" and err.value.message == "interface nosuchdev0 does not exist"

            # native on lo is refused after the veth succeeded: the veth must be rolled back,
            # and an explicit mode does not fall back to skb
            plan |= {"interfaces": [dev, "lo"], "xdp_mode": "native"}
            with pytest.raises(HelperError) as err:
                helper.call("attach", plan=plan)
            assert err.value.kind == "SteerError"
            assert err.value.message.startswith("lo: attach XDP (native)"), err.value.message
            assert "\n" not in err.value.message
            assert_nothing_attached(net, "s", helper, instance)
        finally:
            helper.close()
