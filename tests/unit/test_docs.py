"""The man pages render cleanly and cover every setting; the control schema is a valid schema."""

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
