"""SamplingParams and the result types of Engine.generate."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

# Below this a temperature is no longer a sampling distribution in fp32: logits / T overflow.
MIN_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How each prompt's `n` completions are drawn.

    temperature 0 is greedy (else at least MIN_TEMPERATURE). top_k -1 (or 0) keeps every token; top_p in (0, 1]; min_p in [0, 1]
    keeps tokens whose probability is at least min_p times the most likely one's. Generation of a
    completion stops at a stop token (stop_token_ids, plus the model's eos ids unless ignore_eos),
    after max_tokens tokens, or at the engine's max_model_len. seed=None draws a fresh seed per call from the OS
    (torch's random state is neither read nor advanced: torch.manual_seed does not repeat such samples).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        def is_int(x):  # numpy ints too (numbers.Integral)
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, numbers.Real) and not isinstance(x, bool)

        def as_float(x):  # an int past float's range (10**400) is out of every range checked below
            try:
                return float(x)
            except OverflowError:
                return math.inf if x > 0 else -math.inf

        for name in ("n", "top_k", "max_tokens", "seed"):  # numpy ints as plain ints (hashing, C++ calls)
            if is_int(getattr(self, name)):
                object.__setattr__(self, name, int(getattr(self, name)))
        # other real numbers as plain floats: a Fraction passed the checks below, then every backend failed on
        # `logits / temperature` with a bare TypeError (the Triton one took a Fraction min_p), and an int past
        # int64 (temperature=2**70) failed in the sampler's division, "OverflowError: int too big to convert"
        for name in ("temperature", "top_p", "min_p"):
            if is_num(getattr(self, name)):
                object.__setattr__(self, name, as_float(getattr(self, name)))

        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"SamplingParams: n must be an int >= 1, got {self.n!r}")
        if not is_num(self.temperature) or not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < float("inf")):
            raise ValueError(f"SamplingParams: temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                             f"got {self.temperature!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: top_p must lie in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"SamplingParams: top_k must be an int >= 1, or -1/0 for no limit, got {self.top_k!r}")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams: min_p must lie in [0, 1], got {self.min_p!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams: max_tokens must be an int >= 1, got {self.max_tokens!r}")
        stops = self.stop_token_ids
        if hasattr(stops, "ndim") and hasattr(stops, "tolist"):
            # a numpy array or tensor as its Python numbers: a 0-d one failed in tuple() with a bare "iteration over
            # a 0-d tensor", and a tensor's elements (0-d tensors, not ints) were refused although prompts take
            # tensors
            if stops.ndim != 1:
                raise ValueError(f"SamplingParams: stop_token_ids must be a 1-D sequence of ints, got an array of "
                                 f"{stops.ndim} dimensions")
            stops = stops.tolist()
        if isinstance(stops, (str, bytes)) or not hasattr(stops, "__iter__"):
            raise ValueError(f"SamplingParams: stop_token_ids must be a sequence of ints, got {self.stop_token_ids!r}")
        stops = tuple(stops)  # once: a generator would be used up by the check below
        if not all(is_int(t) for t in stops):
            raise ValueError(f"SamplingParams: stop_token_ids must be a sequence of ints, got {stops!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stops))
        if not isinstance(self.ignore_eos, bool):  # a truthy string such as 'no' would ignore the eos
            raise ValueError(f"SamplingParams: ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"SamplingParams: seed must be an int or None, got {self.seed!r}")
        # the random streams fold 96 bits of the seed (sampler.stream_key): seed 2**100 drew seed 0's samples
        if self.seed is not None and not -2**63 <= self.seed < 2**64:
            raise ValueError(f"SamplingParams: seed must fit in 64 bits ([-2**63, 2**64)), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]     # log_softmax(logits / temperature) at each sampled token (see docs/rollout.md)
    finish_reason: str        # "stop" (a stop/eos token, included in token_ids) or "length"


@dataclasses.dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    completions: list[Completion]
