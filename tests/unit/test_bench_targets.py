"""The benchmark's verdict on each target reads as what was measured."""

from __future__ import annotations

from bench import report


def test_a_ratio_just_under_its_goal_reads_under_it() -> None:
    data = {"ratios": {"xdp": {"1200": 0.3171, "64": 0.5}}, "rsockd": {"xdp": {}}}
    targets = {t["key"]: t for t in report.evaluate_targets(data)}
    under, at = targets["rate_1200_xdp"], targets["rate_64_xdp"]
    assert (under["status"], report._measured(under)) == ("not met", "0.317x")
    assert (at["status"], report._measured(at)) == ("met", "0.500x")
