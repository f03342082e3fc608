"""A tiny local Qwen2 model and a character tokenizer, built offline.

The TRL integration tests and the `trl` bench suite need a real Hugging Face causal LM and a
real tokenizer without hub access; these are built from scratch in a few milliseconds.
"""
from __future__ import annotations

from pathlib import Path


def char_tokenizer():
    """r1fast's built-in character tokenizer, padded on the left as TRL's generation expects."""
    from r1fast.data.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def qwen2_config(*, tokenizer, vocab_size: int | None = None, hidden_size: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 intermediate_size: int = 64, tie_word_embeddings: bool = False, **extra):
    """A tiny Qwen2Config over `tokenizer` (a larger `vocab_size` pads the vocabulary, as real models do)."""
    from transformers import Qwen2Config

    if vocab_size is not None and vocab_size < len(tokenizer):
        # an embedding without rows for some of the tokenizer's ids: an IndexError at the first prompt holding one
        raise ValueError(f"qwen2_config: vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} "
                         f"tokens; leave it None for the tokenizer's size, or pad with a larger one")
    return Qwen2Config(
        vocab_size=len(tokenizer) if vocab_size is None else vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate_size, max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **extra,
    )


def save_tiny_qwen2(path: str | Path, *, seed: int = 0, tie_word_embeddings: bool = False,
                    **config_overrides) -> Path:
    """Write a random tiny Qwen2 model and its char tokenizer to `path`; returns the path."""
    import torch
    from transformers import Qwen2ForCausalLM

    path = Path(path)
    tokenizer = char_tokenizer()
    config = qwen2_config(tokenizer=tokenizer, tie_word_embeddings=tie_word_embeddings, **config_overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Random init gives near-uniform next-token distributions; larger output weights give the
    # sampler and the loss something to work with (distinct probabilities, non-trivial ratios). A tied
    # head also scales the embeddings, and too large a scale makes the sampler repeat one token: 4, not 20.
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0 if tie_word_embeddings else 20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
