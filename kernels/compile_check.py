"""Compile the loss kernels for a GPU architecture without a GPU (ahead-of-time, no launch).

Catches what the CPU interpreter cannot: Triton front-end/type errors, unsupported ops and
layout failures in the real compiler. Used by tests (marked slow) and runnable by hand:
    python -m r1fast.kernels.compile_check 90 [--full]
Needs TRITON_INTERPRET unset (under the interpreter @triton.jit yields interpreted functions).
"""
import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from r1fast.kernels import grpo_loss as grpo_kernels
from r1fast.kernels import logprob as logprob_kernels


def compile_for(jitfn, types: dict, constexprs: dict, arch: int, num_warps: int = 8, num_stages: int = 3):
    """triton.compile `jitfn` for sm_<arch>; unnamed non-constexpr arguments are i32 scalars."""
    names = list(inspect.signature(jitfn.fn).parameters)
    sig, consts = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name], consts[(i,)] = "constexpr", constexprs[name]
        else:
            sig[name] = types.get(name, "i32")
    src = ASTSource(fn=jitfn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_all(arch: int = 90, full: bool = False):
    """Every kernel in its GPU configuration; `full` also walks every grpo_loss specialisation."""
    done = []
    cfg = {k: v for k, v in logprob_kernels.GPU_CONFIG.items() if k.startswith("BLOCK")}
    for dt in ("bf16", "fp16", "fp32"):
        types = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dl_ptr": f"*{dt}", "t_ptr": "*i64", "inv_temp": "fp32"}
        types.update({n: "*fp32" for n in ("z_ptr", "part_ptr", "lse_ptr", "zt_ptr", "ent_ptr", "g_logp_ptr", "g_ent_ptr")})
        prec = "ieee" if dt == "fp32" else "tf32"
        compile_for(logprob_kernels._logits_kernel, types, dict(cfg, PRECISION=prec), arch)
        for load_z in (False, True):
            c = dict(cfg, WITH_ENTROPY=True, PRECISION=prec, LOAD_Z=load_z)
            compile_for(logprob_kernels._logprob_fwd_kernel, types, c, arch)
            compile_for(logprob_kernels._dlogits_kernel, types, c, arch)
        done.append(f"logprob kernels {dt}")
    types = {n: "*fp32" for n in ("logp_ptr", "old_ptr", "ref_ptr", "smp_ptr", "ent_ptr", "mask_ptr", "adv_ptr",
                                  "denom_ptr", "row_cnt_ptr", "row_loss_ptr", "g_logp_ptr", "g_ent_ptr", "stats_ptr")}
    types.update({n: "fp32" for n in ("epsilon", "eps_high", "delta", "beta", "tis_cap", "entropy_coef", "max_len")})
    variants = [(lt, seq, tis) for lt in range(5) for seq in (False, True) for tis in (0, 1, 2)] if full else \
        [(0, True, 2), (4, False, 1)]
    for lt, seq, tis in variants:
        c = dict(LOSS_TYPE=lt, SEQ_LEVEL=seq, HAS_DELTA=True, KL=3, USE_KL=True, TIS=tis, TIS_SEQ=seq,
                 HAS_SMP=tis != 0, HAS_ENT=True, BLOCK_T=1024, N_STATS=grpo_kernels.N_STATS,
                 HAS_ROW_CNT=not seq)
        compile_for(grpo_kernels._grpo_loss_kernel, types, c, arch, num_warps=4)
    done.append(f"grpo_loss kernel ({len(variants)} specialisations)")
    return done


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    for line in compile_all(int(args[0]) if args else 90, full="--full" in sys.argv):
        print("compiled:", line)
