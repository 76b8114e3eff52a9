"""The SYN tag (rsockd/core/syntag.py): SipHash-2-4's reference vectors, the message layout and
the slots a server accepts."""

from __future__ import annotations

import socket

from rsockd.core import syntag
from rsockd.core.framing import Keyring

KEY = bytes(range(16))


def test_siphash_reference_vectors() -> None:
    # The SipHash paper's appendix and its reference implementation's vectors.h (messages 00 01 02 ...).
    assert syntag.siphash24(KEY, b"") == 0x726FDB47DD0E0E31
    assert syntag.siphash24(KEY, bytes(range(8))) == 0x93F5F5799A932462
    assert syntag.siphash24(KEY, bytes(range(15))) == 0xA129CA6149BE45E5
    assert syntag.siphash24(KEY, bytes(range(63))) == 0x958A324CEB064572


def test_message_is_mapped_addresses_then_ports_slot_and_r_little_endian() -> None:
    v4 = syntag.message(socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"), 0x1234, 0x2711, 0xABCDEF, 0x5A)
    assert v4 == (bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]) + bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 2])
                  + bytes([0x34, 0x12, 0x11, 0x27, 0xEF, 0xCD, 0xAB, 0x5A]))
    a6, b6 = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "fd00::2")
    assert syntag.message(a6, b6, 1, 2, 3, 4)[:32] == a6 + b6


def test_isn_carries_r_in_the_top_byte_and_depends_on_every_input() -> None:
    k = Keyring.from_secret("secret").syn_key
    a, b = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")
    isn = syntag.syn_isn(k, a, b, 40000, 10001, 100, 0xC3)
    assert isn >> 24 == 0xC3
    others = {syntag.syn_isn(k, b, a, 40000, 10001, 100, 0xC3), syntag.syn_isn(k, a, b, 40001, 10001, 100, 0xC3),
              syntag.syn_isn(k, a, b, 40000, 10002, 100, 0xC3), syntag.syn_isn(k, a, b, 40000, 10001, 101, 0xC3),
              syntag.syn_isn(Keyring.from_secret("other").syn_key, a, b, 40000, 10001, 100, 0xC3)}
    assert isn not in others and len(others) == 5


def test_server_accepts_the_slots_around_its_own_and_no_other() -> None:
    k = Keyring.from_secret(None).syn_key
    a, b = socket.inet_aton("192.0.2.1"), socket.inet_aton("192.0.2.2")
    made = 64 * 1000 + 5  # slot 1000
    isn = syntag.syn_isn(k, a, b, 40000, 443, syntag.slot_of(made), 9)
    for wall, ok in [(made, True), (made + 59, True), (made + 64, True), (made + 122, True), (made + 123, False),
                     (made - 5, True), (made - 69, True), (made - 70, False), (made + 3600, False)]:
        assert syntag.tag_ok(k, a, b, 40000, 443, isn, wall) == ok, wall
    assert not syntag.tag_ok(k, socket.inet_aton("192.0.2.3"), b, 40000, 443, isn, made)  # replayed from elsewhere
    assert not syntag.tag_ok(k, a, b, 40000, 443, isn ^ 1, made)
