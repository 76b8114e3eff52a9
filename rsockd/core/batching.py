"""Runs for segmentation offload: one splitter for both directions.

A run is a slice of items that the kernel can cut into separate packets from one send: every
item as long as the first, except that the last may be shorter (UDP GSO towards the
application, TCP GSO on the packet send path).  A run holds at most ``max_count`` items and its
items with ``overhead`` each stay within ``max_bytes`` (an IP packet's 64 KiB).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

GSO_MAX_BYTES = 65000  # under the 64 KiB an IP datagram can carry


def runs(sizes: Sequence[int], max_count: int, max_bytes: int = GSO_MAX_BYTES,
         overhead: int = 0) -> Iterator[tuple[int, int]]:
    """Split ``sizes`` into runs ``[i, j)``, in order.  Items of size 0 stand alone."""
    i, n = 0, len(sizes)
    while i < n:
        size = sizes[i]
        if size == 0:
            yield i, i + 1
            i += 1
            continue
        fit = min(max_count, max(1, max_bytes // (size + overhead)))
        j = i + 1
        while j < n and j - i < fit and sizes[j] == size:
            j += 1
        if j < n and j - i < fit and 0 < sizes[j] < size:
            j += 1  # a shorter item may end a run
        yield i, j
        i = j
