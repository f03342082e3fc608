"""The rollout engine: paged KV cache, continuous batching, group forks, counter-based sampling.

    from r1fast.rollout import Engine, SamplingParams
    results = Engine(model).generate(prompt_token_ids, SamplingParams(n=8, temperature=1.0, max_tokens=256))

See docs/rollout.md.
"""
from r1fast.rollout.engine import Engine
from r1fast.rollout.params import Completion, RequestOutput, SamplingParams

__all__ = ["Engine", "SamplingParams", "Completion", "RequestOutput"]
