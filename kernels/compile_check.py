"""Compile the loss kernels for a GPU architecture without a GPU (ahead-of-time, no launch).

Catches what the CPU interpreter cannot: Triton front-end/type errors, unsupported ops and
layout failures in the real compiler. Used by tests (marked slow) and runnable by hand:
    python -m r1fast.kernels.compile_check 90 [--full] [--resources]
`--resources` prints registers / spill bytes / shared memory per kernel (ptxas -v): spills are
what the interpreter can never show and what makes a memory-bound kernel slow on the GPU.
Needs TRITON_INTERPRET unset (under the interpreter @triton.jit yields interpreted functions).
"""
import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from r1fast.kernels import advantages as advantages_kernels
from r1fast.kernels import grpo_loss as grpo_kernels
from r1fast.kernels import logprob as logprob_kernels


# Integer arguments that are multiples of 16 at the GPU size (H=4096, V=151936): the JIT marks such
# values (and 16-byte aligned pointers) tt.divisibility=16 when it specialises, which is what lets
# loads vectorise and the pipeliner issue cp.async. Without the hints, the compiled code is not
# what runs (no software pipelining at all).
DIVISIBLE_INTS = ("H", "V", "stride_h", "stride_w", "stride_dl")


def compile_for(jitfn, types: dict, constexprs: dict, arch: int, num_warps: int = 8, num_stages: int = 3,
                enable_fp_fusion: bool | None = None, divisible: tuple = ()):
    """triton.compile `jitfn` for sm_<arch>; unnamed non-constexpr arguments are i32 scalars, unnamed
    constexprs with a default take it. Pointers, DIVISIBLE_INTS and the `divisible` names get the
    divisibility-by-16 hint the JIT would give them. enable_fp_fusion: as a launch passes it (None:
    Triton's default)."""
    params = inspect.signature(jitfn.fn).parameters
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(params.items()):
        if name in constexprs or param.default is not inspect.Parameter.empty:
            sig[name], consts[(i,)] = "constexpr", constexprs.get(name, param.default)
        else:
            sig[name] = types.get(name, "i32")
            if sig[name].startswith("*") or name in DIVISIBLE_INTS or name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=jitfn, signature=sig, constexprs=consts, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if enable_fp_fusion is not None:
        options["enable_fp_fusion"] = enable_fp_fusion
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_usage(kernel, arch: int):
    """(registers, spill-store bytes, shared bytes) of a compiled kernel, from `ptxas -v` on its PTX
    with the ptxas Triton itself uses; None where that ptxas cannot be found (e.g. another Triton)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - only a report, never a failure
        return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([ptxas, "-v", f"-arch={sm}", path, "-o", os.devnull], capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    if not regs or not spill:
        return None
    return int(regs.group(1)), int(spill.group(1)), kernel.metadata.shared


# sm_90's limit on shared memory per block (227 KB): a config above it compiles but fails at launch.
SHARED_LIMIT = {90: 232448, 80: 166912}


def _compile(jitfn, types, constexprs, arch, cfg, report, name, divisible=()):
    k = compile_for(jitfn, types, dict(constexprs, **{n: v for n, v in cfg.items() if n.startswith("BLOCK")}), arch,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    enable_fp_fusion=cfg.get("enable_fp_fusion"), divisible=divisible)
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and k.metadata.shared > limit:
        raise RuntimeError(f"{name}: {k.metadata.shared} bytes of shared memory > sm_{arch}'s {limit}")
    if report is not None:
        report.append((name, ptxas_usage(k, arch)))
    return k


def compile_all(arch: int = 90, full: bool = False, report=None):
    """Every kernel in its GPU configuration; `full` also walks every grpo_loss specialisation.
    With a `report` list, appends (name, (registers, spill bytes, shared bytes) or None) per kernel."""
    done = []
    for dt in ("bf16", "fp16", "fp32"):
        types = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dl_ptr": f"*{dt}", "t_ptr": "*i64", "inv_temp": "fp32",
                 "temperature": "fp32", "arg_ptr": "*i32"}
        types.update({n: "*fp32" for n in ("z_ptr", "part_ptr", "lse_ptr", "lse_lo_ptr", "zt_ptr", "ent_ptr", "g_logp_ptr",
                                           "g_ent_ptr")})
        prec = "ieee" if dt == "fp32" else "tf32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
        _compile(logprob_kernels._logits_kernel, types, dict(PRECISION=prec), arch,
                 logprob_kernels.gpu_config(dtype), report, f"_logits_kernel {dt}")
        for load_z in (False, True):
            cfg = logprob_kernels.gpu_config(dtype, load_z)
            # every optional output on (the forward's WITH_ARGMAX too): the largest specialisation
            c = dict(WITH_ENTROPY=True, PRECISION=prec, LOAD_Z=load_z, WITH_ARGMAX=True)
            for kern in (logprob_kernels._logprob_fwd_kernel, logprob_kernels._dlogits_kernel):
                _compile(kern, types, c, arch, cfg, report, f"{kern.fn.__name__} {dt} LOAD_Z={load_z}")
            unfused = logprob_kernels.dlogits_config(cfg, dtype, load_z, 1 / 0.7)
            if unfused is not cfg:   # the launch at a temperature other than 1, FP fusion off
                _compile(logprob_kernels._dlogits_kernel, types, c, arch, unfused, report,
                         f"_dlogits_kernel {dt} LOAD_Z={load_z} T!=1")
        done.append(f"logprob kernels {dt}")
    types = {n: "*fp32" for n in ("logp_ptr", "old_ptr", "ref_ptr", "smp_ptr", "ent_ptr", "mask_ptr", "adv_ptr",
                                  "denom_ptr", "row_cnt_ptr", "row_loss_ptr", "g_logp_ptr", "g_ent_ptr", "stats_ptr")}
    types.update({n: "fp32" for n in ("epsilon", "eps_high", "delta", "beta", "tis_cap", "entropy_coef", "max_len")})
    variants = [(lt, seq, tis) for lt in range(5) for seq in (False, True) for tis in (0, 1, 2)] if full else \
        [(0, True, 2), (4, False, 1)]
    for lt, seq, tis in variants:
        c = dict(LOSS_TYPE=lt, SEQ_LEVEL=seq, HAS_DELTA=True, KL=3, USE_KL=True, TIS=tis, TIS_SEQ=seq,
                 HAS_SMP=tis != 0, HAS_ENT=True, BLOCK_T=1024, N_STATS=grpo_kernels.N_STATS,
                 HAS_ROW_CNT=not seq, KL_WEIGHTED=tis != 1, HAS_ISW=tis == 0 and (lt + seq) % 2 == 1, CHECK=True,
                 ROW_SUMS=seq)  # grpo_loss.needs_row_sums: HAS_ROW_CNT = not seq, TIS_SEQ = seq
        _compile(grpo_kernels._grpo_loss_kernel, types, c, arch, dict(num_warps=4, num_stages=3), report,
                 f"_grpo_loss_kernel {lt}/{seq}/{tis}")
    done.append(f"grpo_loss kernel ({len(variants)} specialisations)")
    types = {"r_ptr": "*fp32", "mask_ptr": "*i1", "out_ptr": "*fp32", "batch_std_ptr": "*fp32", "eps": "fp32"}
    modes = (advantages_kernels.GRPO_GROUP, advantages_kernels.GRPO_BATCH, advantages_kernels.GRPO_NONE,
             advantages_kernels.RLOO)
    group_sizes = (2, 8, 64, advantages_kernels.MAX_GROUP) if full else (8,)
    for g in group_sizes:
        cfg = dict(advantages_kernels.launch_config(g), num_stages=1)
        for mode in modes:
            for has_mask in (False, True):
                _compile(advantages_kernels._group_advantages_kernel, types, dict(MODE=mode, HAS_MASK=has_mask),
                         arch, cfg, report, f"_group_advantages_kernel G={g} MODE={mode} HAS_MASK={has_mask}")
    done.append(f"group_advantages kernel ({len(group_sizes) * len(modes) * 2} specialisations)")
    # rollout kernels: token sampling (fp32 logits from lm_logits; bf16 too with `full`), paged
    # decode attention and the KV-cache write, as their wrappers launch them
    from r1fast.kernels import decode_attention as decode_kernels
    from r1fast.kernels import kv_cache as kv_kernels
    from r1fast.kernels import sampling as sampling_kernels

    blk, nb_pad, warps, stages = sampling_kernels.launch_config(151936, "cuda")
    modes = (("greedy", True, False), ("temperature", False, False), ("min_p", False, True))
    dts = ("fp32", "bf16") if full else ("fp32",)
    for dt in dts:
        types = {"logits_ptr": f"*{dt}", "u_ptr": "*fp64", "tok_ptr": "*i64", "lp_ptr": "*fp32", "scale": "fp32",
                 "inv_temp": "fp32", "min_p": "fp32"}
        for mode, greedy, min_p in modes:
            _compile(sampling_kernels._sample_kernel, types, dict(GREEDY=greedy, MIN_P=min_p, NB_PAD=nb_pad), arch,
                     dict(BLOCK=blk, num_warps=warps, num_stages=stages), report, f"_sample_kernel {dt} {mode}")
    done.append(f"sampling kernel ({len(dts) * len(modes)} specialisations)")
    shapes = ((1, 64), (6, 128), (8, 256), (32, 128)) if full else ((6, 128),)  # (query heads per KV head, head_dim)
    dts = ("bf16", "fp16", "fp32") if full else ("bf16", "fp32")
    for dt in dts:
        types = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bt_ptr": "*i32", "cl_ptr": "*i32",
                 "out_ptr": f"*{dt}", "ml_ptr": "*fp32", "acc_ptr": "*fp32", "rs_ptr": "*i32", "pml_ptr": "*fp32",
                 "pacc_ptr": "*fp32", "tile_ptr": "*i32", "rows_ptr": "*i32", "prefix_ptr": "*i32", "scale": "fp32"}
        for group, d in shapes:
            g_pad, d_pad = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(d))
            fp32 = dt == "fp32"
            cfg = dict(BLOCK_N=decode_kernels.block_n_for(d_pad, fp32), num_warps=decode_kernels.num_warps_for(g_pad),
                       num_stages=3)
            for has_prefix in (False, True):
                # as launched over 16-token blocks: head_dim, block_size (and so partition_size) and a
                # table width of whole 16s are marked divisible by the JIT
                c = dict(GROUP=group, G_PAD=g_pad, D_PAD=d_pad, FP32=fp32, HAS_PREFIX=has_prefix,
                         CARRY_BLOCKS=decode_kernels.carry_blocks(g_pad, d, 16, fp32))
                _compile(decode_kernels._decode_kernel, types, c, arch, cfg, report,
                         f"_decode_kernel {dt} group={group} dim={d}{' suffix' if has_prefix else ''}",
                         divisible=("head_dim", "block_size", "partition_size", "max_blocks"))
            if decode_kernels.prefix_tile_rows(group, d) >= 2:
                m_pad = decode_kernels.prefix_m_pad(group, d, fp32)
                _compile(decode_kernels._prefix_kernel, types, dict(GROUP=group, M_PAD=m_pad, D_PAD=d_pad, FP32=fp32,
                                                                    CARRY_BLOCKS=decode_kernels.prefix_carry_blocks(
                                                                        d, 16, fp32)),
                         arch, dict(BLOCK_N=decode_kernels.prefix_block_n(d_pad, fp32),
                                    num_warps=decode_kernels.num_warps_for(m_pad), num_stages=3), report,
                         f"_prefix_kernel {dt} group={group} dim={d}",
                         divisible=("head_dim", "block_size", "max_blocks"))
        for splits in (2, 64):  # the split-K merge: its smallest tile and its largest (64 partitions a pass)
            cfg = decode_kernels.merge_config(splits, 128)
            _compile(decode_kernels._merge_kernel, {"out_ptr": f"*{dt}", "ml_ptr": "*fp32", "acc_ptr": "*fp32"},
                     dict(D_PAD=cfg["D_PAD"], S_BLOCK=cfg["S_BLOCK"]), arch,
                     dict(num_warps=cfg["num_warps"], num_stages=3), report,
                     f"_merge_kernel {dt} splits={splits} dim=128")
        types = {"key_ptr": f"*{dt}", "value_ptr": f"*{dt}", "k_cache_ptr": f"*{dt}", "v_cache_ptr": f"*{dt}",
                 "slot_ptr": "*i64"}
        _compile(kv_kernels._store_kv_kernel, types, {}, arch, dict(BLOCK=1024, num_warps=4, num_stages=3), report,
                 f"_store_kv_kernel {dt}")
    done.append(f"decode_attention kernel ({len(dts) * len(shapes)} specialisations)")
    done.append(f"store_kv kernel ({len(dts)} specialisations)")
    # fused decoder layers, as ops.rms_norm / ops.swiglu launch them: RMSNorm over hidden sizes
    # (Qwen2.5-1.5B 1536, 4096, 8192: the widest row kept in registers) and Qwen3's per-head q/k
    # norm (head_dim 128, 16 rows per tile), plus a row wider than a block with `full`; SwiGLU at
    # Qwen2.5-1.5B's intermediate size 8960 (a tile shape that does not depend on the width past 2048)
    from r1fast.kernels import rmsnorm as rmsnorm_kernels
    from r1fast.kernels import swiglu as swiglu_kernels

    widths = (128, 1536, 4096, 8192, 16384) if full else (128, 1536)
    dts = ("bf16", "fp16", "fp32") if full else ("bf16", "fp32")
    for dt in dts:
        types = {n: f"*{dt}" for n in ("x_ptr", "r_ptr", "s_ptr", "w_ptr", "out_ptr", "dy_ptr", "dx_ptr", "ds_ptr")}
        types.update({"rstd_ptr": "*fp32", "dw_ptr": "*fp32", "eps": "fp32", "inv_h": "fp32"})
        for h in widths:
            cfg = rmsnorm_kernels.launch_config(h, "cuda", elem_bytes=4 if dt == "fp32" else 2)
            c = dict(N_BLOCKS=cfg["N_BLOCKS"])
            for res in (False, True):  # plain, and with the residual add (ops.add_rms_norm)
                _compile(rmsnorm_kernels._rmsnorm_fwd_kernel, types, dict(c, HAS_RES=res), arch, cfg, report,
                         f"_rmsnorm_fwd_kernel {dt} H={h}" + (" residual" if res else ""))
            bwd = ((True, True, False), (True, True, True), (True, False, False)) if full else \
                ((True, True, False), (True, True, True))
            for has_dx, has_dw, has_ds in bwd:
                _compile(rmsnorm_kernels._rmsnorm_bwd_kernel, types, dict(c, HAS_DX=has_dx, HAS_DW=has_dw, HAS_DS=has_ds),
                         arch, cfg, report, f"_rmsnorm_bwd_kernel {dt} H={h}" + ("" if has_dw else " no dw") +
                         (" residual" if has_ds else ""))
    n_bwd = 3 if full else 2
    done.append(f"rmsnorm kernels ({len(dts) * len(widths) * (2 + n_bwd)} specialisations)")
    for dt in dts:
        types = {n: f"*{dt}" for n in ("g_ptr", "u_ptr", "out_ptr", "dy_ptr", "dg_ptr", "du_ptr")}
        cfg = swiglu_kernels.launch_config(8960, "cuda")
        for kern in (swiglu_kernels._swiglu_fwd_kernel, swiglu_kernels._swiglu_bwd_kernel):
            _compile(kern, types, dict(PRECISE=True), arch, cfg, report, f"{kern.fn.__name__} {dt}")
    done.append(f"swiglu kernels ({2 * len(dts)} specialisations)")
    # rotary of q and k, as ops.rotary launches it: Qwen2.5-1.5B (12 q heads, 2 k heads, head_dim 128),
    # forward (rounding like torch for 16-bit) and backward
    from r1fast.kernels import rotary as rotary_kernels

    for dt in dts:
        types = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "cos_ptr", "sin_ptr")}
        cfg = rotary_kernels.launch_config(12, 64, "cuda")
        for backward in (False, True):
            c = dict(BACKWARD=backward, ROUND=dt != "fp32")
            _compile(rotary_kernels._rotary_kernel, types, c, arch, cfg, report,
                     f"_rotary_kernel {dt}" + (" backward" if backward else ""))
    done.append(f"rotary kernel ({2 * len(dts)} specialisations)")
    # the fused loss's in-place gradient scale (bf16 / fp16 gradients, a device fp32 scalar)
    from r1fast.kernels import scale as scale_kernels

    for dt in ("bf16", "fp16"):
        _compile(scale_kernels._scale_kernel, {"x_ptr": f"*{dt}", "g_ptr": "*fp32"}, {}, arch,
                 {"BLOCK": 8192, "num_warps": 8, "num_stages": 1}, report, f"_scale_kernel {dt}")
    done.append("scale kernel (2 specialisations)")
    return done


if __name__ == "__main__":
    _usage = "usage: python -m r1fast.kernels.compile_check [ARCH] [--full] [--resources]"
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(__doc__))
    unknown = [a for a in sys.argv[1:] if a.startswith("-") and a not in ("--full", "--resources")]
    if unknown:  # a typo such as --resource was ignored, and the run silently left out what it asked for
        sys.exit(f"{_usage}\ncompile_check: unknown option(s) {' '.join(unknown)}")
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    report = [] if "--resources" in sys.argv else None
    for line in compile_all(int(args[0]) if args else 90, full="--full" in sys.argv, report=report):
        print("compiled:", line)
    for name, usage in report or ():
        print(f"  {name}: " + ("ptxas unavailable" if usage is None else
                               "{} registers, {} bytes spilled, {} bytes shared".format(*usage)))
