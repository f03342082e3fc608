import csv
import math

import pytest
import torch

from r1fast.bench import harness
from r1fast.cli import main as cli_main


def test_kv_cache_suite_rows_follow_the_schema(tmp_path):
    rows = harness.main(["kv_cache"], size="smoke", out_dir=str(tmp_path), budget_s=0.0, min_reps=2, log=lambda *_: None)
    providers = {r["provider"] for r in rows}
    assert {"r1fast", "torch"} <= providers
    for r in rows:
        assert set(harness.COLUMNS) <= set(r)
    times = [r for r in rows if r["metric"] == "time_ms"]
    assert all(r["p50"] > 0 and r["p20"] <= r["p50"] <= r["p80"] for r in times)
    # The floor is bytes / measured bandwidth: positive and finite for a copy.
    assert all(math.isfinite(r["floor"]) and r["floor"] > 0 for r in times)
    (csv_path,) = tmp_path.glob("*.csv")
    with open(csv_path) as f:
        assert list(csv.DictReader(f))[0].keys() == set(harness.COLUMNS)
    assert "r1fast_speedup" in harness.format_table(rows)
    png = harness.plot([csv_path], tmp_path / "plot.png")
    assert png.stat().st_size > 1000


def test_unknown_suite_and_size_are_clear_errors():
    with pytest.raises(ValueError, match="unknown suite"):
        harness.main(["no_such_suite"], log=lambda *_: None)
    with pytest.raises(ValueError, match="--size must be"):
        harness.main(["kv_cache"], size="huge", log=lambda *_: None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            harness.main(["kv_cache"], size="gpu", log=lambda *_: None)


def test_floor_takes_the_larger_of_compute_and_bandwidth():
    m = harness.Machine(torch.device("cpu"), "smoke")
    m._rates["float32"], m._bandwidth = 1e12, 1e11
    case = harness.Case("c", "fwd", "float32", [], flops=2e9, bytes=1e9)
    assert m.floor_ms(case) == pytest.approx(max(2e9 / 1e12, 1e9 / 1e11) * 1e3)


def test_info_and_bench_list_commands(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "r1fast._C:" in out and "transformer_engine" in out
    assert cli_main(["bench", "--list"]) == 0
    assert "kv_cache" in capsys.readouterr().out


def test_every_suite_runs_at_smoke_size(tmp_path):
    # Keeps the suites from rotting: each must time r1fast and at least one peer on this machine.
    log = []
    suites = list(harness.load_suites())
    rows = harness.main(suites, size="smoke", out_dir=str(tmp_path), budget_s=0.0, min_reps=1, log=log.append)
    assert not [line for line in log if "FAILED" in line], log
    for name in suites:
        providers = {r["provider"] for r in rows if r["suite"] == name and r["metric"] == "time_ms"}
        assert "r1fast" in providers, (name, providers)
        assert len(providers) >= 2, (name, providers)


def test_gpu_check_script_parses_and_names_existing_tests():
    """bench/gpu_check.sh runs in a scarce GPU window: a syntax error or a renamed test file would
    waste it, so both are caught here on the CPU."""
    import pathlib
    import re
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    script = root / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    named = re.findall(r"tests/test_\w+\.py", script.read_text())
    assert named, "gpu_check.sh names no test file"
    missing = [n for n in named if not (root / n).is_file()]
    assert not missing, f"gpu_check.sh names missing test files: {missing}"
    # every file with GPU-marked tests runs there
    marker = "@pytest.mark." + "gpu"  # split so this file does not count itself
    gpu_files = {p.relative_to(root).as_posix() for p in (root / "tests").glob("test_*.py") if marker in p.read_text()}
    assert gpu_files <= set(named), f"GPU tests not run by gpu_check.sh: {sorted(gpu_files - set(named))}"


def test_table_compares_peers_with_the_fastest_r1fast_backend():
    def row(provider, backend, ms):
        return dict(suite="s", case="c", mode="fwd", dtype="bf16", provider=provider, backend=backend,
                    metric="time_ms", p50=ms, pct_of_floor=50.0)
    table = harness.format_table([row("r1fast", "triton", 2.0), row("r1fast", "torch", 8.0),
                                  row("torch", "eager", 6.0)])
    peer = next(line for line in table.splitlines() if line.startswith("s ") and " eager " in line)
    assert peer.rstrip().endswith("3.00x")  # 6 ms / r1fast's best 2 ms, not / its torch backend's 8 ms


def test_with_env_sets_the_variable_for_each_call_only(monkeypatch):
    import os

    monkeypatch.delenv("R1FAST_LOGITS_GEMM", raising=False)
    run = harness.with_env(lambda: (lambda: os.environ.get("R1FAST_LOGITS_GEMM")), R1FAST_LOGITS_GEMM="cublas")()
    assert run() == "cublas" and "R1FAST_LOGITS_GEMM" not in os.environ


def test_timer_warmup_zero_times_the_first_call_and_impl_overrides_the_case(tmp_path):
    calls = []
    timer = harness.Timer(torch.device("cpu"), warmup=3, min_reps=5, budget_s=0.0)
    t = timer(lambda: calls.append(1), warmup=0, reps=1)
    assert len(calls) == 1 and t.reps == 1  # one call, and it is the timed one
    calls.clear()
    timer(lambda: calls.append(1), warmup=2, reps=2)
    assert len(calls) == 4  # two warm-up calls, two timed

    counted = []

    def setup():
        return lambda: counted.append(1)
    case = harness.Case("c", "fwd", "float32", [harness.Impl("r1fast", "torch", setup),
                                                harness.Impl("peer", "slow", setup, warmup=0, reps=1)],
                        warmup=2, reps=3)
    s = harness.Suite("t", lambda size, device: [case])
    harness.run_suite(s, "smoke", torch.device("cpu"), harness.Machine(torch.device("cpu"), "smoke"), timer,
                      log=lambda *_: None)
    assert len(counted) == (2 + 3) + 1


def test_a_failing_impl_is_reported_and_the_others_still_run():
    def broken():
        raise RuntimeError("no such kernel here")
    log = []
    case = harness.Case("c", "fwd", "float32", [harness.Impl("r1fast", "x", broken),
                                                harness.Impl("peer", "y", lambda: (lambda: None))])
    s = harness.Suite("t", lambda size, device: [case])
    timer = harness.Timer(torch.device("cpu"), min_reps=1, budget_s=0.0)
    rows = harness.run_suite(s, "smoke", torch.device("cpu"), harness.Machine(torch.device("cpu"), "smoke"), timer,
                             log=log.append)
    assert any("FAILED t/c r1fast/x: RuntimeError: no such kernel here" in line for line in log)
    assert {r["provider"] for r in rows} == {"peer"}
