"""The pure parts of server workers: the port split, the status sum, the parent/child messages."""

from __future__ import annotations

import socket

import pytest

from rsockd.service.daemon import merge_status
from rsockd.service.worker import WorkerGone, recv_msg, send_msg, share


@pytest.mark.parametrize("n", [1, 2, 3, 4, 10])
def test_share_gives_every_port_to_exactly_one_worker(n: int) -> None:
    ports = [10010, 10001, 10005, 10002, 10003, 10004, 10006, 10007, 10008, 10009]
    parts = [share(ports, n, i) for i in range(n)]
    assert sorted(p for part in parts for p in part) == sorted(ports)
    assert all(parts)  # nobody idle while workers <= ports
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_share_takes_every_nth_port_of_the_sorted_range() -> None:
    assert share([10004, 10001, 10003, 10002], 2, 0) == (10001, 10003)
    assert share([10004, 10001, 10003, 10002], 2, 1) == (10002, 10004)


def test_merge_status_adds_counts_and_keeps_the_rest() -> None:
    mine = {"sessions": 1, "flows": 2, "half_open": 0, "target": "127.0.0.1:9",
            "connections": {"total": 2, "by_state": {"established": 2}},
            "traffic": {"from_app_packets": 5}, "drops": {"replay": 1, "bad_auth": 0},
            "tx_errors": {}, "peers": ["10.0.0.2", "10.0.0.1"]}
    theirs = [{"sessions": 1, "flows": 3, "half_open": 1, "target": "other",
               "connections": {"total": 3, "by_state": {"established": 2, "syn_rcvd": 1}},
               "traffic": {"from_app_packets": 7}, "drops": {"replay": 2, "bad_auth": 4},
               "tx_errors": {"rx_econnrefused": 1}, "peers": ["10.0.0.3", "10.0.0.1"]}]
    out = merge_status(mine, theirs)
    assert out["sessions"] == 2 and out["flows"] == 5 and out["half_open"] == 1
    assert out["connections"] == {"total": 5, "by_state": {"established": 4, "syn_rcvd": 1}}
    assert out["traffic"] == {"from_app_packets": 12}
    assert out["drops"] == {"replay": 3, "bad_auth": 4} and out["tx_errors"] == {"rx_econnrefused": 1}
    assert out["peers"] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert out["target"] == "127.0.0.1:9"
    assert mine["connections"] == {"total": 2, "by_state": {"established": 2}}  # not modified


def test_messages_cross_a_socketpair_and_a_dead_peer_is_worker_gone() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_msg(a, ("status", {"x": [1, 2]}))
        assert recv_msg(b, 1.0) == ("status", {"x": [1, 2]})
        with pytest.raises(WorkerGone, match="no answer"):
            recv_msg(b, 0.05)
        a.sendall(b"\x00\x00\x00\x10abc")  # a message cut short by the sender's death
        a.close()
        with pytest.raises(WorkerGone, match="closed"):
            recv_msg(b, 1.0)
