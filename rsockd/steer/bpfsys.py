"""A small ``bpf(2)`` wrapper (ctypes), bpffs helpers, and the Python mirror of ``bpf/rsockd.h``.

The daemon never imports bcc (it keeps ~200 MB of LLVM resident): the short-lived loader child
compiles, loads and pins, and everything the daemon does afterwards — fill and read the maps,
find the programs attached to a link and tell whose they are — goes through this module.

Failures of the system call raise ``OSError`` with the errno; ``PinnedMaps.open`` raises
``SteerError`` (user-facing) when an instance's pins are missing or are not what rsockd pins.

Byte order: map keys and values are in host order except where ``rsockd.h`` says otherwise
(``peers4``/``peers6`` keys are addresses as on the wire).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..core import syntag
from ..core.packet import pack_address
from ..errors import SteerError
from . import STEER_COUNTERS

LOG = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The mirror of bpf/rsockd.h (tests/unit/test_bpf_layout.py compiles the header and compares).


class RsockdConfig(ctypes.Structure):
    """``struct rsockd_config``: the single entry of the ``config`` map."""

    _fields_ = [
        ("mark", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("instance_tag", ctypes.c_uint64),
        ("syn_rate", ctypes.c_uint32),
        ("syn_burst", ctypes.c_uint32),
        ("syn_cpus", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


#: Where ``instance_tag`` ends: every rsockd's config value holds it at the same offset, so the
#: owner of a program an older rsockd loaded (a shorter config) is still found.
CONFIG_TAG_END = RsockdConfig.instance_tag.offset + RsockdConfig.instance_tag.size


class RsockdAddr6(ctypes.Structure):
    """``struct rsockd_addr6``: the key of ``peers6``."""

    _fields_ = [("addr", ctypes.c_uint8 * 16)]


class RsockdSyntag(ctypes.Structure):
    """``struct rsockd_syntag``: the single entry of the ``syntag`` map (the SYN tag's key and slot)."""

    _fields_ = [
        ("k0", ctypes.c_uint64),
        ("k1", ctypes.c_uint64),
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class RsockdConn(ctypes.Structure):
    """``struct rsockd_conn``: a key of ``conns`` (``conn_key`` builds one)."""

    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),  # network byte order
        ("dport", ctypes.c_uint16),
    ]


class RsockdSeenKey(ctypes.Structure):
    """``struct rsockd_seen_key``: a key of ``seen`` (a SYN's tag; the value is its ``RsockdConn``)."""

    _fields_ = [("isn", ctypes.c_uint32), ("tsval", ctypes.c_uint32)]


PORT_SERVER = 1  # server: a tunnel port we serve (match on dport)
PORT_LOCAL = 2  # client: one of our local ports (match on dport)
PORT_PEER = 4  # client: a server tunnel port (match on sport)

#: ``enum rsockd_stat``: index of each counter in the ``stats`` map.
STAT_INDEX = {name: i for i, name in enumerate(STEER_COUNTERS)}
STAT_COUNT = len(STEER_COUNTERS)

PORTS_MAX = 65536
PEERS_MAX = 256
CONNS_MAX = 65536

MAP_NAMES = ("config", "ports", "peers4", "peers6", "stats", "syntag", "conns")
#: Programs are ours when their name starts with this (``rsockd_xdp``, ``rsockd_guard``).
PROG_PREFIX = "rsockd_"

BPFFS = "/sys/fs/bpf"


def pin_dir(instance: str) -> str:
    """Where an instance's maps are pinned."""
    return f"{BPFFS}/rsockd/{instance}"


# ---------------------------------------------------------------------------------------------
# The system call

_SYS_BPF = {"x86_64": 321, "amd64": 321, "aarch64": 280, "arm64": 280}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
_PERCPU_TYPES = frozenset((BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH))

BPF_OBJ_NAME_LEN = 16

_CMD_NAMES = {
    BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM",
    BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM",
    BPF_MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM",
    BPF_MAP_GET_NEXT_KEY: "BPF_MAP_GET_NEXT_KEY",
    BPF_OBJ_PIN: "BPF_OBJ_PIN",
    BPF_OBJ_GET: "BPF_OBJ_GET",
    BPF_PROG_GET_FD_BY_ID: "BPF_PROG_GET_FD_BY_ID",
    BPF_MAP_GET_FD_BY_ID: "BPF_MAP_GET_FD_BY_ID",
    BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD",
}


# The members of ``union bpf_attr`` each command uses (include/uapi/linux/bpf.h).  The kernel
# accepts a shorter attr than its own and zero-fills the rest.
class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # value, or next_key for BPF_MAP_GET_NEXT_KEY
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _GetFdByIdAttr(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class BpfProgInfoC(ctypes.Structure):
    """The head of ``struct bpf_prog_info`` (everything up to ``ifindex``)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
    ]


class BpfMapInfoC(ctypes.Structure):
    """The head of ``struct bpf_map_info`` (everything up to ``ifindex``)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def os_error_text(e: OSError) -> str:
    """One line for an ``OSError``: its message (without "[Errno n]") and file name, if any."""
    text = e.strerror or str(e)
    return f"{e.filename}: {text}" if e.filename else text


def _sys_bpf_nr() -> int:
    machine = platform.machine()
    try:
        return _SYS_BPF[machine]
    except KeyError:
        raise OSError(errno.ENOSYS, f"bpf(2): no syscall number known for {machine}") from None


def sys_bpf(cmd: int, attr: ctypes.Structure) -> int:
    """Call ``bpf(cmd, &attr, sizeof attr)``; returns the result, raises ``OSError`` on failure."""
    ret = _syscall(
        ctypes.c_long(_sys_bpf_nr()), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr))
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({_CMD_NAMES.get(cmd, cmd)}): {os.strerror(err)}")
    return int(ret)


def obj_get(path: str) -> int:
    """Open a pinned object; returns a new fd (``BPF_OBJ_GET``)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    fd = sys_bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(p)))
    os.set_inheritable(fd, False)
    return fd


def obj_pin(fd: int, path: str) -> None:
    """Pin the map or program ``fd`` at ``path`` on a bpffs (``BPF_OBJ_PIN``)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    sys_bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(p), bpf_fd=fd))


def prog_get_fd_by_id(prog_id: int) -> int:
    """A new fd for the loaded program ``prog_id`` (needs CAP_SYS_ADMIN)."""
    fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, _GetFdByIdAttr(id=prog_id))
    os.set_inheritable(fd, False)
    return fd


def map_get_fd_by_id(map_id: int) -> int:
    """A new fd for the map ``map_id`` (needs CAP_SYS_ADMIN)."""
    fd = sys_bpf(BPF_MAP_GET_FD_BY_ID, _GetFdByIdAttr(id=map_id))
    os.set_inheritable(fd, False)
    return fd


@dataclass(frozen=True)
class ProgInfo:
    """What ``BPF_OBJ_GET_INFO_BY_FD`` says about a program."""

    id: int
    name: str
    type: int
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    """What ``BPF_OBJ_GET_INFO_BY_FD`` says about a map."""

    id: int
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


def _get_info(fd: int, info: ctypes.Structure) -> None:
    sys_bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
    )


def prog_info(fd: int) -> ProgInfo:
    """Id, name, type and map ids of the program ``fd``."""
    room = 16
    while True:
        ids = (ctypes.c_uint32 * room)()
        info = BpfProgInfoC(nr_map_ids=room, map_ids=ctypes.addressof(ids))
        _get_info(fd, info)
        if info.nr_map_ids <= room:  # the kernel reports the true count, fills at most `room`
            break
        room = info.nr_map_ids
    return ProgInfo(
        id=info.id,
        name=info.name.decode(errors="replace"),
        type=info.type,
        map_ids=tuple(ids[: info.nr_map_ids]),
    )


def map_info(fd: int) -> MapInfo:
    """Id, name, type and sizes of the map ``fd``."""
    info = BpfMapInfoC()
    _get_info(fd, info)
    return MapInfo(
        id=info.id,
        name=info.name.decode(errors="replace"),
        type=info.type,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
    )


def _parse_cpu_list(text: str) -> int:
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


_possible_cpus: int | None = None


def possible_cpus() -> int:
    """How many values a per-CPU map returns: the possible CPUs, not the online ones."""
    global _possible_cpus
    if _possible_cpus is None:
        _possible_cpus = _parse_cpu_list(Path("/sys/devices/system/cpu/possible").read_text())
    return _possible_cpus


def online_cpus() -> int:
    """The CPUs online now: the SYN budget is split across these (``rsockd_config.syn_cpus``)."""
    try:
        return max(1, _parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text()))
    except (OSError, ValueError):
        return max(1, os.cpu_count() or 1)


class BpfMap:
    """An open map fd with its info; keys and values are ``bytes`` of the map's sizes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            self.info = map_info(fd)
        except BaseException:
            os.close(fd)
            raise
        self.percpu = self.info.type in _PERCPU_TYPES

    @classmethod
    def from_pin(cls, path: str) -> BpfMap:
        return cls(obj_get(path))

    @classmethod
    def from_id(cls, map_id: int) -> BpfMap:
        return cls(map_get_fd_by_id(map_id))

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def _value_room(self) -> int:
        if not self.percpu:
            return self.info.value_size
        # per-CPU values come one per possible CPU, each padded to 8 bytes
        return (self.info.value_size + 7) // 8 * 8 * possible_cpus()

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.info.key_size:
            raise ValueError(f"map {self.info.name}: key of {len(key)} bytes, expected {self.info.key_size}")
        return ctypes.create_string_buffer(key, len(key))

    def lookup_raw(self, key: bytes) -> bytes | None:
        """The value (all CPUs' values for a per-CPU map), or None when the key is absent."""
        k = self._key(key)
        v = ctypes.create_string_buffer(self._value_room)
        try:
            sys_bpf(BPF_MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=self.fd, key=ctypes.addressof(k),
                                                      value=ctypes.addressof(v)))
        except FileNotFoundError:
            return None
        return v.raw

    def lookup(self, key: bytes) -> bytes | None:
        """The value of a plain map, or None when absent."""
        if self.percpu:
            raise TypeError(f"map {self.info.name} is per-CPU: use lookup_percpu")
        return self.lookup_raw(key)

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """One value per possible CPU, or None when absent."""
        raw = self.lookup_raw(key)
        if raw is None:
            return None
        step = (self.info.value_size + 7) // 8 * 8
        return [raw[i : i + self.info.value_size] for i in range(0, len(raw), step)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if self.percpu:
            raise TypeError(f"map {self.info.name} is per-CPU: writing it is not supported")
        if len(value) != self.info.value_size:
            raise ValueError(f"map {self.info.name}: value of {len(value)} bytes, expected {self.info.value_size}")
        k = self._key(key)
        v = ctypes.create_string_buffer(value, len(value))
        sys_bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=self.fd, key=ctypes.addressof(k),
                                                  value=ctypes.addressof(v), flags=flags))

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False when it was not there."""
        k = self._key(key)
        try:
            sys_bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=self.fd, key=ctypes.addressof(k)))
        except FileNotFoundError:
            return False
        return True

    def next_key(self, key: bytes | None) -> bytes | None:
        """The key after ``key`` (the first key for None); None at the end."""
        nk = ctypes.create_string_buffer(self.info.key_size)
        attr = _MapElemAttr(map_fd=self.fd, value=ctypes.addressof(nk))
        if key is not None:
            k = self._key(key)
            attr.key = ctypes.addressof(k)
        try:
            sys_bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except FileNotFoundError:
            return None
        return nk.raw

    def all_keys(self) -> Iterator[bytes]:
        """Every key (a hash map's keys; for an array, every index)."""
        key = self.next_key(None)
        while key is not None:
            yield key
            key = self.next_key(key)


# ---------------------------------------------------------------------------------------------
# bpffs


def _unescape_mount(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def fs_type(path: str) -> str | None:
    """The type of the filesystem mounted at the longest mount point that contains ``path``."""
    best, kind = "", None
    target = os.path.normpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = _unescape_mount(parts[1])
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):  # later mounts shadow earlier ones
                best, kind = mnt, parts[2]
    return kind


def ensure_bpffs(path: str = BPFFS) -> bool:
    """Mount bpffs at ``path`` unless it already is one; True when this call mounted it.

    systemd hosts mount it at boot; other hosts (and every ``ip netns exec``, which remounts
    /sys) do not.
    """
    if fs_type(path) == "bpf":
        return False
    os.makedirs(path, exist_ok=True)
    mount = _libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    LOG.info("mounted bpffs at %s", path)
    return True


def remove_pins(directory: str) -> bool:
    """Remove an instance's pin directory (files, then the directory); True when it existed."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        os.unlink(directory)
        return True
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        pass
    parent = os.path.dirname(directory.rstrip("/"))
    if parent == f"{BPFFS}/rsockd":  # the last instance gone: leave bpffs as we found it
        try:
            os.rmdir(parent)
        except OSError:  # other instances' pins are still there (ENOTEMPTY), or it is gone
            pass
    return True


# ---------------------------------------------------------------------------------------------
# The maps of one instance


# Map keys and values are host-order integers (peer addresses excepted: those are wire order).
def _u32(v: int) -> bytes:
    return int(v).to_bytes(4, sys.byteorder)


def _from_u32(b: bytes) -> int:
    return int.from_bytes(b[:4], sys.byteorder)


def _u64(b: bytes) -> int:
    return int.from_bytes(b[:8], sys.byteorder)


_ONE = _u32(1)


class PinnedMaps:
    """The maps of one loaded instance, opened by fd: read and write them as rsockd.h says."""

    def __init__(self, maps: Mapping[str, BpfMap]) -> None:
        self.maps = dict(maps)

    @classmethod
    def open(cls, directory: str) -> PinnedMaps:
        """Open the pins under ``directory``.  Raises ``SteerError`` when they are missing."""
        maps: dict[str, BpfMap] = {}
        try:
            for name in MAP_NAMES:
                maps[name] = BpfMap.from_pin(os.path.join(directory, name))
        except OSError as e:
            for m in maps.values():
                m.close()
            raise SteerError(f"{directory}/{name}: cannot open pinned map: {e.strerror}") from None
        self = cls(maps)
        self.check()
        return self

    @classmethod
    def from_fds(cls, fds: Mapping[str, int]) -> PinnedMaps:
        """Wrap duplicates of already open map fds (the loader's own, before pinning)."""
        maps: dict[str, BpfMap] = {}
        for name in MAP_NAMES:
            maps[name] = BpfMap(os.dup(fds[name]))
        self = cls(maps)
        self.check()
        return self

    def check(self) -> None:
        """Refuse maps whose sizes disagree with this mirror of rsockd.h."""
        want = {
            "config": (4, ctypes.sizeof(RsockdConfig)),
            "ports": (4, 4),
            "peers4": (4, 4),
            "peers6": (ctypes.sizeof(RsockdAddr6), 4),
            "stats": (4, 8),
            "syntag": (4, ctypes.sizeof(RsockdSyntag)),
            "conns": (ctypes.sizeof(RsockdConn), 4),
        }
        for name, (ks, vs) in want.items():
            info = self.maps[name].info
            if (info.key_size, info.value_size) != (ks, vs):
                self.close()
                raise SteerError(
                    f"BPF map {name} has key/value sizes {info.key_size}/{info.value_size}, "
                    f"expected {ks}/{vs}: bpf/rsockd.h and rsockd/steer/bpfsys.py disagree"
                )

    def close(self) -> None:
        for m in self.maps.values():
            m.close()

    def __enter__(self) -> PinnedMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pin(self, directory: str) -> None:
        """Pin every map under ``directory`` (created; must be on a bpffs)."""
        os.makedirs(directory, exist_ok=True)
        for name, m in self.maps.items():
            obj_pin(m.fd, os.path.join(directory, name))

    # -- config

    def read_config(self) -> RsockdConfig:
        raw = self.maps["config"].lookup(_u32(0))
        return RsockdConfig.from_buffer_copy(raw) if raw else RsockdConfig()

    def write_config(self, *, mark: int, instance_tag: int, syn_rate: int = 0, syn_burst: int = 0,
                     syn_cpus: int | None = None, flags: int = 0) -> None:
        """Write ``config[0]`` in one update (the programs never see half of it).

        ``syn_rate``/``syn_burst`` are the whole machine's; ``syn_cpus`` (default: the online
        CPUs) is how many per-CPU buckets share them.
        """
        cpus = online_cpus() if syn_cpus is None else syn_cpus
        for name, value in (("syn_rate", syn_rate), ("syn_burst", syn_burst), ("syn_cpus", cpus)):
            if not 0 <= value <= 0xFFFFFFFF:
                raise SteerError(f"config {name} {value} does not fit in 32 bits")
        cfg = RsockdConfig(mark=mark, flags=flags, instance_tag=instance_tag, syn_rate=syn_rate,
                           syn_burst=syn_burst, syn_cpus=cpus)
        self.maps["config"].update(_u32(0), bytes(cfg))

    # -- ports and peers

    def write_ports(self, ports: Mapping[int, int], previous: Mapping[int, int] | None = None) -> None:
        """Set ``ports[p] = flags``; then clear the ports of ``previous`` that are not in ``ports``.

        New entries go in before old ones leave, so a port kept across the change never
        stops matching.
        """
        m = self.maps["ports"]
        for port, flags in sorted(ports.items()):
            if previous is None or previous.get(port) != flags:
                m.update(_u32(_port(port)), _u32(flags))
        for port in sorted(set(previous or ()) - set(ports)):
            m.update(_u32(_port(port)), _u32(0))

    def read_ports(self, candidates: Iterable[int]) -> dict[int, int]:
        """The non-zero flags of the given ports (the array has 65536 entries: ask for some)."""
        m, out = self.maps["ports"], {}
        for port in candidates:
            raw = m.lookup(_u32(_port(port)))
            if raw and _from_u32(raw):
                out[port] = _from_u32(raw)
        return out

    def write_peers(self, peers: Iterable[str]) -> None:
        """Make ``peers4``/``peers6`` hold exactly ``peers`` (textual addresses); adds first."""
        want4: set[bytes] = set()
        want6: set[bytes] = set()
        for addr in peers:
            try:
                want4.add(socket.inet_pton(socket.AF_INET, addr))
            except OSError:
                try:
                    want6.add(socket.inet_pton(socket.AF_INET6, addr))
                except OSError:
                    raise SteerError(f"peer address {addr!r} is neither IPv4 nor IPv6") from None
        for name, want in (("peers4", want4), ("peers6", want6)):
            if len(want) > PEERS_MAX:
                raise SteerError(f"{len(want)} peer addresses: at most {PEERS_MAX} per family")
            m = self.maps[name]
            have = set(m.all_keys())
            for key in sorted(want - have):
                m.update(key, _ONE)
            for key in sorted(have - want):
                m.delete(key)

    def read_peers(self) -> set[str]:
        out = {socket.inet_ntop(socket.AF_INET, k) for k in self.maps["peers4"].all_keys()}
        out |= {socket.inet_ntop(socket.AF_INET6, k) for k in self.maps["peers6"].all_keys()}
        return out

    # -- port sharing: the SYN tag and the connections

    def write_syntag(self, key: bytes, slot: int) -> None:
        """Write ``syntag[0]``: the 16-byte SYN tag key and the current slot, in one update."""
        k0, k1 = syntag.key_words(key)
        self.maps["syntag"].update(_u32(0), bytes(RsockdSyntag(k0=k0, k1=k1, slot=slot & syntag.SLOT_MASK)))

    def read_syntag(self) -> RsockdSyntag:
        raw = self.maps["syntag"].lookup(_u32(0))
        return RsockdSyntag.from_buffer_copy(raw) if raw else RsockdSyntag()

    def add_conns(self, keys: Iterable[bytes]) -> None:
        """Add ``conns`` keys (``conn_key``)."""
        m = self.maps["conns"]
        for key in keys:
            m.update(key, _ONE)

    def delete_conns(self, keys: Iterable[bytes]) -> None:
        m = self.maps["conns"]
        for key in keys:
            m.delete(key)

    def read_conns(self) -> set[bytes]:
        return set(self.maps["conns"].all_keys())

    # -- counters

    def stats(self) -> dict[str, int]:
        """The counters summed over all CPUs, keyed by ``STEER_COUNTERS`` names."""
        m, out = self.maps["stats"], {}
        for name, index in STAT_INDEX.items():
            values = m.lookup_percpu(_u32(index)) or []
            out[name] = sum(_u64(v) for v in values)
        return out


_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _addr16(addr: str | bytes) -> bytes:
    """An address as ``struct rsockd_conn`` holds it: 16 bytes, IPv4 as IPv4-mapped IPv6."""
    packed = pack_address(addr)
    return _V4_MAPPED + packed if len(packed) == 4 else packed


def conn_key(src: str | bytes, dst: str | bytes, sport: int, dport: int) -> bytes:
    """A ``conns`` key: a segment from ``src:sport`` to ``dst:dport`` (addresses textual or packed)."""
    ports = _port(sport).to_bytes(2, "big") + _port(dport).to_bytes(2, "big")
    return _addr16(src) + _addr16(dst) + ports


def _port(port: int) -> int:
    if not 0 < port < PORTS_MAX:
        raise SteerError(f"port {port} is outside 1-65535")
    return port
