"""One module per suite; each registers its cases with r1fast.bench.harness.suite."""
