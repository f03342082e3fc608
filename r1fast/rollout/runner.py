"""Runs the model over the paged KV cache: prefill chunks, decode steps (CUDA graphs on GPU), logits.

The cache is one tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; layer l's
keys are kv[l, 0] and values kv[l, 1], each contiguous in the layout of ops.store_kv.

Shared prefixes: the G samples of a group hold their prompt's blocks in common. With a triton or
cuda decode backend each decode step can pass ops.paged_decode_attention a SharedPrefix, so those
blocks are read once per tile of samples, not once per sample; by default only where that is timed
faster on the card at start-up (self_check.choose_decode). The tiles come from the block tables
(r1fast.ops.shared_prefix) and are kept while the running set is unchanged.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from r1fast import backends, ops
from r1fast.fp8 import fp8_disabled
from r1fast.ops.shared_prefix import (SharedPrefix, drop_tile_rows, pad_shared_prefix, prefix_tile_rows,
                                  shared_block_tiles, shared_prefix_at)
from r1fast.rollout.sequence import ids_in

log = logging.getLogger(__name__)


class PrefillContext:
    """attend(): store the chunk's K/V, then causal attention over cached prefix + chunk."""

    def __init__(self, kv, slots, context_slots, query_lens, context_lens, scale, store_backend=None, cu_seqlens=None,
                 rotary_table=None):
        self.kv, self.slots, self.context_slots = kv, slots, context_slots
        self.query_lens, self.context_lens, self.scale = query_lens, context_lens, scale
        self.store_backend, self.cu_seqlens = store_backend, cu_seqlens
        self.rotary_table = rotary_table

    def cos_sin(self, position_ids):
        return rotary_rows(self.rotary_table, position_ids)

    def attend(self, layer: int, q, k, v):
        kc, vc = self.kv[layer, 0], self.kv[layer, 1]
        ops.store_kv(k, v, kc, vc, self.slots, check_slots=False, backend=self.store_backend)
        # the block manager built context_slots: in range, and checking them would sync once per layer
        return ops.paged_prefill_attention(q, kc, vc, self.context_slots, self.query_lens, self.context_lens,
                                           scale=self.scale, cu_seqlens=self.cu_seqlens, check_bounds=False)


class DecodeContext:
    """attend(): store the new token's K/V, then paged decode attention (no host sync: graph-safe)."""

    def __init__(self, kv, slots, block_tables, context_lens, scale, backend=None, store_backend=None,
                 shared_prefix=None, rotary_table=None):
        self.kv, self.slots, self.block_tables, self.context_lens = kv, slots, block_tables, context_lens
        self.scale, self.backend, self.store_backend = scale, backend, store_backend
        self.shared_prefix, self.rotary_table = shared_prefix, rotary_table

    def cos_sin(self, position_ids):
        return rotary_rows(self.rotary_table, position_ids)

    def attend(self, layer: int, q, k, v):
        kc, vc = self.kv[layer, 0], self.kv[layer, 1]
        ops.store_kv(k, v, kc, vc, self.slots, check_slots=False, backend=self.store_backend)
        return ops.paged_decode_attention(q.contiguous(), kc, vc, self.block_tables, self.context_lens,
                                          scale=self.scale, backend=self.backend, check_bounds=False,
                                          shared_prefix=self.shared_prefix)


def rotary_table(model, num_positions: int) -> torch.Tensor:
    """[num_positions, 2, head_dim]: the model's cos (row 0) and sin (row 1) at positions 0.. in its dtype,
    computed once by the expressions a forward computes them with (model.rotary.cos_sin). A step then
    gathers its rows in one kernel; computed per step they were seven (cast, multiply, cat, cos, sin,
    two casts), each a launch in every decode step's graph."""
    cos, sin = model.rotary.cos_sin(torch.arange(num_positions, device=model.device), model.dtype)
    return torch.stack((cos, sin), dim=1)


def rotary_rows(table: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, head_dim] of `position_ids` from a rotary_table(): views of one gathered tensor."""
    rows = table.index_select(0, position_ids)
    return rows[:, 0], rows[:, 1]


_TORCH_INT = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


def _layout(fields):
    """Byte offsets of `fields` (name, dtype, shape) packed one after another, each 16-byte aligned (as
    a fresh allocation would be: kernels may vectorise their loads): ([(name, dtype, shape, offset)], total bytes)."""
    out, off = [], 0
    for name, dt, shape in fields:
        out.append((name, dt, shape, off))
        off += -(-np.dtype(dt).itemsize * math.prod(shape) // 16) * 16
    return out, off


def _views(buf: torch.Tensor, layout, as_numpy: bool) -> dict:
    """Typed views of the uint8 tensor `buf` at a _layout(): numpy arrays (the host side) or tensors."""
    out = {}
    for name, dt, shape, off in layout:
        raw = buf[off: off + np.dtype(dt).itemsize * math.prod(shape)]
        out[name] = raw.numpy().view(dt).reshape(shape) if as_numpy else raw.view(_TORCH_INT[np.dtype(dt)]).view(shape)
    return out


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, V] with fp32 accumulation, like ops.grouped_logprob."""
    if hidden.dtype in (torch.float16, torch.bfloat16) and hidden.is_cuda:
        try:
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return torch.mm(hidden.float(), weight.float().t())


def _checks_kernels(device: torch.device) -> bool:
    """Whether the runner checks and times its kernels on `device` at start-up: on a GPU, where they
    run inside CUDA graphs and their speed differs by card (the CPU path runs neither)."""
    return device.type == "cuda"


def _captures_graphs(device: torch.device) -> bool:
    """Whether the runner captures its decode steps in CUDA graphs on `device` (if asked to)."""
    return device.type == "cuda"


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int,
                 use_cuda_graphs: bool = True, decode_backend: str | None = None,
                 shared_prefix: bool | None = None):
        cfg = model.config
        self.model = model
        self.device, self.dtype = model.device, model.dtype
        self.block_size = block_size
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.decode_backend, self.store_backend = decode_backend, None
        if decode_backend is not None:  # a misspelt or unusable backend: said now, not at the first decode step
            # with the model's dtype: a backend without a path for it (triton with fp64 weights, or bf16 under
            # the Triton interpreter) was accepted here and failed at the first decode step, after the prefill
            try:
                backends.resolve("paged_decode_attention", self.device, decode_backend, dtype=self.dtype)
            except ValueError as e:
                raise ValueError(f"Engine: decode_backend={decode_backend!r} cannot decode this model: {e}") from None
        candidates = None  # {decode backend: tiles} that passed the start-up checks (a GPU only)
        if _checks_kernels(self.device):
            candidates = self._decode_candidates(shared_prefix, decode_backend is None, max_num_seqs)
            self.shared_prefix = self._choose_decode(candidates, max_num_seqs, max_model_len, graph=use_cuda_graphs)
        else:  # the CPU: the tiles wherever the backend reads them, untimed
            self.shared_prefix = self._reads_tiles(self.decode_backend, shared_prefix, max_num_seqs)
        self._tiles_of = None  # the running ids array the cached tiles were found for
        self._tiles = None
        self.kv = torch.zeros(cfg.num_hidden_layers, 2, num_blocks, block_size, self.num_kv_heads, self.head_dim,
                              device=self.device, dtype=self.dtype)
        self.rotary_table = rotary_table(model, max_model_len)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        if use_cuda_graphs and _captures_graphs(self.device):
            self._capture_graphs(max_num_seqs)
            if not self.graphs and _checks_kernels(self.device):
                # the steps run eagerly after all: the start-up's choice was timed for graph replays, where
                # launches cost nothing; it is made again as the steps will run (no staging depends on it), from
                # the backends and tiles already checked
                log.warning("choosing the decode attention again for eager decoding")
                self.shared_prefix = self._choose_decode(candidates, max_num_seqs, max_model_len, graph=False)

    def _reads_tiles(self, backend: str | None, requested: bool | None, max_num_seqs: int) -> bool:
        """Whether decode steps through `backend` can pass SharedPrefix tiles (unless turned off): only the
        triton and cuda kernels read shared blocks once (both through Triton's prefix kernel); the others
        would ignore the tiles. A tile holds two rows or more, so an engine of one row has none: the
        tiles would only add an empty prefix launch to each step's graph (and a timing to the start-up)."""
        group = self.model.config.num_attention_heads // self.num_kv_heads
        return requested is not False and max_num_seqs >= 2 and backend in ("triton", "cuda") and \
            backends.backend_available("triton", self.device)[0] and prefix_tile_rows(group, self.head_dim) >= 2

    def _decode_candidates(self, requested: bool | None, pick_backend: bool, max_num_seqs: int
                           ) -> dict[str, bool | None]:
        """{decode backend: tiles} for self_check.choose_decode, on a device where the runner checks its
        kernels (a GPU). Without decode_backend given (pick_backend), the decode and KV-write backends that
        match the reference here (kernels that never ran on this card are checked before any graph holds
        them; the KV-write backend is set here), each decode backend's shared-prefix path checked too.
        requested: True, tiles wherever the path runs and passes its check (untimed); False, never; None,
        only where they are also the faster on this card (timed: None)."""
        from r1fast.rollout import self_check

        cfg = self.model.config
        shape = (cfg.num_attention_heads, self.num_kv_heads, self.head_dim)
        names = [self.decode_backend]
        if pick_backend:
            names = self_check.correct_backends("paged_decode_attention", self.device, self.dtype, *shape,
                                                every=True) or ["torch"]
            self.store_backend = (self_check.correct_backends("store_kv", self.device, self.dtype, *shape)
                                  or ["torch"])[0]
        tiles = {}
        for name in names:
            usable = self._reads_tiles(name, requested, max_num_seqs) and \
                (not pick_backend or self_check.shared_prefix_ok(name, self.device, self.dtype, *shape))
            tiles[name] = usable and (True if requested else None)
        return tiles

    def _choose_decode(self, candidates: dict[str, bool | None], timing_batch: int, max_model_len: int,
                       graph: bool = True) -> bool:
        """Sets the decode backend of `candidates` (_decode_candidates) and returns whether decode steps pass
        SharedPrefix tiles: the backend and the tiles are chosen together (self_check.choose_decode: each
        backend timed with and without them at timing_batch rows of at most max_model_len tokens, as graph
        replays or eager launches as the engine will run them)."""
        from r1fast.rollout import self_check

        cfg = self.model.config
        shape = (cfg.num_attention_heads, self.num_kv_heads, self.head_dim)
        self.decode_backend, uses_tiles = self_check.choose_decode(candidates, self.device, self.dtype, *shape,
                                                                   batch=timing_batch, max_context=max_model_len,
                                                                   graph=graph)
        return uses_tiles

    @staticmethod
    def kv_bytes_per_block(cfg, block_size: int, dtype: torch.dtype) -> int:
        return cfg.num_hidden_layers * 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * \
            torch.empty((), dtype=dtype).element_size()

    def copy_blocks(self, copies: np.ndarray):
        if len(copies):
            c = torch.from_numpy(copies).to(self.device, torch.long)
            self.kv[:, :, c[:, 1]] = self.kv[:, :, c[:, 0]]

    def _h2d(self, array, dtype):
        t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        return t.to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    # -- prefill ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, bm, seq_ids, tokens_per_seq, starts, ends) -> torch.Tensor:
        """Hidden states [B, H] of the last token of each chunk."""
        ids = np.asarray(seq_ids, dtype=np.int64)
        input_ids = np.concatenate([np.asarray(t[s:e], dtype=np.int64) for t, s, e in
                                    zip(tokens_per_seq, starts, ends)])
        positions = np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in zip(starts, ends)])
        slots = bm.slot_mapping(ids, np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64))
        context_slots = bm.slot_mapping(ids, np.zeros(len(ids), dtype=np.int64), np.asarray(ends, dtype=np.int64))
        query_lens = [e - s for s, e in zip(starts, ends)]
        self._check_positions(max(ends) - 1)
        cu = tuple(self._h2d(np.concatenate(([0], np.cumsum(lens))), torch.int32) for lens in (query_lens, ends))
        ctx = PrefillContext(self.kv, self._h2d(slots, torch.long), self._h2d(context_slots, torch.long),
                             query_lens, list(ends), self.scale, self.store_backend, cu_seqlens=cu,
                             rotary_table=self.rotary_table)
        last = self._h2d(np.cumsum(query_lens) - 1, torch.long)  # before the forward: a copy may wait for the stream
        hidden = self.model(self._h2d(input_ids, torch.long), self._h2d(positions, torch.long), attn=ctx)
        return hidden.index_select(0, last)

    # -- decode ----------------------------------------------------------------------------------
    def _decode_fields(self, rows: int, width: int) -> list[tuple[str, type, tuple]]:
        """(name, numpy dtype, shape) of a decode step's integer inputs at `rows` rows."""
        fields = [("input_ids", np.int64, (rows,)), ("source_rows", np.int64, (rows,)), ("positions", np.int64, (rows,)),
                  ("slots", np.int64, (rows,)), ("context_lens", np.int32, (rows,))]
        if self.shared_prefix:
            fields += [("tile_ptr", np.int32, (rows // 2 + 1,)), ("tile_rows", np.int32, (rows,)),
                       ("tile_prefix", np.int32, (rows // 2,)), ("row_start", np.int32, (rows,))]
        # last: a graph step copies the fields before it and only the columns of the tables it uses
        return fields + [("block_tables", np.int32, (rows, width))]

    def _fill_decode_inputs(self, out, seq_ids, positions, slots, graph, last_tokens=None, source_rows=None):
        """Writes a decode step's inputs into the host arrays `out`, whose block_tables rows 0..B-1
        already hold the batch's tables. Rows past the batch are padding: they write to slot -1 and
        read one slot. For a CUDA graph the shared-prefix arrays are always filled (the extra tiles
        empty); otherwise they are dropped from `out` when no rows share blocks."""
        b = len(seq_ids)
        out["block_tables"][b:] = 0
        out["input_ids"][:b] = 0 if last_tokens is None else last_tokens
        out["source_rows"][:b] = 0 if source_rows is None else source_rows
        out["source_rows"][b:] = 0
        out["positions"][:b] = positions
        out["slots"][:b] = slots
        out["context_lens"][:b] = out["positions"][:b] + 1
        out["input_ids"][b:], out["positions"][b:], out["slots"][b:], out["context_lens"][b:] = 0, 0, -1, 1
        if self.shared_prefix:
            shared = self._shared_prefix(seq_ids, out["block_tables"][:b], out["context_lens"][:b]) if b else None
            if graph:
                for name, arr in pad_shared_prefix(shared, b, len(out["input_ids"]))._asdict().items():
                    out[name][:] = arr
            elif shared is None:
                for name in SharedPrefix._fields:
                    out.pop(name)
            else:
                out.update(shared._asdict())

    def _shared_prefix(self, seq_ids, tables, context_lens) -> SharedPrefix | None:
        # The running set's ids array is replaced whenever a row joins or leaves, and a running row's
        # leading blocks never change: the tiles found for this array stay valid (only the cut to the
        # current context lengths is redone). When rows only left, their tiles just lose them.
        old = self._tiles_of
        if old is not seq_ids:
            keep = ids_in(old, seq_ids) if old is not None and len(seq_ids) < len(old) else None
            if keep is not None and keep.sum() == len(seq_ids) and (old[keep] == seq_ids).all():
                self._tiles = drop_tile_rows(self._tiles, keep)
            else:
                group = self.model.config.num_attention_heads // self.num_kv_heads
                self._tiles = shared_block_tiles(tables, context_lens, self.block_size, group, self.head_dim)
            self._tiles_of = seq_ids
        return shared_prefix_at(self._tiles, context_lens)

    def _run_decode(self, t):
        shared = SharedPrefix(*(t[k] for k in SharedPrefix._fields)) if "row_start" in t else None
        ctx = DecodeContext(self.kv, t["slots"], t["block_tables"], t["context_lens"], self.scale,
                            self.decode_backend, self.store_backend, shared, self.rotary_table)
        # FP8 layers decode in their parameters' precision: one-token GEMMs are too thin for FP8 to
        # pay, and the FP8 quantiser (torch.compile) and TE's scaling state do not belong in a graph.
        with fp8_disabled():
            return self.model(t["input_ids"], t["positions"], attn=ctx)

    @torch.no_grad()
    def decode(self, bm, seq_ids, positions, slots, last_tokens=None, tokens_from=None) -> torch.Tensor:
        """Hidden states [B, H] of each sequence's new token.

        seq_ids: an int64 array whose identity stands for the running set: pass the same array object
        only while it names the same live sequences (scheduler.Running replaces it when a row joins or
        leaves); the shared-prefix tiles found for it are kept until then.
        The input tokens: last_tokens (a host array), or tokens_from = (tokens, rows): row i feeds
        tokens[rows[i]] of a device tensor, the last step's samples, which need not reach the host first."""
        if (last_tokens is None) == (tokens_from is None):
            raise ValueError("ModelRunner.decode: pass exactly one of last_tokens and tokens_from")
        source, rows = tokens_from if tokens_from is not None else (None, None)
        b = len(seq_ids)
        if b:
            self._check_positions(int(np.max(positions)))
        bucket = next((s for s in sorted(self.graphs) if s >= b), None)
        ids = np.asarray(seq_ids, dtype=np.int64)
        if bucket is None:
            host = {name: np.empty(shape, dtype) for name, dtype, shape in self._decode_fields(b, 0)}
            host["block_tables"] = bm.block_tables(ids)
            self._fill_decode_inputs(host, seq_ids, positions, slots, False, last_tokens, rows)
            t = {k: self._h2d(v, _TORCH_INT[v.dtype]) for k, v in host.items()}
            if source is not None:
                t["input_ids"] = source.index_select(0, t["source_rows"])
            return self._run_decode(t)
        graph, static = self.graphs[bucket]
        self._staging_free.synchronize()  # the previous step's copy has left the host buffer
        nbytes, width = self._stage_graph_inputs(bucket, bm, ids, seq_ids, positions, slots, last_tokens, rows)
        with torch.cuda.device(self.device):
            self._upload_staged(bucket, nbytes, width)
            if source is not None:  # stream-ordered after the sampler that wrote `source`: no host sync
                torch.index_select(source, 0, static["source_rows"][:b], out=static["input_ids"][:b])
            graph.replay()
        return static["hidden"][:b]

    def _check_positions(self, highest: int):
        """A position past the rotary table would be an out-of-range gather (a device assert on CUDA)."""
        if highest >= self.rotary_table.shape[0]:
            raise RuntimeError(f"ModelRunner: position {highest} is past max_model_len "
                               f"{self.rotary_table.shape[0]} (engine bug: sequences end at max_model_len)")

    def _table_width(self, positions) -> int:
        """Block-table columns a decode step at these positions reads: its longest context's blocks (at
        least one: the padding rows read block 0)."""
        longest = int(np.max(positions)) + 1 if len(positions) else 1
        return min(-(-longest // self.block_size), self.max_blocks_per_seq)

    def _stage_graph_inputs(self, bucket, bm, ids, seq_ids, positions, slots, last_tokens, rows) -> tuple[int, int]:
        """Fills bucket's host staging buffer for a graph step; returns (bytes to copy, table columns).

        The tables are written as [bucket, width] at the end of the buffer, width being the columns this
        step reads: at max_model_len 32k and 256 rows the full tables were 2 MiB a step, mostly padding."""
        staged = self._staged[bucket]
        width = self._table_width(positions)
        offset = self._tables_offset[bucket]
        tables = self._staging_host[offset: offset + bucket * width * 4].numpy().view(np.int32).reshape(bucket, width)
        if len(ids):  # (no block manager for the capture's empty step)
            bm.block_tables(ids, 0, 0, out=tables)
        staged["block_tables"] = tables
        self._fill_decode_inputs(staged, seq_ids, positions, slots, True, last_tokens, rows)
        return offset + tables.nbytes, width

    def _upload_staged(self, bucket: int, nbytes: int, width: int):
        """Copies a staged step to the device: one copy of its first nbytes, then its tables into the
        first `width` columns of the graph's full-width tables. Columns past a row's context keep an
        earlier step's block ids, which no decode kernel reads (each stops at its context length)."""
        self._staging_dev[:nbytes].copy_(self._staging_host[:nbytes], non_blocking=True)
        if self._staging_dev.is_cuda:
            self._staging_free.record(torch.cuda.current_stream(self.device))
        offset = self._tables_offset[bucket]
        packed = self._staging_dev[offset: nbytes].view(torch.int32).view(bucket, width)
        self._graph_tables[:bucket, :width].copy_(packed)

    def _capture_graphs(self, max_num_seqs: int):
        """One graph per batch-size bucket; any failure leaves eager decode in place.

        Every bucket's integer inputs live in one device buffer, laid out for that bucket (one graph
        replays at a time), mirrored by one pinned host buffer: a step fills the host side through
        numpy views and moves it with a single copy (instead of a staged pageable copy, and a call,
        per input), its block tables only as wide as the step's longest context (_stage_graph_inputs)."""
        buckets = sorted({b for b in (1, 2, 4, 8) if b <= max_num_seqs} |
                         set(range(16, max_num_seqs + 1, 16)) | {max_num_seqs})
        try:
            layouts = self._make_staging(buckets, pin_memory=True)
            self._staging_free = torch.cuda.Event()
            # torch.cuda.graph captures on a side stream of the *current* device: make it the model's.
            with torch.cuda.device(self.device):
                self._capture_buckets(buckets, layouts)
            torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - any capture problem means: run eagerly
            log.warning("CUDA graph capture failed (%s); decoding eagerly", e)
            self.graphs.clear()

    def _make_staging(self, buckets, pin_memory: bool) -> dict:
        """The staging buffers of the graphs' inputs (host and device) and the graphs' full-width block
        tables, one [max bucket, max_blocks_per_seq] tensor whose first rows each bucket reads (one graph
        replays at a time); returns each bucket's _layout."""
        layouts = {b: _layout(self._decode_fields(b, self.max_blocks_per_seq)) for b in buckets}
        self._staged_bytes = {b: nbytes for b, (_, nbytes) in layouts.items()}
        self._tables_offset = {b: fields[-1][3] for b, (fields, _) in layouts.items()}
        total = max(self._staged_bytes.values())
        self._staging_host = torch.empty(total, dtype=torch.uint8, pin_memory=pin_memory)
        self._staging_dev = torch.empty(total, dtype=torch.uint8, device=self.device)
        self._graph_tables = torch.zeros(max(buckets), self.max_blocks_per_seq, dtype=torch.int32, device=self.device)
        self._staged = {b: _views(self._staging_host, fields, as_numpy=True) for b, (fields, _) in layouts.items()}
        return layouts

    def _graph_inputs(self, bucket: int, layout) -> dict:
        """The device tensors bucket's graph reads: views of the staging buffer, and the full-width tables."""
        static = _views(self._staging_dev, layout, as_numpy=False)
        static["block_tables"] = self._graph_tables[:bucket]
        return static

    def _capture_buckets(self, buckets, layouts):
        pool = None
        for b in reversed(buckets):
            static = self._graph_inputs(b, layouts[b][0])
            # a valid empty step (every row padding) for the warm-up and the capture
            nbytes, width = self._stage_graph_inputs(b, None, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                                                     [], [], [], None)
            self._upload_staged(b, nbytes, width)
            with torch.no_grad():
                self._run_decode(static)  # warm-up: compiles kernels outside capture
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    static["hidden"] = self._run_decode(static)
            pool = graph.pool()
            self.graphs[b] = (graph, static)
