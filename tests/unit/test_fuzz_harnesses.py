"""The atheris harnesses of tests/fuzz stay runnable: each takes its seeds and a few hundred random
inputs through the plain-Python loop (no atheris needed; the long runs are tests/fuzz/README.md's)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from rsockd.service import config

HARNESSES = ["fuzz_packet", "fuzz_framing", "fuzz_control", "fuzz_config", "fuzz_receive"]


@pytest.fixture
def no_atheris(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("RSOCKD_FUZZ_NO_ATHERIS", "1")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", config.DEFAULT_CONFIG_PATH)  # fuzz_config changes it
    yield


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_runs_its_seeds_and_random_inputs(no_atheris: None, name: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a failing input would be written here
    harness = importlib.import_module("tests.fuzz.harness")
    mod = importlib.import_module(f"tests.fuzz.{name}")
    assert harness.random_loop(mod.TestOneInput, mod.SEEDS, ["-runs=400", "-seed=7"]) == 0
