"""The engine's start-up check of its decode kernels: a backend that disagrees with the float64
reference (or cannot run) is not used; the next candidate, or torch, is."""
import logging

import pytest
import torch

from r1fast import backends
from r1fast.rollout.self_check import decode_seconds, select_backends, shared_prefix_ok

SHAPES = dict(num_heads=6, num_kv_heads=2, head_dim=32)


def test_a_correct_backend_is_chosen():
    chosen = select_backends("cpu", torch.float32, **SHAPES,
                             candidates={"paged_decode_attention": ["triton"], "store_kv": ["triton"]})
    assert chosen == {"paged_decode_attention": "triton", "store_kv": "triton"}


def test_a_wrong_or_failing_backend_is_skipped_with_a_warning(monkeypatch, caplog):
    impls = backends.implementations("paged_decode_attention")
    good = impls["triton"]

    def off_by_a_bit(*args):  # e.g. a kernel that drops the last partition on this card
        return good(*args) * 1.01

    def crashes(*args):
        raise RuntimeError("an illegal memory access was encountered")
    monkeypatch.setitem(impls, "triton", off_by_a_bit)
    monkeypatch.setitem(impls, "cuda", crashes)
    store = backends.implementations("store_kv")

    def writes_nothing(key, value, k_cache, v_cache, slots):
        return None
    monkeypatch.setitem(store, "triton", writes_nothing)
    monkeypatch.setattr(backends, "backend_available", lambda b, d: (True, ""))  # "cuda" runs here too
    with caplog.at_level(logging.WARNING):
        chosen = select_backends("cpu", torch.float32, **SHAPES,
                                 candidates={"paged_decode_attention": ["cuda", "triton", "torch"],
                                             "store_kv": ["triton"]})
    assert chosen == {"paged_decode_attention": "torch", "store_kv": "torch"}
    text = caplog.text
    assert "cuda backend fails its start-up check" in text and "illegal memory access" in text
    assert "triton backend disagrees with the reference" in text
    assert "store_kv: the triton backend disagrees" in text


def test_a_backend_wrong_only_with_split_k_is_skipped(monkeypatch, caplog):
    # the check runs one split and several: a kernel whose partition merge is broken is caught too
    impls = backends.implementations("paged_decode_attention")
    good = impls["triton"]

    def bad_merge(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, *rest):
        out = good(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, *rest)
        return out if num_splits == 1 else out * 1.01
    monkeypatch.setitem(impls, "triton", bad_merge)
    with caplog.at_level(logging.WARNING):
        chosen = select_backends("cpu", torch.float32, **SHAPES,
                                 candidates={"paged_decode_attention": ["triton"], "store_kv": ["torch"]})
    assert chosen["paged_decode_attention"] == "torch"
    assert "triton backend disagrees with the reference" in caplog.text


def test_the_shared_prefix_path_is_checked_on_its_own(monkeypatch, caplog):
    assert shared_prefix_ok("triton", "cpu", torch.float32, **SHAPES)
    impls = backends.implementations("paged_decode_attention")
    good = impls["triton"]

    def prefix_dropped(*args):  # right without tiles, wrong with them
        out = good(*args)
        return out if args[-1] is None else out * 0.99
    monkeypatch.setitem(impls, "triton", prefix_dropped)
    with caplog.at_level(logging.WARNING):
        assert not shared_prefix_ok("triton", "cpu", torch.float32, **SHAPES)
    assert "shared-prefix path disagrees" in caplog.text
    assert select_backends("cpu", torch.float32, **SHAPES, candidates={"paged_decode_attention": ["triton"],
                                                                       "store_kv": ["torch"]}) == \
        {"paged_decode_attention": "triton", "store_kv": "torch"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_tolerance_accepts_the_torch_backend(dtype):
    chosen = select_backends("cpu", dtype, **SHAPES, candidates={"paged_decode_attention": ["torch"],
                                                                 "store_kv": ["torch"]})
    assert chosen == {"paged_decode_attention": "torch", "store_kv": "torch"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernels_pass_their_start_up_check(dtype):
    """On the card: the CUDA C++ kernels (when built) and the Triton ones agree with the reference,
    so the engine decodes with its fastest backends (Qwen2.5-1.5B's heads)."""
    for op in ("paged_decode_attention", "store_kv"):
        for name in [b for b in ("cuda", "triton") if b in backends.available(op, "cuda")]:
            chosen = select_backends("cuda", dtype, num_heads=12, num_kv_heads=2, head_dim=128,
                                     candidates={op: [name]})
            assert chosen[op] == name, f"{op}: the {name} backend fails its check on {torch.cuda.get_device_name()}"
            if op == "paged_decode_attention":
                assert shared_prefix_ok(name, "cuda", dtype, num_heads=12, num_kv_heads=2, head_dim=128)
                seconds = decode_seconds(name, "cuda", dtype, 12, 2, 128, batch=64)
                assert 0 < seconds < 0.01, f"{name}: {seconds} s per decode call"  # graph replay and events work
                # the shared-prefix timing: its tiles captured in the graph too
                seconds = decode_seconds(name, "cuda", dtype, 12, 2, 128, batch=64, group=8, shared_prefix=True)
                assert 0 < seconds < 0.01, f"{name}+shared: {seconds} s per decode call"
    names = [b for b in ("cuda", "triton") if b in backends.available("paged_decode_attention", "cuda")]
    chosen = select_backends("cuda", dtype, num_heads=12, num_kv_heads=2, head_dim=128, timing_batch=64)
    assert chosen["paged_decode_attention"] in names


def test_the_faster_of_two_correct_decode_backends_is_chosen(monkeypatch, caplog):
    from r1fast.rollout import self_check

    times = {"triton": 3e-5, "torch": 2e-5, "reference": 9e-5}
    timed, graphs = [], []

    def fake_seconds(name, device, dtype, *shape, batch, graph, group, shared_prefix, context):
        assert (group, shared_prefix, context) == (1, False, 1024)  # no tiles in this race
        timed.append((name, batch))
        graphs.append(graph)
        return times[name]
    monkeypatch.setattr(self_check, "decode_seconds", fake_seconds)
    cands = {"paged_decode_attention": ["triton", "torch", "reference"], "store_kv": ["torch"]}
    with caplog.at_level(logging.INFO, logger="r1fast.rollout.self_check"):
        chosen = select_backends("cpu", torch.float32, **SHAPES, candidates=cands, timing_batch=48)
    assert chosen["paged_decode_attention"] == "torch"
    assert timed == [("triton", 48), ("torch", 48), ("reference", 48)]
    assert "triton 30.0 us, torch 20.0 us, reference 90.0 us; using torch" in caplog.text
    times["triton"] = 2e-5  # a tie keeps the preferred (earlier) one
    assert select_backends("cpu", torch.float32, **SHAPES, candidates=cands,
                           timing_batch=48)["paged_decode_attention"] == "triton"
    assert set(graphs) == {True}  # timed as graph replays unless told the engine decodes eagerly
    graphs.clear()
    select_backends("cpu", torch.float32, **SHAPES, candidates=cands, timing_batch=48, graph=False)
    assert graphs == [False] * 3
    timed.clear()  # without timing_batch: the first correct one, nothing timed
    assert select_backends("cpu", torch.float32, **SHAPES, candidates=cands)["paged_decode_attention"] == "triton"
    assert timed == []


def test_a_failed_timing_keeps_the_preferred_backend(monkeypatch, caplog):
    from r1fast.rollout import self_check

    def fails(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(self_check, "decode_seconds", fails)
    with caplog.at_level(logging.WARNING):
        chosen = select_backends("cpu", torch.float32, **SHAPES, timing_batch=8,
                                 candidates={"paged_decode_attention": ["torch", "reference"], "store_kv": ["torch"]})
    assert chosen["paged_decode_attention"] == "torch"
    assert "timing torch on cpu failed (RuntimeError: operation not permitted" in caplog.text
    assert "timing reference on cpu failed" in caplog.text and "no decode timing ran on cpu; using torch" in caplog.text


def test_decode_timing_runs_the_backend_at_the_asked_shape(monkeypatch):
    from r1fast.rollout import self_check

    impls, seen = backends.implementations("paged_decode_attention"), []
    real = impls["torch"]

    def spy(q, k_cache, v_cache, block_tables, context_lens, *rest):
        seen.append((tuple(q.shape), tuple(k_cache.shape), context_lens.tolist()))
        return real(q, k_cache, v_cache, block_tables, context_lens, *rest)
    monkeypatch.setitem(impls, "torch", spy)
    s = self_check.decode_seconds("torch", "cpu", torch.float32, 6, 2, 32, batch=3, context=40, repeats=2)
    assert 0 < s < 1
    assert len(seen) == 2 * 4  # a warm-up, then three rounds, of `repeats` calls each
    assert seen[0] == ((3, 6, 32), (3 * 3, 16, 2, 32), [40, 40, 40])
    monkeypatch.setattr(self_check, "_TIMING_BYTES", 3 * 20 * 2 * 2 * 32 * 4)  # room for 20 tokens a row
    seen.clear()
    self_check.decode_seconds("torch", "cpu", torch.float32, 6, 2, 32, batch=3, context=40, repeats=1)
    assert seen[0][2] == [20, 20, 20]


def test_the_cuda_decode_kernel_is_not_tried_on_shapes_it_cannot_take(monkeypatch, caplog):
    impls = backends.implementations("paged_decode_attention")

    def cuda_stand_in(*args):
        raise AssertionError("called")
    monkeypatch.setitem(impls, "cuda", cuda_stand_in)
    real_available = backends.backend_available
    monkeypatch.setattr(backends, "backend_available",
                        lambda b, d: (True, "") if b == "cuda" else real_available(b, d))
    with caplog.at_level(logging.WARNING):
        chosen = select_backends("cpu", torch.float32, num_heads=6, num_kv_heads=2, head_dim=12)
    assert "paged_decode_attention: the cuda" not in caplog.text and chosen["paged_decode_attention"] != "cuda"
    with caplog.at_level(logging.WARNING):  # a shape it takes is tried (and this stand-in fails its check)
        select_backends("cpu", torch.float32, num_heads=6, num_kv_heads=2, head_dim=16)
    assert "paged_decode_attention: the cuda backend fails its start-up check" in caplog.text


def test_the_shared_prefix_timing_case_has_groups_that_share_their_first_blocks():
    """The GRPO-shaped case the shared-prefix path is timed on: runs of 8 rows hold the blocks of the
    first half of their context in common and their own after, and the runner's tile finding finds
    one tile per group in it (the last group short), each reading that half."""
    import numpy as np

    from r1fast.ops.shared_prefix import find_shared_prefixes
    from r1fast.rollout import self_check

    batch, context, width = 20, 100, 7  # 7 blocks of 16; the first 3 shared
    q, k, v, tables, ctx = self_check._timing_case(batch, context, **SHAPES, group=8)
    assert tables.shape == (batch, width) and ctx.tolist() == [context] * batch and q.shape == (batch, 6, 32)
    for start in (0, 8, 16):
        group = tables[start: start + 8]
        assert (group[:, :3] == group[0, :3]).all()
    assert len(set(tables[::8, :3].flatten().tolist())) == 3 * 3  # groups share nothing with each other
    assert len(set(tables[:, 3:].flatten().tolist())) == batch * (width - 3)  # the rest is each row's own
    assert int(tables.max()) < k.shape[0]
    found = find_shared_prefixes(tables.numpy(), ctx.numpy(), 16, **SHAPES)
    assert sorted(np.diff(found.tile_ptr).tolist()) == [4, 8, 8]  # tiles come in the order of their blocks' ids
    assert [sorted(found.tile_rows[a:b].tolist()) for a, b in zip(found.tile_ptr, found.tile_ptr[1:])] == \
        sorted([list(range(0, 8)), list(range(8, 16)), list(range(16, 20))], key=lambda r: int(tables[r[0], 2]))
    assert found.tile_prefix.tolist() == [48] * 3 and found.row_start.tolist() == [48] * batch
    padded = self_check._timing_tiles(tables, ctx, 16, **SHAPES)  # a graph step's buffers: 10 tiles, 7 empty
    assert padded.tile_ptr.tolist()[:4] == found.tile_ptr.tolist() and padded.tile_ptr.tolist()[4:] == [20] * 7
    assert padded.tile_prefix.tolist() == [48] * 3 + [0] * 7
    # without groups (the backend timing's case) no row shares a block
    plain = self_check._timing_case(batch, context, **SHAPES)[3]
    assert find_shared_prefixes(plain.numpy(), ctx.numpy(), 16, **SHAPES) is None


def test_the_shared_prefix_timing_passes_the_tiles_of_its_case(monkeypatch):
    from r1fast.rollout import self_check

    impls, seen = backends.implementations("paged_decode_attention"), []
    real = impls["torch"]

    def spy(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition, shared_prefix):
        seen.append((block_tables.clone(), context_lens.clone(), shared_prefix))
        return real(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition, shared_prefix)
    monkeypatch.setitem(impls, "torch", spy)
    for tiles in (False, True):
        seen.clear()
        self_check.decode_seconds("torch", "cpu", torch.float32, 6, 2, 32, batch=12, context=64, repeats=1,
                                  group=8, shared_prefix=tiles)
        tables, ctx, passed = seen[0]
        assert (tables[1:8, :2] == tables[0, :2]).all() and ctx.tolist() == [64] * 12
        if not tiles:
            assert all(s is None for *_, s in seen)
            continue
        want = self_check._timing_tiles(tables, ctx, 16, 6, 2, 32)
        assert [a.tolist() for a in passed] == [a.tolist() for a in want]
        assert sorted(passed.tile_ptr.diff().tolist()[:2]) == [4, 8] and passed.tile_prefix.tolist()[:2] == [32, 32]
        # timed for an eager engine: the tiles as found (2), as its steps pass them, not a graph's buffers (6)
        seen.clear()
        self_check.decode_seconds("torch", "cpu", torch.float32, 6, 2, 32, batch=12, context=64, repeats=1,
                                  group=8, shared_prefix=True, graph=False)
        eager = seen[0][2]
        assert len(eager.tile_prefix) == 2 and [a.tolist() for a in eager] == \
            [a.tolist() for a in self_check._timing_tiles(tables, ctx, 16, 6, 2, 32, graph=False)]


@pytest.mark.parametrize("plain_us, shared_us, kept", [(100.0, 90.0, True), (100.0, 96.0, False),
                                                       (114.0, 157.0, False)])
def test_the_shared_prefix_path_is_kept_only_when_timed_faster(monkeypatch, caplog, plain_us, shared_us, kept):
    from r1fast.rollout import self_check

    timed = []

    def fake_seconds(name, device, dtype, *shape, batch, group, shared_prefix, context, graph):
        timed.append((name, batch, group, shared_prefix, graph))
        return (shared_us if shared_prefix else plain_us) * 1e-6
    monkeypatch.setattr(self_check, "decode_seconds", fake_seconds)
    with caplog.at_level(logging.INFO, logger="r1fast.rollout.self_check"):
        assert self_check.choose_decode({"triton": None}, "cpu", torch.float32, **SHAPES, batch=48) == ("triton", kept)
    assert timed == [("triton", 48, 8, False, True), ("triton", 48, 8, True, True)]
    timed.clear()  # an engine that decodes eagerly: eager launches timed
    self_check.choose_decode({"triton": None}, "cpu", torch.float32, **SHAPES, batch=48, graph=False)
    assert timed == [("triton", 48, 8, False, False), ("triton", 48, 8, True, False)]
    assert f"triton {plain_us:.1f} us, triton+tiles {shared_us:.1f} us; " \
        f"using {'triton+tiles' if kept else 'triton'} (tiles only where they save 5%)" in caplog.text


def test_a_failed_shared_prefix_timing_decodes_without_it(monkeypatch, caplog):
    from r1fast.rollout import self_check

    def fails(*args, shared_prefix, **kwargs):
        if shared_prefix:
            raise RuntimeError("out of memory")
        return 1e-4
    monkeypatch.setattr(self_check, "decode_seconds", fails)
    with caplog.at_level(logging.WARNING):
        assert self_check.choose_decode({"triton": None}, "cpu", torch.float32, **SHAPES, batch=8) == ("triton", False)
    assert "timing triton+tiles on cpu failed (RuntimeError: out of memory)" in caplog.text


def test_the_shared_prefix_path_is_timed_no_longer_than_the_engine_decodes(monkeypatch, caplog):
    """The shared-prefix timing's contexts are the engine's longest (max_context) where that is under the
    usual 1024 tokens: the default pipeline decodes 80-token sequences (32-token prompts), and a verdict
    from 1024-token contexts, half of them shared, said nothing of those."""
    from r1fast.rollout import self_check

    contexts = []

    def fake_seconds(name, device, dtype, *shape, batch, group, shared_prefix, context, graph):
        contexts.append(context)
        return 1e-4
    monkeypatch.setattr(self_check, "decode_seconds", fake_seconds)
    for max_context, want in ((80, 80), (1024, 1024), (32768, 1024), (None, 1024)):
        contexts.clear()
        with caplog.at_level(logging.INFO, logger="r1fast.rollout.self_check"):
            self_check.choose_decode({"triton": None}, "cpu", torch.float32, **SHAPES, batch=48,
                                     max_context=max_context)
        assert contexts == [want, want]
        assert f"at batch 48, contexts of up to {want} tokens, in groups of 8" in caplog.text


def test_decode_timing_rotates_through_caches_that_outgrow_l2(monkeypatch):
    """Replayed on one K/V cache, a small timing case sat in L2 from its second call on, where a real
    step's layers each read their own cache: the calls now rotate through copies of the K/V (the same
    values, distinct memory) until twice the L2 lies between two reads of one, within _TIMING_BYTES."""
    from r1fast.rollout import self_check

    # 64 rows of 80 tokens (5 MB): 21 copies; 256 MiB: one. A case far smaller than the L2 (80 kB against 50 MB) is latency-bound: at most _MAX_COPIES copies
    assert self_check._cold_copies(80 << 10, 50 << 20) == self_check._MAX_COPIES == 128
    assert self_check._cold_copies(5 << 20, 50 << 20) == 21 and self_check._cold_copies(256 << 20, 50 << 20) == 1

    impls, seen, first = backends.implementations("paged_decode_attention"), [], []
    real = impls["torch"]

    def spy(q, k_cache, v_cache, *rest):
        seen.append((k_cache.data_ptr(), v_cache.data_ptr()))
        first.extend([] if first else (k_cache.clone(), v_cache.clone()))
        assert torch.equal(k_cache, first[0]) and torch.equal(v_cache, first[1])  # copies: the same values
        return real(q, k_cache, v_cache, *rest)
    monkeypatch.setitem(impls, "torch", spy)
    copy_bytes = 2 * 3 * 3 * 16 * 2 * 32 * 4  # K and V of 3 rows of 3 blocks, fp32
    monkeypatch.setattr(self_check, "_l2_bytes", lambda device: 100_000)
    self_check.decode_seconds("torch", "cpu", torch.float32, 6, 2, 32, batch=3, context=40, repeats=2)
    # 1 + ceil(2 * 100000 / 73728) = 4 copies, each read once a round (4 calls, not 2), in turn
    assert len(seen) == 4 * 4 and len(set(seen)) == 4 and len({k for k, _ in seen} | {v for _, v in seen}) == 8
    assert seen[:4] == seen[4:8] == seen[12:]
    seen.clear()
    monkeypatch.setattr(self_check, "_TIMING_BYTES", 3 * copy_bytes)  # room for three copies only
    self_check.decode_seconds("torch", "cpu", torch.float32, 6, 2, 32, batch=3, context=40, repeats=2)
    assert len(set(seen)) == 3 and len(seen) == 4 * 3
    seen.clear()  # no L2 to outgrow (off a GPU): one cache, `repeats` calls, as before
    monkeypatch.setattr(self_check, "_l2_bytes", lambda device: 0)
    self_check.decode_seconds("torch", "cpu", torch.float32, 6, 2, 32, batch=3, context=40, repeats=2)
    assert len(set(seen)) == 1 and len(seen) == 4 * 2


@pytest.mark.parametrize("us, tiles, want, runs", [
    # cuda+tiles beats a triton that is faster than plain cuda: timing the tiles for the winner of the
    # plain race alone (triton) would have missed it
    (dict(cuda=100.0, cuda_t=80.0, triton=90.0, triton_t=88.0), dict(cuda=None, triton=None), ("cuda", True), 4),
    # cuda+tiles is the fastest pair but saves under 5% on plain cuda: cuda counts plain, and triton wins
    (dict(cuda=100.0, cuda_t=96.0, triton=98.0, triton_t=99.0), dict(cuda=None, triton=None), ("triton", False), 4),
    (dict(cuda=100.0, cuda_t=94.0, triton=98.0, triton_t=90.0), dict(cuda=None, triton=None), ("triton", True), 4),
    # tiles forced on (shared_prefix_attention=True): only the tile runs; off for cuda: only its plain run
    (dict(cuda=100.0, cuda_t=80.0, triton=90.0, triton_t=85.0), dict(cuda=True, triton=True), ("cuda", True), 2),
    (dict(cuda=100.0, cuda_t=80.0, triton=90.0, triton_t=85.0), dict(cuda=False, triton=None), ("triton", True), 3),
    (dict(cuda=90.0, cuda_t=80.0, triton=90.0, triton_t=95.0), dict(cuda=False, triton=False), ("cuda", False), 2),
    # one backend whose tiles are settled: nothing to time
    (dict(cuda=90.0, cuda_t=80.0, triton=90.0, triton_t=95.0), dict(triton=False), ("triton", False), 0),
    (dict(cuda=90.0, cuda_t=80.0, triton=90.0, triton_t=95.0), dict(cuda=True), ("cuda", True), 0)])
def test_the_decode_backend_and_tiles_are_chosen_as_the_fastest_pair(monkeypatch, caplog, us, tiles, want, runs):
    from r1fast.rollout import self_check

    timed = []

    def fake_seconds(name, device, dtype, *shape, batch, group, shared_prefix, context, graph):
        timed.append((name, shared_prefix, group, context))
        return us[name + ("_t" if shared_prefix else "")] * 1e-6
    monkeypatch.setattr(self_check, "decode_seconds", fake_seconds)
    with caplog.at_level(logging.INFO, logger="r1fast.rollout.self_check"):
        assert self_check.choose_decode(tiles, "cuda", torch.bfloat16, **SHAPES, batch=64, max_context=300) == want
    assert len(timed) == runs and len(set(timed)) == runs
    # one case for the whole race: GRPO groups where any tiles are timed, at the engine's longest context
    grouped = any(t is not False for t in tiles.values())
    assert {(g, c) for _, _, g, c in timed} <= {(8 if grouped else 1, 300)}
    assert all(t is tiles[n] for n, t, *_ in timed if tiles[n] is not None)  # a settled backend: its mode only
    if runs:
        assert f"using {want[0]}{'+tiles' if want[1] else ''}" in caplog.text


@pytest.mark.parametrize("batch, words", [(48, "in groups of 8 sharing"),
                                          (12, "in groups of 8 (the last of 4) sharing"),
                                          (4, "in one group of 4 sharing"), (8, "in one group of 8 sharing")])
def test_the_shared_prefix_timing_names_its_groups_as_the_case_makes_them(monkeypatch, caplog, batch, words):
    """Below 8 rows the timing case is one group of them all: the log said "in groups of 8"."""
    from r1fast.rollout import self_check

    monkeypatch.setattr(self_check, "decode_seconds", lambda *args, shared_prefix, **kwargs: 1e-4)
    with caplog.at_level(logging.INFO, logger="r1fast.rollout.self_check"):
        self_check.choose_decode({"triton": None}, "cpu", torch.float32, **SHAPES, batch=batch)
    assert f"at batch {batch}, contexts of up to 1024 tokens, {words} half of them:" in caplog.text
    leads = self_check._timing_case(batch, 32, **SHAPES, group=8)[3][:, 0]  # each row's first (shared) block
    assert [len(set(leads[i: i + 8].tolist())) for i in range(0, batch, 8)] == [1] * -(-batch // 8)
