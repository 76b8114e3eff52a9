"""Classic BPF: the assembler, the interpreter, and the tunnel filter against a Python model."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsockd.core.packet import ACK, PROTO_TCP, PROTO_UDP, SYN, TcpHeader, ipv4_header, ipv6_header, pseudo_sum
from rsockd.steer import cbpf
from rsockd.steer.cbpf import (
    ACCEPT,
    BPF_ABS,
    BPF_ALU,
    BPF_AND,
    BPF_B,
    BPF_H,
    BPF_IND,
    BPF_JEQ,
    BPF_JGT,
    BPF_JMP,
    BPF_LD,
    BPF_LDX,
    BPF_MSH,
    BPF_RET,
    BPF_W,
    Assembler,
    Instruction,
    Program,
    port_ranges,
    run,
    tunnel_filter,
)

S4, C4, X4 = socket.inet_aton("10.9.0.2"), socket.inet_aton("10.9.0.1"), socket.inet_aton("10.9.0.7")
S6 = socket.inet_pton(socket.AF_INET6, "fd09::2")
C6 = socket.inet_pton(socket.AF_INET6, "fd09::1")
X6 = socket.inet_pton(socket.AF_INET6, "fd09::7")
PORTS = frozenset({80, 443, *range(10001, 10011)})
LINKS = [("raw", 0), ("en10mb", 14), ("null", 4)]


# ---------------------------------------------------------------------------------------------
# Packet builders


def tcp(src: bytes, dst: bytes, sport: int, dport: int, flags: int = SYN, payload: bytes = b"") -> bytes:
    return TcpHeader(sport, dport, 1, 0, flags, 65535).pack(payload, pseudo_sum(src, dst))


def ip4(src: bytes, dst: bytes, l4: bytes, *, proto: int = PROTO_TCP, frag: int = 0x4000,
        options: bytes = b"") -> bytes:
    hdr = bytearray(ipv4_header(src, dst, len(l4) + len(options), proto=proto, checksum=False))
    hdr[0] = 0x40 | (5 + len(options) // 4)
    hdr[6:8] = struct.pack("!H", frag)
    return bytes(hdr) + options + l4


def ip6(src: bytes, dst: bytes, l4: bytes, *, proto: int = PROTO_TCP) -> bytes:
    return ipv6_header(src, dst, len(l4), proto=proto) + l4


def seg4(src: bytes, dst: bytes, sport: int, dport: int, **kw: int) -> bytes:
    return ip4(src, dst, tcp(src, dst, sport, dport), **kw)


def seg6(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    return ip6(src, dst, tcp(src, dst, sport, dport))


def framed(link: str, pkt: bytes) -> bytes:
    """Prefix ``pkt`` with the link header of ``link`` (family from its version nibble)."""
    v6 = pkt[:1] and pkt[0] >> 4 == 6
    if link == "en10mb":
        return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", 0x86DD if v6 else 0x0800) + pkt
    if link == "null":
        return (30 if v6 else 2).to_bytes(4, sys.byteorder) + pkt
    return pkt


def verdict(prog: Program, link: str, pkt: bytes) -> bool:
    v = run(prog, framed(link, pkt))
    assert v in (0, ACCEPT)
    return v == ACCEPT


# ---------------------------------------------------------------------------------------------
# Assembler and interpreter


def test_pack_unpack_round_trip() -> None:
    prog = tunnel_filter("client", PORTS, {40000, 40001}, ["10.9.0.2", "fd09::2"], link="en10mb")
    data = prog.pack()
    assert len(data) == 8 * len(prog)
    assert Program.unpack(data) == prog
    assert struct.unpack_from("HBBI", data) == astuple(prog.instructions[0])
    with pytest.raises(ValueError):
        Program.unpack(data[:-1])


def astuple(i: Instruction) -> tuple[int, int, int, int]:
    return (i.code, i.jt, i.jf, i.k)


def test_labels_resolve_to_relative_offsets() -> None:
    asm = Assembler()
    asm.op(BPF_LD | BPF_H | BPF_ABS, 12)
    asm.jump(BPF_JEQ, 0x0800, "ip", None)
    asm.jump(BPF_JEQ, 0x86DD, "ip", "drop")
    asm.label("ip")
    asm.ja("keep")
    asm.ret(1)  # skipped by the ja
    asm.label("keep")
    asm.ret(ACCEPT)
    asm.label("drop")
    asm.ret(0)
    prog = asm.assemble()
    assert [astuple(i) for i in prog.instructions] == [
        (BPF_LD | BPF_H | BPF_ABS, 0, 0, 12),
        (BPF_JMP | BPF_JEQ, 1, 0, 0x0800),
        (BPF_JMP | BPF_JEQ, 0, 3, 0x86DD),
        (BPF_JMP, 0, 0, 1),
        (BPF_RET, 0, 0, 1),
        (BPF_RET, 0, 0, ACCEPT),
        (BPF_RET, 0, 0, 0),
    ]
    eth = bytes(12)
    assert run(prog, eth + b"\x08\x00") == ACCEPT
    assert run(prog, eth + b"\x86\xdd") == ACCEPT
    assert run(prog, eth + b"\x08\x06") == 0
    assert run(prog, eth + b"\x08") == 0  # truncated load


def test_far_jumps_get_trampolines() -> None:
    asm = Assembler()
    asm.op(BPF_LD | BPF_B | BPF_ABS, 0)
    asm.jump(BPF_JEQ, 1, "far", "far2")
    for _ in range(300):
        asm.op(BPF_ALU | BPF_AND, 0xFF)
    asm.label("far")
    asm.ret(7)
    asm.label("far2")
    asm.ret(9)
    prog = asm.assemble()
    assert len(prog) == 1 + 1 + 2 + 300 + 2
    assert all(i.jt <= 255 and i.jf <= 255 for i in prog.instructions)
    assert run(prog, b"\x01") == 7
    assert run(prog, b"\x02") == 9


def test_assembler_rejects_bad_labels() -> None:
    asm = Assembler()
    asm.label("back")
    asm.ret(0)
    asm.ja("back")
    with pytest.raises(ValueError, match="not forward"):
        asm.assemble()
    asm = Assembler()
    asm.jump(BPF_JEQ, 1, "nowhere")
    asm.ret(0)
    with pytest.raises(ValueError, match="undefined"):
        asm.assemble()
    with pytest.raises(ValueError):
        Assembler().op(BPF_JMP | BPF_JEQ, 0)


def test_interpreter_loads_and_alu() -> None:
    prog = Program((
        Instruction(BPF_LDX | BPF_B | BPF_MSH, k=0),   # X = 4 * (pkt[0] & 0xf) = 20
        Instruction(BPF_LD | BPF_H | BPF_IND, k=2),    # A = pkt[22:24]
        Instruction(BPF_ALU | BPF_AND, k=0xFF00),
        Instruction(BPF_RET | 0x10),                   # ret A
    ))
    pkt = b"\x45" + bytes(21) + b"\x12\x34"
    assert run(prog, pkt) == 0x1200
    assert run(prog, pkt[:-1]) == 0
    with pytest.raises(ValueError, match="off its end"):
        run(Program((Instruction(BPF_LD | BPF_W | BPF_ABS, k=0),)), bytes(4))
    assert run(Program((Instruction(BPF_LD | BPF_W | BPF_ABS, k=0),
                        Instruction(BPF_JMP | BPF_JGT, 0, 1, 0x01020303),
                        Instruction(BPF_RET, k=1), Instruction(BPF_RET, k=2))), b"\x01\x02\x03\x04") == 1


def test_port_ranges_merge() -> None:
    assert port_ranges([443, 80, 10003, 10001, 10002, 444]) == [(80, 80), (443, 444), (10001, 10003)]
    assert port_ranges([]) == []
    with pytest.raises(ValueError):
        port_ranges([65536])


def test_drop_all() -> None:
    assert run(cbpf.drop_all(), seg4(C4, S4, 1, 443)) == 0
    assert len(cbpf.drop_all()) == 1


# ---------------------------------------------------------------------------------------------
# The tunnel filter on hand-built packets


@pytest.mark.parametrize(("link", "l3"), LINKS)
def test_server_filter(link: str, l3: int) -> None:
    prog = tunnel_filter("server", PORTS, l3_offset=l3, link=link)  # type: ignore[arg-type]
    yes = [
        seg4(C4, S4, 40000, 443),
        seg4(C4, S4, 40000, 80),
        seg4(C4, S4, 40000, 10001),
        seg4(C4, S4, 40000, 10010),
        seg4(X4, S4, 1, 10005),
        ip4(C4, S4, tcp(C4, S4, 40000, 10004, ACK, b"data")),
        ip4(C4, S4, tcp(C4, S4, 40000, 10004), options=b"\x01\x01\x01\x00"),  # IHL 6
        ip4(C4, S4, tcp(C4, S4, 40000, 10004), frag=0),  # DF clear, not a fragment
        seg6(C6, S6, 40000, 443),
        seg6(X6, S6, 40000, 10010),
    ]
    no = [
        seg4(C4, S4, 443, 40000),  # port as source
        seg4(C4, S4, 40000, 10000),
        seg4(C4, S4, 40000, 10011),
        seg4(C4, S4, 40000, 81),
        seg4(C4, S4, 40000, 444),
        seg6(C6, S6, 40000, 10011),
        ip4(C4, S4, struct.pack("!HHHH", 40000, 443, 8, 0), proto=PROTO_UDP),
        ip6(C6, S6, struct.pack("!HHHH", 40000, 443, 8, 0), proto=PROTO_UDP),
        ip4(C4, S4, b"\x08\x00\x00\x00\x00\x01\x00\x01", proto=1),  # ICMP echo
        ip6(C6, S6, b"\x80\x00\x00\x00\x00\x01\x00\x01", proto=58),  # ICMPv6 echo
        seg4(C4, S4, 40000, 443, frag=0x2000),  # first fragment (MF)
        seg4(C4, S4, 40000, 443, frag=0x0001),  # later fragment whose bytes look like ports
        ip6(C6, S6, b"\x06\x00\x00\x01\x00\x00\x00\x00" + tcp(C6, S6, 40000, 443), proto=44),  # fragment header
        ip6(C6, S6, b"\x06\x00\x01\x04\x00\x00\x00\x00" + tcp(C6, S6, 40000, 443), proto=0),  # hop-by-hop
        seg4(C4, S4, 40000, 443)[:22],  # truncated before the destination port
        seg6(C6, S6, 40000, 443)[:43],
        b"",
        b"\x45",
        b"\x44" + seg4(C4, S4, 40000, 443)[1:],  # IHL 4
        b"\x55" + seg4(C4, S4, 40000, 443)[1:],  # version 5
    ]
    for pkt in yes:
        assert verdict(prog, link, pkt), pkt.hex()
    for pkt in no:
        assert not verdict(prog, link, pkt), pkt.hex()


@pytest.mark.parametrize(("link", "l3"), LINKS)
def test_server_filter_without_syns(link: str, l3: int) -> None:
    """``syns=False``: SYNs without ACK stay out (the nft backend's SYN queue hands them over)."""
    prog = tunnel_filter("server", PORTS, l3_offset=l3, link=link, syns=False)  # type: ignore[arg-type]
    for flags, want in ((SYN, False), (SYN | ACK, True), (ACK, True), (0x19, True), (0x04, True), (0x03, False)):
        for pkt in (ip4(C4, S4, tcp(C4, S4, 40000, 443, flags)), ip6(C6, S6, tcp(C6, S6, 40000, 10010, flags)),
                    ip4(C4, S4, tcp(C4, S4, 40000, 10004, flags), options=b"\x01\x01\x01\x00")):
            assert verdict(prog, link, pkt) == want, (flags, pkt.hex())
    assert not verdict(prog, link, ip4(C4, S4, tcp(C4, S4, 40000, 444, ACK)))  # still only the tunnel ports


@pytest.mark.parametrize(("link", "l3"), LINKS)
def test_client_filter(link: str, l3: int) -> None:
    peers = ["10.9.0.2", "fd09::2", "10.9.0.3"]
    prog = tunnel_filter("client", PORTS, {40000, 40002}, peers, l3_offset=l3, link=link)  # type: ignore[arg-type]
    yes = [
        seg4(S4, C4, 443, 40000),
        seg4(S4, C4, 10010, 40002),
        seg4(socket.inet_aton("10.9.0.3"), C4, 80, 40000),
        seg6(S6, C6, 10001, 40000),
    ]
    no = [
        seg4(X4, C4, 443, 40000),  # wrong peer
        seg6(X6, C6, 443, 40000),
        seg4(S4, C4, 444, 40000),  # not a tunnel port
        seg4(S4, C4, 443, 40001),  # not a local port
        seg6(S6, C6, 443, 40001),
        seg4(S4, C4, 40000, 443),  # reversed
        seg4(S4, C4, 443, 40000, frag=0x2000),
        ip4(S4, C4, struct.pack("!HHHH", 443, 40000, 8, 0), proto=PROTO_UDP),
        seg4(S4, C4, 443, 40000)[:23],
    ]
    for pkt in yes:
        assert verdict(prog, link, pkt), pkt.hex()
    for pkt in no:
        assert not verdict(prog, link, pkt), pkt.hex()


def test_link_header_must_agree_with_ip_version() -> None:
    pkt = seg4(C4, S4, 40000, 443)
    en = tunnel_filter("server", PORTS, link="en10mb")
    arp = b"\x02" * 12 + b"\x08\x06" + pkt
    assert run(en, arp) == 0
    assert run(en, b"\x02" * 12 + b"\x86\xdd" + pkt) == 0  # IPv6 ethertype, IPv4 header
    null = tunnel_filter("server", PORTS, link="null")
    assert run(null, (10).to_bytes(4, sys.byteorder) + seg6(C6, S6, 1, 443)) == 0  # Linux AF_INET6
    assert run(null, (30).to_bytes(4, sys.byteorder) + seg6(C6, S6, 1, 443)) == ACCEPT


def test_client_without_peers_or_ports_accepts_nothing() -> None:
    assert tunnel_filter("client", PORTS, {40000}, []) == cbpf.drop_all()
    assert tunnel_filter("client", PORTS, [], ["10.9.0.2"]) == cbpf.drop_all()
    assert tunnel_filter("server", []) == cbpf.drop_all()
    only4 = tunnel_filter("client", PORTS, {40000}, ["10.9.0.2"])
    assert run(only4, seg4(S4, C4, 443, 40000)) == ACCEPT
    assert run(only4, seg6(S6, C6, 443, 40000)) == 0


def test_large_port_sets_compile() -> None:
    ports = set(range(1, 60000, 3))  # 20000 isolated ports: too many ranges
    with pytest.raises(ValueError, match="too many port ranges"):
        tunnel_filter("server", ports)
    ports = set(range(1000, 60000, 60))  # ~1000 ranges: trampolines, still within 4096
    prog = tunnel_filter("server", ports)
    assert len(prog) <= cbpf.BPF_MAXINSNS
    for p in (1000, 1060, 59980, 1001, 999, 59999):
        assert verdict(prog, "raw", seg4(C4, S4, 1, p)) == (p in ports)


# ---------------------------------------------------------------------------------------------
# Property: the filter's verdict equals a straightforward statement of the rule


def model(role: str, tunnel: set[int], local: set[int], peers: set[bytes], link: str, l3: int, frame: bytes) -> bool:
    """The match rule, written plainly.  A field the filter must read but which lies past the
    end of the frame rejects (the kernel's out-of-bounds load)."""
    if len(frame) <= l3:
        return False
    if link == "raw":
        fam = {4: 4, 6: 6}.get(frame[l3] >> 4)
    elif link == "en10mb":
        fam = {0x0800: 4, 0x86DD: 6}.get(int.from_bytes(frame[l3 - 2 : l3], "big"))
    else:
        fam = {2: 4, 30: 6}.get(int.from_bytes(frame[l3 - 4 : l3], sys.byteorder))
    ip = frame[l3:]
    if fam == 4:
        ihl = (ip[0] & 0x0F) * 4
        if ip[0] >> 4 != 4 or ihl < 20 or len(ip) < ihl + 4:
            return False
        if ip[9] != 6 or int.from_bytes(ip[6:8], "big") & 0x3FFF:
            return False
        src, l4 = ip[12:16], ip[ihl:]
    elif fam == 6:
        if ip[0] >> 4 != 6 or len(ip) < 44 or ip[6] != 6:
            return False
        src, l4 = ip[8:24], ip[40:]
    else:
        return False
    sport, dport = struct.unpack_from("!HH", l4)
    if role == "server":
        return dport in tunnel
    return src in peers and sport in tunnel and dport in local


def port_sets() -> st.SearchStrategy[set[int]]:
    single = st.integers(0, 65535).map(lambda p: {p})
    span = st.tuples(st.integers(0, 65535), st.integers(0, 40)).map(
        lambda t: set(range(t[0], min(t[0] + t[1], 65535) + 1)))
    return st.lists(st.one_of(single, span), min_size=1, max_size=12).map(lambda parts: set().union(*parts))


@st.composite
def frames(draw: st.DrawFn, tunnel: set[int], local: set[int], peers: list[bytes], link: str) -> bytes:
    def port(pool: set[int]) -> int:
        near = sorted(pool)
        if near and draw(st.integers(0, 3)):
            p = draw(st.sampled_from(near)) + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
            return max(0, min(65535, p))
        return draw(st.integers(0, 65535))

    v6 = draw(st.booleans())
    alen = 16 if v6 else 4
    known = [p for p in peers if len(p) == alen]
    if known and draw(st.integers(0, 3)):
        src = draw(st.sampled_from(known))
    else:
        src = draw(st.binary(min_size=alen, max_size=alen))
    dst = b"\x0a" * alen
    pools = [tunnel, local]
    sport, dport = port(draw(st.sampled_from(pools))), port(draw(st.sampled_from(pools)))
    l4 = struct.pack("!HH", sport, dport) + draw(st.binary(max_size=24))
    proto = draw(st.sampled_from([6] * 8 + [17, 1, 0, 44, 58]))
    if v6:
        pkt = ip6(src, dst, l4, proto=proto)
    else:
        frag = draw(st.sampled_from([0x4000] * 4 + [0, 0x2000, 0x0001, 0x1FFF, 0x8000]))
        options = b"\x01" * (4 * draw(st.sampled_from([0, 0, 0, 1, 10])))
        pkt = ip4(src, dst, l4, proto=proto, frag=frag, options=options)
        if draw(st.integers(0, 9)) == 0:  # a nonsense version/IHL byte
            pkt = bytes([draw(st.integers(0, 255))]) + pkt[1:]
    frame = framed(link, pkt)
    if draw(st.integers(0, 7)) == 0:
        frame = frame[: draw(st.integers(0, len(frame)))]
    if link != "raw" and draw(st.integers(0, 9)) == 0:  # a foreign link type
        frame = draw(st.binary(min_size=4, max_size=4)) + frame[4:]
    return frame


@settings(max_examples=200, deadline=None)
@given(data=st.data(), role=st.sampled_from(["server", "client"]), tunnel=port_sets(), local=port_sets(),
       link_l3=st.sampled_from(LINKS),
       peers=st.lists(st.sampled_from([S4, X4, S6, X6, socket.inet_aton("10.9.0.8")]), min_size=1, max_size=3))
def test_filter_matches_model(data: st.DataObject, role: str, tunnel: set[int], local: set[int],
                              link_l3: tuple[str, int], peers: list[bytes]) -> None:
    link, l3 = link_l3
    prog = tunnel_filter(role, tunnel, local, peers, link=link)  # type: ignore[arg-type]
    for _ in range(20):
        frame = data.draw(frames(tunnel, local, peers, link))
        want = model(role, tunnel, local, set(peers), link, l3, frame)
        assert (run(prog, frame) == ACCEPT) == want, (frame.hex(), str(prog))


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")
def test_interpreter_runs_libpcap_programs() -> None:
    """The interpreter agrees with programs compiled by libpcap (``tcpdump -ddd``)."""
    out = subprocess.run(["tcpdump", "-ddd", "-y", "EN10MB", "tcp dst port 443"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    prog = Program(tuple(Instruction(*map(int, line.split())) for line in out[1 : 1 + int(out[0])]))
    cases = [
        (seg4(C4, S4, 1, 443), True),
        (ip4(C4, S4, tcp(C4, S4, 1, 443), options=b"\x01" * 8), True),
        (seg6(C6, S6, 1, 443), True),
        (seg4(C4, S4, 443, 1), False),
        (seg6(C6, S6, 1, 444), False),
        (ip4(C4, S4, struct.pack("!HHHH", 1, 443, 8, 0), proto=PROTO_UDP), False),
        (seg4(C4, S4, 1, 443, frag=0x0001), False),
    ]
    ours = tunnel_filter("server", {443}, link="en10mb")
    for pkt, want in cases:
        assert (run(prog, framed("en10mb", pkt)) != 0) == want, pkt.hex()
        assert verdict(ours, "en10mb", pkt) == want, pkt.hex()
