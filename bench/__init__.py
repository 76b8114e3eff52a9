"""The benchmark harness (``bench/run``) and its traffic tools; see docs/bench.md."""
