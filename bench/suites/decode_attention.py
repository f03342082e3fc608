"""decode_attention: paged decode attention (one query token per sequence over its paged context).

Memory-bound: the floor is the K/V bytes read (plus q and out) over the measured copy bandwidth.
Peer: the same math in plain torch (gather the pages, einsum, softmax).

The `shared prefix` case is GRPO's: groups of G samples whose contexts begin with the same prompt
blocks. Its floor counts each distinct block once; the rows "+shared" pass the SharedPrefix tiles
(the prompt's blocks read once per tile), the others read them once per sample.
"""
import math

import torch

from r1fast import ops
from r1fast.ops.shared_prefix import find_shared_prefixes
from r1fast.bench.harness import Case, Impl, require_backend, suite


def _inputs(num_seqs, heads, kv_heads, dim, ctx, block_size, dtype, device):
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = num_seqs * blocks_per_seq
    g = torch.Generator().manual_seed(0)
    q = torch.randn(num_seqs, heads, dim, generator=g).to(device=device, dtype=dtype)
    kc = torch.randn(num_blocks, block_size, kv_heads, dim, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    tables = torch.randperm(num_blocks, generator=g).view(num_seqs, blocks_per_seq).to(device=device,
                                                                                         dtype=torch.int32)
    lens = torch.full((num_seqs,), ctx, device=device, dtype=torch.int32)
    return q, kc, vc, tables, lens


def _graphed(setup, device):
    """An Impl setup whose timed callable replays one call captured in a CUDA graph, as the rollout
    engine runs decode: the GPU's time without the host's (the Python wrapper, each launch), which
    the plain rows also count where it outlasts the timer's L2 flush."""
    def wrapped():
        run = setup()
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile and look everything up outside the capture
                run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
        return graph.replay
    return wrapped


def _r1fast(backend, shape, dtype, device):
    def setup():
        require_backend("paged_decode_attention", backend, device)
        args = _inputs(*shape, dtype, device)
        return lambda: ops.paged_decode_attention(*args, backend=backend, check_bounds=False)
    return setup


def _shared_inputs(groups, samples, heads, kv_heads, dim, prompt, ctx, block_size, dtype, device):
    """groups x samples rows; each group's rows share the blocks of its `prompt` tokens, then own theirs."""
    q, kc, vc, tables, lens = _inputs(groups * samples, heads, kv_heads, dim, ctx, block_size, dtype, device)
    shared_blocks = prompt // block_size
    t = tables.view(groups, samples, -1)
    t[:, 1:, :shared_blocks] = t[:, :1, :shared_blocks]
    return q, kc, vc, tables, lens


def _r1fast_shared(backend, shape, dtype, device, use_tiles):
    def setup():
        require_backend("paged_decode_attention", backend, device)
        groups, samples, heads, kv_heads, dim, prompt, ctx, bs = shape
        q, kc, vc, tables, lens = _shared_inputs(*shape, dtype, device)
        tiles = None
        if use_tiles:
            tiles = find_shared_prefixes(tables.cpu().numpy(), lens.cpu().numpy(), bs, heads, kv_heads,
                                         dim).to(device)
        return lambda: ops.paged_decode_attention(q, kc, vc, tables, lens, backend=backend, check_bounds=False,
                                                  shared_prefix=tiles)
    return setup


def _shared_case(shape, dtype, device):
    groups, samples, heads, kv_heads, dim, prompt, ctx, bs = shape
    b = groups * samples
    es = torch.finfo(dtype).bits // 8
    distinct_tokens = groups * prompt + b * (ctx - prompt)
    nbytes = es * (2 * distinct_tokens * kv_heads * dim + 2 * b * heads * dim)
    gpu = device.type == "cuda"
    names = ("cuda", "triton") if gpu else ("triton",)
    impls = [Impl("r1fast", f"{name}+shared", _r1fast_shared(name, shape, dtype, device, True)) for name in names]
    impls += [Impl("r1fast", name, _r1fast_shared(name, shape, dtype, device, False)) for name in names]
    if gpu:  # whether the tiles pay where the engine uses them: inside a CUDA graph
        impls += [Impl("r1fast", f"triton{tag} (graph)", _graphed(_r1fast_shared("triton", shape, dtype, device, t),
                                                                  device)) for tag, t in (("+shared", True), ("", False))]
    impls.append(Impl("torch", "gather+einsum" if gpu else "reference",
                      _r1fast_shared("torch" if gpu else "reference", shape, dtype, device, False)))
    return Case(f"shared prefix: {groups} groups x {samples} samples heads={heads}/{kv_heads} dim={dim} "
                f"prompt={prompt} ctx={ctx}", "fwd", str(dtype).removeprefix("torch."), impls,
                flops=4 * b * heads * ctx * dim, bytes=nbytes, items=b, item_name="seqs")


@suite("decode_attention", "paged decode attention vs plain torch; floor = KV bytes / bandwidth")
def cases(size, device):
    # (num_seqs, heads, kv_heads, head_dim, context, block_size): Qwen2.5-1.5B heads at GPU size
    if size == "gpu":
        shapes, dtype = [(512, 12, 2, 128, 768, 16), (64, 12, 2, 128, 4096, 16), (8, 12, 2, 128, 32768, 16),
                         (128, 32, 8, 128, 2048, 16)], torch.bfloat16
    else:
        shapes, dtype = [(8, 4, 2, 32, 64, 16)], torch.float32
    es = torch.finfo(dtype).bits // 8
    out = []
    for shape in shapes:
        b, h, hkv, d, ctx, bs = shape
        nbytes = es * (2 * b * ctx * hkv * d + 2 * b * h * d)
        flops = 4 * b * h * ctx * d
        gpu = device.type == "cuda"
        impls = [Impl("r1fast", name, _r1fast(name, shape, dtype, device))
                 for name in (("cuda", "triton") if gpu else ("torch",))]
        if gpu:
            impls.append(Impl("r1fast", "triton (graph)", _graphed(_r1fast("triton", shape, dtype, device), device)))
        impls.append(Impl("torch", "gather+einsum", _r1fast("torch", shape, dtype, device)) if gpu else
                     Impl("torch", "reference", _r1fast("reference", shape, dtype, device)))
        out.append(Case(f"seqs={b} heads={h}/{hkv} dim={d} ctx={ctx}", "fwd", str(dtype).removeprefix("torch."),
                        impls, flops=flops, bytes=nbytes, items=b, item_name="seqs"))
    # (groups, samples, heads, kv_heads, head_dim, prompt, context, block_size): the rollout's step
    shared = (64, 8, 12, 2, 128, 256, 512, 16) if size == "gpu" else (2, 4, 4, 2, 32, 32, 48, 16)
    out.append(_shared_case(shared, dtype, device))
    return out
