"""The compiled data path: reader and writer (rsockd/dataplane/_datapath.c)."""

from collections.abc import Callable
from typing import Any

HostPort = tuple[bytes, int]

TAGS_AT_ONCE: int

class Reader:
    tags_ahead: int
    rx_batches: int
    rx_batched: int
    def __init__(self) -> None: ...
    def drain(self, fd: int, family: int, port: int, endpoint: Any, now: float, pktinfo: bool,
              fallback: bytes | None, batch: int, budget: int,
              sink: Callable[[Any, int], tuple[Any, int, Any] | None] | None,
              gso: bool) -> tuple[HostPort | None, HostPort, bytes] | None: ...
    def take_errors(self) -> tuple[list[tuple[int, int]], bool]: ...

class Writer:
    tx_batches: int
    tx_batched: int
    def __init__(self) -> None: ...
    def fill(self, fd: int, endpoint: Any, now: float, key: Any, batch: int, budget: int,
             wire: Callable[[Any, float], tuple[Any, ...] | None] | None = None) -> tuple[Any, bytes] | None: ...
    def take_errors(self) -> list[tuple[int, int]]: ...

def tag(key: bytes, person: bytes, context: bytes, data: bytes) -> bytes: ...
def tags(key: bytes, person: bytes, context: bytes, counters: list[bytes], frames: list[bytes]) -> list[bytes]: ...
def send_raw(fd: int, dst: bytes, iphdr: bytes, ident: int, step: int, header: bytes, payloads: list[bytes],
             psum: int, pktinfo: bytes) -> list[tuple[int, int]]: ...
