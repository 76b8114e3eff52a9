"""Datagrams for the application side (the target, or the application), sent in batches."""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections import Counter
from typing import Any

from ..core.batching import runs
from ..errors import errno_name
from .platform import UDP_GSO

LOG = logging.getLogger(__name__)

UDP_SEGMENT = 103  # <linux/udp.h>: UDP GSO segment size (cmsg on SOL_UDP)
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS


class Delivery:
    """Datagrams for the application side (target or app), gathered during one wake-up.

    A run of equal-sized datagrams to one destination leaves in one ``sendmsg`` with UDP GSO
    (``UDP_SEGMENT``): the kernel makes the datagrams, the receiver sees each one as usual.  One
    send costs one trip through the stack instead of one per datagram.  Order is kept per
    destination; where GSO is refused, every datagram goes on its own.
    """

    __slots__ = ("errors", "gso", "queues")

    def __init__(self, errors: Counter[str]) -> None:
        self.errors = errors
        self.gso = UDP_GSO
        self.queues: dict[tuple[socket.socket, Any], tuple[str, list[bytes]]] = {}

    def add(self, sock: socket.socket, addr: Any, label: str, data: bytes) -> None:
        """Queue ``data`` for ``sock`` (connected: ``addr`` None); ``label`` prefixes error counts."""
        q = self.queues.get((sock, addr))
        if q is None:
            self.queues[(sock, addr)] = (label, [data])
        else:
            q[1].append(data)

    def forget(self, sock: socket.socket) -> None:
        """A socket closed before the flush: drop what was queued for it."""
        for key in [k for k in self.queues if k[0] is sock]:
            del self.queues[key]

    def flush(self) -> None:
        if not self.queues:
            return
        queues, self.queues = self.queues, {}
        for (sock, addr), (label, items) in queues.items():
            if len(items) == 1 or not self.gso:
                for d in items:
                    self._one(sock, addr, label, d)
                continue
            for i, j in runs([len(d) for d in items], GSO_MAX_SEGMENTS):
                if j - i == 1:
                    self._one(sock, addr, label, items[i])
                else:
                    self._run(sock, addr, label, items[i:j])

    def _run(self, sock: socket.socket, addr: Any, label: str, run: list[bytes]) -> None:
        cmsg = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(run[0])))]
        try:
            if addr is None:
                sock.sendmsg(run, cmsg)
            else:
                sock.sendmsg(run, cmsg, 0, addr)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                LOG.info("UDP GSO refused (%s): sending datagrams one by one", e.strerror)
                self.gso = False
                for d in run:
                    self._one(sock, addr, label, d)
            else:
                self.errors[label + errno_name(e)] += len(run)

    def _one(self, sock: socket.socket, addr: Any, label: str, data: bytes) -> None:
        try:
            if addr is None:
                sock.send(data)
            else:
                sock.sendto(data, addr)
        except OSError as e:
            self.errors[label + errno_name(e)] += 1
