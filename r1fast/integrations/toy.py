"""A tiny local Qwen2 model and a character tokenizer, built offline.

The TRL integration tests and the `trl` bench suite need a real Hugging Face causal LM and a
real tokenizer without hub access; these are built from scratch in a few milliseconds.
"""
from __future__ import annotations

import string
from pathlib import Path

# Characters the toy tokenizer knows; ids 0..3 are the special tokens.
_ALPHABET = string.ascii_lowercase + string.digits + " +-=?.,"
_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def char_tokenizer():
    """A PreTrainedTokenizerFast that maps each known character to one token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL + list(_ALPHABET))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own token, spaces included.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        padding_side="left",
    )


def qwen2_config(*, vocab_size: int, hidden_size: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 intermediate_size: int = 64, tie_word_embeddings: bool = False, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate_size, max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=0, eos_token_id=1, bos_token_id=2, **extra,
    )


def save_tiny_qwen2(path: str | Path, *, seed: int = 0, tie_word_embeddings: bool = False,
                    head_scale: float | None = None, **config_overrides) -> Path:
    """Write a random tiny Qwen2 model and its char tokenizer to `path`; returns the path.

    `head_scale` multiplies the initial lm_head weight (default 20 untied, 4 tied: a tied head
    also scales the embeddings, and too large a scale makes the sampler repeat one token).
    """
    import torch
    from transformers import Qwen2ForCausalLM

    path = Path(path)
    tokenizer = char_tokenizer()
    config = qwen2_config(vocab_size=len(tokenizer), tie_word_embeddings=tie_word_embeddings, **config_overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Random init gives near-uniform next-token distributions; larger output weights give the
    # sampler and the loss something to work with (distinct probabilities, non-trivial ratios).
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale or (4.0 if tie_word_embeddings else 20.0))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
