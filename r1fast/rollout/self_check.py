"""A start-up check of the rollout's fast kernels on the card they are about to run on.

The engine's decode path runs `paged_decode_attention` and `store_kv` through their fastest
backends (CUDA C++, then Triton) inside CUDA graphs, where a wrong number would go unnoticed until
the rewards drift. So before capturing its graphs the engine runs each candidate once on a small
random case in the model's shapes and dtype (several context lengths, one and several splits)
against the float64 reference, and uses the first that agrees; one that does not is skipped with a
warning naming the error. The shared-prefix path of each decode backend that agrees is checked the
same way (shared_prefix_ok); where it disagrees that backend decodes without it. Then the engine
chooses its decode backend and whether it reads the shared-prefix tiles together (choose_decode):
each backend that agrees is timed on a decode step of the rollout's batch without the tiles and, unless
the engine was told otherwise (shared_prefix_attention), with them, on a GRPO-shaped batch (groups of 8
rows sharing the first half of their context's blocks, contexts no longer than the engine's
max_model_len, the tiles built as the runner builds them, the calls replayed from a CUDA graph as the
engine runs them, or launched one by one for an engine that decodes eagerly, rotating through copies of
the K/V that outgrow the card's L2); a backend keeps its tiles only when they make it at least 5%
faster (the plain kernel can find a group's shared blocks in L2 anyway), and the fastest backend in
its better mode is used: which of the CUDA and Triton kernels wins, and whether the tiles pay, depend on the card and the
head shapes. The cost is a few small launches and up to four short timings per engine.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from r1fast import backends, ops
from r1fast.ops.shared_prefix import SharedPrefix, find_shared_prefixes, pad_shared_prefix

log = logging.getLogger(__name__)

# max |kernel - float64 reference| / max |reference| allowed, by the kernel's dtype
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _random_paged_case(seed: int, lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int):
    """(q, k_cache, v_cache, block_tables, context_lens) on the CPU: one query row per sequence of
    `lens`, its blocks of 16 slots drawn at random from a cache with 3 blocks to spare."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    block_size = 16
    width = -(-max(lens) // block_size)
    num_blocks = len(lens) * width + 3
    k, v = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g) for _ in range(2))
    q = torch.randn(len(lens), num_heads, head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * width].reshape(len(lens), width).to(torch.int32)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32)


def _decode_error_on(backend: str, device, dtype, q, k, v, tables, ctx, shared_prefix=None) -> float:
    """max |backend - float64 reference| / max |reference| over one and four splits."""
    want = ops.paged_decode_attention(q.double(), k.double(), v.double(), tables, ctx, backend="reference")
    extra = {} if shared_prefix is None else {"shared_prefix": shared_prefix.to(device)}
    err = 0.0
    for splits in (1, 4):
        got = ops.paged_decode_attention(*(x.to(device, dtype) for x in (q, k, v)), tables.to(device),
                                         ctx.to(device), num_splits=splits, backend=backend, **extra)
        err = max(err, float((got.double().cpu() - want).abs().max() / want.abs().max()))
    return err


def _decode_error(backend: str, device, dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> float:
    case = _random_paged_case(0, [1, 37, 300], num_heads, num_kv_heads, head_dim)
    return _decode_error_on(backend, device, dtype, *case)


def _shared_prefix_error(backend: str, device, dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> float:
    """Three samples sharing 2 blocks of a prompt and a lone row, through the shared-prefix tiles."""
    q, k, v, tables, ctx = _random_paged_case(2, [40, 47, 90, 33], num_heads, num_kv_heads, head_dim)
    shared = 2
    tables[1:3, :shared] = tables[0, :shared]
    tiles = find_shared_prefixes(tables.numpy(), ctx.numpy(), k.shape[1], num_heads, num_kv_heads, head_dim)
    # as found, and in a CUDA graph's fixed-size buffers (trailing tiles empty)
    return max(_decode_error_on(backend, device, dtype, q, k, v, tables, ctx, shared_prefix=t)
               for t in (tiles, pad_shared_prefix(tiles, len(ctx), len(ctx))))


def shared_prefix_ok(backend: str, device, dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether `backend`'s shared-prefix path matches the reference on `device` (a warning if not)."""
    try:
        err = _shared_prefix_error(backend, torch.device(device), dtype, num_heads, num_kv_heads, head_dim)
    except Exception as e:  # noqa: BLE001 - a path that cannot run here is not used, the same way
        log.warning("paged_decode_attention: the %s backend's shared-prefix path fails its start-up check on %s "
                    "(%s: %s); decoding without it", backend, device, type(e).__name__, e)
        return False
    if err <= _TOLERANCE.get(dtype, 1e-4):
        return True
    log.warning("paged_decode_attention: the %s backend's shared-prefix path disagrees with the reference on %s "
                "(relative error %.2e); decoding without it", backend, device, err)
    return False


def _store_error(backend: str, device, dtype, num_kv_heads: int, head_dim: int) -> float:
    g = torch.Generator(device="cpu").manual_seed(1)
    caches = [torch.randn(8, 16, num_kv_heads, head_dim, generator=g) for _ in range(2)]
    key, value = (torch.randn(5, num_kv_heads, head_dim, generator=g) for _ in range(2))
    slots = torch.tensor([3, 17, 64, -1, 127])  # -1: a padding row writes nothing
    want = [c.clone() for c in caches]
    ops.store_kv(key, value, *want, slots, backend="reference")
    got = [c.to(device, dtype) for c in caches]
    ops.store_kv(key.to(device, dtype), value.to(device, dtype), *got, slots.to(device), backend=backend)
    return max(float((a.double().cpu() - b.to(a.dtype).double()).abs().max() / b.abs().max())
               for a, b in zip(got, want))


# The K/V caches of a timing, all its copies together (_cold_copies), take at most this much memory: the
# context shrinks until one copy fits, and there are no more copies than fit.
_TIMING_BYTES = 256 << 20
# The L2 a timing's calls must not find their K/V in, where the card does not say its own (torch's
# L2_cache_size): GH100's full 60 MB (H100 and H200 enable 50 MB of it). A real step's layers each read
# their own cache, so the same layer's blocks come round again only after every other layer's.
_L2_BYTES = 60 << 20
# At most this many copies (and so calls a round): a case so small that this many copies fit in L2 (under
# 0.8 MB a copy: a few rows of a few blocks) is bound by launch latency, not by where its bytes come
# from, and thousands of calls a round would make each start-up timing take seconds.
_MAX_COPIES = 128
# The timing case's context length, unless memory or (shared-prefix timing) the engine's max_model_len cuts it.
_TIMING_CONTEXT = 1024
# GRPO's decode batch, for timing the shared-prefix path: the samples of one prompt, in groups of
# this many adjacent rows (the rollout's G), share the first half of their context's blocks.
_TIMING_GROUP = 8
# The shared-prefix path is kept only when it beats the plain one by this fraction. It adds a launch
# and a round trip of partial softmax states through memory, and where a group's rows run side by side
# the plain kernel finds the shared blocks in L2 anyway: on an H200 at the rollout's shape the plain
# Triton kernel was the faster (0.114 against 0.157 ms). A gain inside the timing's noise is not worth
# a second kernel in every step's graph.
_SHARED_PREFIX_MIN_GAIN = 0.05


def _timing_case(batch: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int, group: int = 1):
    """(q, k_cache, v_cache, block_tables, context_lens) on the CPU in float32: `batch` sequences of
    `context` tokens, their blocks of 16 slots drawn at random; with group > 1 each run of `group`
    adjacent rows shares the blocks of the first half of its context, as a GRPO group's samples hold
    their prompt's (at least one block)."""
    block_size = 16
    width = math.ceil(context / block_size)
    g = torch.Generator(device="cpu").manual_seed(3)
    k, v = (torch.randn(batch * width, block_size, num_kv_heads, head_dim, generator=g) for _ in range(2))
    q = torch.randn(batch, num_heads, head_dim, generator=g)
    tables = torch.randperm(batch * width, generator=g).reshape(batch, width).to(torch.int32)
    if group > 1:
        shared = max(1, width // 2)
        lead = torch.arange(batch) // group * group  # each row's group's first row
        tables[:, :shared] = tables[lead, :shared]
    return q, k, v, tables, torch.full((batch,), context, dtype=torch.int32)


def _timing_tiles(tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, num_heads: int,
                  num_kv_heads: int, head_dim: int, graph: bool = True) -> SharedPrefix:
    """The SharedPrefix tiles of a timing case, as the runner builds a step's: found from the tables,
    cut to the context lengths; for a graph step laid out in the fixed-size buffers of its rows."""
    found = find_shared_prefixes(tables.numpy(), context_lens.numpy(), block_size, num_heads, num_kv_heads, head_dim)
    return pad_shared_prefix(found, len(context_lens), len(context_lens)) if graph else found


def _l2_bytes(device: torch.device) -> int:
    """The L2 the timing's K/V copies must outgrow: the card's, off a GPU none (no copies there)."""
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _L2_BYTES


def _cold_copies(copy_bytes: int, l2_bytes: int) -> int:
    """How many copies of a timing case's K/V the calls rotate through so that each call reads its K/V
    from memory, not from L2, as a real decode step's layers do: enough that twice the L2 passes
    between two reads of one copy (an LRU-like cache keeps none of a cyclic scan twice its size), no
    more than _TIMING_BYTES hold nor _MAX_COPIES (at least one). Replayed on one cache, a small case
    (64 rows of 80 tokens: 5 MB) sat in L2 from the second call on and timed a kernel reading L2, not HBM."""
    wanted = 1 + -(-2 * l2_bytes // copy_bytes)
    return max(1, min(wanted, _TIMING_BYTES // copy_bytes, _MAX_COPIES))


def decode_seconds(backend: str, device, dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                   batch: int = 64, context: int = _TIMING_CONTEXT, repeats: int = 10, group: int = 1,
                   shared_prefix: bool = False, graph: bool = True) -> float:
    """Seconds per call of `backend`'s decode attention for `batch` sequences of `context` tokens (the
    best of three rounds). On a GPU the calls are replayed from a CUDA graph, as the engine runs them,
    so Python's launch overhead (the same for every backend) does not hide the kernels' difference;
    with graph=False (an engine that decodes eagerly: use_cuda_graphs=False) they are launched one by
    one, as that engine's steps launch them, and the launches count (the shared-prefix path's are two).
    Each round makes at least `repeats` calls, rotating through distinct copies of the K/V caches
    (_cold_copies: as many as it takes to outgrow the card's L2, like a step's layers), so that no
    call finds its K/V in L2 from the call before.
    group > 1: rows in groups of that many share the first half of their blocks (_timing_case);
    shared_prefix: the calls are passed those groups' SharedPrefix tiles."""
    device, block_size = torch.device(device), 16
    token_bytes = 2 * num_kv_heads * head_dim * dtype.itemsize
    context = max(block_size, min(context, _TIMING_BYTES // (batch * token_bytes)))
    q, k, v, tables, ctx = _timing_case(batch, context, num_heads, num_kv_heads, head_dim, group)
    extra = {}
    if shared_prefix:
        tiles = _timing_tiles(tables, ctx, block_size, num_heads, num_kv_heads, head_dim, graph)
        extra["shared_prefix"] = tiles.to(device)
    q, k, v = (x.to(device, dtype) for x in (q, k, v))
    tables, ctx = tables.to(device), ctx.to(device)
    copies = _cold_copies(2 * k.numel() * k.element_size(), _l2_bytes(device))
    caches = [(k, v)] + [(k.clone(), v.clone()) for _ in range(copies - 1)]  # the same values, elsewhere
    calls = max(repeats, copies)

    def step():
        for i in range(calls):
            kc, vc = caches[i % copies]
            ops.paged_decode_attention(q, kc, vc, tables, ctx, backend=backend, check_bounds=False, **extra)

    if device.type != "cuda":
        step()  # warm-up: compiles
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
        return best / calls
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up outside the capture: compiles and autotunes
        torch.cuda.current_stream().wait_stream(side)
        run = step
        if graph:
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                step()
            run = captured.replay
        run()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = math.inf
        for _ in range(3):
            begin.record()
            run()
            end.record()
            end.synchronize()
            best = min(best, begin.elapsed_time(end) / 1e3)
        run = captured = None
    return best / calls


def _label(backend: str, tiles: bool) -> str:
    return f"{backend}+tiles" if tiles else backend


def _grouping(batch: int) -> str:
    """How _timing_case groups `batch` rows, in words: runs of _TIMING_GROUP, the last one shorter."""
    if batch <= _TIMING_GROUP:
        return f"in one group of {batch}"
    last = batch % _TIMING_GROUP
    return f"in groups of {_TIMING_GROUP}" + (f" (the last of {last})" if last else "")


def choose_decode(tiles: dict[str, bool | None], device, dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                  batch: int, max_context: int | None = None, graph: bool = True) -> tuple[str, bool]:
    """(decode backend, whether it reads SharedPrefix tiles) for an engine of `batch` rows: of the
    backends of `tiles`, in order of preference, each correct here, mapped to True (tiles on, untimed),
    False (tiles off) or None (tiles on only where they pay). Each backend is timed without tiles unless
    they are forced, and with them unless they are off, so at most two timings per backend (four with
    cuda and triton: the start-up cost every Engine pays, and evaluate() builds one each time); one
    backend whose tiles are settled is not timed at all. A backend with tiles None keeps them only where
    they beat its own plain time by _SHARED_PREFIX_MIN_GAIN; then the fastest backend, each in its
    better mode, wins (a tie keeps the preferred one). Choosing the backend without tiles first and
    timing the tiles for it alone missed e.g. cuda+tiles beating a triton that is faster than plain cuda.

    The timings share one case (decode_seconds): `batch` rows of min(1024, max_context) tokens (the
    saving the tiles bring grows with the shared length: a verdict at 1024 tokens says nothing of an
    engine whose sequences end at 80), in GRPO groups of _TIMING_GROUP rows that share the first half
    of their blocks where any tiles are timed; graph: as CUDA graph replays or eager launches. A timing
    that fails leaves its pair out; when all fail, the first backend (tiles only if forced)."""
    names = list(tiles)
    runs = [(n, t) for n in names for t in (False, True) if tiles[n] is None or tiles[n] is t]
    if len(runs) == 1:
        return runs[0]
    grouped = any(t for _, t in runs)
    context = _TIMING_CONTEXT if max_context is None else min(_TIMING_CONTEXT, max_context)
    seconds = {}
    for n, t in runs:
        try:
            seconds[n, t] = decode_seconds(n, device, dtype, num_heads, num_kv_heads, head_dim, batch=batch,
                                           group=_TIMING_GROUP if grouped else 1, shared_prefix=t, context=context,
                                           graph=graph)
        except Exception as e:  # noqa: BLE001 - the kernels were checked: only this pair's place in the choice is lost
            log.warning("paged_decode_attention: timing %s on %s failed (%s: %s); leaving it out of the choice",
                        _label(n, t), device, type(e).__name__, e)
    best_of = []
    for n in names:
        plain, shared = seconds.get((n, False)), seconds.get((n, True))
        if shared is not None and (plain is None or shared <= plain * (1 - _SHARED_PREFIX_MIN_GAIN)):
            best_of.append((n, True))
        elif plain is not None:
            best_of.append((n, False))
    if not best_of:
        n = names[0]
        log.warning("paged_decode_attention: no decode timing ran on %s; using %s", device, _label(n, tiles[n] is True))
        return n, tiles[n] is True
    best = min(best_of, key=seconds.__getitem__)  # min keeps the earlier (preferred) one on a tie
    groups = f", {_grouping(batch)} sharing half of them" if grouped else ""
    rule = f" (tiles only where they save {_SHARED_PREFIX_MIN_GAIN:.0%})" if None in tiles.values() else ""
    log.info("paged_decode_attention on %s at batch %d, contexts of up to %d tokens%s: %s; using %s%s", device,
             batch, context, groups, ", ".join(f"{_label(*r)} {s * 1e6:.1f} us" for r, s in seconds.items()),
             _label(*best), rule)
    return best


def correct_backends(op: str, device, dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                     names: list[str] | None = None, every: bool = False) -> list[str]:
    """The backends of `names` (default: the usable ones that take these shapes, cuda before triton)
    whose `op` ("paged_decode_attention" or "store_kv") matches the reference on `device`: the first
    only, or with every=True all of them; each one that disagrees or fails is named in a warning."""
    device = torch.device(device)
    error_of = {
        "paged_decode_attention": lambda b: _decode_error(b, device, dtype, num_heads, num_kv_heads, head_dim),
        "store_kv": lambda b: _store_error(b, device, dtype, num_kv_heads, head_dim),
    }[op]
    names = names or [b for b in ("cuda", "triton") if b in backends.available(op, device)
                      and _takes_shapes(op, b, dtype, num_heads, num_kv_heads, head_dim)]
    correct = []
    for name in names:
        try:
            err = error_of(name)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run here is skipped the same way
            log.warning("%s: the %s backend fails its start-up check on %s (%s: %s); not using it",
                        op, name, device, type(e).__name__, e)
            continue
        if err <= _TOLERANCE.get(dtype, 1e-4):
            correct.append(name)
            if not every:
                break
        else:
            log.warning("%s: the %s backend disagrees with the reference on %s (relative error %.2e); not "
                        "using it", op, name, device, err)
    return correct


def select_backends(device, dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                    candidates: dict[str, list[str]] | None = None, timing_batch: int | None = None,
                    graph: bool = True) -> dict[str, str]:
    """{op: backend} for paged_decode_attention and store_kv on `device`: of the candidates (default: the
    usable ones that take these shapes, cuda before triton) that match the reference here, the first,
    or, for decode attention with `timing_batch` given, the fastest at that batch without shared-prefix
    tiles (choose_decode; graph: timed as replays of a CUDA graph, or launched eagerly); "torch" when
    none matches. (The engine chooses its decode backend and tiles together: ModelRunner.)"""
    chosen = {}
    for op in ("paged_decode_attention", "store_kv"):
        race = op == "paged_decode_attention" and timing_batch is not None
        correct = correct_backends(op, device, dtype, num_heads, num_kv_heads, head_dim,
                                   (candidates or {}).get(op), every=race)
        if len(correct) > 1:
            chosen[op] = choose_decode(dict.fromkeys(correct, False), device, dtype, num_heads, num_kv_heads,
                                       head_dim, timing_batch, graph=graph)[0]
        else:
            chosen[op] = correct[0] if correct else "torch"
    return chosen


def _takes_shapes(op: str, backend: str, dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether `backend`'s kernel takes a model of these shapes at all (the CUDA decode kernel has
    head_dim and group limits): one that does not is passed over without a warning."""
    from r1fast.ops.attention import cuda_decode_problem

    if not backends.takes_dtype(op, backend, dtype):
        return False
    return op != "paged_decode_attention" or backend != "cuda" or \
        cuda_decode_problem(dtype, num_heads, num_kv_heads, head_dim) is None
