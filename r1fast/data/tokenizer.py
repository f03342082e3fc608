"""The built-in tokenizer: one token per character plus the reasoning tags, built in code.

Its characters are printable ASCII, space and newline; any other character (a tab, "é", "×") is
<unk>, which `r1fast.data.encode_prompt` / `encode_completion` warn about, naming the characters.

It is a `tokenizers` WordLevel model over single characters, wrapped as a transformers
PreTrainedTokenizerFast with a chat template, so the rest of r1fast treats it exactly like a
Hugging Face tokenizer (and `save_pretrained` writes a folder `AutoTokenizer` loads). Nothing is
downloaded.
"""
from __future__ import annotations

import string

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<|user|>", "<|assistant|>"]
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"

# A prompt is "<bos><|user|>{content}<|assistant|>": short, and unambiguous for a char model.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(vocab_size: int | None = None):
    """A PreTrainedTokenizerFast with ids: specials, tags, then printable ASCII characters.

    vocab_size: pad the vocabulary to this size with filler tokens "<v{id}>" that text never encodes
    to but that decode (benchmarks: a model with a real-sized vocabulary, e.g. Qwen's 151936)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + TAG_TOKENS + list(CHARACTERS))}
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"build_char_tokenizer: vocab_size must be >= {len(vocab)}, got {vocab_size}")
        vocab.update({f"<v{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # "[\s\S]", not ".": Oniguruma's "." skips "\n", so a run of newlines stayed one piece and "\n\n"
    # became a single <unk>.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS + TAG_TOKENS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=4096,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
