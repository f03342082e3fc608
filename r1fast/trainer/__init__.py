"""Training: GRPO (r1fast.GRPOTrainer / GRPOConfig), SFT, rejection sampling, multi-stage pipelines."""
from r1fast.trainer.config import ConfigError, GRPOConfig, SampleConfig, SFTConfig
from r1fast.trainer.grpo import GRPOTrainer
from r1fast.trainer.sft import SFTTrainer

__all__ = ["ConfigError", "GRPOConfig", "SampleConfig", "SFTConfig", "GRPOTrainer", "SFTTrainer"]
