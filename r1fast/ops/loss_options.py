"""LossOptions: the GRPO loss knobs, one validated dataclass shared by the ops, the trainer and TRL glue.

Names and defaults follow TRL 1.16's GRPOConfig where the meaning is the same (beta=0.0, epsilon=0.2,
epsilon_high=None -> epsilon, delta=None, loss_type="dapo", importance_sampling_level="token",
max_completion_length=512, temperature=1.0, entropy_coef=0.0); the truncated-importance-sampling
knobs map TRL's `vllm_importance_sampling_*` onto LOSS_SPEC's `tis_mode` / `tis_cap` (TRL's default
is correction on, masked, cap 3.0, per sequence). See docs/loss_spec.md for the formulas.

`use_bias_correction_kl` (TRL's name): multiply the per-token KL by the unclipped, differentiable
importance ratio exp(lw) (lw the token log-ratio, or the row-mean log-ratio for sequence-level
ratios; taken before the `delta` clip), so `L += beta * kl * exp(lw)`; the `kl` statistic is then
the mean of that weighted KL, as TRL logs it. It is the one default that differs from TRL's
(TRL: True, here: False): LOSS_SPEC's objective is the plain `L += beta * kl` (verl's form as
well), and r1fast's own trainer keeps it unless asked. The TRL drop-in passes TRL's value through.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, fields

import numpy as np

_FLOAT32_MAX = 3.4028234663852886e38

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IS_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
TIS_MODES = ("truncate", "mask", None)
TIS_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossOptions:
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    max_completion_length: int | None = 512
    temperature: float = 1.0
    kl_estimator: str = "k3"
    tis_mode: str | None = "mask"
    tis_cap: float = 3.0
    tis_level: str = "sequence"
    entropy_coef: float = 0.0
    num_items: float | None = None
    use_bias_correction_kl: bool = False

    def __post_init__(self):
        if self.tis_mode == "none":   # GRPOConfig's (and its YAML's) spelling of no correction
            object.__setattr__(self, "tis_mode", None)

        def num(name, lo=None, lo_open=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            # a numpy scalar (np.float32(0.2)) as the Python float it holds: refused as "must be a finite
            # float32 number", it was one; np.float64, a float subclass, is stored as a plain float too
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v) not in (int, float):
                v = float(v)
                object.__setattr__(self, name, v)
            # the kernels take these as float32 scalars
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) <= _FLOAT32_MAX:
                raise ValueError(f"LossOptions.{name} must be a finite float32 number (|x| <= 3.4e38), got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"LossOptions.{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")

        num("beta", 0.0)
        num("epsilon", 0.0)
        num("epsilon_high", 0.0, allow_none=True)
        num("delta", 1.0, lo_open=True, allow_none=True)
        num("temperature", 0.0, lo_open=True)
        # the floor the log-prob ops refuse below: checked here too, so the TRL integration's
        # unsupported_options refuses TRL's temperature at __init__, not at the first loss after a generation
        from r1fast.rollout.params import MIN_TEMPERATURE

        if self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"LossOptions.temperature must be >= {MIN_TEMPERATURE} (the floor rollouts and the "
                             f"log-prob ops take), got {self.temperature!r}")
        num("tis_cap", 1.0)
        num("entropy_coef")
        num("num_items", 0.0, lo_open=True, allow_none=True)
        # numpy scalars (np.True_, np.int64(512), read off an array or a config) as the Python values they hold
        if isinstance(self.use_bias_correction_kl, np.bool_):
            object.__setattr__(self, "use_bias_correction_kl", bool(self.use_bias_correction_kl))
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"LossOptions.use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        length = self.max_completion_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1):
            raise ValueError(f"LossOptions.max_completion_length must be a positive int, got {length!r}")
        if length is not None and type(length) is not int:
            object.__setattr__(self, "max_completion_length", int(length))
        for name, allowed in (("loss_type", LOSS_TYPES), ("importance_sampling_level", IS_LEVELS),
                              ("kl_estimator", KL_ESTIMATORS), ("tis_mode", TIS_MODES), ("tis_level", TIS_LEVELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LossOptions.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("LossOptions: loss_type='dr_grpo' needs max_completion_length")
        if self.loss_type != "cispo" and self.epsilon >= 1.0:
            raise ValueError(f"LossOptions.epsilon must be < 1 (the lower clip bound is 1 - epsilon), got {self.epsilon}")

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def from_kwargs(cls, options: "LossOptions | None" = None, **kwargs) -> "LossOptions":
        """Build from keyword arguments (or update `options`), naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown loss option(s) {unknown}; known options: {sorted(known)}")
        if options is None:
            return cls(**kwargs)
        if not isinstance(options, LossOptions):
            raise TypeError(f"options must be a LossOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **kwargs)
