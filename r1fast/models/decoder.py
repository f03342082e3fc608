"""The decoder: Llama / Qwen2 / Qwen3 / Mistral as one module tree, forward over packed token batches.

Parameter names match transformers' checkpoints minus the "model." prefix, except two fused
projections: q/k/v are one `qkv_proj` and gate/up one `gate_up_proj`, each a single GEMM (at a
rollout's few hundred rows, k and v alone are too thin to fill the GPU, and two GEMMs over the same
input read it twice). `hf_tensors` maps checkpoint keys to views of these parameters (row slices of
the fused ones), so a checkpoint still loads and saves one transformers tensor at a time.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from r1fast.models.attention import (PackedBatch, check_cu_seqlens, check_cu_seqlens_form, check_prefix_of,
                                     packed_from_lengths, packed_from_positions, positions_of, varlen_causal_attention)
from r1fast.models.config import ModelConfig
from r1fast.models.linear import Linear
from r1fast.models.rotary import RotaryEmbedding
from r1fast.ops.layers import add_rms_norm, rms_norm, rotary, swiglu


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back before the weight (as transformers does)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, return_sum: bool = True):
        """norm(x); with a residual, (norm(residual + x), residual + x): the residual add before this
        norm in the same kernel (return_sum=False: the norm alone, for a sum nothing reads after it).
        ops.rms_norm / ops.add_rms_norm: transformers' expressions on the CPU (torch backend, bit for
        bit), fused Triton on CUDA."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        out = add_rms_norm(x, residual, self.weight, self.eps)
        return out if return_sum else out[0]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        h, qd, kvd = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [qd, kvd, kvd]
        self.qkv_proj = Linear(h, qd + 2 * kvd, bias=config.attention_bias)  # rows: q, then k, then v
        self.o_proj = Linear(qd, h, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, packed: PackedBatch | None, attn=None):
        t = x.shape[0]
        # column slices of one GEMM's output: rotary and store_kv read such strided rows in place
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # ops.rotary: transformers' expression on the CPU (torch backend), one fused Triton launch on CUDA
        q, k = rotary(q, k, cos, sin)
        if attn is not None:
            out = attn.attend(self.layer_idx, q, k, v)
        else:
            out = varlen_causal_attention(q, k, v, packed, self.scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one GEMM (gate_up_proj: rows gate, then up)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = Linear(h, 2 * i, bias=b)
        self.down_proj = Linear(i, h, bias=b)

    def forward(self, x):
        # ops.swiglu on the packed [T, 2I]: F.silu(gate) * up on the CPU (torch backend), fused Triton on
        # CUDA reading both halves in place and writing their gradient as one tensor
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, pending, cos, sin, packed, attn=None):
        """The residual stream is x + pending: `pending` is the previous layer's MLP output (None
        before the first layer), added here inside this layer's first norm. Returns (stream, this
        layer's MLP output), which the next layer's first norm adds the same way: each residual add
        but the last shares a kernel with the norm after it."""
        if pending is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm(pending, residual=x)
        h, x = self.post_attention_layernorm(self.self_attn(h, cos, sin, packed, attn), residual=x)
        return x, self.mlp(h)


def _longest_context(packed) -> int:
    """The most keys a query of the packed batch attends to: its sequence plus the prefix it continues."""
    prefixes = packed.prefix_of or [-1] * len(packed.lengths)
    return max(n + (packed.lengths[p] if p >= 0 else 0) for n, p in zip(packed.lengths, prefixes))


class CausalLM(nn.Module):
    """Decoder-only LM. `forward` returns the final (normed) hidden states [T, H] of a packed batch;
    the vocabulary projection is left to the caller (`lm_head_weight`, `logits`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"CausalLM takes a ModelConfig, got {type(config).__name__} "
                            "(use ModelConfig.from_hf_config for a config.json)")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                           bias=False)
        self.rotary = RotaryEmbedding(config)
        self.sliding_window = config.sliding_window
        self.rope_position_limit = config.rope_position_limit
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def _apply(self, fn, *args, **kwargs):
        # Put the rotary frequencies on the weights' device whenever the model moves, so no forward
        # (in particular one being captured into a CUDA graph) has to copy them from the host.
        out = super()._apply(fn, *args, **kwargs)
        if not self.embed_tokens.weight.is_meta:
            self.rotary.inv_freq(self.embed_tokens.weight.device)
        return out

    # -- parameters ------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None):
        """Random init like transformers': N(0, initializer_range) matrices, zero biases, unit norms."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            elif gen is not None:  # seeded: drawn on the CPU so every device gets the same weights
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device="cpu") * std)
            else:
                p.normal_(0.0, std)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]: the output projection (the embedding matrix when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def eos_token_ids(self) -> list[int]:
        """Where generation ends: config.json's eos_token_id and generation_config.json's (an instruct
        checkpoint often lists its base's end-of-text there too, as Qwen2.5-Instruct does), as
        transformers' generate and vLLM stop at either."""
        ids: list[int] = []
        generation = getattr(self, "generation_config_json", None) or {}
        for eos in (self.config.eos_token_id, generation.get("eos_token_id")):
            for i in (eos if isinstance(eos, (list, tuple)) else [eos]):
                if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.config.vocab_size and i not in ids:
                    ids.append(i)
        return ids

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @staticmethod
    def hf_name(name: str) -> str:
        """A parameter name in transformers' layout (q_proj, gate_proj...) -> its checkpoint key."""
        return name if name.startswith("lm_head.") else "model." + name

    def _fused_parts(self, module: str) -> list[tuple[str, int, int]] | None:
        """(transformers' module name, first row, end row) of each part of a fused projection."""
        cfg = self.config
        if module == "qkv_proj":
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            return [("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)]
        if module == "gate_up_proj":
            i = cfg.intermediate_size
            return [("gate_proj", 0, i), ("up_proj", i, 2 * i)]
        return None

    def hf_layout(self) -> list[tuple[str, str, slice | None]]:
        """(checkpoint key, parameter name, rows) for every tensor of a transformers checkpoint: the
        key's tensor is that parameter's rows (rows None: the whole parameter)."""
        out = []
        for name, _ in self.named_parameters():
            owner, _, leaf = name.rpartition(".")
            parent, _, module = owner.rpartition(".")
            parts = self._fused_parts(module)
            if parts is None:
                out.append((self.hf_name(name), name, None))
            else:
                out += [(self.hf_name(f"{parent}.{part}.{leaf}"), name, slice(a, b)) for part, a, b in parts]
        return out

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint key -> a view of this model's parameter (rows of a fused one): loading copies into
        these views, saving reads them."""
        params = dict(self.named_parameters())
        return {key: params[name] if rows is None else params[name][rows] for key, name, rows in self.hf_layout()}

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, attn=None, prefix_of: list[int] | None = None) -> torch.Tensor:
        """Final hidden states [T, H] of a packed batch (cu_seqlens; one sequence without it). prefix_of
        (one int per sequence, -1 for none) lets a sequence continue an earlier one: it attends to all of
        that sequence's tokens first and its positions follow them (GRPO: G completions after one prompt)."""
        device = self.device
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 1 or input_ids.dtype not in (torch.int32, torch.int64) or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty 1-D int tensor of packed tokens [T], got dtype "
                             f"{input_ids.dtype} shape {tuple(input_ids.shape)}")
        if input_ids.device != device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}")
        t = input_ids.shape[0]
        if cu_seqlens is not None:
            check_cu_seqlens_form(cu_seqlens, device)
        cu_host = None
        if attn is None:
            # The rollout engine (attn given) owns its ids; training batches are checked, since an
            # out-of-range id is a device assert on CUDA. Read with the sequence boundaries, in one host sync
            # (apart, each forward of a training micro-batch waited on the device twice).
            reads = [torch.stack(torch.aminmax(input_ids)).long()] + ([] if cu_seqlens is None else [cu_seqlens.long()])
            lo, hi, *cu_host = torch.cat(reads).tolist()
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got min {lo} max {hi}")
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor) or position_ids.shape != (t,) or \
                    position_ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"position_ids must be an int tensor of shape [{t}] like input_ids, got "
                                 f"{getattr(position_ids, 'dtype', type(position_ids))} "
                                 f"{tuple(getattr(position_ids, 'shape', ()))}")
            if position_ids.device != device:
                raise ValueError(f"position_ids are on {position_ids.device} but the model is on {device}")
        packed = None
        if prefix_of is not None and (cu_seqlens is None or attn is not None):
            raise ValueError("prefix_of needs cu_seqlens (the packed sequences it refers to), and no attn")
        if cu_seqlens is not None:
            packed = check_prefix_of(prefix_of, check_cu_seqlens(cu_seqlens, t, device, host=cu_host or None))
        elif attn is None:
            packed = packed_from_positions(position_ids) if position_ids is not None else \
                packed_from_lengths([t], device)
        self._check_sliding_window(packed)
        if attn is None:  # the rollout engine's max_model_len is at most max_position_embeddings
            self._check_rope_positions(packed, position_ids)
        if position_ids is None:
            position_ids = positions_of(packed, device) if packed is not None else torch.arange(t, device=device)

        x = self.embed_tokens(input_ids)
        # the rollout engine's contexts gather cos/sin from a table of every position (one kernel)
        table_rows = getattr(attn, "cos_sin", None)
        cos, sin = table_rows(position_ids) if table_rows is not None else self.rotary.cos_sin(position_ids, x.dtype)
        use_ckpt = self.gradient_checkpointing and attn is None and torch.is_grad_enabled()
        pending = None
        for layer in self.layers:
            if use_ckpt:
                x, pending = checkpoint(layer, x, pending, cos, sin, packed, use_reentrant=False)
            else:
                x, pending = layer(x, pending, cos, sin, packed, attn)
        # the last layer's residual add runs inside the final norm's kernel too (it was a kernel of its own,
        # a [T, H] read twice and written once per decode step); the norm returns the normed tensor
        # alone, so forward hooks on it still see the model's output
        if pending is None:
            return self.norm(x)
        return self.norm(pending, residual=x, return_sum=False)

    def _check_sliding_window(self, packed) -> None:
        """Full attention equals transformers' sliding layers only while no query has more keys than the
        window (its own sequence plus the prefix it continues)."""
        if self.sliding_window is None or packed is None:
            return
        longest = _longest_context(packed)
        if longest > self.sliding_window:
            raise ValueError(f"a sequence of {longest} tokens exceeds config.json's sliding_window "
                             f"({self.sliding_window}): r1fast runs full attention, equal to transformers' "
                             f"sliding-window layers only up to {self.sliding_window} tokens; shorten the sequences")

    def _check_rope_positions(self, packed, position_ids) -> None:
        """Dynamic NTK rope equals the default rotation only while positions stay below its limit."""
        limit = self.rope_position_limit
        if limit is None:
            return
        if position_ids is not None:
            highest = int(position_ids.max())  # a host sync, paid by dynamic-rope models only
        else:
            highest = _longest_context(packed) - 1
        if highest >= limit:
            raise ValueError(f"position {highest} reaches max_position_embeddings ({limit}), where transformers' "
                             f"dynamic rope rescales its frequencies; r1fast implements it only below that")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, V] fp32 logits from final hidden states (materialises the vocabulary: small uses only)."""
        return F.linear(hidden, self.lm_head_weight).float()

    # -- checkpoints -----------------------------------------------------------------------------
    def save_pretrained(self, path, max_shard_size="5GB") -> None:
        from r1fast.models.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)
