#!/usr/bin/env python3
"""A stand-in for rsockd under the packaged unit, run by packaging/vm/checks.sh.

checks.sh starts it as ``rsockd@<instance>.service`` with a drop-in that replaces only
ExecStart (and, with --no-bpf, nothing else), so it runs inside the unit's real sandbox:
CapabilityBoundingSet, SystemCallFilter, ProtectSystem=strict, ReadWritePaths=/sys/fs/bpf,
RestrictAddressFamilies...  It does what the daemon's privileged steps need and reports each:

- bcc compiles an XDP program and a TC (cls_bpf) program against the kernel headers,
- attaches the XDP program (skb mode) to DEV and the TC one to DEV's clsact egress (pyroute2),
- pins a map under /sys/fs/bpf/rsockd/<instance>/,
- opens the attached program again by id (BPF_PROG_GET_FD_BY_ID: CAP_SYS_ADMIN),
- loads an nft table ``inet rsockd_<instance>`` (libnftables JSON),
- opens the raw and packet sockets with SO_MARK,

then sends READY=1 with a STATUS= line, pings the watchdog, answers SIGHUP with RELOADING=1 …
READY=1, and on SIGTERM sends STOPPING=1, undoes everything and exits 0: the notify / reload /
stop plumbing of the unit, before the daemon itself exists.  Any failed step exits 1 before
READY, so ``systemctl start`` fails and the journal says which step.

Usage: standin.py INSTANCE [--bpf DEV]
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time

import sdnotify

PROGRAMS = r"""
#include <uapi/linux/bpf.h>
#include <linux/pkt_cls.h>

BPF_ARRAY(hits, u64, 1);

int rsockd_probe_xdp(struct xdp_md *ctx) {
    int k = 0;
    u64 *v = hits.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return XDP_PASS;
}

int rsockd_probe_tc(struct __sk_buff *skb) {
    return TC_ACT_OK;
}
"""

SO_MARK = 36
BPF_PROG_GET_FD_BY_ID = 13
SYS_BPF = 321  # x86_64
TC_EGRESS_PARENT = "ffff:fff3"


def say(text: str) -> None:
    print(text, flush=True)


class Stop(Exception):
    pass


class BpfSteps:
    """The privileged steps, each undone by ``close``."""

    def __init__(self, instance: str, dev: str) -> None:
        self.instance, self.dev = instance, dev
        self.bpf = None
        self.ipr = None
        self.idx = 0
        self.pin_dir = f"/sys/fs/bpf/rsockd/{instance}"
        self.table = f"rsockd_{instance}"
        self.nft = None
        self.socks: list[socket.socket] = []
        self.xdp_attached = self.clsact_added = False
        self.xdp_flags = 0

    def open(self) -> None:
        from bcc import BPF, libbcc
        from pyroute2 import IPRoute

        t = time.monotonic()
        self.bpf = BPF(text=PROGRAMS)
        xdp = self.bpf.load_func("rsockd_probe_xdp", BPF.XDP)
        tc = self.bpf.load_func("rsockd_probe_tc", BPF.SCHED_CLS)
        say(f"ok: bcc compiled and loaded XDP + TC programs in {time.monotonic() - t:.1f} s")

        # Detaching needs the same mode flag: with 0 the kernel would detach a native program
        # and leave this skb-mode one attached.
        self.xdp_flags = BPF.XDP_FLAGS_SKB_MODE
        self.bpf.attach_xdp(self.dev, xdp, self.xdp_flags)
        self.xdp_attached = True
        say(f"ok: XDP attached to {self.dev} (skb mode)")

        self.ipr = IPRoute()
        self.idx = self.ipr.link_lookup(ifname=self.dev)[0]
        self.ipr.tc("add", "clsact", self.idx)
        self.clsact_added = True
        self.ipr.tc("add-filter", "bpf", self.idx, ":1", fd=tc.fd, name=tc.name,
                    parent=TC_EGRESS_PARENT, classid=1, direct_action=True)
        say(f"ok: TC program on {self.dev} clsact egress")

        os.makedirs(self.pin_dir, exist_ok=True)
        path = f"{self.pin_dir}/hits".encode()
        if libbcc.lib.bpf_obj_pin(self.bpf["hits"].map_fd, path) != 0:
            raise OSError(ctypes.get_errno(), f"bpf_obj_pin {path.decode()}")
        say(f"ok: map pinned at {path.decode()}")

        link = self.ipr.get_links(self.idx)[0]
        prog_id = link.get_attr("IFLA_XDP").get_attr("IFLA_XDP_PROG_ID")
        attr = ctypes.create_string_buffer(prog_id.to_bytes(4, sys.byteorder), 128)
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(SYS_BPF, BPF_PROG_GET_FD_BY_ID, attr, 128)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"BPF_PROG_GET_FD_BY_ID {prog_id}")
        os.close(fd)
        say(f"ok: attached program {prog_id} opened by id")

        import nftables

        self.nft = nftables.Nftables()
        self._nft({"add": {"table": {"family": "inet", "name": self.table}}})
        say(f"ok: nft table inet {self.table}")

        for family, kind, proto in ((socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
                                    (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP),
                                    (socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))):
            s = socket.socket(family, kind, proto)
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, 0x72736B64)
            self.socks.append(s)
        say("ok: raw IPv4, raw IPv6 and packet sockets with SO_MARK")

    def _nft(self, command: dict[str, object]) -> None:
        assert self.nft is not None
        rc, _, err = self.nft.json_cmd({"nftables": [command]})
        if rc != 0:
            raise OSError(f"nft: {err.strip()}")

    def close(self) -> None:
        for s in self.socks:
            s.close()
        if self.nft is not None:
            try:
                self._nft({"delete": {"table": {"family": "inet", "name": self.table}}})
            except OSError as e:
                say(f"cleanup: {e}")
        if os.path.isdir(self.pin_dir):
            for name in os.listdir(self.pin_dir):
                os.unlink(os.path.join(self.pin_dir, name))
            os.rmdir(self.pin_dir)
        if self.clsact_added:
            self.ipr.tc("del", "clsact", self.idx)
        if self.ipr is not None:
            self.ipr.close()
        if self.xdp_attached:
            self.bpf.remove_xdp(self.dev, self.xdp_flags)
        if self.bpf is not None:
            self.bpf.cleanup()
        say("ok: detached and removed everything")


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--bpf"):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    instance = argv[0]
    steps = BpfSteps(instance, argv[2]) if len(argv) == 3 else None
    notify = sdnotify.SystemdNotifier()
    reloads = 0

    def on_hup(signum: int, frame: object) -> None:
        nonlocal reloads
        reloads += 1
        notify.notify("RELOADING=1")
        say(f"reload {reloads}")
        notify.notify(f"READY=1\nSTATUS=stand-in {instance}: reloaded {reloads} time(s)")

    def on_term(signum: int, frame: object) -> None:
        raise Stop

    signal.signal(signal.SIGTERM, on_term)
    rc = 0
    try:
        if steps is not None:
            steps.open()
        signal.signal(signal.SIGHUP, on_hup)
        what = f"bcc/XDP/TC/nft on {steps.dev}" if steps else "no bpf"
        notify.notify(f"READY=1\nSTATUS=stand-in {instance}: ready ({what})")
        say("ready")
        watchdog = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        while True:
            if watchdog:
                notify.notify("WATCHDOG=1")
            time.sleep(watchdog / 3 if watchdog else 3600)
    except Stop:
        notify.notify("STOPPING=1")
        say("stopping")
    except Exception as e:  # one line for the journal, then exit 1
        say(f"FAILED: {type(e).__name__}: {e}")
        rc = 1
    if steps is not None:
        try:
            steps.close()
        except Exception as e:
            say(f"FAILED cleanup: {type(e).__name__}: {e}")
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
