"""Fuzzing configuration loading as a whole: any file content, any command line.

test_config.py already tries any *value* for each key; here the whole input is arbitrary: file
bytes (not UTF-8, a BOM, NULs), TOML of every kind (dates, tables, inline tables, arrays of
tables, huge numbers, unknown and misspelt keys) and command lines of any flags in any order and
form.  The outcome is always a ``Config`` or a one-line ``ConfigError`` (exit code 2) naming its
source -- ``--help`` and ``--version`` exit 0 -- and never any other exception.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rsockd.errors import ConfigError
from rsockd.service.config import KEYS, Config, load

from .test_config import _no_system_config  # noqa: F401 - its autouse fixture: never the machine's own file

ROLE_LINES = ['role = "server"\ntarget = "127.0.0.1:9"\n', 'role = "client"\nserver = "192.0.2.1"\n', ""]


def _outcome(argv: list[str], source: str) -> None:
    try:
        c = load(argv, environ={})
    except ConfigError as err:
        message = str(err)
        assert err.exit_code == 2
        assert len(message.splitlines()) == 1 and message == message.strip(), message
        assert message.startswith(f"{source}: ") or message.startswith("command line: "), message
    except SystemExit as done:  # only --help, --version, or -h (alone or first in a cluster of short flags)
        assert done.code in (0, None) and any(a.split("=")[0] in ("--help", "--version") or
                                              (a.startswith("-h") and not a.startswith("--")) for a in argv)
    else:
        assert isinstance(c, Config) and c.role in ("server", "client")


def _toml_string(s: str) -> str:
    return json.dumps(s)  # a JSON string is a TOML basic string (escapes included)


scalars = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(lambda f: "nan" if f != f else ("inf" if f == float("inf") else "-inf" if f == -float("inf")
                                                    else repr(f))),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.text(max_size=30).map(_toml_string),
    st.text(alphabet="abc\\'\n", max_size=10).map(lambda s: "'''" + s.replace("'''", "") + "'''"),
    st.sampled_from(["1979-05-27T07:32:00Z", "1979-05-27", "07:32:00", "0x7fff", "0o17", "0b11", "1_000",
                     '"10001-10010"', '"::1"', '"[::1]:30000"', '"eth0"', "+inf", "-0.0", "1e400"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
    st.dictionaries(st.sampled_from(["a", "b", "role"]), inner, max_size=2).map(
        lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}")), max_leaves=5)
names = st.one_of(st.sampled_from(KEYS), st.sampled_from(["Role", "target-port", "hash", "lcapIp", "ports ", "keys"]),
                  st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,12}", fullmatch=True))
toml_lines = st.one_of(
    st.tuples(names, values).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.sampled_from(["[server]", "[[ports]]", "# a comment", "", "role = ", "= 1", "dev.name = 'eth0'",
                     'key = "a"\nkey = "b"']),
)
files = st.one_of(
    st.tuples(st.sampled_from(ROLE_LINES), st.lists(toml_lines, max_size=6)).map(
        lambda t: (t[0] + "\n".join(t[1]) + "\n").encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda s: ("\ufeff" + s).encode()),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(files)
@example(b'role = "server"\ntarget = "127.0.0.1:9"\nkeepalive = 1979-05-27T07:32:00Z\n')
@example(b'role = "server"\ntarget = "127.0.0.1:9"\nports = [{a = 1}]\n')
@example(b'role = "client"\nserver = "192.0.2.1"\n[listen]\nhost = "x"\n')
@example(b"\xff\xfe\x00r")
def test_any_file_gives_a_config_or_one_line_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(content)
    _outcome(["-f", str(path)], str(path))


flag_names = st.one_of(
    st.sampled_from(sorted({"--" + k.replace("_", "-") for k in KEYS} | {
        "-d", "-t", "-l", "-p", "-f", "--taddr", "--ludp", "--hash", "--lcapIp", "--config", "--check", "--version",
        "--help", "-h", "--", "-", "--ro", "--role="})),
    st.from_regex(r"--?[a-zA-Z-]{1,12}", fullmatch=True),
)
flag_values = st.one_of(st.text(max_size=20), st.sampled_from(
    ["server", "client", "127.0.0.1:9", "192.0.2.1", "10001-10004", "0", "-1", "1e9", "nan", "inf", "::1",
     "[::1]:0", "eth0", "xdp", "nft", "auto", "udp", "all", "0x72736b64", ""]))
args = st.lists(st.one_of(
    st.tuples(flag_names, flag_values).map(lambda t: [t[0], t[1]]),
    st.tuples(flag_names, flag_values).map(lambda t: [f"{t[0]}={t[1]}"]),
    flag_names.map(lambda f: [f]),
    flag_values.map(lambda v: [v]),
), max_size=8).map(lambda parts: [a for p in parts for a in p])


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([["--role=server", "-t", "127.0.0.1:9"], ["--role", "client", "-t", "192.0.2.1"], []]), args)
@example([], ["--ports", "10001-10004", "--role", "server", "-t", "127.0.0.1:9", "--ports=9-1"])
@example(["--role=server", "-t", "127.0.0.1:9"], ["-t", "127.0.0.1:10"])
def test_any_command_line_gives_a_config_or_one_line_error(base: list[str], extra: list[str]) -> None:
    extra = [a for a in extra if not a.startswith(("-f", "--config"))]  # no file names from the fuzzer
    _outcome([*base, *extra], "command line")
