"""Fuzz configuration loading: TOML file content and command lines.

    .venv/bin/python -m tests.fuzz.fuzz_config -max_total_time=300

The first byte chooses: even, the rest is a config file's bytes (loaded with ``-f``, beside a role
and target on the command line or not); odd, the rest is a command line (NUL-separated arguments,
``-f``/``--config`` removed: no file names from the fuzzer).  The outcome is a ``Config`` or a
one-line ``ConfigError`` naming its source; only ``--help``/``--version`` exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from tests.fuzz.harness import instrumented, main

with instrumented():
    from rsockd.errors import ConfigError
    from rsockd.service import config

config.DEFAULT_CONFIG_PATH = "/nonexistent/rsockd/rsockd.toml"  # never the machine's own file
FILE = os.path.join(tempfile.mkdtemp(prefix="rsockd-fuzz-"), "fuzz.toml")
atexit.register(shutil.rmtree, os.path.dirname(FILE), True)  # the host as it was
BASES: tuple[list[str], ...] = (["--role=server", "-t", "127.0.0.1:9"], ["--role", "client", "-t", "192.0.2.1"], [])


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    base = BASES[data[0] // 2 % len(BASES)]
    if data[0] % 2 == 0:
        with open(FILE, "wb") as f:
            f.write(data[1:])
        argv, source = [*base, "-f", FILE], FILE
    else:
        extra = data[1:].decode("utf-8", "replace").split("\0")
        extra = [a for a in extra if not a.startswith(("-f", "--config", "--con", "--co"))]
        argv, source = [*base, *extra], "command line"
    try:
        config.load(argv, environ={})
    except ConfigError as err:
        message = str(err)
        assert err.exit_code == 2 and len(message.splitlines()) == 1, message
        assert message.startswith((f"{source}: ", "command line: ")), message
    except SystemExit as done:  # only --help, --version, or -h (alone or first in a cluster of short flags)
        assert done.code in (0, None) and any(a.split("=")[0] in ("--help", "--version") or
                                              (a.startswith("-h") and not a.startswith("--")) for a in argv)


SEEDS = [
    b'\x00role = "server"\ntarget = "127.0.0.1:9"\nports = "10001-10004"\nkey = "k"\n',
    b'\x04keepalive = 1979-05-27\n[table]\nx = 1\n',
    b"\x01--ports\x0010001-10004\x00--backend=xdp\x00--mtu\x001400",
    b"\x05--role\x00server\x00--taddr=[::1]:9\x00-d\x00eth0,eth1",
]

if __name__ == "__main__":
    main(TestOneInput, SEEDS)
