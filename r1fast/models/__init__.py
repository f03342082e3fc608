"""r1fast's own decoder (Llama / Qwen2 / Qwen3 / Mistral) over packed token batches; see docs/models.md.

    cfg = ModelConfig.from_hf_config(path_or_dict); model = CausalLM(cfg)   # random init
    model = from_pretrained(path, dtype=None, device=None, fp8="off")        # local HF folder
    hidden = model(input_ids, cu_seqlens=cu)                                  # [T, H], after the last norm
    model.save_pretrained(path); tok = load_tokenizer(path)
"""
from r1fast.models.checkpoint import from_pretrained, save_pretrained
from r1fast.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from r1fast.models.decoder import CausalLM
from r1fast.models.linear import Linear
from r1fast.models.tokenizer import load_tokenizer

__all__ = ["ModelConfig", "CausalLM", "Linear", "from_pretrained", "save_pretrained", "load_tokenizer",
           "SUPPORTED_ARCHITECTURES"]
