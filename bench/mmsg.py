"""Batched UDP I/O for the benchmark tools: ``sendmmsg(2)`` / ``recvmmsg(2)`` through ctypes (Linux).

A ``MsgBatch`` is one buffer cut into ``count`` slots of ``stride`` bytes plus the ``mmsghdr``
array pointing at them, built once.  Every datagram starts with an 8-byte little-endian sequence
number; ``seqs()`` views those numbers (and ``lengths()`` the received lengths) as memoryviews, so
per-batch work stays in C: the tools never touch a datagram one by one in the fast path.
"""

from __future__ import annotations

import ctypes
import os
import socket
from array import array

_libc = ctypes.CDLL(None, use_errno=True)

MSG_DONTWAIT = 0x40
SEQ_BYTES = 8


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int))


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint32))


_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = (ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int)
_sendmmsg.restype = ctypes.c_int
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = (ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
_recvmmsg.restype = ctypes.c_int

_NAME = 28  # sizeof(struct sockaddr_in6)
_LEN_OFFSET = _Mmsghdr.msg_len.offset
_NAMELEN_OFFSET = _Msghdr.msg_namelen.offset
_HDR_SIZE = ctypes.sizeof(_Mmsghdr)
assert _LEN_OFFSET % 4 == 0 and _NAMELEN_OFFSET % 4 == 0 and _HDR_SIZE % 4 == 0


class MsgBatch:
    """``count`` datagram slots of ``size`` bytes (slots ``stride`` apart, 8-byte aligned)."""

    def __init__(self, count: int, size: int, *, names: bool = False) -> None:
        if size < SEQ_BYTES:
            raise ValueError(f"datagrams of {size} bytes cannot carry an {SEQ_BYTES}-byte sequence number")
        self.count, self.size = count, size
        self.stride = (size + 7) & ~7
        self.buf = (ctypes.c_char * (self.stride * count))()
        self.iov = (_Iovec * count)()
        self.hdrs = (_Mmsghdr * count)()
        base = ctypes.addressof(self.buf)
        for i in range(count):
            self.iov[i].iov_base = base + i * self.stride
            self.iov[i].iov_len = size
            self.hdrs[i].msg_hdr.msg_iov = ctypes.pointer(self.iov[i])
            self.hdrs[i].msg_hdr.msg_iovlen = 1
        # Room for each sender's address (sockaddr_in6 is the largest we meet), when asked for.
        self.names = (ctypes.c_char * (_NAME * count))() if names else None
        if self.names is not None:
            nbase = ctypes.addressof(self.names)
            for i in range(count):
                self.hdrs[i].msg_hdr.msg_name = nbase + i * _NAME
        self._q = memoryview(self.buf).cast("B").cast("Q")
        self._qstep = self.stride // 8
        self._words = memoryview(self.hdrs).cast("B").cast("I")
        self._lstart, self._lstep = _LEN_OFFSET // 4, _HDR_SIZE // 4
        self._nstart = _NAMELEN_OFFSET // 4
        self._namelens = array("I", [_NAME] * count)

    def set_seqs(self, first: int, n: int) -> None:
        """Number the first ``n`` slots ``first``, ``first + 1``, …"""
        self._q[: n * self._qstep : self._qstep] = array("Q", range(first, first + n))

    def seqs(self, n: int) -> memoryview:
        """The sequence numbers of the first ``n`` slots."""
        return self._q[: n * self._qstep : self._qstep]

    def lengths(self, n: int) -> memoryview:
        """The received lengths of the first ``n`` slots (after ``recv``)."""
        return self._words[self._lstart : self._lstart + n * self._lstep : self._lstep]

    def payload(self, i: int) -> bytes:
        """A copy of received datagram ``i``."""
        off = i * self.stride
        return bytes(memoryview(self.buf).cast("B")[off : off + self.hdrs[i].msg_len])

    def sender(self, i: int) -> tuple[str, int]:
        """The source address of received datagram ``i`` (needs ``names=True``)."""
        assert self.names is not None
        raw = memoryview(self.names).cast("B")[i * _NAME : (i + 1) * _NAME]
        family = int.from_bytes(raw[:2], "little")
        port = int.from_bytes(raw[2:4], "big")
        if family == socket.AF_INET6:
            return socket.inet_ntop(socket.AF_INET6, bytes(raw[8:24])), port
        return socket.inet_ntop(socket.AF_INET, bytes(raw[4:8])), port

    def send(self, sock: socket.socket, n: int) -> int:
        """Send the first ``n`` slots on a connected socket; the number sent (blocks when the socket does)."""
        r = _sendmmsg(sock.fileno(), self.hdrs, n, 0)
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return int(r)

    def recv(self, sock: socket.socket, flags: int = MSG_DONTWAIT) -> int:
        """Receive up to ``count`` datagrams; 0 when none is waiting (non-blocking by default)."""
        if self.names is not None:  # the kernel shrinks each to the address it wrote: restore
            self._words[self._nstart :: self._lstep] = self._namelens
        r = _recvmmsg(sock.fileno(), self.hdrs, self.count, flags, None)
        if r < 0:
            e = ctypes.get_errno()
            if e in (11, 4):  # EAGAIN, EINTR
                return 0
            raise OSError(e, os.strerror(e))
        return int(r)
