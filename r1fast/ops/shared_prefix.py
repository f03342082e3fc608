"""Which sequences of a decode batch share leading KV blocks, as tiles for the shared-prefix path of
ops.paged_decode_attention (host-side numpy; the kernels are in kernels/decode_attention.py).

The G samples of a GRPO group fork from one prefilled prompt and hold its full blocks in common;
with a SharedPrefix the decode kernels read those blocks once per tile of samples instead of once
per sample. shared_block_tiles finds the tiles from the block tables, drop_tile_rows trims them when
rows leave, shared_prefix_at cuts them to the current context lengths, pad_shared_prefix lays them
out in a CUDA graph's fixed-size buffers, and find_shared_prefixes does the lot for one batch.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class SharedPrefix(NamedTuple):
    """Sequences of a decode batch that share their leading KV blocks, cut into tiles (int32 arrays).

    Tile t holds rows tile_rows[tile_ptr[t]:tile_ptr[t+1]] of the batch, whose block tables agree on
    the blocks covering their first tile_prefix[t] tokens (0 <= tile_prefix[t] < each member's context
    length). row_start[b] is the prefix length of row b's tile, 0 for a row in no tile. Trailing tiles
    may be empty (tile_ptr repeats, prefix 0): a CUDA graph's fixed-size buffers (pad_shared_prefix).
    """
    tile_ptr: object
    tile_rows: object
    tile_prefix: object
    row_start: object

    def to(self, device) -> "SharedPrefix":
        """int32 tensors on `device` (from numpy arrays or tensors)."""
        return SharedPrefix(*(torch.as_tensor(a).to(device=device, dtype=torch.int32) for a in self))


def prefix_tile_rows(group: int, head_dim: int) -> int:
    """Member sequences per tile of the prefix kernel, whose query tile stacks `group` query heads per
    member: 64 rows, 32 past head_dim 128 (a 64 x 256 fp32 accumulator spills on sm_90)."""
    return (64 if head_dim <= 128 else 32) // group


def shared_block_tiles(block_tables: np.ndarray, context_lens: np.ndarray, block_size: int, group: int,
                       head_dim: int):
    """Tiles of decode rows that share leading blocks: (tile_ptr, tile_rows, tile_tokens) int arrays, or None.

    A block is one piece of storage, and rows come to hold one in common only by forking or by a
    prefix-cache hit, both of which share every block before it too. So each row is keyed by its
    deepest block (inside its context) that another row of the batch also holds, and rows with the
    same key share every block up to it. Keying by the deepest rather than the first shared block
    matters: prompts under one chat template share their header's blocks across groups, and only
    the deeper blocks single out a prompt's G samples. tile_tokens is the run of leading blocks all
    members hold (checked against the first member's table), in tokens. Groups are split evenly into
    tiles of at most prefix_tile_rows() rows. A few numpy passes, no loop over rows; the engine keeps
    the result while its running set is unchanged (a running row's leading blocks never change).
    """
    tables = np.asarray(block_tables)
    ctx = np.asarray(context_lens, dtype=np.int64)
    per_tile = prefix_tile_rows(group, head_dim)
    b = tables.shape[0]
    if b < 2 or per_tile < 2:
        return None
    cols = -(-int(ctx.max()) // block_size)
    if ctx.min() < 1 or cols > tables.shape[1]:
        raise ValueError(f"find_shared_prefixes: context lengths must lie in [1, {tables.shape[1] * block_size}] "
                         f"(table width x block_size), got {int(ctx.min())}..{int(ctx.max())}")
    t = tables[:, :cols]
    inside = np.arange(cols) < (-(-ctx // block_size))[:, None]
    ids = t[inside]
    if ids.min() < 0:
        row, col = (int(i[0]) for i in np.nonzero(inside & (t < 0)))
        raise ValueError(f"find_shared_prefixes: block_tables[{row}, {col}] = {int(t[row, col])} is a negative block "
                         f"id inside row {row}'s context of {int(ctx[row])} tokens")
    # rows holding each entry's block: a count per id when ids are as dense as a real pool's, else by sorting
    if ids.max() <= 16 * ids.size + 4096:
        held = np.bincount(ids)[ids]
    else:
        uniq, counts = np.unique(ids, return_counts=True)
        held = counts[np.searchsorted(uniq, ids)]
    shared = np.zeros((b, cols + 1), dtype=bool)  # the extra False column ends every run
    shared[:, :cols][inside] = held >= 2
    run = shared.argmin(axis=1)
    cand = np.flatnonzero(run > 0)
    key = t[cand, run[cand] - 1]
    order = cand[np.argsort(key, kind="stable")]
    key = t[order, run[order] - 1]
    new = np.ones(len(order), dtype=bool)
    np.not_equal(key[1:], key[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    sizes = np.diff(starts, append=len(order))
    gid = np.cumsum(new) - 1
    pos = np.flatnonzero(sizes[gid] >= 2)  # a row whose deepest shared block's partners go deeper is left out
    if not len(pos):
        return None
    rows, lead = order[pos], order[starts[gid[pos]]]
    same = np.zeros((len(pos), cols + 1), dtype=bool)
    same[:, :cols] = (t[rows] == t[lead]) & inside[rows]
    common = same.argmin(axis=1)
    gstart = np.flatnonzero(np.diff(gid[pos], prepend=-1))  # where each group begins within pos
    gsize = np.diff(gstart, append=len(pos))
    num_tiles = -(-gsize // per_tile)
    rank = np.arange(len(pos)) - np.repeat(gstart, gsize)
    # even tiles (sizes differ by at most one): 11 rows at 10 per tile -> 5 + 6, 13 at 4 -> 3 + 3 + 3 + 4
    tile = rank * np.repeat(num_tiles, gsize) // np.repeat(gsize, gsize)
    first = (rank == 0) | (tile != np.roll(tile, 1))
    tokens = np.repeat(np.minimum.reduceat(common, gstart), gsize) * block_size
    # a one-row tile saves nothing (3 rows at 2 per tile -> 2 + 1): that row reads its prefix itself,
    # so every tile has two rows or more and a batch of B rows never has more than B // 2 tiles
    tile_id = np.cumsum(first) - 1
    size = np.bincount(tile_id)
    keep = size[tile_id] >= 2
    if not keep.any():
        return None
    rows, tokens, first = rows[keep], tokens[keep], first[keep]
    tile_first = np.flatnonzero(first)
    return np.append(tile_first, len(rows)), rows, tokens[tile_first]


def drop_tile_rows(tiles, keep: np.ndarray):
    """shared_block_tiles() after the rows where `keep` is False left the batch (the others keep their
    order): members renumbered, tiles left with fewer than two members dropped. A subset of a tile
    still holds its blocks, so no table is read again."""
    if tiles is None:
        return None
    tile_ptr, rows, tokens = tiles
    new_index = np.cumsum(keep) - 1
    counts = np.diff(tile_ptr)
    stays = keep[rows]
    left = np.add.reduceat(stays.astype(np.int64), tile_ptr[:-1])  # tiles are never empty here
    live = left >= 2
    if not live.any():
        return None
    member = stays & np.repeat(live, counts)
    return np.append(0, np.cumsum(left[live])), new_index[rows[member]], tokens[live]


def shared_prefix_at(tiles, context_lens: np.ndarray) -> SharedPrefix | None:
    """The SharedPrefix of shared_block_tiles() at these context lengths: each tile's run, cut so every
    member keeps at least its current token to itself (a tile cut to 0 tokens does nothing)."""
    if tiles is None:
        return None
    tile_ptr, rows, tokens = tiles
    ctx = np.asarray(context_lens, dtype=np.int64)
    prefix = np.maximum(np.minimum(tokens, np.minimum.reduceat(ctx[rows], tile_ptr[:-1]) - 1), 0)
    row_start = np.zeros(len(ctx), dtype=np.int32)
    row_start[rows] = np.repeat(prefix, np.diff(tile_ptr))
    return SharedPrefix(tile_ptr.astype(np.int32), rows.astype(np.int32), prefix.astype(np.int32), row_start)


def pad_shared_prefix(shared: SharedPrefix | None, rows: int, batch_size: int) -> SharedPrefix:
    """`shared` (None: no tiles) for a step padded from `rows` to batch_size rows, in buffers of fixed
    size (a CUDA graph's): batch_size // 2 tiles (tiles have two rows or more), those past `shared`'s
    empty; row_start 0 on padding rows."""
    max_tiles = batch_size // 2
    ptr = np.zeros(max_tiles + 1, dtype=np.int32)
    members = np.zeros(batch_size, dtype=np.int32)
    prefix = np.zeros(max_tiles, dtype=np.int32)
    row_start = np.zeros(batch_size, dtype=np.int32)
    if shared is not None:
        n = len(shared.tile_prefix)
        if n > max_tiles:
            raise ValueError(f"pad_shared_prefix: {n} tiles do not fit the {max_tiles} of a {batch_size}-row step "
                             f"(tiles need two rows or more)")
        ptr[: n + 1] = shared.tile_ptr
        ptr[n + 1:] = shared.tile_ptr[-1]
        members[: len(shared.tile_rows)] = shared.tile_rows
        prefix[:n] = shared.tile_prefix
        row_start[:rows] = shared.row_start
    return SharedPrefix(ptr, members, prefix, row_start)


def find_shared_prefixes(block_tables: np.ndarray, context_lens: np.ndarray, block_size: int, num_heads: int,
                         num_kv_heads: int, head_dim: int) -> SharedPrefix | None:
    """The SharedPrefix of a decode batch (host numpy arrays in and out), or None when no rows share a block."""
    tiles = shared_block_tiles(block_tables, context_lens, block_size, num_heads // num_kv_heads, head_dim)
    return shared_prefix_at(tiles, context_lens)
