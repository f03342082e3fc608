"""Training: GRPO (r1fast.GRPOTrainer / GRPOConfig), SFT, rejection sampling, held-out evaluation,
multi-stage pipelines (run_pipeline / load_pipeline).

The names load on first use: the `r1fast` command imports r1fast.trainer.cli, and importing the
trainers (torch with them) cost every `r1fast --help` or `r1fast info` seconds."""
import importlib

_LAZY_NAMES = {"ConfigError": "config", "GRPOConfig": "config", "SampleConfig": "config", "SFTConfig": "config",
               "GRPOTrainer": "grpo", "SFTTrainer": "sft", "rejection_sample": "sampling",
               "evaluate_accuracy": "evaluate", "load_pipeline": "pipeline", "run_pipeline": "pipeline"}


def __getattr__(name):
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"r1fast.trainer.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module 'r1fast.trainer' has no attribute {name!r}")


__all__ = ["ConfigError", "GRPOConfig", "SampleConfig", "SFTConfig", "GRPOTrainer", "SFTTrainer", "rejection_sample",
           "evaluate_accuracy", "load_pipeline", "run_pipeline"]
