"""Fuzz the control protocol's request handling (``ControlServer.handle``).

    .venv/bin/python -m tests.fuzz.fuzz_control -max_total_time=120

Any line gets one answer that encodes to exactly one JSON line with ``version`` and ``ok``; a
failing command becomes an error answer.
"""

from __future__ import annotations

import json
from typing import Any

from tests.fuzz.harness import instrumented, main

with instrumented():
    from rsockd.service.control import PROTOCOL_VERSION, ControlServer, _encode


def _boom() -> dict[str, Any]:
    raise RuntimeError("a bug in a status function")


SERVER = ControlServer("/nonexistent/control.sock", {"status": lambda: {"ok": 1}, "ports": dict, "boom": _boom})


def TestOneInput(data: bytes) -> None:
    resp = SERVER.handle(data)
    assert resp["ok"] in (True, False)
    wire = _encode(resp)
    assert wire.count(b"\n") == 1 and wire.endswith(b"\n")
    back = json.loads(wire)
    assert back["version"] == PROTOCOL_VERSION
    assert isinstance(back["data"], dict) if back["ok"] else isinstance(back["error"], str)


SEEDS = [b'{"version": 1, "command": "status"}', b'{"command": "ports"}', b'{"version": 2}', b"[]",
         b'{"version": 1, "command": "boom"}', b'{"command": {"x": [1, 2]}}', b"\xff\xfe"]

if __name__ == "__main__":
    main(TestOneInput, SEEDS)
