"""Test hosts in network namespaces: a pair joined by a veth, always torn down.

    with NetnsPair() as net:
        net.run("c", ["ping", "-c1", net.srv4])

Names carry a random tag so concurrent runs never clash; ``close()`` deletes both namespaces
(which removes the veth pair and everything attached to it).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def sh(argv: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, text=True, capture_output=True, **kw)


class NetnsPair:
    """Namespaces ``c`` (client) and ``s`` (server) joined by veth ``<tag>c`` <-> ``<tag>s``.

    Addresses: 10.X.Y.1/24 and fdXX::1/64 on the client, .2 / ::2 on the server.
    """

    def __init__(self, *, offload: bool = False, mtu: int = 1500, gro: bool = False) -> None:
        self.tag = "rk" + secrets.token_hex(3)
        self.ns = {"c": self.tag + "c", "s": self.tag + "s"}
        self.dev = {"c": self.tag + "c0", "s": self.tag + "s0"}
        x, y = secrets.randbelow(200) + 20, secrets.randbelow(250) + 1
        self.cli4, self.srv4 = f"10.{x}.{y}.1", f"10.{x}.{y}.2"
        self.cli6, self.srv6 = f"fd{x:02x}:{y:x}::1", f"fd{x:02x}:{y:x}::2"
        self.offload = offload
        self.mtu = mtu
        self.gro = gro  # veth's default is off; physical NICs and virtio-net have it on

    def __enter__(self) -> NetnsPair:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> None:
        for ns in self.ns.values():
            sh(["ip", "netns", "add", ns])
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            # No duplicate address detection: addresses (link-local too) are usable at once.
            sh(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_dad=0"])
        sh(["ip", "link", "add", self.dev["c"], "netns", self.ns["c"], "mtu", str(self.mtu), "type", "veth",
            "peer", "name", self.dev["s"], "netns", self.ns["s"], "mtu", str(self.mtu)])
        for side, a4, a6 in (("c", self.cli4, self.cli6), ("s", self.srv4, self.srv6)):
            ns, dev = self.ns[side], self.dev[side]
            sh(["ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev])
            sh(["ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad"])
            sh(["ip", "-n", ns, "link", "set", dev, "up"])
            if not self.offload:
                # veth passes partial checksums through and the receiver trusts them, which would
                # hide checksum bugs: make the sender compute real checksums.
                sh(["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"])
            if self.gro:
                sh(["ip", "netns", "exec", ns, "ethtool", "-K", dev, "gro", "on"])
        # Static neighbours: no first-packet loss or delay while ARP/ND resolve.
        mac = {side: self._mac(side) for side in ("c", "s")}
        for side, other, addrs in (("c", "s", (self.srv4, self.srv6)), ("s", "c", (self.cli4, self.cli6))):
            for addr in addrs:
                sh(["ip", "-n", self.ns[side], "neigh", "replace", addr, "lladdr", mac[other],
                    "dev", self.dev[side], "nud", "permanent"])

    def _mac(self, side: str) -> str:
        out = sh(["ip", "-n", self.ns[side], "-j", "link", "show", self.dev[side]]).stdout
        return str(json.loads(out)[0]["address"])

    def add_host(self, side: str) -> tuple[str, str]:
        """Another client host ``side`` (e.g. "c2") with its own veth to the server namespace.

        Returns its IPv4 and IPv6 addresses; the server's end is ``dev["s" + side[1:]]``.
        """
        n = len(self.ns)
        ns, dev, sdev = self.tag + side, self.tag + side + "0", self.tag + "s" + side[1:]
        self.ns[side] = ns
        self.dev[side], self.dev["s" + side[1:]] = dev, sdev
        sh(["ip", "netns", "add", ns])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        sh(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])
        sh(["ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", sdev, "netns", self.ns["s"]])
        base4, base6 = self.cli4.rsplit(".", 2)[0], self.cli6.split(":")[0]
        a4 = (f"{base4}.{200 + n}.1", f"{base4}.{200 + n}.2")
        a6 = (f"{base6}:{200 + n:x}::1", f"{base6}:{200 + n:x}::2")
        for name, d, mine in ((side, dev, 0), ("s", sdev, 1)):
            sh(["ip", "-n", self.ns[name], "addr", "add", f"{a4[mine]}/24", "dev", d])
            sh(["ip", "-n", self.ns[name], "addr", "add", f"{a6[mine]}/64", "dev", d, "nodad"])
            sh(["ip", "-n", self.ns[name], "link", "set", d, "up"])
            if not self.offload:
                sh(["ip", "netns", "exec", self.ns[name], "ethtool", "-K", d, "tx", "off"])
        return a4[0], a6[0]

    def close(self) -> None:
        for ns in self.ns.values():
            sh(["ip", "netns", "del", ns], check=False)

    def argv(self, side: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def run(self, side: str, argv: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        return sh(self.argv(side, argv), check=check, **kw)

    def popen(self, side: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(side, argv), text=True, **kw)

    @contextmanager
    def inside(self, side: str) -> Iterator[None]:
        """Run the block in a namespace; sockets made there stay there.  (``os.setns`` is 3.12+.)"""
        back = os.open("/proc/self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.ns[side]}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        try:
            yield
        finally:
            _libc.setns(back, CLONE_NEWNET)
            os.close(back)
