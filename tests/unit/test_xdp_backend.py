"""The pure parts of the XDP backend: plan -> map contents, instance tags, the loader's request
parsing.  The kernel side is tests/integration/test_xdp_steer.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import time

import pytest

from rsockd.core import syntag
from rsockd.core.framing import Keyring
from rsockd.steer import SteerPlan, bpfsys
from rsockd.steer.bcc_loader import LoaderError, Request
from rsockd.steer.xdp import (
    XdpSteering,
    guard_handle,
    instance_tag,
    plan_conns,
    plan_ports,
    plan_syn_key,
    plan_syn_limit,
)


def test_daemon_side_does_not_import_bcc() -> None:
    code = ("import json, sys, rsockd.steer.xdp\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('bcc', 'pyroute2'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_instance_tag_is_blake2s_prefix_big_endian() -> None:
    assert instance_tag("rsockd") == int.from_bytes(hashlib.blake2s(b"rsockd").digest()[:8], "big")
    assert instance_tag("a") != instance_tag("b")
    assert 0 < guard_handle(instance_tag("rsockd")) <= 0xFFFFFFFF
    assert guard_handle(1 << 32) == 1  # never the "pick one for me" handle 0


def test_plan_ports() -> None:
    server = SteerPlan("t", "server", ("eth0",), frozenset({10001, 10002}))
    assert plan_ports(server) == {10001: bpfsys.PORT_SERVER, 10002: bpfsys.PORT_SERVER}
    client = SteerPlan("t", "client", ("eth0",), frozenset({10001}), local_ports=frozenset({40000, 10001}),
                       peers=frozenset({"192.0.2.1"}))
    assert plan_ports(client) == {10001: bpfsys.PORT_PEER | bpfsys.PORT_LOCAL, 40000: bpfsys.PORT_LOCAL}


def test_syn_limit_is_a_server_setting() -> None:
    server = SteerPlan("t", "server", ("eth0",), frozenset({10001}), syn_rate=2000, syn_burst=200)
    assert plan_syn_limit(server) == (2000, 200)
    assert plan_syn_limit(SteerPlan("t", "server", ("eth0",), frozenset({10001}))) == (0, 0)  # default: none
    client = SteerPlan("t", "client", ("eth0",), frozenset({10001}), syn_rate=2000, syn_burst=200)
    assert plan_syn_limit(client) == (0, 0)


def test_loader_request_carries_the_syn_limit() -> None:
    plan = SteerPlan("t", "server", ("eth0",), frozenset({10001}), syn_rate=1500, syn_burst=30)
    raw = XdpSteering(plan).request()
    assert (raw["syn_rate"], raw["syn_burst"]) == (1500, 30)
    req = Request.parse(json.dumps(raw))
    assert (req.syn_rate, req.syn_burst) == (1500, 30)


def test_loader_request_carries_the_syn_tag_and_the_clients_connections() -> None:
    key = Keyring.from_secret("secret").syn_key
    server = SteerPlan("t", "server", ("eth0",), frozenset({10001}), syn_key=key)
    req = Request.parse(json.dumps(XdpSteering(server).request()))
    assert req.syn_key == key and req.conns == ()
    assert abs(req.slot - syntag.slot_of(time.time())) <= 1
    # no key configured: the default key's tag, as the endpoint's
    assert plan_syn_key(SteerPlan("t", "server", ("eth0",), frozenset({10001}))) == Keyring.from_secret(None).syn_key

    client = SteerPlan("t", "client", ("eth0",), frozenset({10001, 10002}), local_ports=frozenset({40001, 40002}),
                       conns=frozenset({("192.0.2.2", 40001, "192.0.2.1", 10001),
                                        ("192.0.2.2", 40002, "192.0.2.1", 10002)}))
    # the keys are the segments as they arrive from the server
    want = {bpfsys.conn_key("192.0.2.1", "192.0.2.2", 10001, 40001),
            bpfsys.conn_key("192.0.2.1", "192.0.2.2", 10002, 40002)}
    assert plan_conns(client) == want
    assert set(Request.parse(json.dumps(XdpSteering(client).request())).conns) == want
    assert plan_conns(dataclasses.replace(client, role="server")) == set()


def test_online_cpus() -> None:
    assert 1 <= bpfsys.online_cpus() <= bpfsys.possible_cpus()


def test_cpu_list() -> None:
    assert bpfsys._parse_cpu_list("0-1\n") == 2
    assert bpfsys._parse_cpu_list("0,2-3,7") == 4
    assert bpfsys._parse_cpu_list("0") == 1


GOOD = {"instance": "t", "pin_dir": "/sys/fs/bpf/rsockd/t", "interfaces": ["eth0"], "xdp_mode": "auto",
        "mark": 1, "instance_tag": 2, "ports": {"10001": 1}, "peers": [], "guard": True}


def test_request_parse() -> None:
    req = Request.parse(json.dumps(GOOD))
    assert req.ports == {10001: 1} and req.interfaces == ("eth0",) and req.guard
    assert (req.syn_rate, req.syn_burst) == (0, 0)  # left out: no SYN limit


@pytest.mark.parametrize("change", [
    {"interfaces": []},
    {"xdp_mode": "fast"},
    {"mark": "x"},
    {"mark": True},
    {"ports": {"x": 1}},
    {"peers": [1]},
    {"syn_rate": -1},
    {"syn_rate": 1 << 32},
    {"syn_rate": "2000"},
    {"syn_burst": True},
    {"syn_burst": 1.5},
    {"syn_key": "00"},
    {"syn_key": "xyz"},
    {"conns": ["00" * 35]},
    {"slot": -1},
])
def test_request_parse_rejects(change: dict[str, object]) -> None:
    with pytest.raises(LoaderError) as err:
        Request.parse(json.dumps(GOOD | change))
    assert "\n" not in str(err.value)


def test_request_not_json() -> None:
    with pytest.raises(LoaderError, match="not JSON"):
        Request.parse("{")
