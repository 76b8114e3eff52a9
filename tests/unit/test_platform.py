"""``rsockd.dataplane.platform`` picks each implementation by ``sys.platform``, and the macOS
choice imports on Linux (its modules make no macOS call until used)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from rsockd.dataplane import netcommon, netinfo, netinfo_darwin, platform, rawsock, rawsock_darwin


def _load_platform_as(monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    """A fresh copy of ``platform.py`` executed with ``sys.platform`` set to ``name``."""
    monkeypatch.setattr(sys, "platform", name)
    spec = importlib.util.find_spec("rsockd.dataplane.platform")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("name", "net", "raw"),
                         [("linux", netinfo, rawsock), ("darwin", netinfo_darwin, rawsock_darwin)])
def test_each_platform_gets_its_implementation(monkeypatch: pytest.MonkeyPatch, name: str, net: ModuleType,
                                               raw: ModuleType) -> None:
    mod = _load_platform_as(monkeypatch, name)
    assert mod.DARWIN is (name == "darwin")
    assert mod.UDP_GSO is (name == "linux")
    for fn in ("route_to", "interface_mtu", "interface_addresses", "interface_of", "default_interfaces"):
        assert getattr(mod, fn) is getattr(net, fn), fn
    assert mod.RawSender is raw.RawSender
    assert mod.Sender is rawsock.Sender
    # One Route record and one resolver whichever platform: both implementations return it.
    assert mod.Route is netcommon.Route is netinfo_darwin.Route
    assert mod.resolve is netcommon.resolve and mod.interface_exists is netcommon.interface_exists


def test_exports_are_what_all_says() -> None:
    assert sorted(platform.__all__) == sorted(n for n in vars(platform) if not n.startswith("_")
                                              and n not in {"annotations", "sys"})
