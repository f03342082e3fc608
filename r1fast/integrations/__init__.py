"""Glue between r1fast and other training stacks.

- `r1fast.integrations.trl`: `GRPOTrainer`, a drop-in subclass of TRL's GRPOTrainer whose
  log-probs and GRPO loss run through r1fast's fused ops (docs/trl.md). Imports TRL, so it is
  loaded only when asked for.
- `r1fast.integrations.hf_rollout`: `HFRollout`, r1fast's rollout engine generating for a transformers
  Llama / Qwen2 / Qwen3 / Mistral model from its own weights (what `GRPOTrainer(..., r1fast_generation=True)` runs).
- `r1fast.integrations.toy`: a tiny local Qwen2 model and character tokenizer, built offline, for
  tests and the bench's smoke size.
"""
