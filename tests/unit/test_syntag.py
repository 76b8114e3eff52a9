"""The SYN tag (rsockd/core/syntag.py): SipHash-2-4's reference vectors, the message layout, the
slots a server accepts and the memory of tags that refuses a replay from elsewhere."""

from __future__ import annotations

from rsockd.core import syntag
from rsockd.core.framing import Keyring

KEY = bytes(range(16))


def test_siphash_reference_vectors() -> None:
    # The SipHash paper's appendix and its reference implementation's vectors.h (messages 00 01 02 ...).
    assert syntag.siphash24(KEY, b"") == 0x726FDB47DD0E0E31
    assert syntag.siphash24(KEY, bytes(range(8))) == 0x93F5F5799A932462
    assert syntag.siphash24(KEY, bytes(range(15))) == 0xA129CA6149BE45E5
    assert syntag.siphash24(KEY, bytes(range(63))) == 0x958A324CEB064572


def test_message_is_isn_then_slot_little_endian() -> None:
    assert syntag.message(0x11223344, 0xAABBCCDD) == bytes([0x44, 0x33, 0x22, 0x11, 0xDD, 0xCC, 0xBB, 0xAA])
    assert syntag.syn_tag(KEY, 0x03020100, 0x07060504) == 0x93F5F5799A932462 & 0xFFFFFFFF


def test_tag_depends_on_key_isn_and_slot() -> None:
    k = Keyring.from_secret("secret").syn_key
    tag = syntag.syn_tag(k, 1234, 100)
    others = {syntag.syn_tag(k, 1235, 100), syntag.syn_tag(k, 1234, 101),
              syntag.syn_tag(Keyring.from_secret("other").syn_key, 1234, 100),
              syntag.syn_tag(Keyring.from_secret(None).syn_key, 1234, 100)}
    assert tag not in others and len(others) == 4
    assert Keyring.from_secret("secret").syn_key != Keyring.from_secret(None).syn_key


def test_server_accepts_the_slots_around_its_own_and_no_other() -> None:
    k = Keyring.from_secret(None).syn_key
    made = 64 * 1000 + 5  # slot 1000
    ts = syntag.syn_tag(k, 777, syntag.slot_of(made))
    for wall, ok in [(made, True), (made + 59, True), (made + 64, True), (made + 122, True), (made + 123, False),
                     (made - 5, True), (made - 69, True), (made - 70, False), (made + 3600, False)]:
        assert syntag.tag_ok(k, 777, ts, wall) == ok, wall
    assert not syntag.tag_ok(k, 778, ts, made) and not syntag.tag_ok(k, 777, ts ^ 1, made)


def test_a_tag_belongs_to_the_first_address_it_came_from_for_its_window() -> None:
    seen = syntag.SeenSyns(size=3)
    a, b = ("10.0.0.1", 40000), ("203.0.113.9", 40000)
    assert seen.claim(1, 2, a, 100.0) and seen.claim(1, 2, a, 101.0)  # a retransmitted SYN
    assert not seen.claim(1, 2, b, 150.0)  # replayed from elsewhere within the window
    assert seen.claim(1, 2, b, 100.0 + syntag.WINDOW_SECONDS)  # later: tag_ok refuses it by itself anyway
    for isn in (10, 11, 12):
        assert seen.claim(isn, 0, a, 500.0)
    assert seen.claim(1, 2, a, 501.0)  # the oldest was forgotten: bounded
