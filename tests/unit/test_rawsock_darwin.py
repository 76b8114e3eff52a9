"""The macOS raw-send header (``rsockd.dataplane.rawsock_darwin``): ``ip_len`` and ``ip_off`` in host byte
order (xnu ``rip_output`` compares ``ip_len`` with the packet length unconverted; ``ip_output``
applies ``HTONS`` to both before the interface), everything else in network order.

Built on Linux and compared with golden bytes for a little-endian host (every Mac: x86_64,
arm64).  The sockets themselves only open on macOS: the option numbers there differ
(``IP_HDRINCL`` 2 is Linux's ``IP_TTL``), so they cannot be exercised here.
"""

from __future__ import annotations

import socket
import struct
import sys

import pytest

from rsockd.core.packet import IPV4_HEADER, ipv4_header
from rsockd.dataplane import rawsock, rawsock_darwin

SRC, DST = socket.inet_aton("192.0.2.1"), socket.inet_aton("198.51.100.2")

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="golden bytes of a little-endian host")


def test_header_golden_bytes() -> None:
    hdr = rawsock_darwin.ipv4_header(SRC, DST, 60)
    assert bytes(hdr) == bytes.fromhex(
        "45 00 3c00 0000 0040 40 06 0000 c0000201 c6336402".replace(" ", ""))
    assert len(hdr) == 20


def test_header_is_the_network_header_with_two_fields_swapped() -> None:
    """Swapping ip_len and ip_off back gives the ordinary header (without id and checksum)."""
    for total in (20, 40, 1500, 0x1234, 0xFFFF):
        hdr = rawsock_darwin.ipv4_header(SRC, DST, total, ttl=17)
        net = bytearray(hdr)
        net[2:4], net[6:8] = hdr[3:1:-1], hdr[7:5:-1]
        assert bytes(net) == ipv4_header(SRC, DST, total - 20, ttl=17, checksum=False)
        assert struct.unpack_from("=H", hdr, 2)[0] == total
        assert struct.unpack_from("=H", hdr, 6)[0] == rawsock_darwin.IP_DF


def test_id_and_checksum_left_to_the_kernel() -> None:
    hdr = rawsock_darwin.ipv4_header(SRC, DST, 52)
    fields = IPV4_HEADER.unpack(bytes(hdr))
    assert fields[3] == 0 and fields[7] == 0  # ip_id (the kernel picks a random one), ip_sum


def test_the_per_segment_length_write_is_host_order() -> None:
    """What ``send4`` does to the path's header before each ``sendmsg``."""
    hdr = rawsock_darwin.ipv4_header(SRC, DST)
    assert hdr[2:4] == b"\0\0"
    rawsock_darwin._HOST_U16.pack_into(hdr, 2, 20 + 1234)
    assert hdr[2:4] == (1254).to_bytes(2, "little")


def test_macos_option_numbers() -> None:
    # <netinet/in.h> IP_HDRINCL 2; <netinet6/in6.h> IPV6_CHECKSUM 26, IPV6_3542PKTINFO 46.
    assert (rawsock_darwin.IP_HDRINCL, rawsock_darwin.IPV6_CHECKSUM, rawsock_darwin.IPV6_PKTINFO) == (2, 26, 46)
    assert rawsock.IN6_PKTINFO.size == 20  # the same struct in6_pktinfo on both


def test_same_public_api_as_linux() -> None:
    assert issubclass(rawsock_darwin.RawSender, rawsock.RawSender)
    assert rawsock_darwin.Sender is rawsock.Sender
    s = rawsock_darwin.RawSender(0x72736B64)
    assert s.mark == 0x72736B64 and not s.errors
    s.close()
