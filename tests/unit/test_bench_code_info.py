"""The benchmark names the code it measured: the commit, and the files changed since."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import harness


def test_dirty_paths_are_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A porcelain line starts with two status columns, the first a space for an unstaged change:
    the first path of the list keeps its first letter."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "rsockd").mkdir()
    for name in ("a.py", "b.py"):
        (tmp_path / "rsockd" / name).write_text("x = 1\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    (tmp_path / "rsockd" / "a.py").write_text("x = 2\n")  # " M": unstaged
    (tmp_path / "rsockd" / "b.py").write_text("x = 3\n")
    subprocess.run([*git, "add", "rsockd/b.py"], check=True)  # "M ": staged
    monkeypatch.setattr(harness, "REPO", tmp_path)
    info = harness.code_info()
    assert info["dirty"] == ["rsockd/a.py", "rsockd/b.py"]
    assert info["commit"] and info["core"] in ("compiled", "interpreted")


def test_report_says_when_the_daemons_ran_another_build() -> None:
    """A source edited during a run leaves a stale build, which the daemons started after the
    edit run interpreted: the report says so beside that backend, and only there."""
    from bench.report import _build_note

    data = {"code": {"core": "compiled", "reader": "compiled"}}
    same = {"build": {"server": {"core": "compiled", "reader": "compiled"},
                      "client": {"core": "compiled", "reader": "compiled"}}}
    stale = {"build": {"server": {"core": "interpreted", "reader": "python"},
                       "client": {"core": "compiled", "reader": "compiled"}}}
    assert _build_note(data, same) == ""
    more = {"build": {side: {"core": "compiled", "reader": "compiled", "tags_at_once": 4} for side in same["build"]}}
    assert _build_note(data, more) == ""  # what the header does not compare is not a difference
    assert _build_note(data, {}) == ""  # a JSON of an older rsockd: nothing reported
    assert _build_note(data, stale) == "; WARNING: the daemons ran core interpreted, reader python"
