"""Fuzzing the control protocol (docs/control.md) from both ends, and rsockctl's file inputs.

The daemon side: any line -- bytes, text, any JSON -- gets one JSON answer with ``ok`` and never
an exception; a stream of arbitrary chunks (long lines, no newlines, many requests at once) gets
one answer per request and leaves the server serving.  The client side: whatever a process at the
socket path answers, ``rsockctl`` fails with one typed error (``RsockdError``: one line, an exit
code), never a traceback.  ``verify-checksum``'s ADDRS/DATA readers only raise ``InputError``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rsockd.cli import ctl
from rsockd.errors import InputError, RsockdError
from rsockd.service.control import MAX_REQUEST, PROTOCOL_VERSION, ControlServer, _encode


def _boom() -> dict[str, Any]:
    raise ValueError("a bug in a status function")


FINAL = "zz-final"  # the harness's own last request: its answer ends an exchange
COMMANDS: dict[str, Callable[[], dict[str, Any]]] = {
    "status": lambda: {"role": "server", "drops": {"malformed": 1}},
    "ports": lambda: {"connections": []},
    "boom": _boom,
    FINAL: lambda: {"final": True},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10)
requests = st.fixed_dictionaries({}, optional={
    "version": st.one_of(st.just(PROTOCOL_VERSION), json_values),
    "command": st.one_of(st.sampled_from(["status", "ports", "boom", "nope", ""]), json_values),
}).flatmap(lambda d: st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(lambda extra: {**extra, **d}))
lines = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    requests.map(lambda r: json.dumps(r).encode()),
)


@settings(max_examples=1000, deadline=None)
@given(lines)
def test_any_line_gets_one_json_answer(line: bytes) -> None:
    server = ControlServer("/nonexistent/control.sock", COMMANDS)
    resp = server.handle(line)
    assert resp["ok"] in (True, False)
    if resp["ok"]:
        assert isinstance(resp["data"], dict)
    else:
        assert isinstance(resp["error"], str) and "\n" not in resp["error"]
    wire = _encode(resp)
    assert wire.endswith(b"\n") and wire.count(b"\n") == 1
    assert json.loads(wire)["version"] == PROTOCOL_VERSION


def test_a_failing_command_is_an_error_answer_not_a_crash() -> None:
    resp = ControlServer("/nonexistent", COMMANDS).handle(b'{"version": 1, "command": "boom"}')
    assert resp == {"ok": False, "error": "internal error: a bug in a status function"}


async def _exchange(path: str, chunks: list[bytes]) -> list[dict[str, Any]]:
    """Send ``chunks`` then one valid request; the answers, until the valid one's (or EOF)."""
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
    answers: list[dict[str, Any]] = []
    try:
        for c in chunks:
            writer.write(c)
        writer.write(b'\n{"version": 1, "command": "%s"}\n' % FINAL.encode())
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), 5)
            if not line:
                break
            answers.append(json.loads(line))
            if answers[-1].get("data") == {"final": True}:
                break
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return answers


async def _serve(chunks: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "rsockd" / "control.sock")
        server = ControlServer(path, COMMANDS)
        await server.start()
        try:
            answers = await _exchange(path, chunks)
            assert all(a["version"] == PROTOCOL_VERSION and a["ok"] in (True, False) for a in answers)
            overlong = any(len(x) > MAX_REQUEST for x in b"".join(chunks).split(b"\n"))
            if not overlong:  # every request line got its answer, the valid one last
                assert len(answers) == b"".join(chunks).count(b"\n") + 2  # + the harness's empty line and request
                assert answers[-1] == {"version": 1, "ok": True, "data": {"final": True}}
            # Whatever that connection did, the server still serves a new one.
            again = await _exchange(path, [])
            assert again[-1]["ok"] is True
        finally:
            await server.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(lines.map(lambda b: b + b"\n"), st.binary(max_size=64),
                          st.integers(MAX_REQUEST - 8, 3 * MAX_REQUEST).map(lambda n: b"x" * n)), max_size=6))
def test_the_socket_answers_every_request_and_keeps_serving(chunks: list[bytes]) -> None:
    asyncio.run(_serve(chunks))


# ---------------------------------------------------------------------------------------------
# rsockctl against whatever answers on the socket


class FakeDaemon:
    """A unix socket server answering each connection with a given byte string, then closing."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.answer = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def fake_daemon() -> Any:
    with tempfile.TemporaryDirectory() as d:
        f = FakeDaemon(str(Path(d) / "control.sock"))
        yield f
        f.close()


answers = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode() + b"\n"),
    st.fixed_dictionaries({}, optional={"version": json_values, "ok": json_values, "data": json_values,
                                        "error": json_values}).map(lambda d: json.dumps(d).encode() + b"\n"),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answers)
@example(b"\x80")  # not UTF-8
@example(b"0\n")  # JSON, not an object
@example(b'{"ok": true}\n')  # no data
@example(b'{"ok": true, "data": null}\n')  # data not an object
@example(b'{"ok": false, "error": "line one\\nline two"}\n')  # a refusal whose reason spans lines
def test_rsockctl_fails_with_one_typed_error_whatever_answers(fake_daemon: FakeDaemon, answer: bytes) -> None:
    fake_daemon.answer = answer
    path = fake_daemon.sock.getsockname()
    try:
        data = ctl.ask(path, "status")
    except RsockdError as e:
        assert "\n" not in str(e) and e.exit_code != 0
    else:
        assert isinstance(data, dict)


def test_rsockctl_reports_a_refusal_and_a_non_json_answer(fake_daemon: FakeDaemon) -> None:
    path = fake_daemon.sock.getsockname()
    for answer, fragment in ((b'{"version": 1, "ok": false, "error": "nope"}\n', "refused 'status': nope"),
                             (b"<html>\n", "not JSON")):
        fake_daemon.answer = answer
        with pytest.raises(RsockdError, match=fragment):
            ctl.ask(path, "status")


# ---------------------------------------------------------------------------------------------
# verify-checksum's inputs


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=120), st.text(max_size=80).map(str.encode),
                 st.lists(st.sampled_from(["1.2.3.4", "::1", "fe80::1%eth0", "10.0.0.1,", "256.1.1.1", "::ffff:1.2.3.4",
                                           "", " ", "\n"]), max_size=4).map(lambda x: " ".join(x).encode())),
       st.binary(max_size=80))
def test_verify_checksum_inputs_give_a_result_or_an_input_error(tmp_path: Path, addrs: bytes, data: bytes) -> None:
    (tmp_path / "tcp_addrs_1.txt").write_bytes(addrs)
    (tmp_path / "tcp_data_1.dat").write_bytes(data)
    try:
        results = list(ctl.verify_pairs(ctl.pairs_in(tmp_path)))
    except InputError as e:
        assert "\n" not in str(e)
    else:
        assert results in ([True], [False])
