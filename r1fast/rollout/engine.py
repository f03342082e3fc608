"""Engine: GRPO-shaped generation (n completions per prompt) over a paged KV cache.

    engine = Engine(model, block_size=16, memory_fraction=0.5)
    results = engine.generate(prompt_token_ids, SamplingParams(n=8, temperature=1.0, max_tokens=512, seed=0))
    results[i].completions[j].token_ids / .logprobs / .finish_reason

The engine reads the model's parameters in place (no copy): after an optimizer step the next
generate() sees the new weights, and drops the cached prompt blocks whose KV the old weights made
(it notices a change by the parameters' version counters and a checksum of their bits, which only
crafted writes escape (docs/rollout.md); reset_prefix_cache() does it by hand).

Decode steps run one ahead of the host (async_decode=True): step k+1 is planned and launched, its
input tokens gathered on the device from step k's samples, before step k's tokens are copied back
and checked for stop ids. The host's work per step (scheduling, block tables, finish checks) then
overlaps the GPU's instead of following it. A sequence that stops at step k is still decoded at step
k+1 and that token discarded (counted in last_stats["discarded_tokens"]); steps that admit, prefill
or preempt wait for the tokens first. The tokens are the same either way: each depends only on its
sequence's own stream and position.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import logging
import math
import numbers
import os
import secrets
import threading

import numpy as np
import torch

from r1fast import _ext, backends, ops
from r1fast.progress import progress as progress_bar
from r1fast.rollout import sampler
from r1fast.rollout.params import Completion, RequestOutput, SamplingParams
from r1fast.rollout.runner import ModelRunner, lm_logits
from r1fast.rollout.scheduler import DecodeBatch, Scheduler
from r1fast.rollout.sequence import Sequence, Status, ids_in

log = logging.getLogger(__name__)

# a float parameter's bits as the signed integer of its width (the weights' checksums in Engine._weights_signature)
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _version(p: torch.Tensor) -> int | None:
    """p's in-place version counter; None for a tensor made under torch.inference_mode, which has none."""
    try:
        return p._version
    except RuntimeError:
        return None


# elements per clamp in _bit_sums: bounds its temporary (16 MB of int32) whatever a parameter's size
_SIGN_CHUNK = 1 << 22


def _bit_sums(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(each row's sum of p's bits read as integers of their width, each column's, the sum of the negative
    ones as int64), each modulo 2^bits (exact: a change of any one element shows in its row's
    sum; no widened copy, which for a bf16 embedding on the GPU was a 4x larger temporary). A row is p's last
    dimension, a column the same place in every row; a 1-D parameter is one row, so its columns are its
    elements. Engine._weights_signature weights the line sums by their place, so that elements moved through
    p.data show too: rows swapped by the row sums, elements swapped within a row (two columns of a weight, two
    entries of a bias, a row rolled) by the column sums. A sign flip moves a sum by 2^(bits-1), its own
    negative modulo 2^bits, so an even number of flips in one row and in one column left their sums unchanged;
    it moves the negative sum by the element's magnitude, into or out of the negatives, so flips cancel there
    only where the magnitudes turned negative sum to those turned positive. None where a tensor subclass (an
    FP8 library's weight) has no such view: its version counter alone speaks for it."""
    try:
        bits = p.detach().view(_INT_OF_SIZE[p.element_size()])
        table = bits.flatten(0, -2) if bits.dim() > 1 else bits.reshape(1, -1)
        rows, columns = table.sum(-1, dtype=bits.dtype), table.sum(0, dtype=bits.dtype)
        if bits.numel() <= _SIGN_CHUNK:  # one clamp: the loop's four extra ops per parameter cost 4x the sums
            return rows, columns, bits.clamp(max=0).sum(dtype=bits.dtype).long()
        flat = bits.reshape(-1)
        negative = torch.zeros((), dtype=bits.dtype, device=bits.device)
        scratch = torch.empty(_SIGN_CHUNK, dtype=bits.dtype, device=bits.device)
        for chunk in flat.split(_SIGN_CHUNK):  # one scratch buffer: a fresh one per chunk page-faulted on the CPU
            part = torch.clamp(chunk, max=0, out=scratch[: chunk.numel()])
            negative += part.sum(dtype=bits.dtype)
        return rows, columns, negative.long()
    except (RuntimeError, TypeError, KeyError, NotImplementedError):
        return None


def _placed_sum(line_sums: torch.Tensor) -> torch.Tensor:
    """The sum over g of line_sums[g] * (2g + 1), int64 wrapping (why odd factors: Engine._weights_signature)."""
    line_sums = line_sums.long()
    return line_sums.mul_(torch.arange(1, 2 * line_sums.numel() + 1, 2, device=line_sums.device)).sum()


def _positive_int(name, value) -> int:
    """value as a Python int; numpy integers (a size computed with numpy) are taken, as SamplingParams takes them."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Engine: {name} must be an int >= 1, got {value!r}")
    return int(value)


# where wrappers keep the module they wrap: torch.compile's OptimizedModule, DDP's and FSDP's
_WRAPPED_MODULE_ATTRS = ("_orig_mod", "module")


def _wrapped_causal_lm(model, causal_lm: type) -> str | None:
    """The attribute path (e.g. "_orig_mod", "module._orig_mod") under which a wrapper such as torch.compile's or
    DDP's holds a `causal_lm`, or None when `model` wraps none."""
    path, inner = [], model
    for _ in range(4):  # wrappers of wrappers (compiled DDP), never a long chain
        attr = next((a for a in _WRAPPED_MODULE_ATTRS if isinstance(getattr(inner, a, None), torch.nn.Module)), None)
        if attr is None:
            return None
        path.append(attr)
        inner = getattr(inner, attr)
        if isinstance(inner, causal_lm):
            return ".".join(path)
    return None


# a prompt token and one generated token: the shortest sequence generate() can run
MIN_MODEL_LEN = 2


def _model_len(max_model_len, cfg) -> int:
    """max_model_len as a Python int, the model's own (as long as its numbers equal transformers') when None. Below
    MIN_MODEL_LEN it is refused: max_model_len=1 was taken, and then every prompt (one token or more) was refused
    by generate(), which needs room for a new token after it."""
    if max_model_len is None:
        if cfg.max_sequence_length < MIN_MODEL_LEN:
            raise ValueError(f"Engine: the model runs sequences of {cfg.max_sequence_length} token (config.json's "
                             f"max_position_embeddings, or its sliding_window): no room for a prompt token and a new "
                             f"one, so its max_model_len is below the least an engine runs, {MIN_MODEL_LEN}")
        max_model_len = cfg.max_sequence_length
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, numbers.Integral) or \
            max_model_len < MIN_MODEL_LEN:
        raise ValueError(f"Engine: max_model_len must be an int >= {MIN_MODEL_LEN} (a prompt token and one new "
                         f"token), got {max_model_len!r}")
    return int(max_model_len)


def _prompt_ids(i: int, prompt, vocab: int) -> list[int]:
    """Prompt i as a new list of Python ints in [0, vocab). The checks are one pass over the element types
    and one numpy conversion (a long prompt costs no Python loop per token); a bad token is then looked up
    to name its position and value."""
    if isinstance(prompt, np.ndarray) and prompt.dtype == object and prompt.ndim == 1:
        prompt = prompt.tolist()   # Python ints in an object array (a pandas object column's values): checked as a list
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        if prompt.ndim != 1:
            raise TypeError(f"generate: prompt {i} must be a 1-D list of token ids, got {prompt.ndim} dimensions")
        if isinstance(prompt, torch.Tensor):
            if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
                raise TypeError(f"generate: prompt {i} must hold ints only, got a tensor of {prompt.dtype}")
            if prompt.is_meta:   # .cpu() raised a bare "Cannot copy out of meta tensor; no data!"
                raise ValueError(f"generate: prompt {i} is a tensor on the meta device, which holds no token ids "
                                 f"(shape only); give it on the CPU or a real device")
            prompt = prompt.detach().cpu().numpy()
        if prompt.dtype.kind not in ("i", "u"):
            raise TypeError(f"generate: prompt {i} must hold ints only, got an array of {prompt.dtype}")
        ids = prompt
    elif isinstance(prompt, (str, bytes)) or not isinstance(prompt, (list, tuple)):
        raise TypeError(f"generate: prompt {i} must be a list of ints, got {type(prompt).__name__}")
    else:
        if not all(issubclass(t, (int, np.integer)) and t is not bool for t in set(map(type, prompt))):
            j, t = next((j, t) for j, t in enumerate(prompt)
                        if isinstance(t, bool) or not isinstance(t, (int, np.integer)))
            raise TypeError(f"generate: prompt {i} must hold ints only; position {j} holds {t!r} "
                            f"({type(t).__name__})")
        try:
            ids = np.array(prompt, dtype=np.int64)
        except OverflowError:   # beyond 64 bits (2**70): outside the vocabulary, named below
            j, t = next((j, int(t)) for j, t in enumerate(prompt) if not -2**63 <= t < 2**63)
            raise ValueError(f"generate: prompt {i} has token id {t} at position {j}, outside the vocabulary "
                             f"[0, {vocab})") from None
    if len(ids) == 0:
        raise ValueError(f"generate: prompt {i} is empty")
    outside = (ids < 0) | (ids >= vocab)
    if outside.any():
        j = int(np.flatnonzero(outside)[0])
        more = int(outside.sum()) - 1
        raise ValueError(f"generate: prompt {i} has token id {int(ids[j])} at position {j}, outside the vocabulary "
                         f"[0, {vocab})" + (f" (and {more} more)" if more else ""))
    return ids.tolist()


class Engine:
    def __init__(self, model, num_blocks: int | None = None, block_size: int = 16, memory_fraction: float = 0.5,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, use_cuda_graphs: bool = True,
                 decode_backend: str | None = None, shared_prefix_attention: bool | None = None,
                 async_decode: bool = True, pool_tokens_per_seq: int | None = None):
        from r1fast.models import CausalLM

        if not isinstance(model, CausalLM):
            # a transformers model has a config with the same fields but another forward: it failed
            # deep inside transformers at the first prefill
            got = f"{type(model).__module__}.{type(model).__name__}"
            inner = _wrapped_causal_lm(model, CausalLM)
            if inner is not None:  # the remedy below (a checkpoint, HFRollout) is not this caller's
                raise TypeError(f"Engine: model must be an r1fast.models.CausalLM, got {got}, a wrapper around one; "
                                f"pass the wrapped module, model.{inner} (the engine runs its own forward and reads "
                                f"that module's weights in place)")
            raise TypeError(f"Engine: model must be an r1fast.models.CausalLM, got {got}; load a Hugging Face folder "
                            f"with r1fast.models.from_pretrained(path), or wrap a transformers model with "
                            f"r1fast.integrations.hf_rollout.HFRollout")
        meta = [name for name, p in model.named_parameters() if p.is_meta]
        if meta:  # the weights' checksum failed first, with a bare "Cannot copy out of meta tensor; no data!"
            more = f" and {len(meta) - 1} more" if len(meta) > 1 else ""
            raise ValueError(f"Engine: the model's parameters ({meta[0]}{more}) are on the meta device, which holds no "
                             f"weights (shapes only: a model built under torch.device('meta')); load its weights "
                             f"first (r1fast.models.from_pretrained(path), or model.to_empty(device=...) and "
                             f"load_state_dict)")
        cfg = model.config
        block_size, max_num_seqs = _positive_int("block_size", block_size), _positive_int("max_num_seqs", max_num_seqs)
        max_num_batched_tokens = _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        # a decoding sequence writes into a block of its own (a shared partial block is copied on write), so no pool
        # runs more sequences than BlockManager's limit of blocks; max_num_seqs=2**40 sized the step buffers and
        # failed inside torch's allocator. Not bounded by this pool's num_blocks: the default 256 seats outnumber a
        # small pool, whose scheduler runs what fits and queues the rest
        most_blocks = _ext.require().BlockManager.max_num_blocks
        if max_num_seqs > most_blocks:
            raise ValueError(f"Engine: max_num_seqs={max_num_seqs} exceeds {most_blocks}, the most blocks a KV pool "
                             f"holds; each running sequence needs a block of its own, so no more can run at once")
        if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, numbers.Real) or \
                not 0 < memory_fraction <= 1:
            raise ValueError(f"Engine: memory_fraction must lie in (0, 1], got {memory_fraction!r}")
        for name, value in (("enable_prefix_caching", enable_prefix_caching), ("use_cuda_graphs", use_cuda_graphs),
                            ("async_decode", async_decode)):
            if not isinstance(value, bool):  # bool("no") is True: a string here would silently mean on
                raise TypeError(f"Engine: {name} must be True or False, got {value!r}")
        if shared_prefix_attention is not None and not isinstance(shared_prefix_attention, bool):
            raise TypeError(f"Engine: shared_prefix_attention must be None (use it where it is faster on this card), "
                            f"True or False, got {shared_prefix_attention!r}")
        self.model = model
        self.config = cfg
        self.max_model_len = _model_len(max_model_len, cfg)
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"Engine: max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        if cfg.sliding_window is not None and self.max_model_len > cfg.sliding_window:
            raise ValueError(f"Engine: max_model_len {self.max_model_len} exceeds config.json's sliding_window "
                             f"{cfg.sliding_window} (r1fast runs full attention, equal to transformers' "
                             f"sliding-window layers only up to that many tokens); limit the sequences "
                             f"(prompt + completion) to {cfg.sliding_window} tokens")
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        if pool_tokens_per_seq is not None:
            pool_tokens_per_seq = _positive_int("pool_tokens_per_seq", pool_tokens_per_seq)
        given = num_blocks is not None
        if num_blocks is None:
            num_blocks = self._blocks_from_memory(memory_fraction, min(pool_tokens_per_seq or self.max_model_len,
                                                                      self.max_model_len))
        num_blocks = _positive_int("num_blocks", num_blocks)
        self._check_pool_fits(num_blocks, given)
        ext = _ext.require()
        self.block_manager = ext.BlockManager(num_blocks, block_size, bool(enable_prefix_caching))
        # autocast off, as in generate(): the CUDA graphs captured here replay in every decode step, and captured
        # under an enclosing torch.autocast they would keep its bf16/fp16 matmuls (or fail and decode eagerly)
        with backends.without_autocast(model.device):
            self.runner = ModelRunner(model, num_blocks, block_size, max_num_seqs, self.max_model_len,
                                      use_cuda_graphs=use_cuda_graphs, decode_backend=decode_backend,
                                      shared_prefix=shared_prefix_attention)
        self.eos_ids = set(model.eos_token_ids)
        self.async_decode = async_decode
        self._uniforms = sampler.HostUniforms(self.max_model_len + 1)
        # Two sets of pinned buffers for a step's uniforms (in) and samples (out): step k+1 uses one while
        # the host still reads step k's from the other. Pinned, because a copy from pageable memory may
        # wait for the stream, which would undo running a step ahead.
        self._pinned = [{name: torch.empty(max_num_seqs, dtype=dt, pin_memory=True) for name, dt in
                         (("uniforms", torch.float64), ("tokens", torch.int64), ("logprobs", torch.float32))}
                        for _ in range(2)] if model.device.type == "cuda" else None
        self._pinned_turn = 0
        self._next_seq_id = 0
        self.last_stats: dict = {}
        # one call at a time: calls share the block manager, the cache and the buffers, and a call's cleanup
        # frees every sequence the manager holds (another thread's call then failed on unknown sequence ids)
        self._generate_lock = threading.Lock()
        self._weights_seen = self._weights_signature()

    def _check_pool_fits(self, num_blocks: int, given: bool):
        """A pool larger than the device's whole memory (block_size=10**9) failed in torch's allocator, a RuntimeError
        traceback. The whole memory, not what is free now: a pool refused here could never be allocated."""
        pool = num_blocks * ModelRunner.kv_bytes_per_block(self.config, self.block_size, self.model.dtype)
        device = self.model.device
        if device.type == "cuda":
            memory = torch.cuda.mem_get_info(device)[1]
        else:
            memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if pool > memory:
            raise ValueError(f"Engine: a KV pool of {num_blocks} block{'s' if num_blocks != 1 else ''} of block_size "
                             f"{self.block_size} tokens takes {pool:,} bytes, more than the {memory:,} bytes of memory "
                             f"on {device}; lower block_size{' or num_blocks' if given else ''}")

    def _blocks_from_memory(self, fraction: float, tokens_per_seq: int) -> int:
        per_block = ModelRunner.kv_bytes_per_block(self.config, self.block_size, self.model.dtype)
        # never more than max_num_seqs sequences of tokens_per_seq use at once (longer ones preempt), nor less
        # than one sequence of max_model_len: a request the engine accepts must fit once the others are preempted
        cap = max(self.max_num_seqs * math.ceil(tokens_per_seq / self.block_size),
                  math.ceil(self.max_model_len / self.block_size)) + 1
        device = self.model.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free * fraction
        else:
            budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * fraction
        blocks = max(1, min(cap, int(budget // per_block)))
        limit = _ext.require().BlockManager.max_num_blocks
        if blocks > limit:
            # memory_fraction is an upper bound, so a pool at the block manager's limit honours it; raising
            # instead would refuse a setting whose only fault is a tiny KV per block (a toy model, block_size 1)
            log.warning("Engine: memory_fraction %s sizes the KV pool at %d blocks, past the block manager's "
                        "limit of %d; using %d (pass num_blocks to choose)", fraction, blocks, limit, limit)
            blocks = limit
        return blocks

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    def reset_prefix_cache(self):
        """Forget every cached prompt block (their KV is stale after a weight update; generate() also
        notices a weight change itself and calls this)."""
        self.block_manager.reset_prefix_cache()

    def _weights_signature(self):
        """(per parameter (storage, in-place version, sum of its negative bits), the parameters' row and column
        sums of bits weighted by their place): it changes whenever a weight does, short of crafted writes that
        cancel in every sum (docs/rollout.md, Prefix cache, names them), so a cached prompt block's KV is not
        reused on other weights. The version counter alone missed writes through `p.data` and fused
        optimizers (torch.optim.AdamW(fused=True) bumps no version), and parameters made under
        torch.inference_mode count none; the bit sums (exact integer arithmetic: any one element's change, sign
        flips, swapped rows and elements swapped within a row show) catch those, for a few passes over the
        weights per call (each decode step reads them once)."""
        params = list(self.model.parameters())
        if not params:
            return (), None
        with torch.no_grad():
            sums = [_bit_sums(p) for p in params]
            known = [s for s in sums if s is not None]
            placed = None
            if known:
                # rows and columns apart, line g's sum times 2g + 1 (int64, wrapping): a changed line sum d moves
                # it by d * (2g + 1), never 0 modulo 2^64 (an odd factor has an inverse there; g + 1 lost an fp64
                # change of 2^62 at g = 3: 1.0 -> inf), and two lines with sums a and b swapped move it by
                # 2 (a - b) * (their distance), never 0 for weights of up to 4 bytes (|a - b| < 2^32) and fewer
                # than 2^31 lines. One sum of rows and columns together missed a transposed square weight.
                placed = [_placed_sum(torch.cat([s[i] for s in known])) for i in (0, 1)]
                values = torch.cat([torch.stack(placed), torch.stack([s[2] for s in known])]).tolist()  # one sync
                placed, negatives = tuple(values[:2]), iter(values[2:])
            sums = [None if s is None else next(negatives) for s in sums]
        return tuple((p.data_ptr(), _version(p), s) for p, s in zip(params, sums)), placed

    def _check_weights(self):
        built_for, model_is = (self.runner.dtype, self.runner.device), (self.model.dtype, self.model.device)
        if model_is != built_for:  # the KV cache (and any graph) keep the old ones: store_kv failed on a dtype mismatch
            raise RuntimeError(f"Engine: the model is now {model_is[0]} on {model_is[1]}, but this engine's KV cache "
                               f"was built for {built_for[0]} on {built_for[1]}; build a new Engine after .to()")
        seen, now = self._weights_seen, self._weights_signature()
        if now == seen:
            return
        if self.runner.graphs and [ptr for ptr, *_ in seen[0]] != [ptr for ptr, *_ in now[0]]:
            raise RuntimeError("Engine: the model's parameters were replaced, not updated in place, since this "
                               "engine captured its CUDA graphs, which still read the old memory; update them in "
                               "place (with torch.no_grad(): p.copy_(new)), or build a new Engine")
        self.block_manager.reset_prefix_cache()
        self._weights_seen = now

    # -- validation --------------------------------------------------------------------------------
    def _validate(self, prompts, params: SamplingParams):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"generate: prompt_token_ids must be a list of token-id lists, got {type(prompts).__name__}")
        vocab = self.config.vocab_size
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad_stop:
            raise ValueError(f"generate: stop_token_ids {bad_stop} are not in the vocabulary [0, {vocab})")
        if params.n > self.max_num_seqs:
            raise ValueError(f"generate: n={params.n} samples exceed max_num_seqs={self.max_num_seqs}")
        out = []
        for i, p in enumerate(prompts):
            p = _prompt_ids(i, p, vocab)
            if len(p) >= self.max_model_len:
                raise ValueError(f"generate: prompt {i} has {len(p)} tokens; max_model_len is {self.max_model_len} "
                                 "(a prompt must leave room for at least one new token)")
            longest = min(len(p) + params.max_tokens, self.max_model_len)
            # the last token is sampled, never fed back: a sequence holds the KV of longest - 1 tokens at most
            need = math.ceil((longest - 1) / self.block_size)
            if need > self.num_blocks:
                raise ValueError(f"generate: prompt {i} with max_tokens={params.max_tokens} needs {need} KV blocks; "
                                 f"the pool has {self.num_blocks} (raise num_blocks or memory_fraction)")
            out.append(p)
        return out

    # -- generation ------------------------------------------------------------------------------
    def _keys(self, prompts, seed: int):
        """Random stream key of (prompt i, sample j): from the seed, the prompt's tokens and how many
        identical prompts came before it in this call, so a prompt's samples are the same alone or in
        any batch, and repeated prompts still get different samples."""
        seen: dict[bytes, int] = {}
        keys = []
        for p in prompts:
            digest = hashlib.blake2b(np.asarray(p, dtype=np.int64).tobytes(), digest_size=8).digest()
            occurrence = seen.get(digest, 0)
            seen[digest] = occurrence + 1
            keys.append((int.from_bytes(digest, "little"), occurrence))
        # stream_key(seed, h, o, j): the prompt's parts folded once, each sample's j onto them
        return [lambda j, s=sampler.stream_key(seed, h, o): sampler.stream_key(j, state=s) for h, o in keys]

    @torch.no_grad()
    def generate(self, prompt_token_ids, params: SamplingParams | None = None, progress: bool = False):
        params = SamplingParams() if params is None else params
        if not isinstance(progress, bool):  # bool("no") is True: a string here would show a bar (as Engine's flags)
            raise TypeError(f"generate: progress must be True or False, got {progress!r}")
        prompts = self._validate(prompt_token_ids, params)
        if not prompts:  # no step runs: the stats say so (they kept the previous call's)
            self.last_stats = dict.fromkeys(("prefill", "decode", "discarded_tokens", "preemptions",
                                             "cached_tokens"), 0)
            return []
        # an unseeded call's seed comes from the OS: drawn with torch.randint, it advanced the caller's torch random
        # stream (a user's own torch.rand after a generate call gave other numbers than without it)
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        key_of = self._keys(prompts, seed)
        # a table over the vocabulary (stop ids are checked in range, sampled ones are): a step's stop check is
        # one lookup, where np.isin cost 20-50 us per step at any batch size
        is_stop = np.zeros(self.config.vocab_size, dtype=bool)
        is_stop[list(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids))] = True
        # autocast off: under an enclosing torch.autocast (a training step's) the projections ran in bf16/fp16 while
        # the KV cache holds the model's dtype, and the first prefill failed in store_kv ("must share a float dtype");
        # the engine's numbers are the model's dtype with fp32 logits (docs/rollout.md), whatever the caller's context
        with self._generate_lock, backends.without_autocast(self.model.device):
            self._check_weights()
            return self._generate(prompts, params, key_of, is_stop, progress)

    def _generate(self, prompts, params: SamplingParams, key_of, is_stop: np.ndarray, progress: bool):
        sched = Scheduler(self.block_manager, self.max_num_seqs, self.max_num_batched_tokens)
        for i, p in enumerate(prompts):
            sched.add(Sequence(self._new_id(), i, 0, key_of[i](0), p, fork_into=params.n,
                               max_len=min(len(p) + params.max_tokens, self.max_model_len)))
        call = _Call(sched, params, key_of, is_stop, {i: [] for i in range(len(prompts))},
                     progress_bar(len(prompts) * params.n, "generate", unit="seq") if progress else None)
        try:
            with _cyclic_gc_paused():
                self._run(call)
        finally:
            # the engine holds no sequence between calls: free whatever an exception left behind, also
            # blocks taken in a window where no scheduler list holds the sequence (a fork before
            # prefill_done, an allocate before prefilling.append, a preempt after running.pop)
            for seq_id in self.block_manager.seq_ids():
                self.block_manager.free(seq_id)
            if call.bar is not None:
                call.bar.close()
        self.last_stats = {**call.steps, "preemptions": sched.num_preemptions, "cached_tokens": sched.num_cached_tokens}
        results = []
        for i, p in enumerate(prompts):
            seqs = sorted(call.done[i], key=lambda s: s.sample)
            results.append(RequestOutput(p, [Completion(s.tokens[s.prompt_len:], s.logprobs, s.finish_reason)
                                             for s in seqs]))
        return results

    def _run(self, call: _Call):
        """Steps until every sequence has finished (into call.done[request])."""
        sched, steps = call.sched, call.steps
        pending = None  # the decode step whose tokens are still on the device
        while sched.has_work() or pending is not None:
            batch = sched.schedule() if pending is None else sched.schedule_ahead()
            if batch is None:  # planning needs the tokens in flight (or nothing is left to decode)
                self._collect(pending, call)
                pending = None
            elif isinstance(batch, DecodeBatch):
                steps["decode"] += 1
                step = self._launch_decode(batch, call, pending)
                if pending is not None:  # its tokens are in step's inputs already; now the host reads them
                    self._collect(pending, call)
                pending = step
                if not self.async_decode:
                    self._collect(pending, call)
                    pending = None
            else:
                steps["prefill"] += 1
                hidden = self._prefill(batch, sched, call.key_of)
                if hidden is not None:
                    self._sample_first_tokens(hidden, call)

    def _sample_first_tokens(self, hidden, call: _Call):
        """Samples (and waits for) the first token of the sequences whose prompts a prefill completed:
        the newest running rows."""
        running = call.sched.running
        start = len(running) - hidden.shape[0]
        keys, lens = running.array("keys")[start:], running.array("lens")[start:]
        tokens, logprobs = self._sample(hidden, keys, lens, call.params, self._next_pinned())
        tokens, logprobs = tokens.cpu().numpy(), logprobs.cpu().numpy()
        _check_finite(logprobs)
        running.advance(tokens, logprobs, start)
        call.finish(running.seqs[start:], tokens, running.array("lens")[start:], running.array("max_lens")[start:])

    def _launch_decode(self, batch: DecodeBatch, call: _Call, pending: _DecodeStep | None) -> _DecodeStep:
        """Queues a decode step and its sampling on the device; returns it in flight. With `pending`
        (the step before, not collected yet) each row's input token is gathered from its samples."""
        running = call.sched.running
        ids, lens = running.array("ids"), running.array("lens")
        if pending is None:
            inputs = {"last_tokens": running.array("last")}
        else:  # running rows are pending's rows less those that left, in the same order
            inputs = {"tokens_from": (pending.tokens, _rows_in(pending.ids, ids))}
        self.runner.copy_blocks(batch.copies)
        hidden = self.runner.decode(self.block_manager, ids, lens - 1, batch.slots, **inputs)
        pinned = self._next_pinned()
        tokens, logprobs = self._sample(hidden, running.array("keys"), lens, call.params, pinned)
        step = _DecodeStep(list(running.seqs), ids, lens.copy(), running.array("max_lens"), tokens,
                           call.sched.num_stopped)
        step.fetch(logprobs, pinned)
        running.count_in_flight()
        # a row whose token in flight reaches its length limit is done: the next step leaves it out
        at_limit = running.array("lens") >= running.array("max_lens")
        if at_limit.any():
            running.remove(at_limit)
        return step

    def _collect(self, step: _DecodeStep, call: _Call):
        """Waits for a decode step's tokens and hands them to their sequences; finishes those that
        stopped or reached their length. Rows whose sequences stopped in the step before are dropped
        (counted as discarded tokens)."""
        tokens, logprobs = step.wait()
        if call.sched.num_stopped == step.num_stopped:  # none of its rows stopped since the launch (most steps)
            live = np.ones(len(step.seqs), dtype=bool)
        else:  # a pass over the rows: ~20 us at 256 rows
            decoding = Status.RUNNING  # once: the enum member looked up per row was 3/4 of this line's time
            live = np.fromiter((s.status is decoding for s in step.seqs), dtype=bool, count=len(step.seqs))
        _check_finite(logprobs[live])
        for s, t, lp, keep in zip(step.seqs, tokens.tolist(), logprobs.tolist(), live.tolist()):
            if keep:
                s.tokens.append(t)
                s.logprobs.append(lp)
        running = call.sched.running
        ids = running.array("ids")
        rows = _rows_in(step.ids, ids)
        if len(rows) != len(ids):
            raise RuntimeError("generate: a running sequence joined while a decode step was in flight (engine bug)")
        running.array("last")[:] = tokens[rows]
        call.finish(step.seqs, tokens, step.lens + 1, step.max_lens, live)
        call.steps["discarded_tokens"] += int(len(live) - live.sum())

    def _next_pinned(self) -> dict | None:
        if self._pinned is None:
            return None
        self._pinned_turn ^= 1
        return self._pinned[self._pinned_turn]

    def _new_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id

    def _prefill(self, batch, sched: Scheduler, key_of):
        """Runs a prefill step; forks each group whose prompt completed and returns the hidden
        states of the sequences that sample now (in the order they joined `sched.running`), or None."""
        hidden = self.runner.prefill(self.block_manager, [s.seq_id for s in batch.seqs],
                                     [s.tokens for s in batch.seqs], batch.starts, batch.ends)
        keep = []
        for r, (s, end) in enumerate(zip(batch.seqs, batch.ends)):
            s.num_computed = end
            self.block_manager.mark_computed(s.seq_id, end)
            if end == len(s):  # the prompt (or recomputed sequence) is complete: sample
                children = [s.child(self._new_id(), j, key_of[s.request](j)) for j in range(1, s.fork_into)]
                for c in children:
                    self.block_manager.fork(s.seq_id, c.seq_id)
                sched.prefill_done(s, children)
                keep += [r] * (1 + len(children))
        if not keep:
            return None
        return hidden.index_select(0, torch.tensor(keep, device=hidden.device))

    def _sample(self, hidden, keys: np.ndarray, lens: np.ndarray, params, pinned: dict | None):
        """(tokens int64 [B], logprobs float32 [B]) on the device for rows with these stream keys and
        lengths; queued only: nothing here waits for the device."""
        logits = lm_logits(hidden, self.model.lm_head_weight)
        u = None
        if not params.greedy:  # the step's random numbers, hashed on the host (see HostUniforms)
            u = torch.from_numpy(self._uniforms(keys, lens))
            if pinned is not None:
                staged = pinned["uniforms"][: len(u)]
                staged.copy_(u)
                u = staged.to(logits.device, non_blocking=True)
        # backend: torch (sampler.sample) on the CPU, the Triton kernel on a GPU (top-k/top-p: torch);
        # R1FAST_BACKEND overrides it as for every op (reference: float64 sampling, for debugging)
        tokens, logprobs = ops.sample_tokens(logits, params, u, check_inputs=False)
        return tokens, logprobs.float()


@dataclasses.dataclass
class _Call:
    """What the steps of one generate() call share."""
    sched: Scheduler
    params: SamplingParams
    key_of: list
    is_stop: np.ndarray                # bool [vocab]: the call's stop ids
    done: dict[int, list[Sequence]]    # request -> its finished sequences
    bar: object | None
    steps: dict = dataclasses.field(default_factory=lambda: {"prefill": 0, "decode": 0, "discarded_tokens": 0})

    def finish(self, seqs: list[Sequence], tokens: np.ndarray, lens: np.ndarray, max_lens: np.ndarray,
               live: np.ndarray | bool = True):
        """Retires the sequences (where live) whose new token is a stop id, or which now hold `lens`
        tokens, their limit or more."""
        stopped = live & self.is_stop[tokens]
        ended = stopped | (live & (lens >= max_lens))
        if not ended.any():
            return
        done = [seqs[i] for i in np.flatnonzero(ended).tolist()]
        self.sched.retire(done, stopped[ended].tolist())
        for s in done:
            self.done[s.request].append(s)
        if self.bar is not None:
            self.bar.update(len(done))


def _rows_in(launched: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Where the running ids sit among the ids a step was launched with (rows only ever leave)."""
    return np.arange(len(ids)) if ids is launched else np.flatnonzero(ids_in(launched, ids))


@dataclasses.dataclass
class _DecodeStep:
    """A launched decode step: its rows as they were at launch, and its samples on their way to the host."""
    seqs: list[Sequence]
    ids: np.ndarray          # the running ids array it was launched with
    lens: np.ndarray         # each row's length before this step's token
    max_lens: np.ndarray
    tokens: torch.Tensor     # int64 [B] on the device: the next step's inputs
    num_stopped: int         # Scheduler.num_stopped at launch: unchanged at collection, every row still runs
    _host: tuple | None = None
    _ready: torch.cuda.Event | None = None

    def fetch(self, logprobs: torch.Tensor, pinned: dict | None):
        """Starts copying (tokens, logprobs) into the pinned host buffers, or to the host now on a CPU."""
        if pinned is None:
            self._host = (self.tokens.cpu(), logprobs.cpu())
            return
        b = len(self.tokens)
        host = (pinned["tokens"][:b], pinned["logprobs"][:b])
        host[0].copy_(self.tokens, non_blocking=True)
        host[1].copy_(logprobs, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record(torch.cuda.current_stream(self.tokens.device))
        self._host = host

    def wait(self) -> tuple[np.ndarray, np.ndarray]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host[0].numpy(), self._host[1].numpy()


def _check_finite(logprobs: np.ndarray):
    bad = int(np.isnan(logprobs).sum())
    if bad:
        raise RuntimeError(f"generate: the model produced NaN logits for {bad} of {len(logprobs)} sequences "
                           f"(NaN/inf weights or activations?); no token can be sampled from them")


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Python's cyclic collector walks every tracked object (torch's, the model's, each Sequence)
    and stalled decode steps for up to a millisecond at random; the loop makes no reference
    cycles, so the collector waits until generate() returns."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
