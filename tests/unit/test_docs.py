"""The man pages render cleanly and cover every setting; the control schema is a valid schema; the
datagram path in docs/design.md names functions that exist."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest

from rsockd.service.config import _KEY_TABLE, KEYS

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = sorted((DOCS / "man").glob("*.[0-9]"))


def test_the_three_pages_exist() -> None:
    assert [p.name for p in PAGES] == ["rsockctl.8", "rsockd.8", "rsockd.toml.5"]


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_pages_render_without_warnings(page: Path) -> None:
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True,
                       env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stderr == ""


def test_every_key_and_flag_is_in_rsockd_toml_5() -> None:
    text = (DOCS / "man" / "rsockd.toml.5").read_text()
    for key in KEYS:
        assert f"\n.B {key}\n" in text, key
    for k in _KEY_TABLE:
        for alias in k.aliases:
            assert alias.replace("-", "\\-") in text, alias


def test_control_schema_is_a_valid_schema() -> None:
    schema = json.loads((DOCS / "control.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)


def _defined(path: Path) -> set[str]:
    """``name`` and ``Class.method`` for every top-level definition of a module."""
    import ast

    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{m.name}" for m in node.body
                         if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef))
    return names


def test_the_datagram_path_in_design_md_matches_the_code() -> None:
    """Every step of "A datagram's path" names functions that exist: ``file:Class.method``, and the
    ``Class.method`` names after it in the same step (they are in the file named last)."""
    import re

    root = DOCS.parent
    text = (DOCS / "design.md").read_text()
    steps = [line for line in text.splitlines() if re.match(r"\d+\. ", line) and "rsockd/" in line]
    assert len(steps) >= 12, "the two path lists are gone from design.md"
    checked, missing = 0, []
    for step in steps:
        current: Path | None = None
        for m in re.finditer(r"`(?:(rsockd/[\w/]+\.py):)?([A-Za-z_][\w]*(?:\.[\w]+)?)`", step):
            file, name = m.group(1), m.group(2)
            if file:
                current = root / file
                assert current.exists(), (step, file)
            elif "." not in name or current is None:
                continue  # a plain word, or a name before any file
            if name not in _defined(current):
                missing.append(f"{current.relative_to(root)}: no {name} ({step[:50]}...)")
            checked += 1
    assert not missing, "\n".join(missing)
    assert checked >= 30
