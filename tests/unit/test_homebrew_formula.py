"""The Homebrew formula (packaging/homebrew/rsockd.rb): Ruby syntax, and its resources and
dependencies against pyproject.toml.  brew itself (install, test do) needs macOS."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
FORMULA = ROOT / "packaging" / "homebrew" / "rsockd.rb"


def formula() -> str:
    return FORMULA.read_text()


def project() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)["project"]
    assert isinstance(data, dict)
    return data


def formula_python() -> str:
    """The x.y of the formula's depends_on "python@x.y"."""
    found = re.findall(r'^\s*depends_on "python@(\d+\.\d+)"\s*$', formula(), re.M)
    assert len(found) == 1, "one depends_on \"python@x.y\""
    return found[0]


def macos_environment() -> dict[str, str]:
    py = formula_python()
    return {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix",
            "python_version": py, "python_full_version": f"{py}.0", "implementation_name": "cpython"}


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby is not installed (scripts/setup installs it)")
def test_formula_is_valid_ruby() -> None:
    proc = subprocess.run(["ruby", "-c", str(FORMULA)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Syntax OK"


def test_formula_python_satisfies_requires_python() -> None:
    assert formula_python() + ".0" in SpecifierSet(str(project()["requires-python"]))


def test_resources_are_exactly_the_non_linux_dependencies() -> None:
    """A resource per dependency pyproject asks for on macOS with the formula's Python, no more."""
    deps = project()["dependencies"]
    assert isinstance(deps, list)
    env = macos_environment()
    needed = {canonicalize_name(r.name) for r in map(Requirement, deps)
              if r.marker is None or Marker(str(r.marker)).evaluate(env)}
    resources = {canonicalize_name(n) for n in re.findall(r'^\s*resource "([^"]+)" do', formula(), re.M)}
    assert resources == needed
    # Linux-only dependencies must not be there (pyroute2, sdnotify).
    linux_only = {canonicalize_name(r.name) for r in map(Requirement, deps)
                  if r.marker is not None and "linux" in str(r.marker)}
    assert linux_only and not linux_only & resources


def test_formula_release_matches_pyproject_version() -> None:
    version = str(project()["version"])
    url = re.search(r'^\s*url "([^"]+)"', formula(), re.M)
    assert url and url[1].endswith(f"/v{version}/rsockd-{version}.tar.gz")
    assert re.search(r'^\s*sha256 "[0-9a-f]{64}"$', formula(), re.M)
    assert re.search(r'^\s*license "MIT"$', formula(), re.M)


def test_formula_service_and_install() -> None:
    text = formula()
    assert "include Language::Python::Virtualenv" in text
    assert re.search(r"^\s*virtualenv_install_with_resources$", text, re.M)
    service = text.split("service do", 1)[1].split("\n  end", 1)[0]
    for line in ('run [opt_bin/"rsockd", "--config", etc/"rsockd/rsockd.toml"]', "require_root true",
                 "keep_alive true", 'log_path var/"log/rsockd.log"', 'error_log_path var/"log/rsockd.log"'):
        assert line in service
    # The example config is installed, and copied to etc only when absent.
    assert "packaging/rsockd.toml.example" in text
    assert "return if config.exist?" in text
    # On macOS post_install rewrites the example's runtime_dir line: it must be there, verbatim.
    line = re.search(r"MACOS_RUNTIME_DIR = \['([^']+)'", text)
    assert line and line[1] in (ROOT / "packaging" / "rsockd.toml.example").read_text()


def test_formula_test_block_is_real() -> None:
    test = formula().split("test do", 1)[1]
    assert "rsockctl verify-checksum" in test and "checksum-samples.txt" in test
    assert "must run as root" in test
