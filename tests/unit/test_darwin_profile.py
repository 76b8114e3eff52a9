"""The macOS profile (``TcpProfile.darwin()``): XNU's SYN and SYN-ACK as p0f 3.09b's database
describes Mac OS X, and the host's settings as ``sysctl -n`` gives them.

The layouts are p0f.fp's: ``mss,nop,ws,nop,nop,ts,sok,eol+1`` for a SYN (``[tcp:request]``, Mac
OS X), and for a SYN-ACK the same order less what the peer's SYN did not offer (``[tcp:response]``
lists every subset).  tests/integration/test_darwin_fingerprint.py shows p0f's verdict on them.
"""

from __future__ import annotations

import random
import sys

import pytest

from rsockd.core import syntag
from rsockd.core.faketcp import Connection
from rsockd.core.framing import Keyring
from rsockd.core.packet import (
    ACK,
    OPT_EOL,
    OPT_MSS,
    OPT_NOP,
    OPT_SACK_PERMITTED,
    OPT_TIMESTAMPS,
    OPT_WSCALE,
    SYN,
    TcpHeader,
    build_options,
    build_options_darwin,
    parse_options,
    parse_tcp,
)
from rsockd.core.tcpprofile import TcpProfile
from rsockd.dataplane.hostprofile import darwin_sysctl, darwin_tcp_profile

DARWIN = TcpProfile.darwin(secret=b"s" * 16)
CLI, SRV = (b"\x0a\0\0\1", 50000), (b"\x0a\0\0\2", 10001)
_P0F_NAMES = {OPT_NOP: "nop", OPT_MSS: "mss", OPT_WSCALE: "ws", OPT_SACK_PERMITTED: "sok", OPT_TIMESTAMPS: "ts"}


def p0f_layout(options: bytes) -> str:
    """The option layout as p0f writes it (``olayout`` of a signature): EOL with its padding count."""
    out, i = [], 0
    while i < len(options):
        kind = options[i]
        if kind == OPT_EOL:
            out.append(f"eol+{len(options) - i - 1}")
            break
        out.append(_P0F_NAMES[kind])
        i += 1 if kind == OPT_NOP else options[i + 1]
    return ",".join(out)


def test_darwin_option_bytes() -> None:
    opts = build_options_darwin(mss=1460, sack_permitted=True, timestamps=(0x11223344, 0), wscale=4)
    assert opts == bytes.fromhex("020405b4" "01030304" "0101080a1122334400000000" "0402" "0000")
    assert p0f_layout(opts) == "mss,nop,ws,nop,nop,ts,sok,eol+1"
    got = parse_options(opts)
    assert (got.mss, got.wscale, got.timestamps, got.sack_permitted) == (1460, 4, (0x11223344, 0), True)
    # A data segment's timestamps: NOP NOP TS, as Linux's.
    assert build_options_darwin(timestamps=(5, 6)) == build_options(timestamps=(5, 6))


@pytest.mark.parametrize("ws, ts, sok, layout", [
    # Each of p0f.fp's Mac OS X [tcp:response] signatures: what XNU answers to each kind of SYN.
    (False, False, False, "mss"),
    (True, False, False, "mss,nop,ws"),
    (False, False, True, "mss,sok,eol+1"),
    (False, True, False, "mss,nop,nop,ts"),
    (True, False, True, "mss,nop,ws,sok,eol+1"),
    (True, True, False, "mss,nop,ws,nop,nop,ts"),
    (False, True, True, "mss,nop,nop,ts,sok,eol+1"),
    (True, True, True, "mss,nop,ws,nop,nop,ts,sok,eol+1"),
])
def test_darwin_layouts_are_p0fs(ws: bool, ts: bool, sok: bool, layout: str) -> None:
    opts = build_options_darwin(mss=1460, sack_permitted=sok, timestamps=(1, 2) if ts else None,
                                wscale=4 if ws else None)
    assert len(opts) % 4 == 0 and p0f_layout(opts) == layout


def test_darwin_window_and_scale_are_xnus() -> None:
    # The receive buffer's space, at most 65535, whatever the MSS.
    assert DARWIN.initial_window(1460, True) == (65535, 4)
    assert DARWIN.initial_window(1448, True) == (65535, 4)
    assert DARWIN.initial_window(1460, False) == (65535, 0)
    assert TcpProfile.darwin(rmem_default=32768).initial_window(1460, True)[0] == 32768
    # tcp_set_max_rwinscale(): at least win_scale_factor, then as much as autorcvbufmax needs.
    assert TcpProfile.darwin(rmem_max=1 << 20).initial_window(1460, True)[1] == 5
    assert TcpProfile.darwin(rmem_max=2 << 20).initial_window(1460, True)[1] == 6
    assert TcpProfile.darwin(rmem_max=1 << 16, win_scale_factor=3).initial_window(1460, True)[1] == 3
    assert TcpProfile.darwin(rmem_max=1 << 40).initial_window(1460, True)[1] == 14
    assert TcpProfile.darwin(win_scale_factor=20).initial_window(1460, True)[1] == 14
    # The Linux profile is what it was.
    assert TcpProfile().initial_window(1460, True) == (64240, 7)


def _handshake() -> tuple[Connection, Connection, TcpHeader, TcpHeader, bytes, bytes]:
    keys = Keyring.from_secret("k")
    rng = random.Random(7)
    client = Connection(role="client", local=CLI, remote=SRV, keyring=keys, mss=1460, profile=DARWIN, rng=rng)
    server = Connection(role="server", local=SRV, remote=CLI, keyring=keys, mss=1460, profile=DARWIN, rng=rng)
    client.connect(100.0)
    (syn_seg,) = client.segments_to_send()
    syn_id = client.ip.take()
    syn, _ = parse_tcp(syn_seg)
    server.accept_syn(syn, 100.0)
    (synack_seg,) = server.segments_to_send()
    synack_id = server.ip.take()
    synack, _ = parse_tcp(synack_seg)
    client.receive(synack, b"", 100.01)
    return client, server, syn, synack, syn_id.to_bytes(2, "big"), synack_id.to_bytes(2, "big")


def test_darwin_syn_and_synack() -> None:
    client, server, syn, synack, syn_id, synack_id = _handshake()
    assert syn.flags == SYN and (syn.window, p0f_layout(syn.options)) == (65535, "mss,nop,ws,nop,nop,ts,sok,eol+1")
    assert synack.flags == SYN | ACK
    assert (synack.window, p0f_layout(synack.options)) == (65535, "mss,nop,ws,nop,nop,ts,sok,eol+1")
    assert parse_options(syn.options).wscale == parse_options(synack.options).wscale == 4
    # p0f's Mac OS X signatures say id+ for both: the SYN-ACK is a socket's too, not ID 0.
    assert syn_id != b"\0\0" and synack_id != b"\0\0"
    # The SYN's TSval is still its tag (core/syntag.py), found among XNU's options.
    tsval = parse_options(syn.options).timestamps
    assert tsval is not None and syntag.tag_ok(client.keyring.syn_key, syn.seq, tsval[0], 100.0)
    # The handshake completes; the SYN-ACK's counter runs on (no new start at the ACK).
    (ack_seg, *_hello) = client.segments_to_send()
    ack, _ = parse_tcp(ack_seg)
    assert ack.flags == ACK and p0f_layout(ack.options) == "nop,nop,ts"
    before = int.from_bytes(synack_id, "big")
    server.receive(ack, b"", 100.02)
    assert server.ip.take() == (before + 1) & 0xFFFF


def test_darwin_host_settings() -> None:
    host = {"net.inet.tcp.rfc1323": 1, "net.inet.tcp.sack": 0, "net.inet.tcp.win_scale_factor": 3,
            "net.inet.tcp.recvspace": 131072, "net.inet.tcp.autorcvbufmax": 4 << 20}
    prof = darwin_tcp_profile(b"s" * 16, host.get)
    assert prof.stack == "darwin" and not prof.sack and prof.window_scaling and prof.timestamps
    assert prof.initial_window(1460, True) == (65535, 7)
    off = darwin_tcp_profile(b"s" * 16, {"net.inet.tcp.rfc1323": 0}.get)
    assert not off.window_scaling and not off.timestamps and off.sack
    if sys.platform != "darwin":
        # Where macOS's sysctl is not to be had (this host), macOS's defaults: no exception.
        assert darwin_sysctl("net.inet.tcp.rfc1323") is None
        assert darwin_tcp_profile(b"s" * 16) == DARWIN
