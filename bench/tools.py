"""The harness's handle on a ``bench.traffic`` process (generator or sink) in a namespace."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from tests.netns import NetnsPair

REPO = Path(__file__).resolve().parents[1]


class ToolError(RuntimeError):
    pass


class Tool:
    """One long-lived ``python -m bench.traffic …`` process, spoken to in JSON lines.

    It runs in its own session, so a Ctrl-C at the terminal reaches only the harness, which then
    ends it in order; it also exits by itself when the harness dies (its stdin closes).
    """

    def __init__(self, net: NetnsPair, side: str, args: list[str], log: Path) -> None:
        self.name = args[0]
        self._log: IO[bytes] = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(net.argv(side, [sys.executable, "-m", "bench.traffic", *args]), cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True)
        self._buf = b""
        self.logpath = log
        hello = self.read(30)
        self.pid = int(hello["pid"])  # `ip netns exec` execs: the same pid as self.proc

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ToolError(f"{self.name} exited: {self._tail()}") from None

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line, within ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise ToolError(f"{self.name}: no answer within {timeout:.0f} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise ToolError(f"{self.name} exited (rc={self.proc.poll()}): {self._tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        if "error" in out:
            raise ToolError(f"{self.name}: {out['error']}")
        return out

    def call(self, cmd: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        self.send(cmd)
        return self.read(timeout)

    def _tail(self) -> str:
        try:
            return self.logpath.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.proc.wait(3)
            except (ToolError, subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self._log.close()


def stop(p: subprocess.Popen[Any], timeout: float = 5) -> None:
    """Terminate a child we started (by its own Popen) and reap it; killed if it will not go."""
    if p.poll() is None:
        p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
