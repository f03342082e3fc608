"""Triton RMSNorm, forward and backward, with the numerics of the decoder's RMSNorm (transformers'
Llama / Qwen2 / Qwen3 RMSNorm: normalise in fp32, round to the input's dtype, THEN multiply by the
weight). Rows are the last dimension of x (hidden states [T, H], or Qwen3's per-head q/k norm with
rows = tokens x heads and H = head_dim).

Forward, per row of width H (x fp16 / bf16 / fp32; weight any of those; out dtype = promote(x, w)):
    rstd = rsqrt(sum(x * x) * fl32(1/H) + eps)        fp32; saved [rows] for the backward
    xn   = round_to_x_dtype(x * rstd)                   the fp32 product, rounded once
    y    = round_to_out_dtype(fp32(w) * fp32(xn))       one fp32 product, rounded once
The torch expression does the same operations in the same order (on CUDA its mean is
sum * fl32(1/H), its rsqrt is CUDA's rsqrtf: the rsqrt.approx instruction this kernel compiles to,
ftz here, which only matters below eps; a 16-bit x 16-bit product is exact in fp32 before its one
rounding, so the weight product is the same even where Triton emits mul.bf16), so on CUDA the output
equals the torch path bit for bit whenever the fp32 sum of squares comes out the same. That holds
when the partial sums are exact (a gpu-marked test checks bf16 bit-equality on such inputs, with a
power-of-two width so that the mean is exact too). In general it does not: the two reduce the row
in different orders and Triton fuses the square-and-add and the mean's multiply with + eps into
FMAs, so rstd can differ in its last bit or two and a small fraction of the outputs then differ by
one rounding step of xn (the gpu test bounds that fraction and size). Not yet run on a GPU: these
are design claims until `pytest -m gpu tests/test_layers_kernels.py` has passed there. Not claimed
under the interpreter (numpy's 1/sqrt is not rsqrt.approx): the CPU tests compare with tolerances.

Residual form (ops.add_rms_norm, the decoder's residual add fused into the next norm): the kernel
reads x and r, writes s = round(x + r) (torch's add: an fp32 sum rounded once) and normalises s as
above; the backward adds the gradient reaching s from the residual stream (ds) to dx in fp32, and
that sum is the gradient of both x and r.

Backward (fp32 inside; the cast to x's dtype is passed straight through, as autograd does):
    g  = dy * w,   c = sum(g * x * rstd) / H
    dx = rstd * (g - x * rstd * c)                      rounded to x's dtype
    dw = sum over rows of dy * xn                       xn rounded as the forward used it
dw is accumulated per program in fp32 over a contiguous chunk of rows and written as a partial
row [P, H]; torch sums the P partials afterwards: deterministic, no atomics. The torch path rounds
g = dy * w and each dy * xn to the input dtype first; these kernels keep them in fp32.

Layout: a program handles a [BLOCK_R, BLOCK_N] tile, BLOCK_R rows at a time (many rows per
program for narrow rows such as head_dim 128). A row wider than max_block (8192 on a GPU, 64 under
the interpreter, so the CPU tests cover it) is walked in N_BLOCKS column blocks of max_block / 2: the forward reads it twice (sum of squares, then the output; the second read is mostly L2 hits) and the backward
keeps its dw partial row in global memory (read-modify-write of the program's own row).
Every row offset is int64. Interpreter-safe: no libdevice, no inline asm.
"""
import functools

import torch
import triton
import triton.language as tl

from r1fast.backends import on_device

# GPU: the whole row in registers up to 8192 (every Llama / Qwen hidden size up to 70B);
# one 16-byte vector per thread and tensor, BLOCK_R rows per tile for narrow rows.
MAX_BLOCK = 8192
TILE = 2048           # elements per tile when several rows share one
MAX_ROWS = 16         # rows per tile at most
PROGRAMS_PER_SM = 4   # backward: persistent programs per SM (each writes one fp32 dw partial row)
# Interpreter: small blocks so test widths cross block edges; a few programs so chunks are uneven.
CPU_MAX_BLOCK = 64
CPU_PROGRAMS = 3


def launch_config(H: int, device_type: str = "cuda", elem_bytes: int = 2) -> dict:
    """BLOCK_R, BLOCK_N, N_BLOCKS, num_warps, num_stages for rows of width H of `elem_bytes`-byte
    elements: one 16-byte vector per thread per tensor (8 elements of 16 bits, 4 of fp32), up to
    32 warps. ptxas, sm_90, Triton 3.6 and 3.9 (`python -m r1fast.kernels.compile_check 90 --full
    --resources`): forward <= 40 registers, backward <= 64, no spills (with 8 elements per thread an
    fp32 4096-wide backward spilled). Launch sizes are not yet tuned on a GPU (`r1fast bench layers`)."""
    max_block = MAX_BLOCK if device_type == "cuda" else CPU_MAX_BLOCK
    block_n = triton.next_power_of_2(H)
    if block_n > max_block:  # walked in blocks: half the widest in-register row keeps registers low
        block_n = triton.next_power_of_2(max_block) // 2
    n_blocks = triton.cdiv(H, block_n)
    block_r = max(1, min(MAX_ROWS, TILE // block_n)) if n_blocks == 1 else 1
    per_thread = max(1, 16 // elem_bytes)
    num_warps = min(32, max(1, block_r * block_n // (32 * per_thread))) if device_type == "cuda" else 1
    return dict(BLOCK_R=block_r, BLOCK_N=block_n, N_BLOCKS=n_blocks, num_warps=num_warps, num_stages=1)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def _load_sum(x_ptr, r_ptr, offs, m, HAS_RES: tl.constexpr):
    """x, or with a residual the sum x + r rounded to x's dtype as torch's add rounds it, in fp32."""
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
        x = (x + r).to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, r_ptr, s_ptr, w_ptr, out_ptr, rstd_ptr, n_rows, H, eps, inv_h,
                        HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        N_BLOCKS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = rows.to(tl.int64) * H  # rows are contiguous: row stride H
    cols = tl.arange(0, BLOCK_N)
    if N_BLOCKS == 1:
        col_ok = cols < H
        m = row_ok[:, None] & col_ok[None, :]
        offs = base[:, None] + cols[None, :]
        x = _load_sum(x_ptr, r_ptr, offs, m, HAS_RES)
        if HAS_RES:
            tl.store(s_ptr + offs, x.to(s_ptr.dtype.element_ty), mask=m)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) * inv_h + eps)
        xn = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (w[None, :] * xn).to(out_ptr.dtype.element_ty), mask=m)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        for b in range(N_BLOCKS):
            c = b * BLOCK_N + cols
            m = row_ok[:, None] & (c < H)[None, :]
            offs = base[:, None] + c[None, :]
            x = _load_sum(x_ptr, r_ptr, offs, m, HAS_RES)
            if HAS_RES:
                tl.store(s_ptr + offs, x.to(s_ptr.dtype.element_ty), mask=m)
            acc += x * x
        rstd = tl.math.rsqrt(tl.sum(acc, axis=1) * inv_h + eps)
        for b in range(N_BLOCKS):
            c = b * BLOCK_N + cols
            col_ok = c < H
            m = row_ok[:, None] & col_ok[None, :]
            offs = base[:, None] + c[None, :]
            x = _load_sum(x_ptr, r_ptr, offs, m, HAS_RES)  # recomputed, not re-read from s: the same rounding
            xn = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, (w[None, :] * xn).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _column_block(x_ptr, dy_ptr, base, row_ok, cb, H):
    """Columns cb of the rows at `base` (row_ok: rows in range), as both passes of the wide-row backward
    read them: the column flags, the tile's mask and offsets, and x and dy in fp32."""
    col_ok = cb < H
    m = row_ok[:, None] & col_ok[None, :]
    offs = base[:, None] + cb[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    return col_ok, m, offs, x, dy


@triton.jit
def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, ds_ptr, n_rows, H, inv_h, tiles_per_prog,
                        HAS_DX: tl.constexpr, HAS_DW: tl.constexpr, HAS_DS: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, N_BLOCKS: tl.constexpr):
    """Program p handles tiles [p * tiles_per_prog, (p + 1) * tiles_per_prog) and writes dw partial
    row p; the last program's tiles past the end have no rows (every access is masked)."""
    pid = tl.program_id(0)
    first = pid * tiles_per_prog
    cols = tl.arange(0, BLOCK_N)
    dw_row = dw_ptr + pid.to(tl.int64) * H
    if N_BLOCKS == 1:
        col_ok = cols < H
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, tiles_per_prog):
            rows = (first + i) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < n_rows
            m = row_ok[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xn = x * rstd[:, None]
            if HAS_DX:
                g = dy * w[None, :]
                c = tl.sum(g * xn, axis=1) * inv_h
                dx = rstd[:, None] * (g - xn * c[:, None])
                if HAS_DS:
                    dx += tl.load(ds_ptr + offs, mask=m, other=0.0).to(tl.float32)
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
            if HAS_DW:
                dw_acc += tl.sum(dy * xn.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
        if HAS_DW:
            tl.store(dw_row + cols, dw_acc, mask=col_ok)
    else:
        for i in range(0, tiles_per_prog):
            rows = (first + i) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < n_rows
            base = rows.to(tl.int64) * H
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            if HAS_DX:
                acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
                for b in range(N_BLOCKS):
                    cb = b * BLOCK_N + cols
                    col_ok, m, offs, x, dy = _column_block(x_ptr, dy_ptr, base, row_ok, cb, H)
                    w = tl.load(w_ptr + cb, mask=col_ok, other=0.0).to(tl.float32)
                    acc += dy * w[None, :] * (x * rstd[:, None])
                c = tl.sum(acc, axis=1) * inv_h
            for b in range(N_BLOCKS):
                cb = b * BLOCK_N + cols
                col_ok, m, offs, x, dy = _column_block(x_ptr, dy_ptr, base, row_ok, cb, H)
                xn = x * rstd[:, None]
                if HAS_DX:
                    w = tl.load(w_ptr + cb, mask=col_ok, other=0.0).to(tl.float32)
                    dx = rstd[:, None] * (dy * w[None, :] - xn * c[:, None])
                    if HAS_DS:
                        dx += tl.load(ds_ptr + offs, mask=m, other=0.0).to(tl.float32)
                    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
                if HAS_DW:
                    part = tl.load(dw_row + cb, mask=col_ok, other=0.0)
                    part += tl.sum(dy * xn.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
                    tl.store(dw_row + cb, part, mask=col_ok)



def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
                 residual: torch.Tensor | None = None):
    """x [rows, H] contiguous (fp16/bf16/fp32), weight [H] contiguous -> (out [rows, H] out_dtype, rstd [rows] fp32).
    With a residual (x's shape and dtype, contiguous): the norm of s = x + residual, and s itself ->
    (out, rstd, s)."""
    rows, h = x.shape
    out = torch.empty((rows, h), dtype=out_dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    s = torch.empty_like(x) if residual is not None else None
    if rows > 0:
        cfg = launch_config(h, x.device.type, x.element_size())
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]),)
        res = (residual, s) if residual is not None else (x, x)  # unused pointers without a residual
        with on_device(x.device):
            _rmsnorm_fwd_kernel[grid](x, *res, weight, out, rstd, rows, h, eps, 1.0 / h,
                                      HAS_RES=residual is not None, **cfg)
    return (out, rstd) if residual is None else (out, rstd, s)


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 need_dx: bool = True, need_dw: bool = True, ds: torch.Tensor | None = None):
    """Gradients of rms_norm_fwd: dy, x [rows, H] contiguous, rstd [rows] fp32 from the forward ->
    (dx [rows, H] in x's dtype or None, dw [H] in weight's dtype or None). With the residual form,
    x is the saved sum s and ds (the gradient reaching s from its other uses) is added to dx."""
    rows, h = x.shape
    dx = torch.empty_like(x) if need_dx else None
    if rows == 0 or not (need_dx or need_dw):
        return dx, (torch.zeros_like(weight) if need_dw else None)
    cfg = launch_config(h, x.device.type, x.element_size())
    n_tiles = triton.cdiv(rows, cfg["BLOCK_R"])
    programs = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        * PROGRAMS_PER_SM if x.is_cuda else CPU_PROGRAMS
    per_prog = triton.cdiv(n_tiles, max(1, min(programs, n_tiles)))
    p = triton.cdiv(n_tiles, per_prog)  # no program without a tile
    # Single-block rows: every program writes its whole partial row. Several blocks: read-modify-write.
    alloc = torch.zeros if cfg["N_BLOCKS"] > 1 else torch.empty
    part = alloc((p, h), dtype=torch.float32, device=x.device) if need_dw else rstd  # rstd: an unused pointer
    with on_device(x.device):
        _rmsnorm_bwd_kernel[(p,)](dy, x, weight, rstd, dx if need_dx else x, part, ds if ds is not None else x,
                                  rows, h, 1.0 / h, per_prog, HAS_DX=need_dx, HAS_DW=need_dw,
                                  HAS_DS=ds is not None and need_dx, **cfg)
    dw = part.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw
