"""BPF device reading on macOS: ``bpf_hdr`` records, link headers, and the device set-up.

The record buffers are built here the way xnu's ``catchpacket`` lays them out (bsd/net/bpf.c):
each record at ``BPF_WORDALIGN`` of the end of the previous one, ``bh_hdrlen`` =
``BPF_WORDALIGN(18 + link header) - link header`` (18 for Ethernet, 20 for DLT_NULL, 20 for
DLT_RAW), all fields in host byte order.  ``FakeBpf`` is a recording stand-in for the device's
ioctls (no /dev/bpf on Linux); the device files are plain files, and ``BpfDevice.packets`` reads
a real pipe.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from rsockd.core.packet import ACK, SYN, TcpHeader, ipv4_header, ipv6_header, pseudo_sum
from rsockd.errors import SteerError
from rsockd.steer import SteerPlan, bpfdev, cbpf
from rsockd.steer.bpfdev import DLT_EN10MB, DLT_NULL, DLT_RAW, BpfDevice, parse_records

LINK_HDR = {DLT_EN10MB: 14, DLT_NULL: 4, DLT_RAW: 0}
REQUESTS = {getattr(bpfdev, n): n for n in dir(bpfdev) if n.startswith("BIOC")}


def bpf_buffer(frames: Sequence[bytes], linktype: int, *, datalen: Sequence[int] | None = None,
               tstamp: int = 1_700_000_000) -> bytes:
    """Records as xnu's catchpacket writes them (``datalen`` overrides ``bh_datalen``)."""
    link = LINK_HDR[linktype]
    hdrlen = bpfdev.bpf_wordalign(18 + link) - link
    out = bytearray()
    for i, frame in enumerate(frames):
        out += b"\0" * (bpfdev.bpf_wordalign(len(out)) - len(out))
        dl = datalen[i] if datalen else len(frame)
        out += bpfdev.BPF_HDR.pack(tstamp + i, 1000 * i, len(frame), dl, hdrlen)
        out += b"\0" * (hdrlen - bpfdev.BPF_HDR.size)
        out += frame
    return bytes(out)


def ip4(payload: bytes = b"", src: str = "192.0.2.1", dst: str = "198.51.100.2") -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = TcpHeader(40000, 10001, 1, 0, SYN, 65535).pack(payload, pseudo_sum(s, d))
    return ipv4_header(s, d, len(tcp)) + tcp


def ip6(payload: bytes = b"", src: str = "2001:db8::1", dst: str = "2001:db8::2") -> bytes:
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    tcp = TcpHeader(10001, 40000, 1, 1, ACK, 65535).pack(payload, pseudo_sum(s, d))
    return ipv6_header(s, d, len(tcp)) + tcp


def eth(ethertype: int, payload: bytes) -> bytes:
    return b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + struct.pack("!H", ethertype) + payload


def null(af: int, payload: bytes) -> bytes:
    return struct.pack("=I", af) + payload


def parsed(buf: bytes, linktype: int, n: int | None = None) -> list[bytes]:
    return [bytes(p) for p in parse_records(buf, len(buf) if n is None else n, linktype)]


# ---------------------------------------------------------------------------------------------
# parse_records


def test_builder_matches_xnu_layout() -> None:
    """hdrlen 18 on Ethernet and 20 on DLT_NULL put the IP header on a 4-byte boundary."""
    e = bpf_buffer([eth(0x0800, ip4())], DLT_EN10MB)
    assert struct.unpack_from("=H", e, 16)[0] == 18 and (18 + 14) % 4 == 0
    n = bpf_buffer([null(2, ip4())], DLT_NULL)
    assert struct.unpack_from("=H", n, 16)[0] == 20 and (20 + 4) % 4 == 0


def test_ethernet_records_with_padding() -> None:
    a, b, c = ip4(b"x"), ip6(b"odd length"), ip4(b"12345")  # lengths that force padding
    arp = eth(0x0806, b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\0" * 20)
    frames = [eth(0x0800, a), eth(0x86DD, b), arp, eth(0x0800, c)]
    buf = bpf_buffer(frames, DLT_EN10MB)
    assert len(buf) > sum(len(f) + 18 for f in frames), "there is padding between records"
    assert parsed(buf, DLT_EN10MB) == [a, b, c]


def test_vlan_and_short_frames_are_skipped() -> None:
    good = ip6()
    frames = [eth(0x8100, b"\x00\x05\x08\x00" + ip4()), b"\x01\x02\x03", eth(0x86DD, good)]
    assert parsed(bpf_buffer(frames, DLT_EN10MB), DLT_EN10MB) == [good]


def test_null_link_families() -> None:
    """AF_INET 2; AF_INET6 30 (macOS), 24 (NetBSD/OpenBSD), 28 (FreeBSD); others skipped."""
    v4, v6 = ip4(b"a"), ip6(b"bb")
    frames = [null(2, v4), null(30, v6), null(24, v6), null(28, v6), null(10, v6), null(17, v4), b"\x02\x00"]
    assert parsed(bpf_buffer(frames, DLT_NULL), DLT_NULL) == [v4, v6, v6, v6]


def test_null_family_is_host_order() -> None:
    v4 = ip4()
    big_endian_af = b"\x00\x00\x00\x02" + v4  # what a wrong-endian writer would produce
    assert parsed(bpf_buffer([big_endian_af], DLT_NULL), DLT_NULL) == ([v4] if struct.pack("=I", 2) ==
                                                                       b"\x00\x00\x00\x02" else [])


def test_raw_link() -> None:
    v4, v6 = ip4(), ip6()
    assert parsed(bpf_buffer([v4, b"\x00junk", v6], DLT_RAW), DLT_RAW) == [v4, v6]


def test_truncated_last_record_is_dropped() -> None:
    a, b = ip4(b"first"), ip4(b"second record")
    buf = bpf_buffer([eth(0x0800, a), eth(0x0800, b)], DLT_EN10MB)
    for cut in (len(buf) - 1, len(buf) - len(b), len(buf) - len(b) - 14 - 18 + 5):
        assert parsed(buf, DLT_EN10MB, cut) == [a], cut
    assert parsed(buf, DLT_EN10MB, 10) == []  # not even one header
    assert parsed(buf, DLT_EN10MB, len(buf)) == [a, b]


def test_n_limits_the_walk_not_the_buffer_size() -> None:
    """A read fills the start of a larger buffer: whatever lies after ``n`` is ignored."""
    a = ip6()
    buf = bpf_buffer([eth(0x86DD, a)], DLT_EN10MB)
    stale = bpf_buffer([eth(0x86DD, ip6(b"stale")), eth(0x86DD, ip6(b"stale"))], DLT_EN10MB)
    big = bytearray(stale)
    big[: len(buf)] = buf
    assert parsed(bytes(big), DLT_EN10MB, len(buf)) == [a]


def test_snapshot_truncated_packet_is_skipped() -> None:
    a, b = ip4(b"cut short"), ip4(b"whole")
    frames = [eth(0x0800, a)[:30], eth(0x0800, b)]
    buf = bpf_buffer(frames, DLT_EN10MB, datalen=[14 + len(a), 14 + len(b)])
    assert parsed(buf, DLT_EN10MB) == [b]


def test_bad_header_length_ends_the_walk() -> None:
    a = ip4()
    buf = bytearray(bpf_buffer([eth(0x0800, a), eth(0x0800, a)], DLT_EN10MB))
    second = bpfdev.bpf_wordalign(18 + 14 + len(a))
    struct.pack_into("=H", buf, second + 16, 4)
    assert parsed(bytes(buf), DLT_EN10MB) == [a]


def test_unknown_link_type() -> None:
    with pytest.raises(ValueError, match="link type 9"):
        list(parse_records(b"", 0, 9))


def test_yields_views_without_copying() -> None:
    a = ip4()
    buf = bytearray(bpf_buffer([eth(0x0800, a)], DLT_EN10MB))
    (view,) = list(parse_records(buf, len(buf), DLT_EN10MB))
    assert isinstance(view, memoryview)
    buf[18 + 14] = 0x46
    assert view[0] == 0x46


# ---------------------------------------------------------------------------------------------
# BpfDevice.packets on a real (pipe) file descriptor


def test_device_reads_until_empty() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    dev = BpfDevice(r, "/dev/bpf9", "en0", DLT_EN10MB, 4096)
    try:
        a, b, c = ip4(b"1"), ip6(b"22"), ip4(b"333")
        os.write(w, bpf_buffer([eth(0x0800, a), eth(0x86DD, b)], DLT_EN10MB))
        got = [bytes(p) for p, _ in dev.packets(bytearray(16))]
        assert got == [a, b]
        assert list(dev.packets(bytearray(16))) == []  # EAGAIN: nothing more
        os.write(w, bpf_buffer([eth(0x0800, c)], DLT_EN10MB))
        assert [bytes(p) for p, _ in dev.packets(bytearray(16))] == [c]
    finally:
        dev.close()
        os.close(w)
    assert dev.fileno() == -1


# ---------------------------------------------------------------------------------------------
# Device set-up against a recording stand-in


class FakeBpf:
    """Recording stand-in for the ioctls of macOS BPF devices (one object serves all fds)."""

    def __init__(self, dlt: int | dict[str, int] = DLT_EN10MB, cap: int = 0x80000,
                 missing: Sequence[str] = (), version: tuple[int, int] = (1, 1)) -> None:
        self.dlt = dlt
        self.cap = cap
        self.missing = set(missing)
        self.version = version
        self.calls: list[tuple[int, str, bytes]] = []
        self.programs: dict[int, list[cbpf.Program]] = {}
        self.blen: dict[int, int] = {}
        self.iface: dict[int, str] = {}
        self.drops = 0

    def names(self, fd: int | None = None) -> list[str]:
        return [n for f, n, _ in self.calls if fd is None or f == fd]

    def __call__(self, fd: int, request: int, arg: bytes) -> bytes:
        name = REQUESTS.get(request, hex(request))
        self.calls.append((fd, name, arg))
        size = (request >> 16) & 0x1FFF
        assert len(arg) == size, f"{name}: {len(arg)}-byte argument, the request says {size}"
        uint = ctypes.c_uint
        if name == "BIOCVERSION":
            return bytes(bpfdev.BpfVersion(*self.version))
        if name == "BIOCSBLEN":
            assert fd not in self.iface, "BIOCSBLEN after BIOCSETIF fails with EINVAL on macOS"
            self.blen[fd] = min(uint.from_buffer_copy(arg).value, self.cap)
            return bytes(uint(self.blen[fd]))
        if name == "BIOCSETIF":
            iface = bytes(bpfdev.Ifreq.from_buffer_copy(arg).ifr_name).decode()
            if iface in self.missing:
                raise OSError(errno.ENXIO, "Device not configured")
            self.iface[fd] = iface
            return arg
        if name == "BIOCGDLT":
            dlt = self.dlt if isinstance(self.dlt, int) else self.dlt[self.iface[fd]]
            return bytes(uint(dlt))
        if name == "BIOCGBLEN":
            return bytes(uint(self.blen.get(fd, 4096)))
        if name == "BIOCSETF":
            prog = bpfdev.BpfProgram.from_buffer_copy(arg)
            insns = ctypes.string_at(prog.bf_insns, prog.bf_len * cbpf.SOCK_FILTER.size)
            self.programs.setdefault(fd, []).append(cbpf.Program.unpack(insns))
            return arg
        if name == "BIOCGSTATS":
            return bytes(bpfdev.BpfStat(100, self.drops))
        return arg


@pytest.fixture
def devdir(tmp_path: Path) -> Path:
    d = tmp_path / "dev"
    d.mkdir()
    for n in (0, 1, 2, 10):
        (d / f"bpf{n}").write_bytes(b"")
    return d


def opener_with_busy(busy_names: set[str]) -> tuple[list[int], Callable[[str, int], int]]:
    opened: list[int] = []

    def opener(path: str, flags: int) -> int:
        if os.path.basename(path) in busy_names:
            raise OSError(errno.EBUSY, "Resource busy")
        fd = os.open(path, flags)
        opened.append(fd)
        return fd

    return opened, opener


SERVER = SteerPlan("east", "server", ("en0",), frozenset({443, *range(10001, 10011)}))
CLIENT = SteerPlan("west", "client", ("en0",), frozenset(range(10001, 10011)), frozenset({40000, 40001}),
                   frozenset({"203.0.113.7", "2001:db8::7"}))


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


def test_device_paths_in_unit_order(devdir: Path) -> None:
    (devdir / "bpf").write_bytes(b"")
    assert [os.path.basename(p) for p in bpfdev.device_paths(str(devdir / "bpf*"))] == \
        ["bpf", "bpf0", "bpf1", "bpf2", "bpf10"]


@pytest.mark.parametrize("plan", [SERVER, CLIENT], ids=["server", "client"])
def test_open_device_sequence(devdir: Path, plan: SteerPlan) -> None:
    fake = FakeBpf(DLT_EN10MB)
    opened, opener = opener_with_busy({"bpf0"})
    dev = bpfdev.open_device("en0", plan, dev_glob=str(devdir / "bpf*"), bufsize=1 << 20, ioctl=fake,
                             opener=opener)
    try:
        assert dev.path == str(devdir / "bpf1"), "the busy bpf0 is skipped"
        assert fake.names() == ["BIOCVERSION", "BIOCSBLEN", "BIOCSETIF", "BIOCGDLT", "BIOCIMMEDIATE",
                                "BIOCSSEESENT", "BIOCGBLEN", "BIOCSETF"]
        args = {n: a for _, n, a in fake.calls}
        assert ctypes.c_uint.from_buffer_copy(args["BIOCSBLEN"]).value == 1 << 20
        assert args["BIOCSETIF"][:16] == b"en0".ljust(16, b"\0")
        assert ctypes.c_uint.from_buffer_copy(args["BIOCIMMEDIATE"]).value == 1
        assert ctypes.c_uint.from_buffer_copy(args["BIOCSSEESENT"]).value == 0
        assert dev.bufsize == 0x80000, "the size the kernel granted, not the one asked for"
        assert fake.programs[dev.fd] == [bpfdev.receiver_filter(plan, DLT_EN10MB)]
        assert dev.linktype == DLT_EN10MB
        assert not os.get_blocking(dev.fd)
        assert dev.stats() == (100, 0)
    finally:
        dev.close()
    assert closed(opened[0])


def test_open_device_on_loopback_sees_sent_packets(devdir: Path) -> None:
    fake = FakeBpf(DLT_NULL)
    dev = bpfdev.open_device("lo0", SERVER, dev_glob=str(devdir / "bpf*"), ioctl=fake)
    try:
        assert "BIOCSSEESENT" not in fake.names()
        assert fake.programs[dev.fd] == [bpfdev.receiver_filter(SERVER, DLT_NULL)]
    finally:
        dev.close()


@pytest.mark.parametrize("case", ["missing", "dlt", "version", "all busy", "no devices"])
def test_open_device_failures_close_the_device(devdir: Path, case: str) -> None:
    fake = FakeBpf(dlt=9 if case == "dlt" else DLT_EN10MB, missing=["en0"] if case == "missing" else [],
                   version=(2, 0) if case == "version" else (1, 1))
    busy_names = {"bpf0", "bpf1", "bpf2", "bpf10"} if case == "all busy" else set()
    opened, opener = opener_with_busy(busy_names)
    glob_ = str(devdir / ("none*" if case == "no devices" else "bpf*"))
    expect = {"missing": "interface en0 does not exist", "dlt": "link type 9 is not supported",
              "version": "kernel BPF version 2.0", "all busy": "no free BPF device \\(4 of 4 busy\\)",
              "no devices": "no free BPF device \\(0 of 0 busy\\)"}[case]
    with pytest.raises(SteerError, match=expect):
        bpfdev.open_device("en0", SERVER, dev_glob=glob_, ioctl=fake, opener=opener)
    assert all(closed(fd) for fd in opened)


def test_open_free_reports_permission(devdir: Path) -> None:
    def opener(path: str, flags: int) -> int:
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(SteerError, match="permission denied \\(run as root\\)"):
        bpfdev.open_free([str(devdir / "bpf0")], opener)


def test_receiver_filter_respects_the_macos_limit() -> None:
    scattered = frozenset(range(1000, 1000 + 2 * 600, 2))  # 600 single ports: a long search
    plan = SteerPlan("x", "server", ("en0",), scattered)
    assert len(cbpf.tunnel_filter("server", scattered, l3_offset=14, link="en10mb")) > bpfdev.BPF_MAXINSNS
    with pytest.raises(SteerError, match="macOS accepts 512"):
        bpfdev.receiver_filter(plan, DLT_EN10MB)
    with pytest.raises(SteerError, match="link type 105"):
        bpfdev.receiver_filter(SERVER, 105)
    assert len(bpfdev.receiver_filter(CLIENT, DLT_EN10MB)) <= bpfdev.BPF_MAXINSNS


def test_receiver_filter_per_link_type() -> None:
    """Each link type gets the shared tunnel filter at its own offset."""
    for dlt, link, l3 in ((DLT_EN10MB, "en10mb", 14), (DLT_NULL, "null", 4), (DLT_RAW, "raw", 0)):
        want = cbpf.tunnel_filter("client", CLIENT.tunnel_ports, CLIENT.local_ports, CLIENT.peers,
                                  l3_offset=l3, link=link)  # type: ignore[arg-type]
        assert bpfdev.receiver_filter(CLIENT, dlt) == want
