"""Benchmark suites (installed as r1fast.bench). `r1fast bench --help` runs them; see bench/README.md."""
