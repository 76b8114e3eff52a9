"""The two things rsockd.steer.xdplink does by hand, against the kernel: pyroute2 0.7.2 fails
where xdplink succeeds.  When a pyroute2 half fails, pyroute2 has been fixed: move that request
to pyroute2 and drop it from xdplink (tests/unit/test_xdplink.py shows the same in encoding)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

import pytest

from rsockd.netlink import Host
from rsockd.steer import bpfsys, xdplink
from rsockd.steer.xdp import clsact_add, drop_empty_clsact, filter_del
from tests.netns import NetnsPair

pytestmark = pytest.mark.root

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
# r0 = 2; exit (XDP_PASS; for a classifier, TC_ACT_SHOT: the test sends nothing through it)
RETURN_2 = bytes([0xB7, 0, 0, 0, 2, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16)]


def load_program(prog_type: int, name: bytes) -> int:
    """A two-instruction program of ``prog_type``; returns its fd."""
    insns = ctypes.create_string_buffer(RETURN_2, len(RETURN_2))
    licence = ctypes.create_string_buffer(b"GPL")
    return bpfsys.sys_bpf(BPF_PROG_LOAD, _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(RETURN_2) // 8,
                                                       insns=ctypes.addressof(insns),
                                                       license=ctypes.addressof(licence), prog_name=name))


@pytest.fixture
def veth() -> Iterator[tuple[NetnsPair, int]]:
    """Inside the client namespace of a fresh pair: (the pair, the veth's ifindex)."""
    with NetnsPair() as net, net.inside("c"), Host() as host:
        link = host.link(net.dev["c"])
        assert link is not None
        yield net, link.index


def test_xdp_attach_in_a_mode_fails_through_pyroute2_and_works_through_xdplink(veth: tuple[NetnsPair, int]) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    _net, index = veth
    fd = load_program(BPF_PROG_TYPE_XDP, b"gap_xdp")
    try:
        with Host() as host:
            # pyroute2 sends IFLA_XDP_FLAGS in two bytes: the kernel refuses the request
            with pytest.raises(NetlinkError) as refused:
                host.ipr.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", fd),
                                                                 ("IFLA_XDP_FLAGS", xdplink.XDP_FLAGS_SKB_MODE)]})
            assert refused.value.code in (22, 34), refused.value  # EINVAL or ERANGE: a short attribute
            link = host.link(index=index)
            assert link is not None and link.xdp == {}
            # the same request with a u32: attached in skb mode, and pyroute2 reads it back
            xdplink.xdp_set(index, fd, xdplink.XDP_FLAGS_SKB_MODE)
            link = host.link(index=index)
            assert link is not None and link.xdp == {"skb": bpfsys.prog_info(fd).id}
            xdplink.xdp_set(index, -1, xdplink.XDP_FLAGS_SKB_MODE, expected_fd=fd)
            link = host.link(index=index)
            assert link is not None and link.xdp == {}
    finally:
        os.close(fd)


def test_cls_bpf_program_id_is_missing_from_pyroute2_and_present_in_xdplink(veth: tuple[NetnsPair, int]) -> None:
    _net, index = veth
    fd = load_program(BPF_PROG_TYPE_SCHED_CLS, b"gap_cls")
    try:
        with Host() as host:
            assert clsact_add(host, index)
            assert not clsact_add(host, index)  # already there
            host.call("add filter", host.ipr.tc, "add-filter", "bpf", index, 7, parent=xdplink.TC_PARENT_EGRESS,
                      prio=9, fd=fd, name="gap_cls", direct_action=True)
            ours = xdplink.filters(index, xdplink.TC_PARENT_EGRESS)
            assert [(f.kind, f.name, f.prio, f.handle, f.prog_id) for f in ours] == [
                ("bpf", "gap_cls", 9, 7, bpfsys.prog_info(fd).id)]
            theirs = [m for m in host.ipr.get_filters(index=index, parent=xdplink.TC_PARENT_EGRESS)
                      if m.get_attr("TCA_OPTIONS") is not None]
            assert len(theirs) == 1
            options = theirs[0].get_attr("TCA_OPTIONS")
            assert options.get_attr("TCA_BPF_NAME") == "gap_cls"
            assert options.get_attr("TCA_BPF_ID") is None  # the id is not decoded
            # removing works through pyroute2, and the emptied clsact goes with it
            filter_del(host, ours[0])
            assert xdplink.filters(index, xdplink.TC_PARENT_EGRESS) == []
            assert drop_empty_clsact(host, index)
            assert not [q for q in host.ipr.get_qdiscs(index) if q.get_attr("TCA_KIND") == "clsact"]
    finally:
        os.close(fd)
