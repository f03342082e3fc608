"""Public ops. Each dispatches to a backend (see r1fast.backends): backend= or R1FAST_BACKEND override."""
from r1fast.ops.kv_cache import store_kv

__all__ = ["store_kv"]
from r1fast.ops.loss_options import LossOptions
from r1fast.ops.logprob import grouped_logprob
from r1fast.ops.advantages import group_advantages, kl_penalty
from r1fast.ops.loss import grpo_loss, per_sequence_clip_fractions
from r1fast.ops.fused_loss import fused_linear_grpo_loss

__all__ += ["LossOptions", "grouped_logprob", "group_advantages", "kl_penalty", "grpo_loss",
            "per_sequence_clip_fractions", "fused_linear_grpo_loss"]
from r1fast.ops.attention import paged_decode_attention, paged_prefill_attention

__all__ += ["paged_decode_attention", "paged_prefill_attention"]
from r1fast.ops.sampling import sample_tokens

__all__ += ["sample_tokens"]
from r1fast.ops.layers import add_rms_norm, rms_norm, rotary, swiglu

__all__ += ["add_rms_norm", "rms_norm", "rotary", "swiglu"]
