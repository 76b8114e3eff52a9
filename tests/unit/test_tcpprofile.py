"""The host-alike TCP values (rsockd/core/tcpprofile.py) and the connection's use of them.

The expected figures are the kernel's own, read off a capture of a Linux 6.18 connection between
two namespaces with tcp_rmem "4096 131072 33554432" and rmem_max 4194304 (MSS 1460 over IPv4,
1440 over IPv6): SYN window 64240 and scale 10, SYN-ACK window 65160, the handshake's ACK window
field 63, and a receiver's window field 67, 70, 73 after the first three 1400-byte segments.
"""

from __future__ import annotations

import random
from pathlib import Path

from rsockd.core import syntag
from rsockd.core.faketcp import Connection
from rsockd.core.framing import Keyring
from rsockd.core.packet import ACK, RST, SYN, TcpHeader, parse_options, parse_tcp, pseudo_sum, steer_rewrite
from rsockd.core.tcpprofile import IpIdent, ReceiveWindow, TcpProfile
from rsockd.dataplane.hostprofile import default_hop_limit, tcp_profile
from tests.unit.tunnelpair import APP, CLI, SRV, EndpointPair, Pair

HOST = TcpProfile(rmem_default=131072, rmem_max=33554432, core_rmem_max=4194304)


def test_initial_window_is_the_kernels() -> None:
    assert HOST.initial_window(1460, True) == (64240, 10)  # SYN, IPv4
    assert HOST.initial_window(1460 - 12, True) == (65160, 10)  # SYN-ACK to a SYN with timestamps
    assert HOST.initial_window(1440, True) == (64800, 10)  # SYN, IPv6
    assert HOST.initial_window(1440 - 12, True) == (64260, 10)  # SYN-ACK, IPv6


def test_window_scale_follows_the_largest_buffer() -> None:
    assert TcpProfile().initial_window(1460, True) == (64240, 7)  # Linux's defaults: tcp_rmem[2] 6 MiB
    assert TcpProfile(rmem_max=1 << 20, core_rmem_max=8 << 20).initial_window(1460, True)[1] == 8
    assert HOST.initial_window(1460, False) == (64240, 0)  # no scaling offered or accepted
    assert TcpProfile(rmem_max=1 << 40).initial_window(1460, True)[1] == 14  # RFC 7323's limit
    assert TcpProfile(signed_windows=True).initial_window(1460, True)[0] == 32767
    # A buffer smaller than a segment is not rounded to nothing.
    assert TcpProfile(rmem_default=1000).initial_window(1460, True)[0] == 500


def test_receive_window_grows_as_the_kernels() -> None:
    w = ReceiveWindow(HOST, 65160, 10, 1448)
    assert w.field == 64  # rounded up to the scale's unit
    fields = []
    for _ in range(3):
        w.received(1400)
        fields.append(w.field)
    assert fields == [67, 70, 73]
    for _ in range(100_000):
        w.received(1400)
    assert w.bytes == HOST.win_from_space(HOST.rmem_max) == 16 << 20  # an autotuned buffer's, no more
    assert w.field <= 0xFFFF


def test_receive_window_without_scaling_stays_in_16_bits() -> None:
    w = ReceiveWindow(HOST, 64240, 0, 1448)
    assert w.field == 64240
    for _ in range(10):
        w.received(1400)
    assert w.field == 0xFFFF and w.bytes == 0xFFFF


def test_ip_ident_counts_per_segment_from_a_random_start() -> None:
    ip = IpIdent()
    assert ip.take() == 0 and ip.take() == 0  # no socket yet: what the kernel's SYN-ACK carries
    ip.start(random.Random(3))
    first = ip.take()
    assert first != 0
    assert [ip.take() for _ in range(3)] == [(first + k) & 0xFFFF for k in (1, 2, 3)]
    batch = ip.take(5)  # a GSO send: the kernel numbers its five segments on from this one
    assert batch == (first + 4) & 0xFFFF and ip.take() == (first + 9) & 0xFFFF
    starts = set()
    for seed in range(200):
        ip.start(random.Random(seed))
        starts.add(ip.take())
    assert 0 not in starts and len(starts) > 190


def test_ip_ident_wraps_through_zero() -> None:
    ip = IpIdent()
    rng = random.Random(0)
    rng.randrange = lambda *a: 0xFFFE  # type: ignore[method-assign]
    ip.start(rng)
    assert [ip.take() for _ in range(4)] == [0xFFFE, 0xFFFF, 0, 1]


def test_ts_offset_is_one_clock_per_address_pair() -> None:
    a, b, c = b"\x0a\0\0\1", b"\x0a\0\0\2", b"\x0a\0\0\3"
    p = TcpProfile(secret=b"k" * 16)
    assert p.ts_offset(a, b) == p.ts_offset(a, b)
    assert len({p.ts_offset(a, b), p.ts_offset(a, c), p.ts_offset(b, a)}) == 3
    assert TcpProfile(secret=b"j" * 16).ts_offset(a, b) != p.ts_offset(a, b)


def _syn(conn: Connection) -> tuple[int, int | None, tuple[int, int] | None, bool]:
    seg = conn.segments_to_send()[0]
    hdr, _ = parse_tcp(seg)
    assert hdr.flags == SYN
    opts = parse_options(hdr.options)
    return hdr.window, opts.wscale, opts.timestamps, opts.sack_permitted


def test_syn_copies_the_profile() -> None:
    keys = Keyring.from_secret("k")
    local, remote = (b"\x0a\0\0\1", 40000), (b"\x0a\0\0\2", 10001)
    conn = Connection(role="client", local=local, remote=remote, keyring=keys, mss=1460, profile=HOST,
                      rng=random.Random(1))
    conn.connect(100.0)
    window, wscale, ts, sack = _syn(conn)
    assert (window, wscale, sack) == (64240, 10, True)
    # The client's TSval is the SYN tag (core/syntag.py): a random offset per connection.
    assert ts is not None and ts[0] == syntag.syn_tag(keys.syn_key, conn.snd_nxt - 1, syntag.slot_of(100.0))
    plain = TcpProfile(window_scaling=False, timestamps=False, sack=False)
    conn = Connection(role="client", local=local, remote=remote, keyring=keys, mss=1460, profile=plain)
    conn.connect(100.0)
    window, wscale, ts, sack = _syn(conn)
    assert (window, wscale, sack) == (64240, None, False) and ts is not None  # the tag needs the option


def test_server_ip_ident_starts_with_the_connection() -> None:
    p = Pair()
    p.client.connect(p.now)
    (syn,) = p.client.segments_to_send()
    assert p.client.ip.take() != 0  # the client's socket counts from its SYN on
    p.to_server(syn)
    pend = next(iter(p.acceptor.pending.values()))
    assert pend.ip.take() == 0  # SYN-ACK: a request socket's, 0
    for seg in pend.segments_to_send():
        p.to_client(seg)
    p.pump()
    assert p.client.established
    assert p.server_conn().ip.take() != 0  # the handshake's ACK made it a socket of its own
    assert pend.ip.label and p.client.ip.label


def test_default_rng_is_the_systems() -> None:
    conn = Connection(role="client", local=(b"\0" * 4, 1), remote=(b"\0" * 4, 2), keyring=Keyring.from_secret("k"))
    assert isinstance(conn.rng, random.SystemRandom)


def test_host_profile_reads_the_sysctls(tmp_path: Path) -> None:
    def put(name: str, value: str) -> None:
        f = tmp_path.joinpath(*name.split("."))
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(value + "\n")

    put("net.ipv4.tcp_rmem", "4096\t131072\t33554432")
    put("net.core.rmem_max", "4194304")
    put("net.ipv4.tcp_window_scaling", "1")
    put("net.ipv4.tcp_timestamps", "2")
    put("net.ipv4.tcp_sack", "0")
    put("kernel.random.boot_id", "b0")
    prof = tcp_profile(b"key", root=tmp_path)
    assert (prof.rmem_default, prof.rmem_max, prof.core_rmem_max) == (131072, 33554432, 4194304)
    assert prof.window_scaling and prof.timestamps and not prof.sack and not prof.signed_windows
    assert prof.secret == tcp_profile(b"key", root=tmp_path).secret != tcp_profile(b"other", root=tmp_path).secret
    put("net.ipv4.tcp_rmem", "garbage")
    assert tcp_profile(root=tmp_path).rmem_max == TcpProfile().rmem_max  # unreadable: Linux's default
    put("net.ipv4.ip_default_ttl", "99")
    put("net.ipv6.conf.eth9.hop_limit", "33")
    put("net.ipv6.conf.default.hop_limit", "44")
    assert default_hop_limit(2, root=tmp_path) == 99
    assert default_hop_limit(10, "eth9", root=tmp_path) == 33
    assert default_hop_limit(10, "eth8", root=tmp_path) == 44


def test_transmits_carry_their_connections_ip_numbering() -> None:
    p = EndpointPair()
    p.start()
    for d in [b"x" * 100] * 10:
        p.client.send_app(APP, d, p.now)
    (run,) = p.client.transmits(p.now)
    conns = {id(c.ip): c for c in p.client.conns}
    assert run.ip is not None and id(run.ip) in conns  # the sending connection's own counter
    # A segment to no connection gets a reset of no socket: ID 0, as the kernel's control socket.
    stray = TcpHeader(40009, SRV[1], 1, 0, ACK, 100).pack(b"", pseudo_sum(CLI[0], SRV[0]))
    p.server.receive_steered(SRV, (CLI[0], 40009), memoryview(steer_rewrite(stray)[8:]), p.now)
    resets = [t for t in p.server.transmits(p.now) if parse_tcp(t.header)[0].flags & RST]
    assert resets and all(t.ip is None for t in resets)
