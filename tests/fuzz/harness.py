"""The shared runner of the fuzz harnesses: atheris (libFuzzer) when installed, else a random loop.

Each harness (``fuzz_*.py`` beside this file) defines ``TestOneInput(data: bytes)`` and a few seed
inputs, imports the code under test inside ``instrumented()`` (so atheris sees its branches) and
ends with ``main(TestOneInput, SEEDS)``.  With atheris the command line is libFuzzer's
(``-max_total_time=60``, ``-runs=N``, a corpus directory, a crash file to replay).  Without it the
same flags work on a plain loop: seeds first, then random bytes and random mutations of the seeds;
a failing input is written to ``crash-<sha1>`` in the current directory and the exception shown.
See README.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

atheris: Any = None
if not os.environ.get("RSOCKD_FUZZ_NO_ATHERIS"):
    try:
        atheris = importlib.import_module("atheris")
    except ImportError:  # the harnesses still run, as a random-input loop
        pass

TestOneInput = Callable[[bytes], None]



def instrumented() -> contextlib.AbstractContextManager[None]:
    """Import the code under test inside this: atheris instruments it for coverage feedback."""
    if atheris is None:
        return contextlib.nullcontext()
    cm: contextlib.AbstractContextManager[None] = atheris.instrument_imports()
    return cm


def _flags(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    flags, paths = {}, []
    for a in argv:
        if a.startswith("-") and "=" in a:
            k, v = a.lstrip("-").split("=", 1)
            flags[k] = v
        elif not a.startswith("-"):
            paths.append(a)
    return flags, paths


def mutate(rng: random.Random, data: bytes, max_len: int) -> bytes:
    """A libFuzzer-like mutation: flip, insert, delete, duplicate, splice in interesting bytes."""
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i:i] = rng.randbytes(rng.randrange(1, 8))
        elif op == 2 and b:
            del b[i : i + rng.randrange(1, 8)]
        elif op == 3 and b:
            j = rng.randrange(len(b))
            b[i:i] = b[j : j + rng.randrange(1, 16)]
        elif op == 4 and b:
            b[min(i, len(b) - 1)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 5 and len(b) >= 2:
            k = rng.randrange(len(b) - 1)
            b[k : k + 2] = rng.choice((b"\x00\x00", b"\xff\xff", b"\x7f\xff", b"\x80\x00"))
    return bytes(b[:max_len])


def random_loop(test: TestOneInput, seeds: Sequence[bytes], argv: Sequence[str]) -> int:
    """What ``main`` does without atheris: replay files if given, else seeds + random inputs."""
    flags, paths = _flags(argv)
    if paths and all(os.path.isfile(p) for p in paths):
        for p in paths:
            with open(p, "rb") as f:
                test(f.read())
            print(f"{p}: ok")
        return 0
    corpus = list(seeds)
    for d in paths:  # a corpus directory (as libFuzzer takes one): its files are seeds too
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                corpus.append(f.read())
    runs = int(flags.get("runs", "100000"))
    deadline = time.monotonic() + float(flags.get("max_total_time", "0") or "inf") if flags.get(
        "max_total_time") else float("inf")
    max_len = int(flags.get("max_len", "4096"))
    rng = random.Random(int(flags.get("seed", "1")))
    done = 0
    t0 = time.monotonic()
    for n in range(runs):
        if time.monotonic() > deadline:
            break
        if n < len(corpus):
            data = corpus[n]
        elif corpus and rng.random() < 0.7:
            data = mutate(rng, rng.choice(corpus), max_len)
        else:
            data = rng.randbytes(rng.randrange(0, min(max_len, 512)))
        try:
            test(data)
        except Exception:
            name = "crash-" + hashlib.sha1(data).hexdigest()
            with open(name, "wb") as f:
                f.write(data)
            traceback.print_exc()
            print(f"failing input after {n} runs written to {name}", file=sys.stderr)
            return 1
        done += 1
    print(f"random loop (atheris not installed): {done} inputs in {time.monotonic() - t0:.1f} s, no failure")
    return 0


def main(test: TestOneInput, seeds: Sequence[bytes] = (), argv: Sequence[str] | None = None) -> None:
    """Fuzz ``test``: atheris with libFuzzer's command line, else ``random_loop``."""
    logging.disable(logging.CRITICAL)  # peer garbage is logged (rate-limited); a fuzzer wants none of it
    args = list(sys.argv if argv is None else argv)
    if atheris is None:
        sys.exit(random_loop(test, seeds, args[1:]))
    corpus = [a for a in args[1:] if not a.startswith("-")]
    if not corpus and seeds:  # start from the seeds: a directory libFuzzer reads and extends
        d = os.environ.get("RSOCKD_FUZZ_CORPUS") or f"corpus-{os.path.basename(args[0]).removesuffix('.py')}"
        os.makedirs(d, exist_ok=True)
        for s in seeds:
            with open(os.path.join(d, hashlib.sha1(s).hexdigest()), "wb") as f:
                f.write(s)
        args.append(d)
    atheris.Setup(args, test)
    atheris.Fuzz()
