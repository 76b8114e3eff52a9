"""rsockd.steer.xdplink: its attribute coding, and the two pyroute2 0.7.2 gaps it exists for.

The gap tests encode and decode with pyroute2's own message classes.  When one fails, the
installed pyroute2 has been fixed: move that request to pyroute2 and drop it from xdplink.
tests/integration/test_pyroute2_gaps.py shows the same gaps against the kernel.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from rsockd.steer import xdplink


def test_netlink_attributes_round_trip() -> None:
    data = xdplink._attr(3, b"eth0\0") + xdplink._attr(43 | xdplink.NLA_F_NESTED,
                                                       xdplink._attr(4, (7).to_bytes(4, sys.byteorder)))
    attrs = list(xdplink._attrs(data))
    assert attrs[0] == (3, b"eth0\0")
    assert attrs[1][0] == 43
    assert list(xdplink._attrs(attrs[1][1])) == [(4, (7).to_bytes(4, sys.byteorder))]


def test_pyroute2_encodes_ifla_xdp_flags_in_two_bytes() -> None:
    """The kernel's policy for IFLA_XDP_FLAGS is NLA_U32: a two-byte attribute is rejected."""
    pytest.importorskip("pyroute2")
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    msg = ifinfmsg()
    msg["index"] = 1
    msg["attrs"] = [("IFLA_XDP", {"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", xdplink.XDP_FLAGS_SKB_MODE)]})]
    msg.encode()
    body = bytes(msg.data)[16 + 16:]  # nlmsghdr, ifinfomsg
    xdp = dict(xdplink._attrs(body))[xdplink.IFLA_XDP]
    flags = dict(xdplink._attrs(xdp))[xdplink.IFLA_XDP_FLAGS]
    assert len(flags) == 2  # a u32 would be 4
    assert flags == struct.pack(">H", xdplink.XDP_FLAGS_SKB_MODE)  # and big-endian at that


def test_pyroute2_does_not_decode_tca_bpf_id() -> None:
    """A cls_bpf filter as the kernel dumps it: pyroute2 keeps the name but not the program id."""
    pytest.importorskip("pyroute2")
    from pyroute2.netlink.rtnl.tcmsg import tcmsg

    options = xdplink._attr(xdplink.TCA_BPF_NAME, b"rsockd_guard\0") + xdplink._attr(xdplink.TCA_BPF_ID,
                                                                                    struct.pack("=I", 42))
    body = (xdplink._TCMSG.pack(0, 2, 1, xdplink.TC_PARENT_EGRESS, 0) + xdplink._attr(xdplink.TCA_KIND, b"bpf\0")
            + xdplink._attr(xdplink.TCA_OPTIONS | xdplink.NLA_F_NESTED, options))
    msg = tcmsg(xdplink._NLMSGHDR.pack(16 + len(body), xdplink.RTM_GETTFILTER, 0, 1, 0) + body)
    msg.decode()
    decoded = msg.get_attr("TCA_OPTIONS")
    assert decoded.get_attr("TCA_BPF_NAME") == "rsockd_guard"
    assert decoded.get_attr("TCA_BPF_ID") is None
    assert 42 not in [v for _name, v, *_ in decoded["attrs"]]  # not under another name either


def test_pyroute2_is_imported_only_when_netlink_is_asked() -> None:
    """pyroute2 is Linux-only and costs the daemon ~11 MB: importing rsockd's modules (as on
    macOS) loads none of it."""
    code = ("import json, sys, rsockd.dataplane.relay, rsockd.dataplane.packetsend, rsockd.cli.check, "
            "rsockd.steer.xdp, rsockd.steer.bcc_loader\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
