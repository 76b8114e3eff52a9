"""The compiled core (setup.py, mypyc) and the switch back to its source (``RSOCKD_PURE``).

``scripts/test`` runs the unit tests twice: on the compiled core, then with ``RSOCKD_PURE=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

import rsockd
from rsockd.core import endpoint, faketcp, framing
from rsockd.dataplane import delivery, packetsend, relay

ROOT = Path(__file__).resolve().parents[2]
STAMP = ROOT / "rsockd" / "core" / "_native.stamp"


def _probe(env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter's answer in ``cwd``'s tree: ``compiled() PURE``, on stdout."""
    code = "import rsockd; print(rsockd.compiled(), rsockd.PURE)"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True)


def test_this_run_takes_what_it_asked_for() -> None:
    """Under ``RSOCKD_PURE=1`` nothing compiled is loaded; otherwise a tree built by
    scripts/setup runs its build (a stale one would fall back, and this fails)."""
    if rsockd.PURE:
        assert not rsockd.compiled()
        assert all(m.__file__ and m.__file__.endswith(".py") for m in (endpoint, faketcp, framing, relay))
        assert relay._compiled_io() is None
    elif STAMP.exists():
        assert rsockd.compiled()
        assert relay._compiled_io() is not None or sys.platform != "linux"
        assert not any((m.__file__ or ".py").endswith(".py") for m in (relay, delivery, packetsend))
        assert STAMP.read_text().strip() == rsockd.native_digest()
    else:
        pytest.skip("no compiled build in this tree")


@pytest.mark.skipif(not STAMP.exists(), reason="no compiled build in this tree")
def test_pure_switch_takes_the_source() -> None:
    assert _probe({**os.environ, "RSOCKD_PURE": "1"}).stdout.strip() == "False True"
    assert _probe({**os.environ, "RSOCKD_PURE": "0"}).stdout.strip() == "True False"


@pytest.mark.skipif(not STAMP.exists(), reason="no compiled build in this tree")
@pytest.mark.parametrize("edited", ["core/counters.py", "dataplane/delivery.py", "dataplane/_datapath.c"])
def test_a_stale_build_never_runs(tmp_path: Path, edited: str) -> None:
    """A compiled module edited after the build: the tree runs its source, and says why."""
    shutil.copytree(ROOT / "rsockd", tmp_path / "rsockd", ignore=shutil.ignore_patterns("__pycache__"))
    run = partial(_probe, {k: v for k, v in os.environ.items() if k != "RSOCKD_PURE"}, tmp_path)
    assert run().stdout.strip() == "True False"  # the copy as built
    with open(tmp_path / "rsockd" / edited, "a") as f:
        f.write("# edited\n")
    done = run()
    assert done.stdout.strip() == "False True"
    assert "compiled build is older than its source" in done.stderr


def test_check_says_which_core_runs() -> None:
    from rsockd.cli.check import check_python

    said = [r.what for r in check_python() if r.what.startswith(("core ", "tunnel socket reader"))]
    if sys.platform != "linux":  # the reader reads with recvmmsg: Linux only
        assert len(said) == 1 and said[0].startswith("core ")
    elif rsockd.compiled():
        from rsockd.dataplane import _datapath

        tags = "four at a time (AVX2)" if _datapath.TAGS_AT_ONCE == 4 else "one at a time"
        assert said == ["core compiled (mypyc)", f"tunnel socket reader compiled (C), record tags {tags}"]
    elif rsockd.PURE:
        assert said == ["core interpreted (RSOCKD_PURE or a stale build)",
                        "tunnel socket reader interpreted (RSOCKD_PURE or a stale build)"]
    else:  # a pure build: no C extension either
        assert said[0] == "core interpreted" and said[1].startswith("tunnel socket reader not built")
