"""The control socket: versioned, newline-delimited JSON over a unix stream socket.

Request:  ``{"version": 1, "command": "status" | "ports"}``
Response: ``{"version": 1, "ok": true, "data": {...}}`` or ``{"version": 1, "ok": false, "error": "..."}``

One request per line; a client may send several on one connection.  docs/control.md documents
the payloads.  The daemon side is ``ControlServer``; ``request()`` is the client side.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

LOG = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_REQUEST = 4096

Handler = Callable[[], dict[str, Any]]


class ControlServer:
    """Serves ``commands`` (name -> function returning the data) on a unix socket."""

    def __init__(self, path: str, commands: dict[str, Handler], mode: int = 0o660) -> None:
        self.path = path
        self.commands = commands
        self.mode = mode
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        d = os.path.dirname(self.path)
        os.makedirs(d, mode=0o750, exist_ok=True)
        if os.path.exists(self.path):
            # A live daemon of the same instance would answer; a dead one left its socket.
            if _alive(self.path):
                from ..errors import RsockdError

                raise RsockdError(f"{self.path}: another rsockd of this instance is running")
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._client, path=self.path, limit=MAX_REQUEST)
        os.chmod(self.path, self.mode)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(_encode({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}))
                    break
                if not line:
                    break
                writer.write(_encode(self.handle(line)))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "request is not a JSON object"}
        if req.get("version", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            return {"ok": False, "error": f"unsupported version {req.get('version')!r} (speak {PROTOCOL_VERSION})"}
        fn = self.commands.get(str(req.get("command")))
        if fn is None:
            return {"ok": False, "error": f"unknown command {req.get('command')!r}; known: {', '.join(self.commands)}"}
        try:
            return {"ok": True, "data": fn()}
        except Exception as e:  # a bug in a status function must not kill the daemon
            LOG.exception("control command %s failed", req.get("command"))
            return {"ok": False, "error": f"internal error: {e}"}

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _encode(resp: dict[str, Any]) -> bytes:
    return (json.dumps({"version": PROTOCOL_VERSION, **resp}, separators=(",", ":")) + "\n").encode()


def _alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def request(path: str, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one request and return the parsed response (raises OSError when unreachable)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall((json.dumps({"version": PROTOCOL_VERSION, "command": command}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    resp: dict[str, Any] = json.loads(buf)
    return resp
