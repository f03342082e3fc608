"""One rank of a two-process TRL GRPO run (torch.distributed.run, gloo on the CPU), stock or r1fast.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trl_ddp_worker.py \
        stock|r1fast|r1fast_generation MODEL_DIR OUT_DIR LOSS_TYPE

Rank 0 writes the trained weights (OUT_DIR/weights.safetensors) and the logged losses and gradient
norms (OUT_DIR/log.json). Used by test_trl_integration.py::test_matches_stock_trl_across_two_processes.
"""
import json
import os
import sys

import torch
import trl
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1fast.integrations import trl as r1trl

PROMPTS = ["ab 1+2=", "what is 3?", "hello", "x=y+z", "q", "9-4=", "abc", "zz top"]


def char_reward(completions, **kwargs):
    return [c.count("a") + 0.3 * c.count("b") + 0.1 * len(c) for c in completions]


def main(which, model_dir, out_dir, loss_type):
    # the Trainer's DDP default without gradient checkpointing: find_unused_parameters=True
    args = trl.GRPOConfig(output_dir=out_dir, per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=5, max_steps=3, logging_steps=1, bf16=False, use_cpu=True,
                          gradient_checkpointing=False, learning_rate=0.05, optim="sgd", report_to="none", seed=0,
                          save_strategy="no", loss_type=loss_type, beta=0.0, dataloader_num_workers=0,
                          disable_tqdm=True)
    torch.manual_seed(0)
    cls = trl.GRPOTrainer if which == "stock" else r1trl.GRPOTrainer
    extra = {"r1fast_generation": True} if which == "r1fast_generation" else {}
    trainer = cls(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), **extra,
                  reward_funcs=char_reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                  processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    if trainer.accelerator.is_main_process:
        assert trainer.accelerator.num_processes == 2
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out_dir, "weights.safetensors"))
        logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        with open(os.path.join(out_dir, "log.json"), "w") as f:
            json.dump({"loss": [h["loss"] for h in logs], "grad_norm": [h["grad_norm"] for h in logs]}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
