"""GRPOTrainer end to end on a tiny model (CPU, seconds): it improves a simple reward, resume is
bit-identical to an uninterrupted run, a NaN step is skipped and counted, KL runs with beta > 0."""
import copy
import dataclasses
import json
import math
import os
import re
import shutil

import pytest
import torch

from r1fast.data import build_char_tokenizer
from r1fast.models import CausalLM, ModelConfig
from r1fast.trainer import GRPOConfig, GRPOTrainer
from r1fast.trainer.metrics import TIMING_KEYS


def tiny_model(seed=0, tok=None):
    tok = tok or build_char_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    model = CausalLM(cfg)
    model.reset_parameters(seed=seed)
    return model, tok


def sevens(prompts, completions, **kw):
    """Share of the completion's characters that are '7'."""
    return [c.count("7") / max(len(c), 1) for c in completions]


ROWS = [{"prompt": str(i), "answer": "7"} for i in range(32)]


def make(tmp_path, name="run", **over):
    model, tok = tiny_model()
    base = dict(learning_rate=3e-2, per_device_train_batch_size=32, num_generations=8, max_steps=12,
                max_completion_length=6, output_dir=str(tmp_path / name), progress_bar=False, seed=3,
                logging_steps=1, log_completions=1)
    base.update(over)
    return GRPOTrainer(model, [sevens], ROWS, GRPOConfig(**base), tokenizer=tok)


def test_short_grpo_run_improves_a_simple_reward(tmp_path):
    tr = make(tmp_path)
    res = tr.train()
    rewards = [h["reward"] for h in tr.history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
    # what a run leaves behind: metrics, sample completions, an HF-format checkpoint
    run = tmp_path / "run"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("reward", "completion_length", "entropy", "tokens_per_s", "time/rollout", "time/loss_backward"):
        assert key in rows[0]
    samples = [json.loads(line) for line in open(run / "completions.jsonl")]
    assert samples and all(set(s["rewards"]) == set(tr.rewards.names) for s in samples)
    assert all(s["reward"] == pytest.approx(sum(s["rewards"].values())) for s in samples)   # unit weights
    ck = res["checkpoint"]
    assert os.path.isfile(os.path.join(ck, "model.safetensors")) and os.path.isfile(os.path.join(ck, "config.json"))


def _metrics(path):
    rows = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("time/")} for r in rows]


def test_a_reward_drawing_from_the_global_generators_gives_the_same_numbers_in_two_runs_of_one_seed(tmp_path):
    import random

    import numpy as np

    def noisy(prompts, completions, **kw):   # a user's reward with noise from Python's, numpy's and torch's globals
        return [random.random() + float(np.random.rand()) + float(torch.rand(())) for _ in completions]

    rewards = []
    for name in ("a", "bb"):
        model, tok = tiny_model()
        cfg = GRPOConfig(learning_rate=3e-2, per_device_train_batch_size=32, num_generations=8, max_steps=2,
                         max_completion_length=6, output_dir=str(tmp_path / name), progress_bar=False, seed=3,
                         logging_steps=1)
        random.seed(len(name))   # the caller's generators in other states before each run
        np.random.seed(len(name))
        torch.manual_seed(len(name))
        tr = GRPOTrainer(model, [noisy], ROWS, cfg, tokenizer=tok)
        tr.train()
        rewards.append([h["reward"] for h in tr.history])
    assert rewards[0] == rewards[1]


def test_resume_is_bit_identical(tmp_path):
    kw = dict(max_steps=6, save_steps=2, learning_rate=3e-3, num_iterations=2, gradient_accumulation_steps=2,
              per_device_train_batch_size=8, lr_scheduler_type="cosine", warmup_steps=2, beta=0.05, weight_decay=0.1)
    full = make(tmp_path, "full", **kw)
    full.train()

    first = make(tmp_path, "split", **kw)
    first.train(callback=lambda step, m: setattr(first, "_stop_requested", step >= 2))
    assert first.global_step == 2
    second = make(tmp_path, "split", **kw)
    second.model.reset_parameters(seed=99)          # resume must overwrite every weight
    second.train(resume=True)
    assert second.global_step == 6
    a, b = _metrics(tmp_path / "full" / "metrics.jsonl"), _metrics(tmp_path / "split" / "metrics.jsonl")
    assert a == b and b[-1]["num_tokens"] == full.num_tokens > 0   # the running total goes on across the resume
    for (n, p), (_, q) in zip(full.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(full.model.parameters(), second.model.parameters()):
        s1, s2 = full.optimizer.state[p], second.optimizer.state[q]
        assert torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"]) and torch.equal(s1["exp_avg"], s2["exp_avg"])


def test_an_abort_mid_run_says_which_checkpoint_resume_continues_from(tmp_path, capsys):
    # a second Ctrl-C (KeyboardInterrupt mid-step) skips the checkpoint the first one writes: the CLI said
    # "stopped; continue with: ... --resume", not from which step, nor that none was written yet
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    def abort_at(step):
        def callback(s, m):
            if s == step:
                raise KeyboardInterrupt
        return callback

    kw = dict(max_steps=2, save_steps=1, per_device_train_batch_size=8, num_generations=4, max_completion_length=2)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, **kw).train(callback=abort_at(2))   # before step 2's checkpoint
    run = tmp_path / "run"
    assert capsys.readouterr().err.endswith(f"r1fast: aborted with 2 of 2 grpo steps done; --resume continues from "
                                            f"{run / 'checkpoint-1'} (step 1); step 2 trained again\n")
    assert make(tmp_path, **kw).train(resume=True)["global_step"] == 2
    model, tok = tiny_model()
    rows = [{"prompt": "1", "completion": "7"}] * 4
    sft = SFTTrainer(model, tok, rows, SFTConfig(max_steps=1, output_dir=str(tmp_path / "sft"), progress_bar=False))
    sft._micro_batch = lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)   # in the first step's backward
    with pytest.raises(KeyboardInterrupt):
        sft.train()
    assert capsys.readouterr().err.endswith("r1fast: aborted with 0 of 1 sft steps done; no checkpoint was written "
                                            "yet: the run starts again from its first step\n")


def test_train_again_after_a_failure_resumes_or_says_why_not(tmp_path, capsys):
    # a reward function that raised, then train() again on the same trainer (a notebook): before its first
    # checkpoint it went on from the model and optimizer in memory, but deleted the logged metrics of the steps
    # done and skipped the failed step's prompts (metrics.jsonl held steps [3, 4] of 4)
    judge_down = [True]

    def trainer(name, **over):
        tr = make(tmp_path, name, **{**dict(max_steps=3, save_steps=1, per_device_train_batch_size=8,
                                            num_generations=4, max_completion_length=2), **over})

        def flaky(prompts, completions, **k):
            if judge_down[0] and tr.global_step == 2:
                raise RuntimeError("judge down")
            return sevens(prompts, completions)
        tr.rewards.funcs[0] = flaky
        with pytest.raises(Exception, match="judge down"):
            tr.train()
        return tr

    unsaved, saved = trainer("unsaved", save_steps=0), trainer("saved")
    judge_down[0] = False
    with pytest.raises(ValueError, match=r"already ran 2 of its 3 steps: it wrote no checkpoint .* to go on from; "
                                         r"build a new trainer to start over"):
        unsaved.train()
    capsys.readouterr()
    with pytest.raises(ValueError, match="it wrote no checkpoint"):   # no "starting from the first step" before it
        unsaved.train(resume=True)
    assert "starting from the first step" not in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"already ran 2 of its 3 steps: call train\(resume=True\) to continue"):
        saved.train()
    assert saved.train(resume=True)["global_step"] == 3
    assert [r["step"] for r in _metrics(tmp_path / "saved" / "metrics.jsonl")] == [1, 2, 3]


def test_train_again_after_a_failure_in_the_first_step_starts_as_a_new_trainer(tmp_path):
    # the failed first step had drawn its prompts and counted its tokens: train() again skipped those prompts
    def run(name, fail_first):
        tr, seen = make(tmp_path, name, max_steps=1, per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=2), []

        def judge(prompts, completions, **k):
            seen.append(sorted(set(prompts)))
            if fail_first and len(seen) == 1:
                raise RuntimeError("judge down")
            return sevens(prompts, completions)
        tr.rewards.funcs[0] = judge
        if fail_first:
            with pytest.raises(Exception, match="judge down"):
                tr.train()
        tr.train()
        return seen[-1], _metrics(tmp_path / name / "metrics.jsonl")[0]["num_tokens"]

    assert run("retried", True) == run("fresh", False)


def test_resuming_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    """The later checkpoints belong to the abandoned steps: a bare --resume afterwards must not pick them."""
    kw = dict(max_steps=4, save_steps=1, save_total_limit=None, per_device_train_batch_size=8)
    make(tmp_path, **kw).train()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in range(1, 5)]
    again = make(tmp_path, **{**kw, "max_steps": 2})
    again.train(resume=str(run / "checkpoint-1") + os.sep)   # a shell's completion adds the slash
    assert f"resuming from checkpoint-1: the later {run / 'abandoned-checkpoint-2'} is set aside" in \
        capsys.readouterr().err   # "resuming from : the later ...": the slash's empty basename
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in run.glob("abandoned-*")) == ["abandoned-checkpoint-2", "abandoned-checkpoint-3",
                                                               "abandoned-checkpoint-4"]
    assert [r["step"] for r in _metrics(run / "metrics.jsonl")] == [1, 2]
    assert make(tmp_path, **kw).train(resume=True)["global_step"] == 4   # continues from the new checkpoint-2
    # a checkpoint that fails to load leaves the later ones where they were
    os.remove(run / "checkpoint-1" / "optimizer.safetensors")
    with pytest.raises(ValueError, match="checkpoint-1.* lacks optimizer.safetensors"):
        make(tmp_path, **kw).train(resume=str(run / "checkpoint-1"))
    assert (run / "checkpoint-4").is_dir()


def test_going_back_to_set_aside_steps_brings_back_their_metrics_and_keeps_the_branch_left(tmp_path):
    """A (steps 1-3), B resumed from checkpoint-1 with another schedule (step 2), A again from abandoned-checkpoint-2:
    the metrics log held B's step 2 as A's history (cut at step 2, then A's step 3)."""
    kw = dict(max_steps=3, save_steps=1, save_total_limit=None, per_device_train_batch_size=4, num_generations=2,
              max_completion_length=3, lr_scheduler_type="linear")
    run = tmp_path / "run"

    def lrs(folder):   # by step (1, 2, ...)
        rows = _metrics(folder / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        return [r["lr"] for r in rows]

    make(tmp_path, **kw).train()
    a_metrics, a_samples = _metrics(run / "metrics.jsonl"), (run / "completions.jsonl").read_text()
    make(tmp_path, **{**kw, "max_steps": 2}).train(resume=str(run / "checkpoint-1"))
    b = [3e-2, 1.5e-2]   # the linear schedule over 2 steps
    assert lrs(run) == pytest.approx(b)
    assert lrs(run / "abandoned-checkpoint-3") == pytest.approx([3e-2, 2e-2, 1e-2])   # A's, kept
    make(tmp_path, **kw).train(resume=str(run / "abandoned-checkpoint-2"))
    assert _metrics(run / "metrics.jsonl") == a_metrics   # A's own step 2 again, and the same step 3
    assert (run / "completions.jsonl").read_text() == a_samples
    assert lrs(run / f"abandoned-checkpoint-2.{os.getpid()}") == pytest.approx(b)   # B's, where B's step 2 went


def test_a_resume_stopped_as_it_sets_checkpoints_aside_keeps_the_logs_of_the_branch_left(tmp_path, monkeypatch):
    """The newest set-aside checkpoint got the branch's whole log after the renames: a kill between them and the
    copy lost the lines past its step for good, the same resume run again finding nothing newer to set aside."""
    from r1fast.trainer import metrics

    kw = dict(max_steps=4, save_steps=1, save_total_limit=None, per_device_train_batch_size=4, num_generations=2,
              max_completion_length=3)

    def stop_at_3(step, m):
        if step == 3:   # logged, not saved: the log runs a step past checkpoint-2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, **kw).train(callback=stop_at_3)
    run = tmp_path / "run"
    real = metrics.copy_logs

    def killed(*a, **k):
        raise SystemExit("killed")

    monkeypatch.setattr(metrics, "copy_logs", killed)
    with pytest.raises(SystemExit):
        make(tmp_path, **kw).train(resume=str(run / "checkpoint-1"))
    monkeypatch.setattr(metrics, "copy_logs", real)
    make(tmp_path, **{**kw, "max_steps": 2}).train(resume=str(run / "checkpoint-1"))
    assert [r["step"] for r in _metrics(run / "abandoned-checkpoint-2" / "metrics.jsonl")] == [1, 2, 3]


def test_resuming_another_runs_checkpoint_into_a_folder_holding_a_third_run_is_refused(tmp_path):
    """--resume runs/b into output_dir runs/a (another run's checkpoints) cut a's metrics at the step resumed
    and replaced its checkpoint of the next step with b's continuation; now refused, naming output_dir=runs/b."""
    kw = dict(max_steps=1, per_device_train_batch_size=4, num_generations=2, max_completion_length=3)
    make(tmp_path, "a", **kw).train()
    make(tmp_path, "b", **kw).train()
    a_log = (tmp_path / "a" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=rf"holds another run \(checkpoint-1\); give output_dir={tmp_path / 'b'} .*"
                                         rf"delete {tmp_path / 'a'}'s run first$"):   # no step past b's: a's own
        make(tmp_path, "a", **{**kw, "max_steps": 2}).train(resume=str(tmp_path / "b"))
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == a_log
    # a set-aside checkpoint's step is read as set_aside_newer reads it: with the ".<pid>" a second set-aside of its
    # step gets, a's checkpoint-1 (older than it) was said to be maybe this run's own steps since it
    shutil.copytree(tmp_path / "b" / "checkpoint-1", tmp_path / "b" / "abandoned-checkpoint-3.77")
    with pytest.raises(ValueError, match=r"delete .*'s run first$"):
        make(tmp_path, "a", **{**kw, "max_steps": 4}).train(resume=str(tmp_path / "b" / "abandoned-checkpoint-3.77"))
    shutil.rmtree(tmp_path / "b" / "abandoned-checkpoint-3.77")
    # the same command run again (a restarted job) finds its own steps since b's checkpoint: --resume alone goes on
    b_ckpt = str(tmp_path / "b" / "checkpoint-1")
    make(tmp_path, "c", **{**kw, "max_steps": 2}).train(resume=b_ckpt)
    b_log = _metrics(tmp_path / "b" / "metrics.jsonl")
    assert _metrics(tmp_path / "c" / "metrics.jsonl")[:1] == b_log and len(b_log) == 1   # b's step 1, then c's 2
    with pytest.raises(ValueError, match=r"If they are this run's own steps since checkpoint-1 \(the same command run "
                                         r"before, as a restarted job does\), --resume alone goes on from checkpoint-2"):
        make(tmp_path, "c", **{**kw, "max_steps": 3}).train(resume=b_ckpt)
    # overwrite_output_dir deletes a's run first
    res = make(tmp_path, "a", **{**kw, "max_steps": 2, "overwrite_output_dir": True}).train(resume=str(tmp_path / "b"))
    assert res["global_step"] == 2 and sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-2"]
    # an output_dir that is a symlink to the checkpoint's own folder continues that run there
    os.symlink(tmp_path / "b", tmp_path / "b_link")
    assert make(tmp_path, "b_link", **{**kw, "max_steps": 2}).train(resume=str(tmp_path / "b"))["global_step"] == 2


def test_resuming_an_older_checkpoint_through_a_symlinked_output_dir_sets_the_later_ones_aside(tmp_path):
    # resume_into compares real paths but set_aside_newer compared abspaths: through output_dir=<symlink to b>,
    # resuming b's checkpoint-1 left b's checkpoint-3 in place, which a later bare --resume went on from
    kw = dict(max_steps=3, per_device_train_batch_size=4, num_generations=2, max_completion_length=3, save_steps=1,
              save_total_limit=None)
    make(tmp_path, "b", **kw).train()
    os.symlink(tmp_path / "b", tmp_path / "b_link")
    make(tmp_path, "b_link", **{**kw, "max_steps": 2}).train(resume=str(tmp_path / "b" / "checkpoint-1"))
    assert sorted(p.name for p in (tmp_path / "b").glob("*checkpoint-*")) == [
        "abandoned-checkpoint-2", "abandoned-checkpoint-3", "checkpoint-1", "checkpoint-2"]


def test_a_failed_reference_write_leaves_the_last_checkpoint_resumable(tmp_path, monkeypatch):
    # reference.safetensors was written after checkpoint-N had been renamed into place and the older
    # checkpoints pruned: a full disk left checkpoint-2 with half a reference model, and the run could
    # not be resumed at all ("cannot load reference.safetensors")
    import safetensors.torch

    kw = dict(max_steps=3, save_steps=1, save_total_limit=1, beta=0.1, per_device_train_batch_size=8)
    real, calls = safetensors.torch.save_model, []

    def disk_full(model, filename, *a, **k):
        calls.append(filename)
        real(model, filename, *a, **k)
        if len(calls) == 2:
            with open(filename, "r+b") as f:
                f.truncate(100)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    with pytest.raises(OSError, match="No space left"):
        make(tmp_path, **kw).train()
    monkeypatch.setattr(safetensors.torch, "save_model", real)
    run = tmp_path / "run"
    assert sorted(p for p in os.listdir(run) if "checkpoint" in p) == ["checkpoint-1"]
    assert make(tmp_path, **kw).train(resume=True)["global_step"] == 3


def test_resume_of_a_later_pipeline_stage_keeps_its_logged_steps(tmp_path):
    # A pipeline stage logs global steps (step_offset + its own): resuming it must keep the lines
    # written before the interruption instead of truncating them on the stage's local step.
    def stage(**over):
        model, tok = tiny_model()
        cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                         output_dir=str(tmp_path / "st"), progress_bar=False, **over)
        return GRPOTrainer(model, [sevens], ROWS, cfg, tokenizer=tok, step_offset=100)

    stage(max_steps=2).train()
    stage(max_steps=3).train(resume=True)
    assert [r["step"] for r in _metrics(tmp_path / "st" / "metrics.jsonl")] == [101, 102, 103]


def test_checkpoints_keep_last_k(tmp_path):
    tr = make(tmp_path, "keep", max_steps=6, save_steps=1, save_total_limit=2)
    tr.train()
    names = sorted(os.listdir(tmp_path / "keep"))
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-5", "checkpoint-6"]
    assert not [n for n in names if n.startswith(".tmp")]


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    tr = make(tmp_path, "nan", max_steps=3)
    calls = {"n": 0}

    def poison(module, args, out):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 2:
                return out * float("nan")
        return out

    handle = tr.model.norm.register_forward_hook(poison)
    snapshot = {}

    def cb(step, m):
        snapshot[step] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}

    res = tr.train(callback=cb)
    handle.remove()
    assert res["nonfinite_skipped"] == 1
    assert tr.history[1]["nonfinite_skipped"] == 1
    for n in snapshot[1]:   # the poisoned step changed nothing
        assert torch.equal(snapshot[1][n], snapshot[2][n])
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reference_model_and_kl(tmp_path, temperature):
    """Before the first update policy, old and reference log-probs agree: at any sampling temperature,
    since all three are taken at it (one at another temperature would show as kl and clipping here)."""
    tr = make(tmp_path, "kl", max_steps=3, beta=0.1, temperature=temperature)
    assert tr.ref_model is not None
    tr.train()
    assert tr.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert tr.history[0]["clip_ratio/region_mean"] == 0.0
    if temperature == 1.0:  # (at 0.7 the first rewards of this tiny task are all 0: nothing moves)
        assert tr.history[-1]["kl"] > 0.0


def test_old_policy_and_reference_passes_run_only_when_needed_and_keep_no_graph(tmp_path):
    """old_logp is computed only for a rollout trained more than once (else it is logp.detach(), LOSS_SPEC), the
    reference's only with beta > 0, both forward-only. max_steps=3 at num_iterations=2 gives a last rollout of one
    optimizer step, which still ran the old-policy pass (a forward of every micro-batch for a ratio of 1)."""
    passes = []

    def recording(tr):
        forward_logp = tr._forward_logp

        def record(model, batch):
            out = forward_logp(model, batch)
            passes.append(("old" if model is tr.model else "ref", tr.rollout_index, out.requires_grad))
            return out
        tr._forward_logp = record
        return tr

    small = dict(per_device_train_batch_size=8, max_completion_length=4, learning_rate=1e-3)
    recording(make(tmp_path, "plain", max_steps=1, **small)).step()
    assert passes == []
    both = recording(make(tmp_path, "both", max_steps=3, num_iterations=2, beta=0.1, **small))
    both.step()
    both.step()
    assert both.global_step == 3
    assert passes == [("old", 0, False), ("ref", 0, False), ("ref", 1, False)]


def test_a_step_decodes_its_rollout_in_one_batch_call(tmp_path, monkeypatch):
    """The rewards' texts of a rollout come from one decode_batch call of the Rust tokenizer over all its
    completions (it uses every core), not one tokenizer.decode per completion (~250 ms of one core at 64 x 8
    completions of 512 tokens, the GPU idle meanwhile); the texts are the per-completion ones."""
    from r1fast.data import loading

    calls, real = [], loading._batch_decoder

    def counting(tokenizer):
        batch = real(tokenizer)
        assert batch is not None   # the char tokenizer is a plain fast tokenizer

        def run(rows, **kw):
            calls.append([list(r) for r in rows])
            return batch(rows, **kw)
        return run
    monkeypatch.setattr(loading, "_batch_decoder", counting)
    tr = make(tmp_path, max_steps=1, per_device_train_batch_size=8, gradient_accumulation_steps=4, max_completion_length=4,
              log_completions=4)
    rollouts, generate = [], tr.generate
    tr.generate = lambda *a: rollouts.append(generate(*a)) or rollouts[-1]
    out = tr.step()
    c_ids = rollouts[0][1]
    assert len(calls) == 1 and len(calls[0]) == len(c_ids) == 4 * 8
    assert [s["completion"] for s in out["samples"]] == [
        loading.decode_completion(tr.tokenizer, ids, tr.end_ids) for ids in c_ids[::8]]


@pytest.mark.parametrize("iterations", [1, 2])
def test_each_micro_batch_is_packed_once_just_before_its_first_forward(tmp_path, monkeypatch, iterations):
    """A micro-batch's tokens are packed (host work, ~3 ms at 32 x 512 tokens) right before the first forward that
    reads them, so that on a GPU the packing runs while the micro-batch before is still computed; packed all up
    front after the rollout, the GPU waited for every one. Each is packed once per rollout, however many passes
    read it (the old-policy pass and num_iterations losses). With num_iterations 1 and beta 0 a step runs
    exactly one forward per micro-batch: no log-prob pass."""
    from r1fast.trainer import grpo

    events, real_pack = [], grpo.pack
    monkeypatch.setattr(grpo, "pack", lambda *a, **kw: events.append("pack") or real_pack(*a, **kw))
    tr = make(tmp_path, max_steps=iterations, num_iterations=iterations, per_device_train_batch_size=8,
              gradient_accumulation_steps=3, max_completion_length=4)
    tr.model.register_forward_pre_hook(lambda module, args: events.append("forward"))
    tr.step()
    generated = events.index("pack")   # the rollout's own forwards (one per prefill / decode step) come before
    assert set(events[:generated]) <= {"forward"}
    passes = iterations + (iterations > 1)   # the old-policy pass only when the rollout is trained twice
    assert events[generated:] == ["pack", "forward"] * 3 + ["forward"] * 3 * (passes - 1)


def test_a_step_never_builds_logits_of_every_token(tmp_path, monkeypatch):
    """No tensor of a step is [tokens, vocab] (LOSS_SPEC: the fused path never materialises the logits): the
    old-policy, reference and loss passes work in chunks of tokens, the rollout samples a row per sequence. The
    chunk budgets are cut to 8 tokens here, so that a micro-batch's ~32 completion tokens would show."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from r1fast.ops import fused_loss, logprob

    tr = make(tmp_path, max_steps=2, num_iterations=2, beta=0.1, per_device_train_batch_size=8, max_completion_length=4)
    vocab, chunk = tr.model.config.vocab_size, 8
    assert tr.model.config.hidden_size != vocab
    monkeypatch.setitem(fused_loss._SINGLE_PASS_BYTES, "cpu", chunk * fused_loss._BYTES_PER_LOGIT["cpu"] * vocab)
    monkeypatch.setitem(logprob._CHUNK_BYTES, "cpu", chunk * 4 * vocab)
    rows = []

    class VocabWideOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # views (w.T) and in-place results allocate nothing
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor) and o.dim() >= 2 and o.shape[-1] == vocab and \
                        o.untyped_storage().data_ptr() not in inputs:
                    rows.append((o.numel() // vocab, str(func)))
            return out

    with VocabWideOutputs():
        m = tr.step()["metrics"]
    tokens = 8 * m["completion_length"]
    assert tokens > 2 * chunk
    # the rollout's 8 sequences sample one [8, V] row each step; every training pass holds one chunk
    assert rows and max(n for n, _ in rows) <= max(chunk, 8), sorted(rows)[-3:]


def test_bias_corrected_kl_reaches_the_loss(tmp_path):
    plain = make(tmp_path, "plain", max_steps=3, beta=0.5)
    weighted = make(tmp_path, "weighted", max_steps=3, beta=0.5, use_bias_correction_kl=True)
    assert plain.cfg.loss_options(None).use_bias_correction_kl is False
    assert weighted.cfg.loss_options(None).use_bias_correction_kl is True
    plain.train()
    weighted.train()
    # on-policy the ratio is 1, so the first step's numbers agree; its gradient (kl * d ratio) does
    # not, so later steps differ
    assert weighted.history[0]["kl"] == pytest.approx(plain.history[0]["kl"], abs=1e-9)
    assert weighted.history[-1]["kl"] > 0.0
    assert weighted.history[-1]["kl"] != pytest.approx(plain.history[-1]["kl"], rel=1e-6)


def test_fp8_and_device_options_apply_to_a_model_object(tmp_path):
    from r1fast.fp8 import apply_fp8
    from r1fast.trainer.config import ConfigError

    tr = make(tmp_path, "fp8", fp8="emulate")  # a model object, not a path: the option still applies
    assert tr.model.fp8_report.options.mode == "emulate" and tr.model.fp8_report.converted
    model, tok = tiny_model()
    apply_fp8(model, "emulate")
    GRPOTrainer(model, [sevens], ROWS, GRPOConfig(per_device_train_batch_size=32, fp8="emulate"), tokenizer=tok)
    with pytest.raises(ConfigError, match="already converted with fp8='emulate'"):
        GRPOTrainer(model, [sevens], ROWS, GRPOConfig(per_device_train_batch_size=32, fp8="torch"), tokenizer=tok)
    with pytest.raises(ConfigError, match="asks for fp8='emulate', fp8_scaling='tensorwise'.*"
                                          "converted with fp8='emulate', fp8_scaling='rowwise'"):
        GRPOTrainer(model, [sevens], ROWS, GRPOConfig(per_device_train_batch_size=32, fp8="emulate",
                                                      fp8_scaling="tensorwise"), tokenizer=tok)
    with pytest.raises(ConfigError, match="option 'device' is 'meta' but the model is on cpu"):
        make(tmp_path, "dev", device="meta")


def test_sft_and_sampling_check_the_device_option_against_a_model_object(tmp_path):
    # GRPOTrainer refused device='meta' for a CPU model object; SFT ignored the option without a word
    from r1fast.trainer.config import ConfigError, SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    rows = [{"prompt": "1+1=", "completion": "2"}]
    with pytest.raises(ConfigError, match="option 'device' is 'meta' but the model is on cpu"):
        SFTTrainer(model, tok, rows, SFTConfig(max_steps=1, device="meta", output_dir=str(tmp_path / "s")))
    SFTTrainer(model, tok, rows, SFTConfig(max_steps=1, device="cpu", output_dir=str(tmp_path / "s")))


def test_trainer_input_errors(tmp_path):
    model, tok = tiny_model()
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, output_dir=str(tmp_path / "e"))
    with pytest.raises(ValueError, match="tokenizer"):
        GRPOTrainer(model, [sevens], ROWS, cfg)
    with pytest.raises(ValueError, match="prompt column"):
        GRPOTrainer(model, [sevens], [{"question": "1"}], cfg, tokenizer=tok)
    with pytest.raises(TypeError, match="GRPOConfig"):
        GRPOTrainer(model, [sevens], ROWS, {"beta": 0.1}, tokenizer=tok)


def test_reward_timeout_is_not_dropped_for_a_reward_set_given_without_it(tmp_path):
    # a RewardSet runs its calls under its own timeout: config.reward_timeout=30 with RewardSet([f]) trained unbounded
    from r1fast.rewards import RewardSet

    model, tok = tiny_model()
    cfg = GRPOConfig(per_device_train_batch_size=32, reward_timeout=30, output_dir=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"config.reward_timeout is 30 s but the RewardSet given has timeout=None"):
        GRPOTrainer(model, RewardSet([sevens]), ROWS, cfg, tokenizer=tok)
    assert GRPOTrainer(model, RewardSet([sevens], timeout=30), ROWS, cfg, tokenizer=tok).rewards.timeout == 30
    no_option = dataclasses.replace(cfg, reward_timeout=None)   # the RewardSet's own limit stands
    assert GRPOTrainer(model, RewardSet([sevens], timeout=5), ROWS, no_option, tokenizer=tok).rewards.timeout == 5
    # reward_weights too: RewardSet([f, g]) totalled with weights [1, 1] while the checkpoint recorded [2, 1]
    weighted = dataclasses.replace(no_option, reward_weights=[2, 1])
    with pytest.raises(ValueError, match=r"config.reward_weights is \[2.0, 1.0\] but the RewardSet given has weights "
                                         r"\[1.0, 1.0\]"):
        GRPOTrainer(model, RewardSet([sevens, "format"]), ROWS, weighted, tokenizer=tok)
    assert GRPOTrainer(model, RewardSet([sevens, "format"], [2, 1]), ROWS, weighted, tokenizer=tok).rewards.weights \
        == [2.0, 1.0]



def test_reward_set_options_are_checked_and_recorded(tmp_path):
    # a RewardSet's built-in rewards score with its own format_pattern / language / length_target: the config's
    # were dropped without a word, and the checkpoint recorded the config's reward_funcs (default
    # ['accuracy', 'format']), weights, timeout and options rather than the set's, so a resume compared those
    from r1fast.rewards import RewardSet
    from r1fast.trainer.common import option_change_note

    model, tok = tiny_model()
    base = dict(per_device_train_batch_size=32, output_dir=str(tmp_path / "r"))
    for option, value, rewards, own in [
            ("format_pattern", "A.*", RewardSet(["format", sevens]), "format_pattern=None"),
            ("language", "zh", RewardSet([sevens, "language"]), "language='en'"),
            ("length_penalty_target", 5, RewardSet(["length"], length_target=50), "length_target=50")]:
        keyword = own.split("=")[0]
        with pytest.raises(ValueError, match=rf"config.{option} is {value!r} but the RewardSet given built its "
                                             rf"'\w+' reward with {re.escape(own)}.*RewardSet\(\.\.\., "
                                             rf"{keyword}={value!r}\) or leave {option} unset"):
            GRPOTrainer(model, rewards, ROWS, GRPOConfig(**base, **{option: value}), tokenizer=tok)
    # the same value, or a set without the built-in the option configures, is fine (as for a list of functions)
    GRPOTrainer(model, RewardSet(["language"], language="zh"), ROWS, GRPOConfig(**base, language="zh"), tokenizer=tok)
    kept = GRPOTrainer(model, RewardSet([sevens]), ROWS, GRPOConfig(**base, format_pattern="A.*"), tokenizer=tok)
    assert kept.cfg.format_pattern == "A.*"   # eval/format still counts by it
    rewards = RewardSet([sevens, "format", "language"], [2, 1, 1], timeout=7, format_pattern="B.*", language="ru")
    tr = GRPOTrainer(model, rewards, ROWS, GRPOConfig(**base), tokenizer=tok)
    assert tr.rewards is rewards
    assert (tr.cfg.reward_funcs, tr.cfg.reward_weights, tr.cfg.reward_timeout, tr.cfg.format_pattern,
            tr.cfg.language) == ([sevens, "format", "language"], [2.0, 1.0, 1.0], 7.0, "B.*", "ru")
    # a resume compares what was scored with: the same set says nothing, another pattern is named
    state = {"config": tr.cfg.to_json_dict()}
    again = GRPOTrainer(model, RewardSet([sevens, "format", "language"], [2, 1, 1], timeout=7, format_pattern="B.*",
                                         language="ru"), ROWS, GRPOConfig(**base), tokenizer=tok)
    assert option_change_note(state, again.cfg.to_json_dict(), 1) is None
    other = GRPOTrainer(model, RewardSet([sevens, "format", "language"], [2, 1, 1], timeout=7, format_pattern="C.*",
                                         language="ru"), ROWS, GRPOConfig(**base), tokenizer=tok)
    assert "format_pattern 'B.*' -> 'C.*'" in option_change_note(state, other.cfg.to_json_dict(), 1)

def test_failing_reward_names_function_and_row(tmp_path):
    from r1fast.rewards import RewardError

    def broken(prompts, completions, **kw):
        if len(completions) > 1:
            raise KeyError("boom")
        return [0.0]

    model, tok = tiny_model()
    tr = GRPOTrainer(model, [broken], ROWS, GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_steps=1,
                                                       max_completion_length=4, output_dir=str(tmp_path / "r"),
                                                       progress_bar=False), tokenizer=tok)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RewardError, match="'broken' raised KeyError"):
        tr.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_leaves_a_resumable_checkpoint(tmp_path, signame, sigterm_guard):
    # SIGTERM (a scheduler ending the job, `kill`) killed the run at once, losing the steps since the
    # last save; it now stops like a first Ctrl-C
    import signal

    sig = getattr(signal, signame)
    tr = make(tmp_path, signame, max_steps=6)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN in a background job
    # raise_signal delivers to this (the main) thread at once, not to whichever thread the OS picks.
    res = tr.train(callback=lambda step, m: signal.raise_signal(sig) if step == 2 else None)
    assert res.get("interrupted") and tr.global_step == 2
    assert os.path.isfile(tmp_path / signame / "checkpoint-2" / "trainer_state.json")
    assert {s: signal.getsignal(s) for s in before} == before   # handlers restored
    # the same trainer goes on (a notebook's next cell): the stop asked of the first train() call was still
    # set, and stopped this one after its first step
    res = tr.train(resume=True)
    assert not res.get("interrupted") and res["global_step"] == 6
    again = make(tmp_path, signame, max_steps=6)
    assert again.train(resume=True)["global_step"] == 6


def test_sft_stops_on_sigterm_with_a_resumable_checkpoint(tmp_path, sigterm_guard):
    import signal

    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    rows = [{"prompt": str(i), "completion": "<answer>7</answer>"} for i in range(16)]
    cfg = SFTConfig(max_steps=6, per_device_train_batch_size=4, output_dir=str(tmp_path / "sft"), progress_bar=False)
    tr = SFTTrainer(model, tok, rows, cfg)
    real_step = tr.step

    def step():
        m = real_step()
        if tr.global_step == 3:
            signal.raise_signal(signal.SIGTERM)
        return m

    tr.step = step
    tr.cfg.save_steps = 3   # stopped at a save step: its checkpoint was written twice over
    saves = []
    real_save = tr.save
    tr.save = lambda: saves.append(tr.global_step) or real_save()
    res = tr.train()
    assert res["interrupted"] and tr.global_step == 3 and saves == [3]
    assert res["checkpoint"] == str(tmp_path / "sft" / "checkpoint-3")
    assert os.path.isfile(tmp_path / "sft" / "checkpoint-3" / "trainer_state.json")
    # resumed, the log goes on from the checkpoint's copy; SFT logs no completions, in its checkpoints or on resume
    again = SFTTrainer(model, tok, rows, dataclasses.replace(cfg, logging_steps=1))
    assert again.train(resume=True)["global_step"] == 6
    assert [r["step"] for r in _metrics(tmp_path / "sft" / "metrics.jsonl")] == [4, 5, 6]
    assert not list((tmp_path / "sft").rglob("completions.jsonl"))


def test_answer_column_reaches_the_accuracy_reward(tmp_path):
    # answer_column only reached the evaluation: training with the accuracy reward on a dataset
    # whose reference is under another name failed after the first rollout.
    model, tok = tiny_model()
    rows = [{"prompt": str(i), "ref": "7"} for i in range(8)]
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, answer_column="ref",
                     output_dir=str(tmp_path / "a"), progress_bar=False)
    tr = GRPOTrainer(model, ["accuracy"], rows, cfg, tokenizer=tok)
    _, totals = tr.score(rows[:2], 4, ["<answer>7</answer>"] * 4 + ["<answer>6</answer>"] * 4, [[1]] * 8)
    assert totals == [1.0] * 4 + [0.0] * 4
    with pytest.raises(ValueError, match="reward 'accuracy' needs the answer column 'answer'"):
        GRPOTrainer(model, ["accuracy"], rows, GRPOConfig(per_device_train_batch_size=8, num_generations=4),
                    tokenizer=tok)
    # a misspelt answer_column was silently scored against the dataset's `solution` column
    with_solution = [{"prompt": str(i), "ref": "7", "solution": "8"} for i in range(8)]
    with pytest.raises(ValueError, match=r"needs the answer column 'rfe' \(option 'answer_column'\); the"):
        GRPOTrainer(model, ["accuracy"], with_solution,
                    GRPOConfig(per_device_train_batch_size=8, num_generations=4, answer_column="rfe"), tokenizer=tok)
    # a dataset's own `answer` column was replaced by answer_column's for every reward function, without a word
    rows = [{"prompt": str(i), "ref": "7", "answer": "worked: 7"} for i in range(8)]
    with pytest.warns(UserWarning, match=r"the train dataset has an 'answer' column, and answer_column is 'ref': the "
                                         r"reward functions get 'ref''s values as `answer`"):
        GRPOTrainer(model, [sevens], rows, cfg, tokenizer=tok)


def test_a_column_named_as_a_reward_argument_is_an_error_before_training(tmp_path):
    # A `completions` or `prompts` column reached each reward function twice: after the first rollout,
    # "RewardError: reward function 'sevens' raised TypeError: ... got multiple values for keyword argument".
    model, tok = tiny_model()
    for column in ("completions", "prompts"):
        rows = [{"prompt": str(i), column: "x"} for i in range(8)]
        with pytest.raises(ValueError, match=f"train dataset has a column '{column}'.*rename or drop"):
            GRPOTrainer(model, [sevens], rows, GRPOConfig(per_device_train_batch_size=8, num_generations=4,
                                                          output_dir=str(tmp_path / "a"), progress_bar=False),
                        tokenizer=tok)
    rows = [{"prompts": str(i)} for i in range(8)]   # the prompt column itself is not passed as a column
    GRPOTrainer(model, [sevens], rows, GRPOConfig(per_device_train_batch_size=8, num_generations=4, prompt_column="prompts",
                                                  output_dir=str(tmp_path / "b"), progress_bar=False), tokenizer=tok)


def test_reward_weights_that_do_not_fit_the_functions_are_an_error(tmp_path):
    # They were dropped without a word when the trainer got a different number of functions.
    model, tok = tiny_model()
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="reward_weights has 2 entries but 1 reward functions"):
        GRPOTrainer(model, [sevens], ROWS, cfg, tokenizer=tok)
    # weights for functions given to the trainer, as TRL's GRPOConfig takes them: the config alone
    # refused them against its default reward_funcs (2 names)
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, reward_weights=[0.5], output_dir=str(tmp_path))
    assert GRPOTrainer(model, [sevens], ROWS, cfg, tokenizer=tok).rewards.weights == [0.5]


def test_reward_timeout_reaches_the_trainers_rewards(tmp_path):
    assert make(tmp_path, "a").rewards.timeout is None
    assert make(tmp_path, "b", reward_timeout=2.5).rewards.timeout == 2.5


def test_sft_rejects_a_row_without_a_completion():
    # The row's None was encoded as the text "None" and trained on.
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    rows = [{"prompt": "1", "completion": "7"}, {"prompt": "2", "completion": None}]
    with pytest.raises(ValueError, match=r"row 1 has no value for column\(s\) \['completion'\]"):
        SFTTrainer(model, tok, rows, SFTConfig(progress_bar=False))


def test_sft_takes_a_model_name_and_a_dataset_path_as_grpo_does(tmp_path):
    # SFTTrainer("builtin:micro", None, ...) was a TypeError ("load it with from_pretrained") where GRPOTrainer
    # loads the name; a dataset path was iterated as characters ("lacks column(s) ... it has ['b']"), and a
    # GRPOConfig or a dict as config failed with AttributeError
    from r1fast.trainer.common import load_model_and_tokenizer
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "1+1", "completion": "2"}\n{"prompt": "2+2", "completion": "4"}\n')
    cfg = SFTConfig(progress_bar=False, output_dir=str(tmp_path), device="cpu", seed=3, max_length=32)
    tr = SFTTrainer("builtin:micro", None, str(data), cfg)
    assert tr.model.device == torch.device("cpu") and len(tr.examples) == 2 and callable(tr.tokenizer)
    same, _ = load_model_and_tokenizer("builtin:micro", device=torch.device("cpu"), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(tr.model.state_dict().values(), same.state_dict().values()))
    rows = [{"prompt": "1", "completion": "7"}]
    model, tok = tiny_model()
    assert len(SFTTrainer(model, tok, config=SFTConfig(dataset=str(data), progress_bar=False,
                                                       output_dir=str(tmp_path))).examples) == 2
    with pytest.raises(TypeError, match=r"tokenizer must be the model's tokenizer .*got None"):
        SFTTrainer(model, None, rows, SFTConfig(progress_bar=False))
    with pytest.raises(TypeError, match=r"model must be an r1fast CausalLM or its name .*got dict"):
        SFTTrainer({}, tok, rows, SFTConfig(progress_bar=False))
    for wrong in (GRPOConfig(), {"max_steps": 1}):
        with pytest.raises(TypeError, match=f"config must be an r1fast SFTConfig, got {type(wrong).__name__}"):
            SFTTrainer(model, tok, rows, wrong)
    # GRPOTrainer's (and TRL's) keyword for the data
    tr = SFTTrainer(model, tokenizer=tok, train_dataset=rows, config=SFTConfig(progress_bar=False))
    assert len(tr.examples) == 1
    with pytest.raises(TypeError, match="give the dataset once, as rows or as train_dataset"):
        SFTTrainer(model, tok, rows, train_dataset=rows)


def test_resume_drops_a_metrics_line_cut_short_by_a_crash(tmp_path):
    # A process killed mid-write leaves half a line; resuming failed on it with a JSONDecodeError.
    from r1fast.trainer.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    MetricsLogger(str(tmp_path), resume_step=2).close()
    assert [r["step"] for r in _metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_resume_starts_the_logs_from_the_checkpoints_copy_else_cuts_the_runs_own(tmp_path):
    # the run's log may be another branch's (b: 1) where the checkpoint is one an earlier resume set aside (b: 0)
    from r1fast.trainer.metrics import MetricsLogger

    run, ck = tmp_path / "run", tmp_path / "run" / "checkpoint-2"
    ck.mkdir(parents=True)
    other = '{"step": 1, "b": 0}\n{"step": 2, "b": 1}\n{"step": 3, "b": 1}\n'
    (run / "metrics.jsonl").write_text(other)
    (run / "completions.jsonl").write_text('{"step": 2, "b": 1}\n')
    (ck / "metrics.jsonl").write_text('{"step": 1, "b": 0}\n{"step": 2, "b": 0}\n{"step": 3, "b": 0}\n')
    MetricsLogger(str(run), resume_step=2, resumed_from=str(ck)).close()
    assert [(r["step"], r["b"]) for r in _metrics(run / "metrics.jsonl")] == [(1, 0), (2, 0)]
    assert (run / "completions.jsonl").read_text() == ""   # the checkpoint's steps logged none
    # a checkpoint of an r1fast before the copies: the run's own log, cut
    os.remove(ck / "metrics.jsonl")
    (run / "metrics.jsonl").write_text(other)
    MetricsLogger(str(run), resume_step=2, resumed_from=str(ck)).close()
    assert [(r["step"], r["b"]) for r in _metrics(run / "metrics.jsonl")] == [(1, 0), (2, 1)]


def test_wandb_init_failing_closes_the_tensorboard_writer_and_names_wandb(tmp_path, monkeypatch):
    # report_to [tensorboard, wandb] with wandb.init raising (no API key): the TensorBoard writer already
    # opened stayed open (its file and flush thread) and the error was wandb's own, naming no option
    import sys
    import types

    pytest.importorskip("tensorboard")   # torch.utils.tensorboard needs it
    import torch.utils.tensorboard as tensorboard
    from r1fast.trainer.config import ConfigError
    from r1fast.trainer.metrics import MetricsLogger

    closed = []

    class Writer(tensorboard.SummaryWriter):
        def close(self):
            closed.append(self)
            super().close()

    def init(**kw):
        raise RuntimeError("api_key not configured")

    monkeypatch.setattr(tensorboard, "SummaryWriter", Writer)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(ConfigError, match=r"report_to wandb: wandb\.init failed \(RuntimeError: api_key not "
                                          r"configured\)"):
        MetricsLogger(str(tmp_path), ["tensorboard", "wandb"])
    assert len(closed) == 1


@pytest.mark.parametrize("damaged", ['\x00\x00\x00\x00', 'garbage', '[1, 2]'])
def test_resume_names_a_damaged_line_of_the_log(tmp_path, damaged):
    # a whole line that is not a JSON object (zeros a crash left, another writer's text) was json's bare
    # "Expecting value: line 1 column 1 (char 0)", or an AttributeError traceback, naming no file
    from r1fast.trainer.metrics import MetricsLogger

    (tmp_path / "completions.jsonl").write_text(f'{{"step": 1}}\n{damaged}\n{{"step": 2}}\n')
    with pytest.raises(ValueError, match=r"completions\.jsonl line 2: not a JSON object .*remove that line"):
        MetricsLogger(str(tmp_path), resume_step=2)


def test_completions_log_of_a_row_no_reward_scored_is_valid_json(tmp_path):
    # such a row's total is NaN: completions.jsonl held `"reward": NaN`, which strict JSON readers refuse
    def sevens_or_none(prompts, completions, **kw):
        return [None if p == prompts[0] else c.count("7") / 6 for p, c in zip(prompts, completions)]

    model, tok = tiny_model()
    cfg = GRPOConfig(per_device_train_batch_size=32, num_generations=8, max_steps=1, max_completion_length=4,
                     output_dir=str(tmp_path / "n"), progress_bar=False, log_completions=4)
    GRPOTrainer(model, [sevens_or_none], ROWS, cfg, tokenizer=tok).train()

    def strict(c):
        raise ValueError(c)
    rows = [json.loads(line, parse_constant=strict) for line in open(tmp_path / "n" / "completions.jsonl")]
    assert rows[0]["reward"] is None and rows[0]["rewards"] == {"sevens_or_none": None}   # the first prompt's


def test_report_to_tensorboard_gets_every_logged_metric(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = make(tmp_path, "tb", max_steps=3, report_to=["tensorboard"])
    tr.train()
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in open(tmp_path / "tb" / "metrics.jsonl")]
    assert [e.step for e in events.Scalars("grpo/reward")] == [r["step"] for r in rows] == [1, 2, 3]
    assert [e.value for e in events.Scalars("grpo/reward")] == pytest.approx([r["reward"] for r in rows])
    numeric = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}
    assert set(events.Tags()["scalars"]) == {f"grpo/{k}" for k in numeric}


def test_tensorboard_drops_the_steps_a_resume_replaces(tmp_path):
    # metrics.jsonl was cut back to the checkpoint on resume, TensorBoard kept the abandoned steps
    # (1, 2, 3, 4, 3, 4); a fresh run into the folder kept a killed earlier run's events
    pytest.importorskip("tensorboard")
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make(tmp_path, "tb", max_steps=4, save_steps=2, report_to=["tensorboard"]).train()
    time.sleep(1.1)  # event files are named by the second: the resumed run's must sort after
    make(tmp_path, "tb", max_steps=4, report_to=["tensorboard"]).train(resume=str(tmp_path / "tb" / "checkpoint-2"))
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in open(tmp_path / "tb" / "metrics.jsonl")]
    assert [e.step for e in events.Scalars("grpo/reward")] == [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("grpo/reward")] == pytest.approx([r["reward"] for r in rows])


def test_reward_functions_get_completions_as_trl_gives_them(tmp_path):
    """Conversational prompts (message lists): completions arrive as assistant message lists, as TRL
    passes them, so a TRL reward function reading c[0]["content"] works; plain prompts: strings. The
    trainer's own arguments never come from same-named dataset columns."""
    model, tok = tiny_model()
    seen = {}

    def trl_style(prompts, completions, **kw):
        seen["completions"], seen["keys"] = completions, set(kw)
        return [c[0]["content"].count("7") / 8 if isinstance(c, list) else c.count("7") / 8 for c in completions]

    chat = [{"prompt": [{"role": "user", "content": str(i)}], "completion_ids": "x", "completion": "y"}
            for i in range(4)]
    cfg = GRPOConfig(per_device_train_batch_size=4, num_generations=2, output_dir=str(tmp_path / "c"),
                     progress_bar=False)
    tr = GRPOTrainer(model, [trl_style], chat, cfg, tokenizer=tok)
    _, totals = tr.score(chat[:1], 2, ["77", "1"], [[1], [2]])
    assert seen["completions"] == [[{"role": "assistant", "content": "77"}], [{"role": "assistant", "content": "1"}]]
    assert totals == [0.25, 0.0]
    assert "completion" not in seen["keys"] and "completion_ids" in seen["keys"]  # the trainer's ids, not the column
    tr = GRPOTrainer(model, [trl_style], ROWS, cfg, tokenizer=tok)
    tr.score(ROWS[:1], 2, ["77", "1"], [[1], [2]])
    assert seen["completions"] == ["77", "1"]


def test_standalone_builtin_eval_prompts_are_kept_out_of_training(tmp_path):
    """Two draws of the built-in task share prompts; the held-out ones must not be trained on."""
    model, tok = tiny_model()
    cfg = GRPOConfig(dataset="builtin:arithmetic", eval_dataset="builtin:arithmetic", eval_size=128,
                     per_device_train_batch_size=8, num_generations=4, output_dir=str(tmp_path / "e"),
                     progress_bar=False)
    tr = GRPOTrainer(model, ["format"], None, cfg, tokenizer=tok)
    held = {r["prompt"] for r in tr.eval_rows}
    assert len(held) > 0 and not held & {r["prompt"] for r in tr.train_rows}


def test_resume_with_a_longer_run_follows_the_new_schedule(tmp_path, capsys):
    # A finished linear run ends at rate 0. Extended from 2 to 3 steps, its step 3 must train at the new
    # schedule's rate (1 - 2/3 of the peak): the restored optimizer rate (0) would leave the weights as
    # they were.
    kw = dict(save_steps=2, per_device_train_batch_size=8, lr_scheduler_type="linear", learning_rate=1e-2)
    first = make(tmp_path, "r", max_steps=2, **kw)
    first.train()
    longer = make(tmp_path, "r", max_steps=3, **kw)
    longer.train(resume=True)
    assert longer.global_step == 3
    moved = [not torch.equal(p, q) for p, q in zip(first.model.parameters(), longer.model.parameters())]
    assert any(moved)
    err = capsys.readouterr().err
    assert "resuming at step 2 with max_steps 2 -> 3" in err and "follows the new values" in err


@pytest.mark.parametrize("micro", [32, 4])  # whole groups of 8 per micro-batch, and groups split across them
def test_shared_prompts_give_the_numbers_of_the_unshared_layout(tmp_path, micro, monkeypatch):
    """share_prompts packs a group's prompt once and its completions after it: one step's loss, statistics
    and updated weights equal those of the plain layout (prompt copied into every completion's row)."""
    from r1fast.trainer import grpo

    runs, tokens = {}, {}
    pack = grpo.pack

    def counting_pack(*a, **kw):
        b = pack(*a, **kw)
        tokens[kw["share_prompts"]] = tokens.get(kw["share_prompts"], 0) + b.input_ids.numel()
        return b

    monkeypatch.setattr(grpo, "pack", counting_pack)
    for share in (True, False):
        tr = make(tmp_path, f"s{share}{micro}", share_prompts=share, max_steps=1, per_device_train_batch_size=micro,
                  gradient_accumulation_steps=32 // micro)
        out = tr.step()["metrics"]
        runs[share] = (out, {n: p.detach().clone() for n, p in tr.model.named_parameters()})
    assert tokens[True] < tokens[False]  # the prompts went through the model fewer times
    (m_shared, w_shared), (m_plain, w_plain) = runs[True], runs[False]
    for key in ("loss", "grad_norm", "entropy", "reward"):
        assert m_shared[key] == pytest.approx(m_plain[key], rel=1e-4, abs=1e-6), key
    # AdamW's first step moves each weight by about lr * g / (|g| + eps): fp32 rounding in g shows where |g|
    # is near eps, up to ~1e-3 of lr there (a real difference would move weights by ~lr)
    for n, w in w_plain.items():
        torch.testing.assert_close(w_shared[n], w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")


def test_pack_shares_each_runs_prompt():
    from r1fast.trainer.common import pack

    p1, p2 = [1, 2, 3], [4, 5]
    b = pack([p1, p1, p2, p1], [[7, 8], [9], [6, 6, 6], [5]], "cpu", share_prompts=True)
    assert b.input_ids.tolist() == [1, 2, 3, 7, 8, 9, 4, 5, 6, 6, 6, 1, 2, 3, 5]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 11, 14, 15] and b.prefix_of == [-1, 0, 0, -1, 3, -1, 5]
    # the prompt's last hidden state predicts each completion's first token
    assert b.select.tolist() == [2, 3, 2, 7, 8, 9, 13] and b.targets.tolist() == [7, 8, 9, 6, 6, 6, 5]
    assert b.completion_cu.tolist() == [0, 2, 3, 6, 7]


def test_host_tensor_equals_torch_tensor_of_the_list():
    # pack's and the step's sampler log-probs go through numpy (torch.tensor on a Python list was ~5x slower):
    # the same dtype and bits as torch.tensor, int64 extremes and float32 rounding of Python floats included
    from r1fast.trainer.common import host_tensor, pack

    g = torch.Generator().manual_seed(0)
    ints = torch.randint(-2**62, 2**62, (257,), generator=g).tolist() + [2**63 - 1, -2**63, 0]
    floats = (torch.randn(257, generator=g, dtype=torch.float64) * 1e3).tolist() + [1e-46, 3.4028235e38, -0.0, 0.1]
    for values, dtype in ((ints, torch.long), (ints[:100], torch.long), ([x % 2**31 for x in ints], torch.int32),
                          (floats, torch.float32)):
        got, want = host_tensor(values, dtype, "cpu"), torch.tensor(values, dtype=dtype)
        assert got.dtype == want.dtype and torch.equal(got.view(torch.int32 if dtype == torch.float32 else dtype),
                                                       want.view(torch.int32 if dtype == torch.float32 else dtype))
    b = pack([[1, 2, 3], [1, 2, 3]], [[7, 8], [9]], "cpu")
    assert [t.dtype for t in (b.input_ids, b.cu_seqlens, b.select, b.targets, b.completion_cu)] == \
        [torch.long, torch.int32, torch.long, torch.long, torch.int32]


def test_share_prompts_is_turned_off_where_attention_has_no_fast_path_for_it(tmp_path, monkeypatch, caplog):
    from r1fast.models import attention

    monkeypatch.setattr(attention, "prefix_attention_keeps_pace", lambda *a: False)
    with caplog.at_level("WARNING"):
        assert make(tmp_path, max_steps=1).share_prompts is False
    assert "share_prompts is off" in caplog.text
    assert make(tmp_path, "off", max_steps=1, share_prompts=False).share_prompts is False
    monkeypatch.undo()
    assert make(tmp_path, "on", max_steps=1).share_prompts is True


def test_sft_packs_a_prompt_once_for_its_completions_with_the_same_numbers(tmp_path, monkeypatch):
    """Rejection-sampled data: several completions per prompt. A micro-batch holding them packs the
    prompt once; one step's loss and weights equal the unshared step's. Distinct prompts stay unshared."""
    from r1fast.trainer import sft
    from r1fast.trainer.config import SFTConfig

    rows = [{"prompt": str(i % 3), "completion": c} for i, c in enumerate(["77", "7a", "123", "7", "x7", "99"])]
    shared_flags, tokens = [], []
    pack = sft.pack

    def spy(*a, **kw):
        b = pack(*a, **kw)
        shared_flags.append(kw["share_prompts"])
        tokens.append(b.input_ids.numel())
        return b

    monkeypatch.setattr(sft, "pack", spy)
    out = {}
    for share in (True, False):
        model, tok = tiny_model()
        tr = sft.SFTTrainer(model, tok, rows, SFTConfig(per_device_train_batch_size=6, learning_rate=1e-2,
                                                        share_prompts=share, progress_bar=False,
                                                        output_dir=str(tmp_path / str(share))))
        out[share] = (tr.step(), {n: p.detach().clone() for n, p in model.named_parameters()})
    assert shared_flags == [True, False] and tokens[0] < tokens[1]  # each of the 3 prompts packed once, not twice
    from r1fast.data.loading import encode_prompt

    assert tokens[1] - tokens[0] == sum(len(encode_prompt(tok, p)) for p in "012")   # whatever order the rows come in
    assert out[True][0]["loss"] == pytest.approx(out[False][0]["loss"], rel=1e-5)
    for n, w in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")
    distinct = [{"prompt": str(i), "completion": "7"} for i in range(6)]
    model, tok = tiny_model()
    sft.SFTTrainer(model, tok, distinct, SFTConfig(per_device_train_batch_size=6, progress_bar=False,
                                                   output_dir=str(tmp_path / "d"))).step()
    assert shared_flags[-1] is False


def _ckpts(run):
    return sorted(n for n in os.listdir(run) if n.startswith("checkpoint-"))


def test_a_new_run_refuses_a_folder_holding_an_earlier_runs_checkpoints(tmp_path):
    # Pruning kept the highest step numbers of both runs: a 2-step run after a 4-step one deleted its
    # own checkpoint-2, and --resume then resumed the old run.
    make(tmp_path, "r", max_steps=4, save_total_limit=1).train()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    again = make(tmp_path, "r", max_steps=2, save_total_limit=1)
    with pytest.raises(ValueError, match=r"r holds an earlier run \(checkpoints checkpoint-4\); continue it with "
                                         r"--resume.*overwrite_output_dir=true"):
        again.train()
    assert _ckpts(tmp_path / "r") == ["checkpoint-4"] and again.global_step == 0
    again.cfg.overwrite_output_dir = True
    assert again.train()["checkpoint"].endswith("checkpoint-2")
    assert _ckpts(tmp_path / "r") == ["checkpoint-2"]
    assert [r["step"] for r in _metrics(tmp_path / "r" / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"   # only what a run writes is deleted


def test_evaluations_between_logging_steps_are_logged(tmp_path):
    # An evaluation at eval_steps reached metrics.jsonl only when its step was also a logging step.
    model, tok = tiny_model()
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_steps=6,
                     eval_steps=2, logging_steps=3, output_dir=str(tmp_path / "e"), progress_bar=False)
    with pytest.warns(UserWarning, match=r"every eval prompt is also a training prompt \(the eval_dataset argument\)"):
        tr = GRPOTrainer(model, [sevens], ROWS, cfg, tokenizer=tok, eval_dataset=ROWS[:2])
    # a pipeline stage's rows from the pipeline's eval_dataset were "eval_dataset None" (the stage's option)
    with pytest.warns(UserWarning, match=r"training prompt \(the pipeline's eval_dataset\)"):
        GRPOTrainer(model, [sevens], ROWS, cfg, tokenizer=tok, eval_dataset=ROWS[:2], eval_at_ends=False)
    tr.train()
    rows = _metrics(tmp_path / "e" / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 4, 6]
    assert [r["step"] for r in rows if "reward" in r] == [3, 6]


def test_grpo_logs_the_mean_of_the_rollouts_since_the_last_line(tmp_path):
    """logging_steps=3: the line at step 3 showed rollout 3's reward alone, dropping rollouts 1-2 (TRL
    and r1fast's SFT log the window's mean); now means, the maximum length's max, the last lr."""
    tr = make(tmp_path, "w", max_steps=5, logging_steps=3, lr_scheduler_type="linear")
    tr.train()
    rows = _metrics(tmp_path / "w" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 5]
    for row, window in zip(rows, (tr.history[:3], tr.history[3:])):
        for key in ("reward", "reward_std", "rewards/sevens", "frac_reward_zero_std", "completion_length", "loss",
                    "grad_norm", "entropy", "truncated_ratio"):
            assert row[key] == pytest.approx(sum(h[key] for h in window) / len(window)), key
        assert row["completion_length_max"] == max(h["completion_length_max"] for h in window)
        assert row["completion_length_min"] == min(h["completion_length_min"] for h in window)
        assert row["lr"] == window[-1]["lr"] and row["nonfinite_skipped"] == window[-1]["nonfinite_skipped"]
    assert tr.history[0]["reward"] != tr.history[2]["reward"]   # else the mean would not tell the fix


def test_grpo_logs_the_shortest_and_longest_completion(tmp_path, monkeypatch):
    # TRL logs completions/min_length beside max_length; r1fast logged the mean and the maximum only
    tr = make(tmp_path, "len", max_steps=1)
    lengths, generate = [], tr.generate

    def spy(*args):
        out = generate(*args)
        lengths.extend(len(c) for c in out[1])
        return out
    monkeypatch.setattr(tr, "generate", spy)
    m = tr.step()["metrics"]
    assert (m["completion_length_min"], m["completion_length_max"]) == (min(lengths), max(lengths))
    assert m["completion_length"] == pytest.approx(sum(lengths) / len(lengths))


def test_grpo_logs_trls_cumulative_num_tokens_and_epoch(tmp_path, monkeypatch):
    # TRL logs num_tokens (prompt + completion tokens seen so far) and epoch; r1fast logged neither, and
    # dropped the op's own num_tokens (the loss's active tokens) from the line
    tr = make(tmp_path, "tok", max_steps=3, logging_steps=2)
    seen, generate = [], tr.generate

    def spy(*args):
        out = generate(*args)
        seen.append(sum(len(p) + len(c) for p, c in zip(out[0], out[1])))
        return out
    monkeypatch.setattr(tr, "generate", spy)
    tr.train()
    assert [h["num_tokens"] for h in tr.history] == [seen[0], seen[0] + seen[1], sum(seen)]
    per_rollout = tr.cfg.prompts_per_rollout / len(ROWS)   # 4 of the 32 prompts a rollout
    assert [h["epoch"] for h in tr.history] == pytest.approx([per_rollout, 2 * per_rollout, 3 * per_rollout])
    rows = _metrics(tmp_path / "tok" / "metrics.jsonl")   # a line's totals are its last rollout's, not a mean
    assert [(r["step"], r["num_tokens"], r["epoch"]) for r in rows] == \
        [(2, seen[0] + seen[1], pytest.approx(2 * per_rollout)), (3, sum(seen), pytest.approx(3 * per_rollout))]


def test_grpo_logs_trls_per_sequence_clip_extremes(tmp_path, monkeypatch):
    """TRL's clip_ratio/low_min and high_max (r1fast's TRL drop-in logs them; its trainer did not): each loss call
    (a micro-batch of one iteration) takes the least share of a sequence's trained tokens clipped low and the largest
    clipped high over its sequences, and a rollout's value is the mean of its calls', a logged line the mean of
    its rollouts' (TRL averages every call it logs). Checked against plain full-logits ratios, and by hand for a
    sequence without trained tokens (a masked truncated one): left out, and a micro-batch of none has none."""
    from r1fast.trainer.grpo import _clip_statistics
    from r1fast import ops

    tr = make(tmp_path, "clip", max_steps=4, num_iterations=2, per_device_train_batch_size=8, epsilon=0.01,
              gradient_accumulation_steps=4, logging_steps=4)
    calls, fused = [], ops.fused_linear_grpo_loss

    def recorded(hidden, weight, targets, mask, adv, *, old_logp, cu_seqlens, options, **kw):
        calls.append((hidden.detach(), weight.detach().clone(), targets, mask, adv, old_logp, cu_seqlens, options))
        return fused(hidden, weight, targets, mask, adv, old_logp=old_logp, cu_seqlens=cu_seqlens, options=options, **kw)
    monkeypatch.setattr(ops, "fused_linear_grpo_loss", recorded)

    def extremes():   # each sequence's clipped fractions, from ratios of the whole [tokens, vocab] logits
        lows, highs = [], []   # each call's extremes
        for hidden, weight, targets, mask, adv, old, cu, opts in calls:
            logp = torch.log_softmax(hidden @ weight.T / opts.temperature, -1).gather(1, targets[:, None]).squeeze(1)
            ratio = torch.exp(logp - (logp if old is None else old))
            low, high = [], []
            for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
                m, n = mask[a:b], float(mask[a:b].sum())
                if n:
                    low.append(float((((ratio[a:b] < 1 - opts.epsilon) & (adv[s] < 0)) * m).sum()) / n)
                    high.append(float((((ratio[a:b] > 1 + opts.eps_high) & (adv[s] > 0)) * m).sum()) / n)
            lows.append(min(low))
            highs.append(max(high))
        assert len(lows) == 8   # 4 micro-batches, 2 iterations
        calls.clear()
        return sum(lows) / len(lows), sum(highs) / len(highs)

    want, step = [], tr.step

    def checked():
        out = step()
        want.append(extremes())
        return out
    monkeypatch.setattr(tr, "step", checked)
    tr.train()
    got = [(h["clip_ratio/low_min"], h["clip_ratio/high_max"]) for h in tr.history]
    assert len(got) == 2 and all(g == pytest.approx(w, abs=1e-6) for g, w in zip(got, want))
    assert max(high for _, high in got) > 0   # the second iterations' ratios clip
    [line] = _metrics(tmp_path / "clip" / "metrics.jsonl")
    assert (line["clip_ratio/low_min"], line["clip_ratio/high_max"]) == \
        pytest.approx((sum(g[0] for g in got) / 2, sum(g[1] for g in got) / 2), rel=1e-12)
    # 2 of 4 tokens clipped low, 1 high; an empty sequence; 1 of 2 low: low fractions 1/2, -, 1/2, high 1/4, -, 0
    stats = {"rows/clip_low": torch.tensor([2.0, 0.0, 1.0]), "rows/clip_high": torch.tensor([1.0, 0.0, 0.0])}
    out = _clip_statistics(stats, torch.tensor([4.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, -1.0]), tr.cfg.loss_options())
    assert {k: float(v) for k, v in out.items()} == {"clip_ratio/low_min": 0.5, "clip_ratio/high_max": 0.25}
    assert not stats   # the per-row counts are not step statistics
    stats = {"rows/clip_low": torch.tensor([0.0, 0.0]), "rows/clip_high": torch.tensor([0.0, 0.0])}
    out = _clip_statistics(stats, torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0]), tr.cfg.loss_options())
    assert all(v.isnan() for v in out.values())   # no sequence with trained tokens: none (TRL's nanmin), not inf


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo_logs_trls_cispo_clip_ratio(tmp_path, monkeypatch, level):
    """Under cispo TRL logs cispo_clip_ratio, the share of trained tokens (at sequence level: of sequences) whose
    ratio passes epsilon_high with a positive advantage, and no clip_ratio/* (whose high_mean counts ratios past
    1 + epsilon_high elsewhere); r1fast logged clip_ratio/low_mean (always 0), high_mean and region_mean.
    Checked against plain full-logits ratios of each loss call, token- (sequence-) weighted over a pass."""
    from r1fast import ops

    tr = make(tmp_path, "cispo", max_steps=2, num_iterations=2, per_device_train_batch_size=8,
              gradient_accumulation_steps=4, loss_type="cispo", epsilon=2.0, epsilon_high=1.001,
              importance_sampling_level=level, learning_rate=5e-2)
    calls, fused = [], ops.fused_linear_grpo_loss

    def recorded(hidden, weight, targets, mask, adv, *, old_logp, cu_seqlens, options, **kw):
        calls.append((hidden.detach(), weight.detach().clone(), targets, mask, adv, old_logp, cu_seqlens, options))
        return fused(hidden, weight, targets, mask, adv, old_logp=old_logp, cu_seqlens=cu_seqlens, options=options, **kw)
    monkeypatch.setattr(ops, "fused_linear_grpo_loss", recorded)
    out = tr.step()["metrics"]
    passes = [calls[:4], calls[4:]]
    shares = []
    for calls_of_pass in passes:
        clipped = units = 0.0
        for hidden, weight, targets, mask, adv, old, cu, opts in calls_of_pass:
            logp = torch.log_softmax(hidden @ weight.T / opts.temperature, -1).gather(1, targets[:, None]).squeeze(1)
            log_ratio = logp - (logp if old is None else old)
            for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
                if level == "sequence":   # one ratio: the mean log-ratio
                    clipped += float(float(log_ratio[a:b].mean().exp()) > opts.eps_high and adv[i] > 0)
                    units += 1
                else:
                    clipped += float(((log_ratio[a:b].exp() > opts.eps_high) & (adv[i] > 0)).sum())
                    units += b - a
        shares.append(clipped / units)
    assert shares[1] > 0   # the second pass's ratios pass the cap
    assert out["cispo_clip_ratio"] == pytest.approx(sum(shares) / 2, abs=1e-6)
    assert not [k for k in out if k.startswith("clip_ratio/")]


def test_grpo_logs_trls_per_function_reward_std(tmp_path, monkeypatch):
    # TRL logs rewards/<fn>/std beside each function's mean; r1fast logged the mean only
    tr = make(tmp_path, "std", max_steps=1)
    scores, score = [], tr.score

    def spy(*args):
        table, totals = score(*args)
        scores.extend(table[0])
        return table, totals
    monkeypatch.setattr(tr, "score", spy)
    m = tr.step()["metrics"]
    assert m["rewards/sevens/std"] == pytest.approx(torch.tensor(scores).std().item()) and m["rewards/sevens/std"] > 0


def test_grpo_logs_trls_terminated_lengths(tmp_path, monkeypatch):
    # TRL logs the lengths of the completions that ended on their own (completions/*_terminated_length):
    # r1fast's completion_length mixed them with the ones cut at max_completion_length
    from r1fast.trainer.grpo import _terminated_lengths

    tr = make(tmp_path, "term", max_steps=1)
    ended, generate = [], tr.generate

    def every_third_ends(*args):   # finish reasons the test chooses, with the completions' own lengths
        p_ids, c_ids, c_logp, finish = generate(*args)
        finish = ["stop" if i % 3 == 0 else "length" for i in range(len(c_ids))]
        ended.extend(len(c) for c, f in zip(c_ids, finish) if f == "stop")
        return p_ids, c_ids, c_logp, finish
    monkeypatch.setattr(tr, "generate", every_third_ends)
    m = tr.step()["metrics"]
    assert m["completions/mean_terminated_length"] == pytest.approx(sum(ended) / len(ended))
    assert (m["completions/min_terminated_length"], m["completions/max_terminated_length"]) == (min(ended), max(ended))
    # none ended: no length to average (null in the log), where TRL writes 0
    assert all(math.isnan(v) for v in _terminated_lengths([[1, 2], [3]], ["length", "length"]).values())


def test_a_run_folder_gets_the_modes_the_umask_gives(tmp_path, umask_027):
    # reference.safetensors (beta > 0) and the checkpoint's other safetensors were 0600 whatever the umask, and
    # the lock file 0644: on a shared cluster the group the umask lets read the run could not
    from conftest import modes_under

    make(tmp_path, "run", max_steps=1, beta=0.1, per_device_train_batch_size=8).train()
    modes = modes_under(tmp_path / "run")
    assert {"checkpoint-1/reference.safetensors", "checkpoint-1/model.safetensors", "metrics.jsonl",
            ".r1fast.lock"} <= set(modes)
    assert modes == {p: 0o750 if (tmp_path / "run" / p).is_dir() else 0o640 for p in modes}


def test_grpo_resume_between_logging_steps_logs_the_uninterrupted_window(tmp_path):
    # the window's rollouts before the checkpoint are kept in it, as SFT keeps its loss window
    kw = dict(max_steps=4, logging_steps=4, learning_rate=3e-3)
    make(tmp_path, "full", **kw).train()
    first = make(tmp_path, "split", **kw)
    first.train(callback=lambda step, m: setattr(first, "_stop_requested", step >= 2))
    log = tmp_path / "split" / "metrics.jsonl"
    assert first.global_step == 2 and not (log.exists() and log.read_text())   # nothing logged before step 4
    make(tmp_path, "split", **kw).train(resume=True)
    a, b = _metrics(tmp_path / "full" / "metrics.jsonl"), _metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in a] == [4] and a == b


def test_resuming_a_finished_run_logs_its_final_evaluation_once(tmp_path, recwarn):
    # the loop had nothing left to do, so the end's evaluation ran again: a second eval line at the last
    # step in metrics.jsonl (and TensorBoard); an interrupted last step still gets its evaluation
    def run(max_steps, resume=None, stop_at=None):
        model, tok = tiny_model()
        cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                         max_steps=max_steps, output_dir=str(tmp_path / "f"), progress_bar=False)
        tr = GRPOTrainer(model, [sevens], ROWS, cfg, tokenizer=tok, eval_dataset=ROWS[:2])
        return tr.train(resume=resume, callback=lambda step, m: setattr(tr, "_stop_requested", step == stop_at))

    def evals():
        return [r["step"] for r in _metrics(tmp_path / "f" / "metrics.jsonl") if "eval/accuracy" in r]

    assert "final" not in run(2, stop_at=2) and evals() == [0]
    first = run(2, resume=True)["final"]
    assert evals() == [0, 2]
    assert run(2, resume=True)["final"] == first and evals() == [0, 2]
    run(3, resume=True)   # a longer run evaluates its new end
    assert evals() == [0, 2, 3]


def test_eval_format_counts_the_runs_format_pattern(tmp_path, recwarn):
    # eval/format checked the default <think>…</think><answer>…</answer> whatever format_pattern said: 0 for
    # every completion of a model trained with a pattern of its own (DeepSeek-R1-Distill's, training.md)
    model, tok = tiny_model()
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                     output_dir=str(tmp_path / "p"), progress_bar=False, format_pattern=r".*")
    tr = GRPOTrainer(model, ["format"], ROWS, cfg, tokenizer=tok, eval_dataset=ROWS[:2])
    assert tr.evaluate()["eval/format"] == 1.0


def _sft(tmp_path, poison_steps, **over):
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    rows = [{"prompt": str(i), "completion": "7"} for i in range(8)]
    cfg = SFTConfig(per_device_train_batch_size=4, progress_bar=False, output_dir=str(tmp_path / "sft"), **over)
    tr = SFTTrainer(model, tok, rows, cfg)
    calls = {"n": 0}

    def poison(module, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] in poison_steps else out

    model.norm.register_forward_hook(poison)
    return tr


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")   # a skipped first step
def test_sft_counts_nonfinite_steps_and_stops_after_too_many(tmp_path):
    # SFT logged a per-step `skipped` flag, so a skipped step between logging steps was lost, and it
    # never stopped however many steps in a row were NaN.
    from r1fast.trainer.grpo import NonFiniteLoss

    res = _sft(tmp_path / "a", {2}, max_steps=3, logging_steps=3).train()
    assert res["nonfinite_skipped"] == 1
    rows = _metrics(tmp_path / "a" / "sft" / "metrics.jsonl")
    assert [r["nonfinite_skipped"] for r in rows] == [1]
    # the logged loss is the mean of the window's applied steps: the skipped one's NaN made it null
    assert rows[0]["loss"] is not None and rows[0]["loss"] > 0
    tr = _sft(tmp_path / "b", set(range(1, 100)), max_steps=20, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLoss, match="3 optimizer steps in a row.*max_nonfinite_steps=3"):
        tr.train()
    assert tr.global_step == 2   # the third NaN step stops the run


def test_sixteen_bit_parameters_step_through_fp32_master_weights(tmp_path, caplog):
    """bf16 weights stepped directly round away AdamW steps near the usual GRPO learning rates; the
    trainer steps fp32 copies instead (or, with fp32_master_weights off, warns)."""
    import logging

    from r1fast.trainer.master_weights import MasterWeightAdamW

    def bf16_trainer(name, **over):
        model, tok = tiny_model()
        return GRPOTrainer(model.to(torch.bfloat16), [sevens], ROWS,
                           GRPOConfig(per_device_train_batch_size=32, learning_rate=1e-6,
                                      output_dir=str(tmp_path / name), **over), tokenizer=tok)

    with caplog.at_level(logging.WARNING, logger="r1fast.trainer.common"):
        assert isinstance(bf16_trainer("master").optimizer, MasterWeightAdamW)
        assert type(make(tmp_path, "fp32").optimizer) is torch.optim.AdamW
        assert "rounded away" not in caplog.text
        assert type(bf16_trainer("plain", fp32_master_weights=False).optimizer) is torch.optim.AdamW
    assert "torch.bfloat16 and fp32_master_weights is off" in caplog.text and "learning_rate=1e-06" in caplog.text


def test_weight_decay_leaves_norm_gains_and_biases_alone(tmp_path):
    """Decay pulls a weight toward 0; a norm's gain is neutral at 1, so decaying it (or a bias) is a pull
    of its own: only the matrices decay, as in Hugging Face's Trainer, through master weights too."""
    from r1fast.testing import randn

    for dtype in (torch.float32, torch.bfloat16):
        model, tok = tiny_model()
        model.to(dtype)
        tr = GRPOTrainer(model, [sevens], ROWS, GRPOConfig(
            weight_decay=0.5, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0,
            per_device_train_batch_size=32, output_dir=str(tmp_path / str(dtype))), tokenizer=tok)
        named = list(model.named_parameters())
        flat = [n for n, _ in named if "norm" in n or n.endswith("bias")]
        assert flat and len(flat) < len(named)
        ref = {n: torch.nn.Parameter(p.detach().float().clone()) for n, p in named}
        ref_opt = torch.optim.AdamW([{"params": [ref[n] for n, _ in named if n not in flat], "weight_decay": 0.5},
                                     {"params": [ref[n] for n in flat], "weight_decay": 0.0}],
                                    lr=tr.optimizer.param_groups[0]["lr"])
        for i, (n, p) in enumerate(named):
            g = randn(*p.shape, seed=i).to(dtype)
            p.grad, ref[n].grad = g, g.float()
        tr.optimizer.step()
        ref_opt.step()
        # bf16 weights step through fp32 copies: compare those (a bf16 ulp near 1 hides the decay of a gain)
        stepped = dict(zip(map(id, tr.optimizer.model_params), tr.optimizer.masters)) if dtype != torch.float32 \
            else {id(p): p for _, p in named}
        for n, p in named:
            # one step of decay moves a weight by 5e-3 of itself; the rest is fp32 rounding of one AdamW step
            torch.testing.assert_close(stepped[id(p)].detach().float(), ref[n].detach(), rtol=1e-6, atol=1e-7)


def test_master_weights_step_in_groups_as_plain_adamw_steps_all_at_once(monkeypatch):
    """The step converts gradients to fp32 a group at a time (a bounded peak): the same update as one
    fp32 AdamW step over every parameter, fp32 parameters among them included."""
    from r1fast.testing import randn
    from r1fast.trainer.master_weights import MasterWeightAdamW

    monkeypatch.setattr(MasterWeightAdamW, "STEP_CHUNK_ELEMENTS", 5)   # several groups
    shapes, dtypes = [(3,), (4, 2), (1,), (6,)], [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]
    params = [torch.nn.Parameter(randn(*s, seed=i).to(d)) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opt = MasterWeightAdamW(params, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        for i, (p, r) in enumerate(zip(params, ref)):
            g = randn(*p.shape, seed=100 * step + i)
            p.grad, r.grad = g.to(p.dtype), g.to(p.dtype).float()
        if step == 1:   # a parameter without a gradient this step
            params[2].grad = ref[2].grad = None
        opt.step()
        ref_opt.step()
    for p, m, r in zip(params, opt.masters, ref):
        assert torch.equal(m, r.detach()) and torch.equal(p, r.detach().to(p.dtype))
    assert params[1].grad is not None   # an fp32 parameter's gradient is left as AdamW leaves it


def test_master_weights_sum_micro_batch_gradients_in_fp32():
    """Inside accumulating() each backward's bf16 gradient joins the fp32 copy's gradient (an fp32 sum of
    the micro-batches' gradients, not a bf16 one) and is freed; a backward outside the block is folded
    in before clipping or stepping; the step is fp32 AdamW's on that sum."""
    from r1fast.testing import randn
    from r1fast.trainer.common import accumulating_gradients, gradient_holders
    from r1fast.trainer.master_weights import MasterWeightAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    params = list(model.parameters())
    opt = MasterWeightAdamW(params, accumulate_fp32=True, lr=1e-2, weight_decay=0.1)
    xs = [randn(5, 8, seed=s).to(torch.bfloat16) for s in range(9)]
    loss = lambda x: model(x).float().square().sum()  # noqa: E731
    per_batch = [torch.autograd.grad(loss(x), params) for x in xs]   # each micro-batch's bf16 gradient alone
    want = [sum(g[i].float() for g in per_batch) for i in range(len(params))]
    in_bf16 = [sum(g[i] for g in per_batch) for i in range(len(params))]
    assert any(not torch.equal(b.float(), w) for b, w in zip(in_bf16, want))   # bf16 sums do round here

    opt.zero_grad()
    with accumulating_gradients(opt):
        for x in xs[:-1]:
            loss(x).backward()
            assert all(p.grad is None for p in params)
    loss(xs[-1]).backward()   # outside the block: a bf16 gradient, folded in by gradient_holders
    holders = gradient_holders(opt, model)
    assert all(p.grad is None for p in params)
    for h, w in zip(holders, want):
        assert h.dtype == torch.float32 and torch.equal(h.grad, w)

    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    for r, w in zip(ref, want):
        r.grad = w.clone()
    opt.step()
    torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1).step()
    for p, m, r in zip(params, opt.masters, ref):
        assert torch.equal(m, r.detach()) and torch.equal(p, r.detach().to(p.dtype))
        assert m.grad is None   # the fp32 gradients do not outlive the step


def test_fp32_accumulation_hooks_hold_their_optimizer_weakly_and_act_only_inside_its_block():
    """A pipeline hands one model from stage to stage, each with a new optimizer: an earlier one's
    hooks neither keep it (and its fp32 copies) alive nor take a later optimizer's gradients."""
    import gc
    import weakref

    from r1fast.trainer.master_weights import MasterWeightAdamW

    model = torch.nn.Linear(16, 16).to(torch.bfloat16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    first = MasterWeightAdamW(list(model.parameters()), accumulate_fp32=True, lr=1e-2)
    second = MasterWeightAdamW(list(model.parameters()), accumulate_fp32=True, lr=1e-2)
    with second.accumulating():
        model(x).sum().backward()
    assert model.weight.grad is None and second.masters[0].grad is not None and first.masters[0].grad is None
    model(x).sum().backward()   # outside every block: a plain gradient, as any optimizer expects
    assert model.weight.grad is not None and model.weight.grad.dtype == torch.bfloat16
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None and len(model.weight._post_accumulate_grad_hooks) == 1   # second's own hook only


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_trainers_sum_micro_batch_gradients_in_fp32(tmp_path, monkeypatch, stage):
    """Each micro-batch's bf16 gradients are folded into the fp32 copies inside the step's accumulation
    block (fp32_grad_accumulation, on by default); turned off, the optimizer sums in bf16."""
    from r1fast.trainer import SFTConfig, sft
    from r1fast.trainer.master_weights import MasterWeightAdamW

    folds = []
    fold = MasterWeightAdamW._fold
    monkeypatch.setattr(MasterWeightAdamW, "_fold", lambda self, i: (folds.append(self._accumulating), fold(self, i)))

    def trainer(**over):
        model, tok = tiny_model()
        model = model.to(torch.bfloat16)
        common = dict(per_device_train_batch_size=8, gradient_accumulation_steps=3, learning_rate=1e-3,
                      progress_bar=False, output_dir=str(tmp_path / str(len(folds))), **over)
        if stage == "grpo":
            return GRPOTrainer(model, [sevens], ROWS, GRPOConfig(max_completion_length=6, **common), tokenizer=tok)
        rows = [{"prompt": str(i), "completion": "7" * (1 + i % 3)} for i in range(24)]
        return sft.SFTTrainer(model, tok, rows, SFTConfig(**common))

    tr = trainer()
    tr.step()
    n = sum(1 for p in tr.model.parameters())
    assert tr.optimizer.accumulate_fp32 and folds == [True] * (3 * n)
    folds.clear()
    tr = trainer(fp32_grad_accumulation=False)
    tr.step()
    assert not tr.optimizer.accumulate_fp32 and folds == []


def test_master_weights_keep_the_steps_bf16_rounds_away():
    from r1fast.trainer.master_weights import MasterWeightAdamW

    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain, master = w.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    opts = [torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0), MasterWeightAdamW([master], lr=1e-4,
                                                                                       weight_decay=0.0)]
    ref = torch.ones(4, dtype=torch.float32, requires_grad=True)   # fp32 AdamW: the numbers wanted
    ref_opt = torch.optim.AdamW([ref], lr=1e-4, weight_decay=0.0)
    for _ in range(100):
        for p, o in ((plain, opts[0]), (master, opts[1]), (ref, ref_opt)):
            o.zero_grad()
            p.grad = torch.ones_like(p)
            o.step()
    assert torch.equal(plain, torch.ones_like(plain))               # each 1e-4 step rounded away
    assert torch.equal(opts[1].masters[0], ref.detach())            # the fp32 copy took every step
    assert torch.equal(master, ref.detach().to(torch.bfloat16)) and not torch.equal(master, plain)


def test_master_weights_state_is_a_copy_and_a_stale_one_is_not_used():
    from r1fast.trainer.master_weights import MasterWeightAdamW

    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([p], lr=1e-2)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    assert "master" in sd["state"][0] and "master" not in opt.state[opt.masters[0]]   # the live state untouched
    # a saved copy the loaded weights were not rounded from (a later run without master weights moved them)
    with torch.no_grad():
        p.fill_(0.5)
    fresh = MasterWeightAdamW([p], lr=1e-2)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.masters[0], torch.full((3,), 0.5)) and torch.equal(p, torch.full_like(p, 0.5))
    # and a plain AdamW resuming such a checkpoint keeps no fp32 copy in its state
    from r1fast.trainer import checkpoints as ckpt

    tensors, (meta,) = ckpt.optimizer_state(opt)
    assert "0.master" in tensors
    plain = torch.optim.AdamW([p], lr=1e-2)
    ckpt.load_optimizer_state(plain, tensors, meta)
    assert "master" not in plain.state[p]


def test_master_weights_resume_exactly(tmp_path):
    """A bf16 run split by a checkpoint equals the run in one go: the fp32 copies are in the checkpoint."""
    def bf16(name):
        model, tok = tiny_model()
        cfg = GRPOConfig(per_device_train_batch_size=32, max_steps=4, save_steps=2, learning_rate=3e-2, seed=3,
                         max_completion_length=6, output_dir=str(tmp_path / name), progress_bar=False)
        return GRPOTrainer(model.to(torch.bfloat16), [sevens], ROWS, cfg, tokenizer=tok)

    full = bf16("full")
    full.train()
    first = bf16("split")
    first.train(callback=lambda step, m: setattr(first, "_stop_requested", step >= 2))
    # the copies hold what bf16 cannot: a resume from the bf16 weights alone would differ
    assert any(not torch.equal(m, p.float()) for m, p in zip(first.optimizer.masters, first.optimizer.model_params))
    second = bf16("split")
    second.train(resume=True)
    assert second.global_step == 4
    for a, b in zip(full.optimizer.masters, second.optimizer.masters):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    for (n, p), (_, q) in zip(full.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n


def _lengths(prompts, completions, **kw):
    """A reward that varies within a group from the first step on (completion length)."""
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_bf16_runs_clip_and_log_the_fp32_gradients_they_step(tmp_path, monkeypatch, stage):
    """With fp32 gradient accumulation the step's gradients sit on the fp32 copies, the bf16 parameters'
    .grad is None: clipping the model's parameters logged a norm of 0.0 and clipped nothing."""
    import math

    from r1fast.trainer import SFTConfig, sft
    from r1fast.trainer.master_weights import MasterWeightAdamW

    stepped = []   # the norm of the gradients each optimizer step applies, taken as it starts
    step = MasterWeightAdamW.step

    def spy(self, closure=None):
        grads = [m.grad.float() for m in self.masters if m.grad is not None]
        stepped.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0)
        return step(self, closure)

    monkeypatch.setattr(MasterWeightAdamW, "step", spy)

    def grad_norm(max_grad_norm):
        model, tok = tiny_model()
        common = dict(per_device_train_batch_size=8, learning_rate=1e-3, max_grad_norm=max_grad_norm,
                      progress_bar=False, output_dir=str(tmp_path / f"{stage}{max_grad_norm}"))
        if stage == "grpo":
            tr = GRPOTrainer(model.to(torch.bfloat16), [_lengths], ROWS,
                             GRPOConfig(max_completion_length=6, **common), tokenizer=tok)
            out = tr.step()["metrics"]["grad_norm"]
        else:
            rows = [{"prompt": str(i), "completion": "7" * (1 + i % 3)} for i in range(24)]
            tr = sft.SFTTrainer(model.to(torch.bfloat16), tok, rows, SFTConfig(**common))
            out = tr.step()["grad_norm"]
        assert tr.optimizer.accumulate_fp32   # the default for a bf16 model
        return out

    free = grad_norm(0.0)   # no clipping
    assert math.isfinite(free) and free > 1e-2 and stepped[-1] == pytest.approx(free, rel=1e-3)
    limit = free / 100
    clipped = grad_norm(limit)
    assert clipped == pytest.approx(free, rel=1e-3)   # the logged norm is the one before clipping
    assert stepped[-1] <= limit * (1 + 1e-4)           # and the step applied the clipped gradients


def test_fp32_parameters_beside_bf16_ones_keep_their_gradients_under_fp32_accumulation():
    """Only 16-bit parameters fold their gradients into fp32 copies; an fp32 parameter (a LayerNorm kept in
    fp32) is its own copy and keeps its gradient: folding it into itself dropped it, so it never trained."""
    from r1fast.testing import randn
    from r1fast.trainer.common import gradient_holders
    from r1fast.trainer.master_weights import MasterWeightAdamW

    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    norm = torch.nn.LayerNorm(4)   # fp32
    model = torch.nn.Sequential(lin, norm)
    opt = MasterWeightAdamW(list(model.parameters()), accumulate_fp32=True, lr=1e-1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with opt.accumulating():
        for s in range(2):
            norm(lin(randn(3, 4, seed=s).to(torch.bfloat16)).float()).square().mul(randn(3, 4, seed=9 + s)).sum().backward()
    assert norm.weight.grad is not None and norm.bias.grad is not None
    assert lin.weight.grad is None   # the bf16 gradient went to its fp32 copy
    holders = gradient_holders(opt, model)
    assert all(h.grad is not None and h.grad.dtype == torch.float32 for h in holders)
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n   # every parameter, fp32 ones included, moved


def test_without_fp32_accumulation_the_model_parameters_hold_the_gradients():
    """accumulate_fp32 off: the bf16 parameters' own gradients are what the step applies, so they are what
    clipping sees (the fp32 copies have none until the step)."""
    from r1fast.testing import randn
    from r1fast.trainer.common import grad_norm_and_clip, gradient_holders
    from r1fast.trainer.master_weights import MasterWeightAdamW

    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    params = list(model.parameters())
    opt = MasterWeightAdamW(params, accumulate_fp32=False, lr=1e-2)
    with opt.accumulating():   # a no-op without accumulate_fp32
        model(randn(5, 8, seed=1).to(torch.bfloat16)).float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in params)
    holders = gradient_holders(opt, model)
    assert len(holders) == len(params) and all(h is p for h, p in zip(holders, params))
    assert all(h is p for h, p in zip(opt.grad_tensors(), params))
    want = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])))
    assert want > 0 and grad_norm_and_clip(holders, 0.0) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_master_weights_zero_grad_clears_the_fp32_gradients(set_to_none):
    """Gradients folded into the fp32 copies are dropped by zero_grad (a skipped NaN step relies on it): kept,
    they would join the next step's."""
    from r1fast.testing import randn
    from r1fast.trainer.master_weights import MasterWeightAdamW

    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    opt = MasterWeightAdamW(list(model.parameters()), accumulate_fp32=True, lr=1e-2)
    with opt.accumulating():
        model(randn(5, 8, seed=2).to(torch.bfloat16)).float().square().sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in opt.masters)
    opt.zero_grad(set_to_none=set_to_none)
    for m in opt.masters:
        assert m.grad is None if set_to_none else not m.grad.any()
    assert all(p.grad is None for p in model.parameters())


def test_resuming_twice_from_the_same_older_checkpoint(tmp_path):
    """The second resume sets aside a checkpoint-2 whose abandoned-checkpoint-2 name the first one took: it
    gets a suffix of its own instead of failing to rename onto the existing folder."""
    kw = dict(max_steps=3, save_steps=1, save_total_limit=None, per_device_train_batch_size=8)
    make(tmp_path, **kw).train()
    run = tmp_path / "run"
    for _ in range(2):
        assert make(tmp_path, **{**kw, "max_steps": 2}).train(resume=str(run / "checkpoint-1"))["global_step"] == 2
    assert _ckpts(run) == ["checkpoint-1", "checkpoint-2"]
    aside = sorted(p.name for p in run.glob("abandoned-*"))
    assert aside == ["abandoned-checkpoint-2", f"abandoned-checkpoint-2.{os.getpid()}", "abandoned-checkpoint-3"]
    assert all((run / n / "trainer_state.json").is_file() for n in aside)
    assert make(tmp_path, **kw).train(resume=True)["global_step"] == 3   # continues the newest checkpoint-2


def test_advantages_of_rows_no_reward_scored(tmp_path):
    """A NaN total (no function scored the row) gets A = 0 and is left out of its group's statistics:
    the scored rows get the advantages of their group without it (the std of 3 rows, not of 4 with a
    filled-in mean, which shrank it and made their advantages ~1.2x too large)."""
    import statistics

    tr = make(tmp_path, num_generations=4, per_device_train_batch_size=12)
    nan = float("nan")
    totals = [1.0, 0.0, nan, 2.0, 5.0, nan, 3.0, 1.0, nan, nan, nan, nan]
    want = [0.0] * 12
    for rows in ([0, 1, 3], [4, 6, 7]):
        grp = [totals[i] for i in rows]
        for i in rows:
            want[i] = (totals[i] - statistics.mean(grp)) / (statistics.stdev(grp) + 1e-4)
    assert (tr.cfg.advantage_estimator, tr.cfg.scale_rewards) == ("grpo", "group")
    torch.testing.assert_close(tr._advantages(totals), torch.tensor(want))
    # exactly 0, not a rounding step off it
    r = torch.rand(64, 4, generator=torch.Generator().manual_seed(0))
    r[:, 2] = nan
    assert torch.equal(tr._advantages(r.flatten().tolist()).view(64, 4)[:, 2], torch.zeros(64))


def test_rewards_reach_the_rows_of_their_own_prompt(tmp_path):
    """Completions are prompt-major (the G samples of prompt 0, then of prompt 1): each is scored with its
    own prompt and its own row's columns."""
    model, tok = tiny_model()
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    seen = []

    def echo(prompts, completions, answer, **kw):
        seen.append((list(prompts), list(answer)))
        return [float(c == p + a) for p, c, a in zip(prompts, completions, answer)]

    cfg = GRPOConfig(per_device_train_batch_size=6, num_generations=3, output_dir=str(tmp_path / "o"),
                     progress_bar=False)
    tr = GRPOTrainer(model, ["accuracy", echo], rows, cfg, tokenizer=tok)
    texts = ["<answer>1</answer>", "a1", "x", "<answer>2</answer>", "b2", "y"]
    table, totals = tr.score(rows, 3, texts, [[1]] * 6)
    assert seen == [(["a"] * 3 + ["b"] * 3, ["1"] * 3 + ["2"] * 3)]
    assert table == [[1.0, 0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]]
    assert totals == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def test_a_prefilled_answer_reaches_the_rewards_with_its_prefill(tmp_path, monkeypatch):
    # a prompt ending on the assistant's "<think>" is continued, and the rewards got the continuation alone: the
    # format reward scored 0 for every well-formed answer ("2</think><answer>2</answer>"), eval/format too
    from r1fast.trainer import evaluate

    model, tok = tiny_model()
    prefill = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "<think>"}]
    rows = [{"prompt": prefill, "answer": "2"}, {"prompt": "1+1=", "answer": "2"}]
    seen = []

    def spy(prompts, completions, **kw):
        seen.extend(completions)
        return [0.0] * len(completions)

    cfg = GRPOConfig(per_device_train_batch_size=4, num_generations=2, output_dir=str(tmp_path / "o"),
                     progress_bar=False)
    tr = GRPOTrainer(model, ["format", "accuracy", spy], rows, cfg, tokenizer=tok)
    text, whole = "2</think><answer>2</answer>", "<think>2</think><answer>2</answer>"
    table, _ = tr.score(rows, 2, [text, text, whole, whole], [[1]] * 4)
    assert table[:2] == [[1.0] * 4, [1.0] * 4]
    assert seen == [[{"role": "assistant", "content": whole}]] * 2 + [whole] * 2
    monkeypatch.setattr(evaluate, "decode_completion", lambda *a: text)
    out = evaluate.evaluate_accuracy(model, tok, rows[:1], max_tokens=2)
    assert out["eval/format"] == 1.0 and out["eval/accuracy"] == 1.0


def test_a_run_trained_on_its_own_answer_column_scores_a_math_held_out_set_against_its_solutions(tmp_path, monkeypatch):
    # answer_column=ref (the training rows' column) on a held-out set with MATH's `solution` only: the solution
    # fallback scores it (once that fallback was for the default 'answer' alone, the run refused to start:
    # "eval dataset rows lack the answer column 'ref'"); the misspelling check is the training set's
    from r1fast.trainer import evaluate

    model, tok = tiny_model()
    train = [{"prompt": "1+1=", "ref": "2"}, {"prompt": "2+2=", "ref": "4"}]
    held = [{"prompt": "3+3=", "solution": r"so \boxed{6}"}]
    cfg = GRPOConfig(per_device_train_batch_size=2, num_generations=2, output_dir=str(tmp_path / "o"),
                     progress_bar=False, answer_column="ref")
    tr = GRPOTrainer(model, ["accuracy"], train, cfg, tokenizer=tok, eval_dataset=held)
    monkeypatch.setattr(evaluate, "decode_completion", lambda *a: "<think>x</think><answer>6</answer>")
    assert tr.evaluate()["eval/accuracy"] == 1.0


def test_rows_of_unequal_columns_pass_every_column_to_every_rollouts_rewards(tmp_path):
    # a list of rows where only some have a column: the reward functions got the columns of whichever row a
    # rollout drew first (`level` in one step, not in the next); now every row has every column, None if missing
    model, tok = tiny_model()
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2", "level": 3}]
    seen = []

    def spy(prompts, completions, **kw):
        seen.append(kw.get("level", "absent"))
        return [0.0] * len(completions)

    cfg = GRPOConfig(per_device_train_batch_size=2, num_generations=2, output_dir=str(tmp_path / "o"),
                     progress_bar=False)
    tr = GRPOTrainer(model, [spy], rows, cfg, tokenizer=tok)
    tr.score(tr.train_rows[:1], 2, ["x", "y"], [[1]] * 2)
    tr.score(tr.train_rows[1:], 2, ["x", "y"], [[1]] * 2)
    assert seen == [[None, None], [3, 3]]
    assert tr.train_rows[0] == {"prompt": "a", "answer": "1", "level": None}
    with pytest.raises(ValueError, match=r"train dataset: row 1 is a str, not a dict of columns"):
        GRPOTrainer(model, [spy], [rows[0], "b"], cfg, tokenizer=tok)


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_truncated_completions_are_masked_out_of_the_loss(tmp_path, monkeypatch, mask_truncated):
    """mask_truncated_completions: a completion that hit max_completion_length ("length") gets a zero
    mask, and dapo's normaliser counts only the kept completions' tokens."""
    from r1fast import ops

    tr = make(tmp_path, max_steps=1, num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
              mask_truncated_completions=mask_truncated)
    generated, calls = {}, []
    generate, loss = tr.generate, ops.fused_linear_grpo_loss

    def every_third_truncated(*a, **kw):
        p_ids, c_ids, c_logp, finish = generate(*a, **kw)
        finish = ["length" if i % 3 == 0 else "stop" for i in range(len(c_ids))]
        generated.update(c_ids=c_ids, finish=finish)
        return p_ids, c_ids, c_logp, finish

    def spy(hidden, weight, targets, mask, advantages, **kw):
        calls.append((mask.clone(), kw["options"].num_items))
        return loss(hidden, weight, targets, mask, advantages, **kw)

    monkeypatch.setattr(tr, "generate", every_third_truncated)
    monkeypatch.setattr(ops, "fused_linear_grpo_loss", spy)
    tr.step()
    c_ids, finish = generated["c_ids"], generated["finish"]
    keep = [not (mask_truncated and f == "length") for f in finish]
    want = torch.cat([torch.full((len(c),), float(k)) for c, k in zip(c_ids, keep)])
    assert torch.equal(torch.cat([m for m, _ in calls]).cpu(), want)
    assert {n for _, n in calls} == {float(sum(len(c) for c, k in zip(c_ids, keep) if k))}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])  # bnpo divides by the micro-batch's tokens
def test_micro_batches_average_to_the_whole_batch_loss(tmp_path, loss_type):
    """Loss types normalised per micro-batch are averaged over the accumulation steps: four micro-batches
    of 8 give the loss and the update of one batch of 32 (same rollout)."""
    runs = {}
    for micro in (32, 8):
        tr = make(tmp_path, f"{loss_type}{micro}", loss_type=loss_type, max_steps=1, per_device_train_batch_size=micro,
                  gradient_accumulation_steps=32 // micro)
        out = tr.step()["metrics"]
        runs[micro] = (out["loss"], out["grad_norm"], {n: p.detach().clone() for n, p in tr.model.named_parameters()})
    (l1, g1, w1), (l4, g4, w4) = runs[32], runs[8]
    assert l1 != 0.0 and l4 == pytest.approx(l1, rel=1e-4, abs=1e-7) and g4 == pytest.approx(g1, rel=1e-3)
    for n, w in w1.items():
        torch.testing.assert_close(w4[n], w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")


def _logps64(model, p_ids, c_ids, temperature):
    """Each completion's token log-probs, one unpacked sequence at a time: logits -> log_softmax -> gather."""
    out = []
    for p, c in zip(p_ids, c_ids):
        seq = torch.tensor(p + c)
        h = model(seq, cu_seqlens=torch.tensor([0, len(seq)], dtype=torch.int32))
        z = h[len(p) - 1:len(seq) - 1] @ model.lm_head_weight.T / temperature
        out.append(z.log_softmax(-1).gather(1, torch.tensor(c)[:, None])[:, 0])
    return out


def _grpo_steps_float64(cfg, model, rollouts):
    """GRPO's optimizer steps written from LOSS_SPEC and docs/training.md in float64, independently of the
    trainer: (prompt ids, completion ids, sampler log-probs, rewards) per rollout -> the weights after its
    num_iterations steps and each step's loss, grad_norm, lr and statistics. Micro-batches are aggregated as
    TRL's: grpo / bnpo / dr_grpo normalise within each micro-batch and average them, dapo divides the
    rollout's sum by its token count."""
    ref_model, params = copy.deepcopy(model), dict(model.named_parameters())
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    b1, b2, mb, M, W = cfg.adam_beta1, cfg.adam_beta2, cfg.per_device_train_batch_size, \
        cfg.gradient_accumulation_steps, cfg.warmup_steps
    eps_hi, T, step, logged = cfg.epsilon_high or cfg.epsilon, cfg.temperature, 0, []
    for p_ids, c_ids, sampler, rewards in rollouts:
        r = torch.tensor(rewards, dtype=torch.float64).view(-1, cfg.num_generations)
        A = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
        with torch.no_grad():
            rollout_logp, ref = _logps64(model, p_ids, c_ids, T), _logps64(ref_model, p_ids, c_ids, T)
        for _ in range(cfg.num_iterations):
            logp = _logps64(model, p_ids, c_ids, T)
            per_tok, st = [], {k: [] for k in ("kl", "low", "high", "w")}
            for i in range(len(c_ids)):
                old = rollout_logp[i] if cfg.num_iterations > 1 else logp[i].detach()
                lw = logp[i] - old   # GSPO: the row's mean log-ratio at every token
                ratio = torch.exp(lw if cfg.importance_sampling_level == "token" else lw.mean().expand_as(lw))
                L = -torch.minimum(ratio * A[i], ratio.clamp(1 - cfg.epsilon, 1 + eps_hi) * A[i])
                d = old - torch.tensor(sampler[i], dtype=torch.float64)
                w = torch.exp(d.sum() if cfg.tis_level == "sequence" else d).expand_as(L)
                L = L * (w.clamp(max=cfg.tis_cap) if cfg.tis_mode == "truncate" else
                         ((w >= 1 / cfg.tis_cap) & (w <= cfg.tis_cap)).double())
                kl = torch.exp(ref[i] - logp[i]) - (ref[i] - logp[i]) - 1
                per_tok.append(L + cfg.beta * kl)
                for k, v in (("kl", kl), ("low", (ratio < 1 - cfg.epsilon) & (A[i] < 0)),
                             ("high", (ratio > 1 + eps_hi) & (A[i] > 0)), ("w", w)):
                    st[k].append(v.detach().double())
            loss = 0.0
            for rows in (range(j * mb, (j + 1) * mb) for j in range(M)):
                total = sum(per_tok[i].sum() for i in rows)
                loss = loss + {"grpo": lambda: sum(per_tok[i].mean() for i in rows) / mb / M,
                               "bnpo": lambda: total / sum(len(c_ids[i]) for i in rows) / M,
                               "dr_grpo": lambda: total / (mb * cfg.max_completion_length) / M,
                               "dapo": lambda: total / sum(map(len, c_ids))}[cfg.loss_type]()
            model.zero_grad()
            loss.backward()
            norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in params.values())))
            clip = min(1.0, cfg.max_grad_norm / (norm + 1e-6))
            # warmup step k at (k+1)/W of the rate, then the config's linear decay
            lr = cfg.learning_rate * ((step + 1) / W if step < W else max(0.0, 1 - (step - W) / (cfg.max_steps - W)))
            step += 1
            with torch.no_grad():   # AdamW, decoupled decay on matrices only
                for n, p in params.items():
                    g, (m, v) = p.grad * clip, moments[n]
                    p.mul_(1 - lr * cfg.weight_decay * (p.dim() >= 2))
                    m.mul_(b1).add_((1 - b1) * g)
                    v.mul_(b2).add_((1 - b2) * g * g)
                    p.sub_(lr * (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + cfg.adam_epsilon))
            cat = {k: torch.cat(v) for k, v in st.items()}
            if cfg.importance_sampling_level == "sequence":   # TRL's: shares of sequences (one ratio each)
                cat.update({k: torch.stack([x[0] for x in st[k]]) for k in ("low", "high")})
            logged.append({"loss": float(loss.detach()), "grad_norm": norm, "lr": lr, "kl": float(cat["kl"].mean()),
                           "clip_ratio/low_mean": float(cat["low"].mean()),
                           "clip_ratio/high_mean": float(cat["high"].mean()),
                           "clip_ratio/region_mean": float((cat["low"] + cat["high"]).mean()),
                           # TRL's: each micro-batch's extreme over its sequences, averaged
                           "clip_ratio/low_min": sum(min(float(st["low"][i].mean()) for i in range(j * mb, (j + 1) * mb))
                                                     for j in range(M)) / M,
                           "clip_ratio/high_max": sum(max(float(st["high"][i].mean()) for i in range(j * mb, (j + 1) * mb))
                                                      for j in range(M)) / M,
                           "is_weight/mean": float(cat["w"].mean()), "is_weight/max": float(cat["w"].max())})
    return {n: p.detach() for n, p in params.items()}, logged


@pytest.mark.parametrize("loss_type, beta, iterations, max_grad_norm, tis, is_level", [
    ("grpo", 0.05, 2, 0.05, ("truncate", "sequence"), "token"), ("dapo", 0.05, 2, 0.05, ("mask", "token"), "token"),
    ("dr_grpo", 0.0, 1, 0.05, ("truncate", "token"), "token"), ("bnpo", 0.0, 2, 10.0, ("mask", "sequence"), "token"),
    ("grpo", 0.0, 1, 10.0, ("truncate", "sequence"), "token"), ("grpo", 0.0, 2, 0.05, ("mask", "token"), "sequence")])
def test_grpo_steps_match_a_float64_computation_from_the_spec(tmp_path, loss_type, beta, iterations, max_grad_norm,
                                                              tis, is_level):
    """Two optimizer steps of GRPOTrainer (one rollout's two iterations, or two rollouts' one) on fixed
    completions of unequal lengths and known rewards, against _grpo_steps_float64: the weights after them,
    and the logged loss, grad_norm, lr, KL, clip and importance-weight statistics. The micro-batches hold
    different token counts, the reference model is frozen, AdamW decays the matrices only, max_grad_norm
    clips (or not), the warmup runs steps 1 and 2 at 1/3 and 2/3 of the rate; the sampler's log-probs weight
    the loss (truncated IS, token or sequence level), and one case takes GSPO's sequence-level ratio."""
    model, tok = tiny_model(seed=1)
    cfg = GRPOConfig(learning_rate=0.05, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     num_generations=4, max_steps=2, num_iterations=iterations, beta=beta, loss_type=loss_type,
                     epsilon=0.1, epsilon_high=0.15, max_completion_length=8, max_grad_norm=max_grad_norm,
                     weight_decay=0.1, warmup_steps=3, lr_scheduler_type="linear", adam_beta1=0.8, adam_beta2=0.95,
                     adam_epsilon=1e-4, temperature=0.8, tis_mode=tis[0], tis_level=tis[1], tis_cap=1.3,
                     importance_sampling_level=is_level, output_dir=str(tmp_path / "run"), progress_bar=False,
                     log_completions=0)
    model64 = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(5)
    drawn = [([torch.randint(4, len(tok), (n,), generator=gen).tolist() for n in lengths],
              torch.rand(8, generator=gen).tolist())
             for lengths in ([1, 7, 3, 5, 2, 6, 8, 4], [5, 2, 8, 1, 4, 4, 6, 3])[:3 - iterations]]
    rollouts = []   # what each rollout trained on: prompt ids, completion ids, sampler log-probs, rewards
    tr = GRPOTrainer(model, [lambda prompts, completions, **kw: rollouts[-1][3]],
                     [{"prompt": "ab"}, {"prompt": "cde"}], cfg, tokenizer=tok)
    assert tr.share_prompts   # the packed layout with each prompt once per micro-batch is the one checked

    def generate(rows, keys, n, temperature, seed):
        c_ids, rewards = drawn[len(rollouts)]
        p_ids = [p for p in tr._prompt_ids(rows, keys) for _ in range(n)]
        noise = 0.15 if cfg.tis_level == "token" else 0.06   # a sequence's weight sums its tokens' noise
        with torch.no_grad():   # the sampler's log-probs: near the policy's, some weights past tis_cap
            sampler = [(lp + noise * torch.randn(lp.shape, generator=gen, dtype=torch.float64)).tolist()
                       for lp in _logps64(model64, p_ids, c_ids, cfg.temperature)]
        rollouts.append((p_ids, c_ids, sampler, rewards))
        return p_ids, c_ids, sampler, ["stop"] * len(c_ids)

    tr.generate = generate
    got = [tr.step()["metrics"] for _ in drawn]
    want_weights, want = _grpo_steps_float64(cfg, model64, rollouts)
    # the weights moved by ~lr = 0.05; adam_epsilon 1e-4 keeps AdamW from blowing float32's rounding of a
    # near-zero gradient up to a whole step
    for n, p in tr.model.named_parameters():
        torch.testing.assert_close(p.detach().double(), want_weights[n], rtol=0, atol=5e-5, msg=lambda m: f"{n}: {m}")
    for m, steps in zip(got, (want[i:i + iterations] for i in range(0, 2, iterations))):
        assert m["lr"] == pytest.approx(steps[-1]["lr"], rel=1e-12)
        assert steps[0]["grad_norm"] > max_grad_norm if max_grad_norm < 1 else steps[0]["grad_norm"] < max_grad_norm
        for k in ("loss", "grad_norm", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                  "is_weight/mean", "clip_ratio/low_min", "clip_ratio/high_max"):
            if k != "kl" or beta:
                assert m[k] == pytest.approx(sum(s[k] for s in steps) / iterations, rel=1e-5, abs=1e-6), k
        for k, pick in (("is_weight/max", max),):
            assert m[k] == pytest.approx(pick(s[k] for s in steps), rel=1e-5), k
    if iterations == 2:   # the second pass moved off the rollout's policy: the clip is exercised
        assert max(s["clip_ratio/region_mean"] for s in want) > 0.1


@pytest.mark.parametrize("estimator, scale", [("grpo", "none"), ("grpo", "batch"), ("rloo", "group")])
def test_advantage_options_reach_the_advantages(tmp_path, estimator, scale):
    from r1fast import ops

    tr = make(tmp_path, num_generations=4, per_device_train_batch_size=8, advantage_estimator=estimator,
              scale_rewards=scale)
    totals = [1.0, 0.0, 3.0, 2.0, 5.0, 4.0, 3.0, 1.0]
    want = ops.group_advantages(torch.tensor(totals), 4, estimator=estimator, scale_rewards=scale)
    assert torch.equal(tr._advantages(totals), want)
    assert not torch.allclose(want, ops.group_advantages(torch.tensor(totals), 4))   # the options matter here


def test_sft_loss_is_the_token_mean_nll_of_completions_given_their_prompts(tmp_path):
    """One step over every row (two micro-batches, a prompt shared by two rows): the loss is the mean
    negative log-likelihood of the completion tokens, each predicted from the tokens before it (the
    prompt's are context only), and the gradients are that loss's, as a plain full-logits model gives."""
    from r1fast.data.loading import encode_completion, encode_prompt
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    rows = [{"prompt": "12", "completion": "7"}, {"prompt": "345", "completion": "77a"},
            {"prompt": "12", "completion": "9x"}, {"prompt": "6", "completion": "1234"}]
    model, tok = tiny_model(seed=1)
    ref, _ = tiny_model(seed=1)
    cfg = SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.0,
                    learning_rate=1e-2, progress_bar=False, output_dir=str(tmp_path / "s"))
    tr = SFTTrainer(model, tok, rows, cfg)
    loss = tr.step()["loss"]
    nll, n = 0.0, 0
    for r in rows:
        p, c = encode_prompt(tok, r["prompt"]), encode_completion(tok, r["completion"])
        logits = ref.logits(ref(torch.tensor(p + c)))
        logp = torch.log_softmax(logits[len(p) - 1:-1], -1).gather(1, torch.tensor(c)[:, None])
        nll, n = nll - logp.sum(), n + len(c)
    (nll / n).backward()
    assert loss == pytest.approx(float(nll.detach() / n), rel=1e-5)
    grads = {name: p.grad for name, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert not torch.equal(p.detach(), dict(ref.named_parameters())[name].detach())   # and it stepped


def test_sft_logs_trls_token_accuracy_num_tokens_and_epoch(tmp_path):
    """TRL's SFT metrics, absent from r1fast's: mean_token_accuracy (the share of completion tokens whose
    logits' argmax is the token), num_tokens (prompt + completion tokens so far) and the fractional epoch;
    checked against a plain full-logits model over two micro-batches, a prompt shared by two rows."""
    from r1fast.data.loading import encode_completion, encode_prompt
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model(seed=1)
    ref, _ = tiny_model(seed=1)

    def predicted(prompt):   # the model's own next character: an untrained model gets no other one right
        with torch.no_grad():
            return tok.decode([int(ref.logits(ref(torch.tensor(encode_prompt(tok, prompt))))[-1].argmax())])
    rows = [{"prompt": "12", "completion": predicted("12") + "7"}, {"prompt": "345", "completion": "77a"},
            {"prompt": "12", "completion": "9x"}, {"prompt": "6", "completion": predicted("6") + "234"}]
    cfg = SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                    progress_bar=False, output_dir=str(tmp_path / "s"))
    tr = SFTTrainer(model, tok, rows, cfg)
    hits, counted, tokens = 0, 0, 0
    for r in rows:
        p, c = encode_prompt(tok, r["prompt"]), encode_completion(tok, r["completion"])
        with torch.no_grad():
            logits = ref.logits(ref(torch.tensor(p + c)))[len(p) - 1:-1]
        hits += int((logits.argmax(-1) == torch.tensor(c)).sum())
        counted, tokens = counted + len(c), tokens + len(p) + len(c)
    m = tr.step()
    assert 0 < hits < counted
    assert (m["mean_token_accuracy"], m["num_tokens"], m["epoch"]) == (hits / counted, tokens, 1.0)


def test_sft_trims_a_long_example_from_the_prompts_start_and_keeps_the_completion(tmp_path):
    from r1fast.data.loading import encode_completion, encode_prompt
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    rows = [{"prompt": "0123456789", "completion": "abc"}, {"prompt": "9", "completion": "x" * 20},
            {"prompt": "12", "completion": "7"}]
    tr = SFTTrainer(model, tok, rows, SFTConfig(max_length=12, progress_bar=False, output_dir=str(tmp_path)))
    (p0, c0), (p1, c1), (p2, c2) = [(encode_prompt(tok, r["prompt"]), encode_completion(tok, r["completion"]))
                                    for r in rows]
    assert len(p0) + len(c0) > 12 and len(p2) + len(c2) <= 12
    assert tr.examples[0] == (p0[-(12 - len(c0)):], c0)   # the prompt's end (the question) stays
    assert tr.examples[1] == (p1[-1:], c1[:11])           # a completion past max_length: one prompt token
    assert tr.examples[2] == (p2, c2)
    # the model's positions cap max_length too (1024 by default, past a small model's): such examples
    # trained at positions the rollout never reaches
    model.config.max_position_embeddings = 12
    tr = SFTTrainer(model, tok, rows, SFTConfig(progress_bar=False, output_dir=str(tmp_path)))
    assert tr.examples[0] == (p0[-(12 - len(c0)):], c0) and tr.examples[1] == (p1[-1:], c1[:11])
    # so does a sliding window shorter than the positions: past it, r1fast's full attention is not the model's
    model.config.max_position_embeddings = 64
    model.config.architecture = "Qwen3ForCausalLM"
    model.config.extra = {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 0}
    assert model.config.max_sequence_length == 12
    tr = SFTTrainer(model, tok, rows, SFTConfig(progress_bar=False, output_dir=str(tmp_path)))
    assert tr.examples[0] == (p0[-(12 - len(c0)):], c0) and tr.examples[1] == (p1[-1:], c1[:11])
    with pytest.raises(ValueError, match="SFT dataset must be a non-empty list of row dicts"):
        SFTTrainer(model, tok, [], SFTConfig(progress_bar=False, output_dir=str(tmp_path)))


@pytest.mark.parametrize("epochs,batch,accum,steps", [(1.0, 4, 1, 3), (1.0, 4, 2, 2), (2.0, 3, 2, 4)])
def test_sft_epochs_give_the_steps_and_the_schedule_follows_them(tmp_path, epochs, batch, accum, steps):
    """10 rows: an epoch is ceil(10 / (batch * accumulation)) optimizer steps; the linear schedule
    reaches 0 after the last one. The logged lr is the rate each step ran at (it logged the next
    step's: 0 for a last step that trained at 1/steps of the rate)."""
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    rows = [{"prompt": str(i), "completion": "7"} for i in range(10)]
    cfg = SFTConfig(num_train_epochs=epochs, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                    lr_scheduler_type="linear", learning_rate=1e-3, progress_bar=False, output_dir=str(tmp_path))
    tr = SFTTrainer(model, tok, rows, cfg)
    assert tr.total_steps == steps
    used = []
    tr.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    lrs = [tr.step()["lr"] for _ in range(steps)]
    assert lrs == pytest.approx([1e-3 * (1 - k / steps) for k in range(steps)]) and lrs == used
    assert tr.scheduler.get_last_lr()[0] == 0.0


def test_sft_logs_the_window_mean_loss_at_global_steps_and_the_last_step(tmp_path):
    """logging_steps=2 over 3 steps of a stage starting at global step 5: lines at 7 (the mean of
    steps 1-2's losses) and at 8, the last step, alone."""
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    rows = [{"prompt": str(i), "completion": "7" * (i + 1)} for i in range(6)]
    cfg = SFTConfig(max_steps=3, logging_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                    progress_bar=False, output_dir=str(tmp_path / "s"))
    tr = SFTTrainer(model, tok, rows, cfg, stage_name="cold", step_offset=5)
    steps, step = [], tr.step

    def spy():
        m = step()
        steps.append(dict(m))
        return m

    tr.step = spy
    tr.train()
    logged = _metrics(tmp_path / "s" / "metrics.jsonl")
    assert [(r["step"], r["stage"]) for r in logged] == [(7, "cold"), (8, "cold")]
    for key in ("loss", "mean_token_accuracy"):   # TRL's mean_token_accuracy is a window mean too
        assert [r[key] for r in logged] == pytest.approx([(steps[0][key] + steps[1][key]) / 2, steps[2][key]]), key
    # running totals are the line's last step's
    assert [(r["num_tokens"], r["epoch"]) for r in logged] == [(steps[1]["num_tokens"], pytest.approx(4 / 6)),
                                                                (steps[2]["num_tokens"], 1.0)]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")   # a skipped first step
def test_sft_resume_between_logging_steps_logs_the_uninterrupted_mean_loss(tmp_path):
    # the logged loss is the mean over the steps since the last logged one; the steps before an
    # interruption were lost, so the first line after a resume averaged only the steps after it
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    def trainer(name):
        m, tok = tiny_model()
        rows = [{"prompt": str(i), "completion": "7" * (i % 4 + 1)} for i in range(8)]
        cfg = SFTConfig(max_steps=6, logging_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                        lr_scheduler_type="constant", progress_bar=False, output_dir=str(tmp_path / name))
        return SFTTrainer(m, tok, rows, cfg)

    trainer("full").train()
    part = trainer("part")
    step = part.step

    def stopping_at_4():
        m = step()
        part._stop_requested = part.global_step == 4
        return m
    part.step = stopping_at_4
    assert part.train()["interrupted"] and part.global_step == 4
    trainer("part").train(resume=True)
    a, b = _metrics(tmp_path / "full" / "metrics.jsonl"), _metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    for key in ("loss", "mean_token_accuracy", "num_tokens", "epoch"):   # windows and running totals carried over
        assert [r[key] for r in b] == [r[key] for r in a], key


def test_sft_resume_continues_the_data_order_and_the_skipped_count(tmp_path):
    """Steps 3-4 after resuming from step 2 are those of an uninterrupted run (same rows, same
    weights), and a NaN step before the checkpoint is still counted."""
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    def trainer(name, model=None):
        m, tok = tiny_model() if model is None else model
        rows = [{"prompt": str(i), "completion": "7" * (i % 4 + 1)} for i in range(8)]
        cfg = SFTConfig(max_steps=4, logging_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
                        lr_scheduler_type="constant", progress_bar=False, output_dir=str(tmp_path / name))
        return SFTTrainer(m, tok, rows, cfg)

    def poisoned_first_step(name):
        tr = trainer(name)
        calls = {"n": 0}

        def poison(module, args, out):
            calls["n"] += 1
            return out * float("nan") if calls["n"] == 1 else out
        tr.model.norm.register_forward_hook(poison)
        return tr

    full = poisoned_first_step("full").train()
    part = poisoned_first_step("part")
    part.step(), part.step()
    ckpt = part.save()
    res = trainer("part").train(resume=ckpt)
    assert res["nonfinite_skipped"] == full["nonfinite_skipped"] == 1
    a, b = _metrics(tmp_path / "full" / "metrics.jsonl"), _metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in b] == [3, 4]
    assert [r["loss"] for r in b] == [r["loss"] for r in a[2:]]


def test_metrics_logger_lines_resume_truncation_and_fresh_start(tmp_path):
    from r1fast.trainer.metrics import MetricsLogger, read_metrics

    log = MetricsLogger(str(tmp_path))
    for step in (1, 2):
        log.log(step, "grpo", {"loss": float("inf"), "kl": float("-inf"), "reward": float("nan"),
                               "lr": torch.tensor(0.5 * step)})
        log.log_completions(step, "grpo", [{"completion": f"c{step}"}])
    log.close()
    rows = read_metrics(str(tmp_path))
    # JSON has no inf/nan: the sign survives as +-1e308, nan is null; tensors become numbers
    assert rows[0] == {"step": 1, "stage": "grpo", "loss": 1e308, "kl": -1e308, "reward": None, "lr": 0.5}
    comp = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
    assert comp == [{"step": 1, "stage": "grpo", "completion": "c1"}, {"step": 2, "stage": "grpo", "completion": "c2"}]
    MetricsLogger(str(tmp_path), resume_step=1).close()   # what came after the checkpoint goes, in both files
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1]
    assert [json.loads(line)["step"] for line in open(tmp_path / "completions.jsonl")] == [1]
    MetricsLogger(str(tmp_path)).close()                  # a fresh run starts empty logs
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "completions.jsonl").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"loss": 2.0}\n')
    with pytest.raises(ValueError, match="record 2 has no numeric 'step'"):
        read_metrics(str(tmp_path))


def test_a_replaced_file_keeps_its_mode_as_open_keeps_it(tmp_path, umask_027):
    # replacing() (metrics truncated on resume, pipeline state and summary, samples) renamed a fresh file over
    # the old one: a log the user had opened to others (chmod o+r) went back to the umask's mode at the
    # next rewrite, and a .tmp left by a killed write lent the new file its mode
    from r1fast.trainer.metrics import replacing

    kept, new = tmp_path / "metrics.jsonl", tmp_path / "summary.json"
    kept.write_text("{}\n")
    kept.chmod(0o644)
    (tmp_path / "summary.json.tmp").write_text("half")
    (tmp_path / "summary.json.tmp").chmod(0o600)
    for path in (kept, new):
        with replacing(str(path)) as f:
            f.write("{}\n")
    assert (kept.stat().st_mode & 0o777, new.stat().st_mode & 0o777) == (0o644, 0o640)


def test_every_iteration_of_a_rollout_gets_the_rollout_policys_log_probs(tmp_path, monkeypatch):
    """num_iterations > 1: each pass over the rollout takes old_logp = the policy's log-probs at rollout time,
    the same numbers in every iteration. Without them (old_logp None: the ratio is 1 by definition) the later
    iterations would neither clip nor weight by the policy's drift, and nothing else in a step shows it."""
    from r1fast import ops

    tr = make(tmp_path, max_steps=2, num_iterations=2, num_generations=4, per_device_train_batch_size=4,
              gradient_accumulation_steps=2)
    calls, loss = [], ops.fused_linear_grpo_loss

    def spy(hidden, weight, targets, mask, advantages, **kw):
        now = ops.grouped_logprob(hidden.detach(), weight.detach(), targets, temperature=kw["options"].temperature)
        calls.append((None if kw["old_logp"] is None else kw["old_logp"].clone(), now))
        return loss(hidden, weight, targets, mask, advantages, **kw)

    monkeypatch.setattr(ops, "fused_linear_grpo_loss", spy)
    tr.step()
    assert len(calls) == 4 and all(old is not None for old, _ in calls)  # 2 iterations x 2 micro-batches
    first, second = calls[:2], calls[2:]
    for (old1, now1), (old2, now2) in zip(first, second):
        assert torch.equal(old1, old2)  # fixed for the rollout, not recomputed per iteration
        torch.testing.assert_close(now1, old1, rtol=1e-5, atol=1e-5)  # iteration 1: old = the current policy
        assert (now2 - old2).abs().max() > 1e-4  # iteration 2 follows an update: the ratio moves off 1


def test_grpo_logs_the_learning_rate_each_step_ran_at(tmp_path):
    """A warmup of 2: step 1 runs at half the rate and logs it (it logged the next step's, the full
    rate); with num_iterations=2 a rollout's line is its last optimizer step's."""
    for name, iters, want in (("one", 1, [0.5, 1.0, 1.0]), ("two", 2, [1.0, 1.0])):
        tr = make(tmp_path, name, max_steps=4 if iters == 2 else 3, num_iterations=iters, warmup_steps=2,
                  learning_rate=1e-3)
        used = []
        tr.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
        tr.train()
        assert [h["lr"] for h in tr.history] == pytest.approx([1e-3 * w for w in want])
        assert [h["lr"] for h in tr.history] == used[iters - 1::iters]


def test_max_steps_stops_within_a_rollouts_iterations(tmp_path):
    # max_steps counts optimizer steps; with num_iterations=2 a 3-step run took 4 (two whole rollouts)
    tr = make(tmp_path, "r", max_steps=3, num_iterations=2, lr_scheduler_type="linear")
    res = tr.train()
    assert tr.global_step == 3 and res["checkpoint"].endswith("checkpoint-3")
    assert [h["step"] for h in tr.history] == [2, 3]
    assert [r["step"] for r in _metrics(tmp_path / "r" / "metrics.jsonl")] == [2, 3]
    assert tr.rollout_index == 2
    # the linear schedule ends at its end; the last step ran at a third of the rate, and logs that
    assert tr.scheduler.last_epoch == 3 and tr.scheduler.get_last_lr()[0] == 0.0
    assert tr.history[-1]["lr"] == pytest.approx(3e-2 / 3)
    # the last rollout's statistics are means over the one pass it made, not halved
    assert tr.history[-1]["entropy"] == pytest.approx(tr.history[0]["entropy"], rel=0.1)
    one = make(tmp_path, "one", max_steps=1, num_iterations=2)
    one.train()
    assert one.global_step == 1 and [h["step"] for h in one.history] == [1]


def test_long_prompts_are_cut_as_training_prompts_are_or_named(tmp_path):
    # an eval prompt longer than max_prompt_length stopped GRPO at its first evaluation with the
    # engine's "max_model_len" error, and max_prompt_length at or past the model's positions stopped
    # it at the first long training prompt; sampling and the pipeline's evaluation name the row
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.evaluate import evaluate_accuracy
    from r1fast.trainer.sampling import rejection_sample

    model, tok = tiny_model()   # 64 positions
    long = {"prompt": "1+2+3+4+5+6+7+8+9+" * 4 + "0=", "answer": "7"}
    rows = ROWS[:7] + [long]
    assert len(tok(long["prompt"]).input_ids) > 64
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_prompt_length=16,
                     max_steps=2, output_dir=str(tmp_path / "a"), progress_bar=False, seed=3)
    held_out = dict(long, prompt="9+" + long["prompt"])
    res = GRPOTrainer(model, [sevens], rows, cfg, tokenizer=tok, eval_dataset=[held_out]).train()
    assert res["final"]["eval/num_samples"] == 1
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_steps=2,
                     output_dir=str(tmp_path / "b"), progress_bar=False, seed=3)   # max_prompt_length 512 > 64
    tr = GRPOTrainer(model, [sevens], rows, cfg, tokenizer=tok)
    assert tr.prompt_cap == 63
    assert tr.train()["global_step"] == 2
    with pytest.raises(ValueError, match=r"evaluation: the prompt of row 1 has \d+ tokens and the model 64 positions"):
        evaluate_accuracy(model, tok, [ROWS[0], long])
    with pytest.raises(ValueError, match=r"rejection sampling: the prompt of row 0 has \d+ tokens and the model 64"):
        rejection_sample(model, tok, [long], SampleConfig(reward_funcs=["format"], progress_bar=False), progress=False)


def test_a_prompt_cut_to_max_prompt_length_is_said_and_keeps_its_end(tmp_path):
    # TRL 1.x has no max_prompt_length and feeds prompts whole; r1fast's (512 by default) cut a longer prompt's
    # start (its system prompt, the template's first header) without a word
    from r1fast.data import encode_prompt
    from r1fast.trainer.evaluate import evaluate_accuracy

    model, tok = tiny_model()
    system = {"role": "system", "content": "Answer in one line."}
    rows = [{"prompt": [system, {"role": "user", "content": f"{i}+{i}="}], "answer": "7"} for i in range(8)]
    whole = len(encode_prompt(tok, rows[0]["prompt"]))
    cfg = GRPOConfig(per_device_train_batch_size=4, num_generations=2, max_completion_length=2, max_prompt_length=12,
                     max_steps=1, output_dir=str(tmp_path / "r"), progress_bar=False, seed=3, log_completions=0)
    tr = GRPOTrainer(model, [sevens], rows, cfg, tokenizer=tok)
    with pytest.warns(UserWarning, match=rf"train dataset: \(said for the first prompt cut\) the prompt of row \d "
                                         rf"has {whole} tokens, more than the 12 a prompt keeps \(max_prompt_length\)"):
        tr.train()
    assert {tok.decode(ids) for ids in tr._prompt_cache.values()} == \
        {f"line.\n<|user|>{k}+{k}=<|assistant|>" for k in tr._prompt_cache}   # the last 12 tokens
    with pytest.warns(UserWarning, match=r"evaluation: held-out rows: 2 of 3 prompts are cut: the prompt of row 0"):
        evaluate_accuracy(model, tok, rows[:2] + [{"prompt": "1=", "answer": "1"}], max_prompt_length=12, max_tokens=2)


def test_a_prompt_cut_to_the_models_positions_names_them_not_max_prompt_length(tmp_path):
    # max_prompt_length (512) above the model's 64 positions: GRPO's held-out evaluation warned of prompts cut to
    # 63 tokens "(max_prompt_length)", and both warnings said to raise max_prompt_length, which changes nothing
    from r1fast.trainer.evaluate import evaluate_accuracy

    model, tok = tiny_model()   # 64 positions
    long = {"prompt": "1+2+3+4+5+6+7+8+9+" * 4 + "0=", "answer": "7"}
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_steps=1,
                     output_dir=str(tmp_path / "r"), progress_bar=False, seed=3)
    tr = GRPOTrainer(model, [sevens], ROWS[:7] + [long], cfg, tokenizer=tok)
    said = r"more than the 63 a prompt keeps \(the model's 64 positions less one\).*shorten them: the model has no more"
    with pytest.warns(UserWarning, match=r"evaluation: held-out rows: 1 of 1 prompts are cut: .*" + said):
        tr.evaluate([long])
    # evaluate_accuracy's own max_prompt_length is capped as GRPO caps it (it was the 'no room' error)
    with pytest.warns(UserWarning, match=said):
        assert evaluate_accuracy(model, tok, [long], max_prompt_length=512, max_tokens=1)["eval/num_samples"] == 1
    # 0 kept the whole prompt (ids[-0:]) while the warning said it kept 0 tokens; -5 cut its first 5 tokens
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match=rf"max_prompt_length must be a whole number >= 1; got {bad}"):
            evaluate_accuracy(model, tok, [{"prompt": "1+2=", "answer": "3"}], max_prompt_length=bad, max_tokens=1)


def test_a_model_with_no_fp8_layer_is_converted_when_the_config_asks(tmp_path):
    # apply_fp8(model, "off") (or a fallback) left a report but no FP8 layer: refused as "already converted"
    from r1fast.fp8 import apply_fp8

    model, tok = tiny_model()
    apply_fp8(model, "off")
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_steps=1,
                     output_dir=str(tmp_path / "r"), progress_bar=False, fp8="emulate")
    tr = GRPOTrainer(model, [sevens], ROWS, cfg, tokenizer=tok)
    assert tr.model.fp8_report.effective_mode == "emulate" and tr.model.fp8_report.converted


def test_an_fp8_fallback_warns_once_when_the_trainer_loads_the_model(tmp_path):
    # fp8: te without Transformer Engine: from_pretrained (a path given to GRPOTrainer, r1fast train) fell
    # back with a warning, then the trainer applied the same options to the loaded model and warned again.
    import warnings

    from r1fast.fp8 import Fp8FallbackWarning
    from r1fast.models import from_pretrained, save_pretrained
    from r1fast.trainer.grpo import _apply_config_to_model

    save_pretrained(tiny_model()[0], tmp_path / "m")
    cfg = GRPOConfig(fp8="te")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = from_pretrained(str(tmp_path / "m"), fp8=cfg.fp8_options())
        _apply_config_to_model(model, cfg)
    assert [w.category for w in caught if issubclass(w.category, Fp8FallbackWarning)] == [Fp8FallbackWarning]
    assert model.fp8_report.effective_mode == "off" and model.fp8_report.device == model.device


def test_step_statistics_do_not_depend_on_the_micro_batching(tmp_path, monkeypatch):
    """The loss statistics are token means (min / max for is_weight's) over the whole rollout: a
    micro-batch whose completions are all masked (mask_truncated_completions) adds no zeros, and
    micro-batches of different token counts are not weighted alike."""
    runs = {}
    for micro in (8, 4):
        tr = make(tmp_path, f"m{micro}", max_steps=1, num_generations=4, per_device_train_batch_size=micro,
                  gradient_accumulation_steps=8 // micro, mask_truncated_completions=True)
        generate = tr.generate

        def first_group_truncated(*a, **kw):
            p_ids, c_ids, c_logp, finish = generate(*a, **kw)
            c_ids = [c[:2] if i == 4 else c for i, c in enumerate(c_ids)]   # token counts differ between rows
            c_logp = [lp[:2] if i == 4 else lp for i, lp in enumerate(c_logp)]
            return p_ids, c_ids, c_logp, ["length" if i < 4 else "stop" for i in range(len(c_ids))]

        monkeypatch.setattr(tr, "generate", first_group_truncated)
        runs[micro] = tr.step()["metrics"]
    whole, split = runs[8], runs[4]
    assert whole["entropy"] > 1.0
    for k in ("entropy", "is_weight/mean", "is_weight/min", "is_weight/max", "is_weight/masked_frac",
              "clip_ratio/region_mean"):
        assert split[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-6), k
    assert whole["is_weight/min"] == pytest.approx(1.0, abs=1e-4) and whole["is_weight/max"] == pytest.approx(1.0, abs=1e-4)


def test_frac_reward_zero_std_counts_groups_of_equal_rewards(tmp_path):
    """A group whose G rewards are all equal has no spread (its advantages are 0), even where the
    float mean of a value such as 0.1 or 0.7 is not that value to the last bit."""
    from r1fast.trainer.grpo import _frac_zero_std

    assert _frac_zero_std([0.1] * 3 + [0.0, 1.0, 1.0], 3) == 0.5
    assert _frac_zero_std([0.7] * 8, 8) == 1.0
    assert _frac_zero_std([0.2, float("nan"), 0.2, 0.2, 0.0, 1.0, 0.0, 1.0], 4) == 0.5
    # TRL's: a group of fewer than two scored rewards has no std (NaN), so it is no zero-std group; r1fast counted it
    assert _frac_zero_std([None, 0.5, 0.3, 0.3, float("nan"), None], 2) == 1 / 3
    assert _frac_zero_std([0.3, 0.3 + 1e-9, 0.0, 1.0], 2) == 0.5   # isclose(std, 0): within 1e-8
    model, tok = tiny_model()
    cfg = GRPOConfig(learning_rate=3e-2, per_device_train_batch_size=8, num_generations=8, max_steps=1,
                     max_completion_length=6, output_dir=str(tmp_path / "z"), progress_bar=False, seed=3)
    tr = GRPOTrainer(model, [lambda prompts, completions, **kw: [0.7] * len(completions)], ROWS, cfg, tokenizer=tok)
    assert tr.step()["metrics"]["frac_reward_zero_std"] == 1.0


def test_reward_and_reward_std_metrics_are_the_sample_mean_and_std_of_the_scored_rows():
    """`reward` / `reward_std` leave out rows no function scored (None or NaN); the std is the sample
    (Bessel-corrected) one, as torch.std and TRL's logged reward std."""
    import statistics

    from r1fast.trainer.grpo import _nanmean, _nanstd

    totals = [0.25, None, 1.5, float("nan"), -0.75, 2.0]
    scored = [0.25, 1.5, -0.75, 2.0]
    assert _nanmean(totals) == pytest.approx(statistics.fmean(scored), rel=1e-12)
    assert _nanstd(totals) == pytest.approx(statistics.stdev(scored), rel=1e-12)
    # fewer than two scored rows: no std, NaN as TRL's nanstd (it was 0, which a logged line's mean took in)
    assert all(math.isnan(_nanstd(xs)) for xs in ([0.5, None], [], [float("nan"), 1.0]))
    assert _nanmean([None, float("nan")]) != _nanmean([None, float("nan")])  # nothing scored: NaN


def test_rewards_never_see_the_model_eos_that_ended_a_completion(tmp_path, monkeypatch):
    """The engine stops at the model config's eos ids as well as the tokenizer's; a completion ended by
    one of the former reached the rewards (and completions.jsonl) with the stop token as text."""
    from r1fast.rollout.params import Completion, RequestOutput

    tok = build_char_tokenizer()
    other_eos = tok.convert_tokens_to_ids("<|user|>")
    model, _ = tiny_model(tok=tok)
    model.config.eos_token_id = [tok.eos_token_id, other_eos]
    seen = []

    def spy(prompts, completions, **kw):
        seen.extend(completions)
        return [1.0] * len(completions)

    cfg = GRPOConfig(per_device_train_batch_size=2, num_generations=2, max_steps=1, output_dir=str(tmp_path / "o"),
                     progress_bar=False)
    tr = GRPOTrainer(model, [spy], ROWS[:2], cfg, tokenizer=tok)
    body = tok("<answer>7</answer>", add_special_tokens=False).input_ids
    ends = [other_eos, tok.eos_token_id]
    monkeypatch.setattr(tr.engine, "generate", lambda prompts, params: [
        RequestOutput(list(p), [Completion(body + [e], [0.0] * (len(body) + 1), "stop") for e in ends])
        for p in prompts])
    tr.step()
    assert seen == ["<answer>7</answer>"] * 2


def test_a_prompt_the_trainers_cannot_encode_is_an_error_naming_its_row_before_training(tmp_path):
    """GRPO encodes its prompts as steps draw them: a message with role "User" stopped the run at the step
    that drew it (hours in, no checkpoint), naming no row. An empty prompt under a tokenizer with no chat
    template and no BOS failed the first step with "pack: every prompt and completion needs at least one
    token" (SFT) or "generate: prompt 0 is empty" (GRPO)."""
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    bad = ROWS[:5] + [{"prompt": [{"role": "User", "content": "1"}], "answer": "7"}]
    cfg = GRPOConfig(per_device_train_batch_size=2, num_generations=2, output_dir=str(tmp_path / "o"),
                     progress_bar=False)
    with pytest.raises(ValueError, match=r"train dataset: row 5: a prompt message needs a role"):
        GRPOTrainer(model, [sevens], bad, cfg, tokenizer=tok)
    with pytest.raises(ValueError, match=r"eval dataset: row 5: a prompt message needs a role"):
        GRPOTrainer(model, [sevens], ROWS, cfg, tokenizer=tok, eval_dataset=bad)
    with pytest.raises(ValueError, match=r"SFT dataset: row 1: a prompt must be a string"):
        SFTTrainer(model, tok, [{"prompt": "1", "completion": "7"}, {"prompt": 2, "completion": "7"}],
                   SFTConfig(progress_bar=False))
    tok.chat_template = None   # "" encodes to no tokens at all
    empty = [{"prompt": "1", "completion": "7", "answer": "7"}, {"prompt": "", "completion": "7", "answer": "7"}]
    with pytest.raises(ValueError, match=r"SFT dataset: row 1's prompt is empty"):
        SFTTrainer(model, tok, empty, SFTConfig(progress_bar=False))
    with pytest.raises(ValueError, match=r"train dataset: row 1's prompt is empty"):
        GRPOTrainer(model, [sevens], empty, cfg, tokenizer=tok)
    GRPOTrainer(model, [sevens], empty, GRPOConfig(system_prompt="Answer.", progress_bar=False), tokenizer=tok)


def test_sft_trains_on_a_completion_message_content_never_on_its_repr():
    """A completion whose content is a list of parts ([{"type": "text", "text": ...}], the OpenAI-style
    messages many datasets hold) or a single message dict was trained on as its Python repr."""
    from r1fast.data import encode_completion
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    want = encode_completion(tok, "<answer>7</answer>")
    assert encode_completion(tok, {"role": "assistant", "content": "<answer>7</answer>"}) == want
    assert encode_completion(tok, [{"role": "assistant", "content": "<answer>7</answer>"}]) == want
    assert encode_completion(tok, 7) == encode_completion(tok, "7")   # a number from a JSON column
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "<answer>7</answer>"}]}]
    rows = [{"prompt": "1", "completion": "7"}, {"prompt": "2", "completion": parts}]
    with pytest.raises(ValueError, match=r"SFT dataset: row 1: a completion must be a string or a list of"):
        SFTTrainer(model, tok, rows, SFTConfig(progress_bar=False))


def test_sft_refuses_a_completion_message_that_is_not_the_assistants():
    """A completion is the assistant's message (docs/training.md); a message list ending on the user's
    turn was trained on as the completion, teaching the model to write the user's text."""
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    for comp in ({"role": "user", "content": "7"},
                 [{"role": "assistant", "content": "7"}, {"role": "user", "content": "and 8?"}]):
        rows = [{"prompt": "1", "completion": "7"}, {"prompt": "2", "completion": comp}]
        with pytest.raises(ValueError, match=r"SFT dataset: row 1: a completion message must be the assistant's; "
                                             r"got role 'user'"):
            SFTTrainer(model, tok, rows, SFTConfig(progress_bar=False))


def test_sft_rows_of_both_formats_name_the_row_that_is_not_conversational(tmp_path):
    # a messages row, then a prompt/completion one: once every row got every column (None where missing), row 0
    # was blamed ("row 0 has no value for column(s) ['prompt', 'completion']") for the format of the first row
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"prompt": "q", "completion": "a"}]
    with pytest.raises(ValueError, match=r"SFT dataset: row 1: 'messages' must be a list of two or more"):
        SFTTrainer(model, tok, rows, SFTConfig(progress_bar=False, output_dir=str(tmp_path / "a")))


def test_sft_reads_a_messages_column_as_prompt_and_completion(tmp_path):
    """The conversational format of TRL's SFT datasets (one `messages` list per row) was refused for
    lacking prompt/completion columns: the last message, the assistant's, is the completion, the rest
    (system, earlier turns) its prompt, trained exactly as those two columns would be."""
    import json

    from r1fast.cli import main
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    system, user = {"role": "system", "content": "be brief"}, {"role": "user", "content": "3+4"}
    turns = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}, user]
    answer = {"role": "assistant", "content": "<answer>7</answer>"}
    convs = [{"messages": [user, answer], "level": 1}, {"messages": [system, *turns, answer], "level": 2}]
    columns = [{"prompt": [user], "completion": answer, "level": 1},
               {"prompt": [system, *turns], "completion": answer, "level": 2}]
    model, tok = tiny_model()
    cfg = SFTConfig(progress_bar=False, output_dir=str(tmp_path / "a"))
    assert SFTTrainer(model, tok, convs, cfg).examples == SFTTrainer(model, tok, columns, cfg).examples
    for bad, match in (([user, {"role": "user", "content": "7"}], "the last of its 'messages' is trained on and must "
                                                                  "be the assistant's; its role is 'user'"),
                       ([answer], "'messages' must be a list of two or more")):
        with pytest.raises(ValueError, match=rf"SFT dataset: row 1: {match}"):
            SFTTrainer(model, tok, [convs[0], {"messages": bad}], cfg)
    data = tmp_path / "chat.jsonl"   # and from the command line
    data.write_text("".join(json.dumps(r) + "\n" for r in convs))
    assert main(["sft", "model_name_or_path=builtin:micro", f"dataset={data}", "max_steps=1", "progress_bar=false",
                 f"output_dir={tmp_path / 'cli'}"]) == 0


def test_a_checkpoint_whose_replacement_was_killed_between_renames_is_resumed(tmp_path):
    # A save over an existing checkpoint-N renames it to .checkpoint-N.old-<pid>, then the new one in; killed
    # between the two, the complete old one was left under that name forever and a resume went back to
    # the checkpoint before it. (A visible checkpoint-N.old-<pid>, an earlier r1fast's name, may be the user's own
    # copy: only named, test_checkpoint_and_data::test_a_dated_copy_of_a_checkpoint_a_resume_set_aside_is_not_put_back)
    tr = make(tmp_path, "old", max_steps=4, save_steps=2, per_device_train_batch_size=8, num_generations=4)
    tr.train()
    run = tmp_path / "old"
    os.rename(run / "checkpoint-4", run / ".checkpoint-4.old-123")
    again = make(tmp_path, "old", max_steps=4, save_steps=2, per_device_train_batch_size=8, num_generations=4)
    again.train(resume=True)
    assert again.global_step == 4 and again.history == []   # resumed at step 4: nothing left to train
    assert not (run / ".checkpoint-4.old-123").exists()
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    # beside a complete checkpoint-4, the old one (now hidden) is only deleted
    (run / ".checkpoint-4.old-7").mkdir()
    make(tmp_path, "old", max_steps=4, per_device_train_batch_size=8, num_generations=4).train(resume=True)
    assert not (run / ".checkpoint-4.old-7").exists()


def test_a_users_dated_copy_of_a_checkpoint_in_the_run_folder_is_kept(tmp_path):
    """The replaced checkpoint was set aside as checkpoint-N.old-<pid>, and every resume deleted any
    checkpoint-N.old-<digits> beside checkpoint-N: the user's `cp -r checkpoint-4 checkpoint-4.old-20261129`; and
    beside a pruned checkpoint-N, put it back as checkpoint-N, which the next save pruned."""
    kw = dict(max_steps=4, save_steps=2, per_device_train_batch_size=8, num_generations=4, save_total_limit=1)
    make(tmp_path, "old", **kw).train()
    run = tmp_path / "old"
    shutil.copytree(run / "checkpoint-4", run / "checkpoint-4.old-20261129")
    shutil.copytree(run / "checkpoint-4", run / "checkpoint-2.old-20261128")   # of checkpoint-2, pruned since
    make(tmp_path, "old", **{**kw, "max_steps": 6}).train(resume=True)
    names = sorted(n for n in os.listdir(run) if "checkpoint" in n)
    assert names == ["checkpoint-2.old-20261128", "checkpoint-4.old-20261129", "checkpoint-6"]


def test_eval_rows_without_any_reference_answer_are_an_error_when_built(tmp_path):
    # eval/accuracy read 0.0 for held-out rows whose answers were all missing: it measured nothing
    model, tok = tiny_model()
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, output_dir=str(tmp_path), progress_bar=False)
    with pytest.raises(ValueError, match="eval dataset rows: no row has a reference answer in column 'answer'"):
        GRPOTrainer(model, [sevens], ROWS, cfg, tokenizer=tok, eval_dataset=[{"prompt": "1", "answer": None}] * 2)


def test_eval_samples_per_prompt_above_a_rollouts_completions_gets_engine_seats(tmp_path):
    # The evaluation decodes a held-out prompt's samples together on the rollout engine, whose seats were
    # one rollout's completions: 2 of them and eval_samples_per_prompt=4 failed at the first evaluation
    # ("n=4 samples exceed max_num_seqs=2"), in a pipeline's GRPO stage after its first eval_steps of training
    model, tok = tiny_model()
    cfg = GRPOConfig(per_device_train_batch_size=2, num_generations=2, max_completion_length=4, max_steps=1,
                     eval_samples_per_prompt=4, output_dir=str(tmp_path / "e"), progress_bar=False)
    assert cfg.rollout_max_num_seqs == 4
    tr = GRPOTrainer(model, [sevens], ROWS[2:], cfg, tokenizer=tok, eval_dataset=ROWS[:2])
    res = tr.train()
    assert res["final"]["eval/num_samples"] == 8
    # the same 4 samples per prompt give pass@4 and cons@4, in the result and in metrics.jsonl
    logged = [r for r in _metrics(tmp_path / "e" / "metrics.jsonl") if "eval/accuracy" in r][-1]
    assert {"eval/pass@4", "eval/cons@4"} <= set(res["final"]) and logged["eval/pass@4"] == res["final"]["eval/pass@4"]
    # seats set below it are refused when the trainer is built, naming both options
    cfg = GRPOConfig(per_device_train_batch_size=2, num_generations=2, engine_max_num_seqs=2,
                     eval_samples_per_prompt=4, output_dir=str(tmp_path / "f"), progress_bar=False)
    with pytest.raises(ValueError, match="'engine_max_num_seqs' = 2 is below eval_samples_per_prompt = 4"):
        GRPOTrainer(model, [sevens], ROWS[2:], cfg, tokenizer=tok, eval_dataset=ROWS[:2])


def test_engine_num_blocks_too_small_for_one_sequence_is_refused_when_built(tmp_path):
    # A pool that cannot hold one prompt + completion failed at the first rollout that drew a long prompt
    # ("needs 4 KV blocks; the pool has 3 (raise num_blocks or memory_fraction)"), naming no option
    model, tok = tiny_model()
    over = dict(per_device_train_batch_size=8, num_generations=4, max_prompt_length=24, max_completion_length=40,
                engine_block_size=16, output_dir=str(tmp_path / "e"), progress_bar=False)
    with pytest.raises(ValueError, match=r"option 'engine_num_blocks' = 3 cannot hold one sequence of 64 tokens.*"
                                         r"needs 4 blocks"):
        GRPOTrainer(model, [sevens], ROWS, GRPOConfig(engine_num_blocks=3, **over), tokenizer=tok)
    tr = GRPOTrainer(model, [sevens], ROWS, GRPOConfig(engine_num_blocks=4, max_steps=1, **over), tokenizer=tok)
    tr.train()


def test_progress_off_a_terminal_is_plain_lines_not_a_redrawn_bar(tmp_path, capsys):
    """A tqdm bar written to a file (a Slurm or nohup log) is one line of carriage returns growing
    with every step; off a terminal the trainers print a readable line now and then and at the end."""
    import io

    from r1fast.progress import LineProgress, progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert type(progress(3, "x", stream=io.StringIO())) is LineProgress
    assert type(progress(3, "x", stream=Terminal())) is not LineProgress   # tqdm's bar

    out = io.StringIO()
    bar = LineProgress(4, "grpo", initial=1, unit="steps", stream=out, interval=0.0)
    for step in (2, 3):
        bar.set_postfix(reward=f"{step / 10:.3f}")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["grpo: 2/4 steps (50%)", "grpo: 3/4 steps (75%)"]
    assert lines[0].endswith("reward=0.200") and lines[1].endswith("reward=0.300") and "left" in lines[1]

    out = io.StringIO()
    bar = LineProgress(5, "generate", unit="seq", stream=out, interval=3600.0)
    bar.update(2)
    bar.update(3)
    bar.close()
    bar.close()
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("generate: 5/5 seq (100%)")

    make(tmp_path, max_steps=2, progress_bar=True).train()
    err = capsys.readouterr().err
    assert "\r" not in err and "grpo: 2/2 steps (100%)" in err


def test_a_run_killed_in_its_first_save_leaves_no_temp_folder_behind(tmp_path):
    # A SIGKILL during a run's first save left ".tmp-checkpoint-<step>-*" (a whole model copy) and
    # save_pretrained's "..tmp-checkpoint-*" beside it; with no checkpoint there was nothing to resume,
    # and the new run started in the folder kept them until an overwrite
    run = tmp_path / "run"
    for left in (".tmp-checkpoint-3-k6rae195", "..tmp-checkpoint-3-k6rae195.tmp-8yy4ogqo"):   # as a SIGKILL leaves them
        (run / left).mkdir(parents=True)
        (run / left / "model.safetensors").write_bytes(b"\0" * 64)
    make(tmp_path, max_steps=1, per_device_train_batch_size=8, num_generations=4).train()
    assert not [n for n in os.listdir(run) if "tmp-checkpoint" in n]
    # a complete checkpoint left as checkpoint-N.old-<pid> is an earlier run's, which a new run refuses
    from r1fast.trainer.checkpoints import RunFolderInUse

    os.rename(run / "checkpoint-1", run / "checkpoint-1.old-123")
    with pytest.raises(RunFolderInUse, match="checkpoint-1"):
        make(tmp_path, max_steps=1, per_device_train_batch_size=8, num_generations=4).train()


def test_resume_says_which_checkpoint_and_step_it_continues_from(tmp_path, capsys):
    kw = dict(max_steps=4, save_steps=2, per_device_train_batch_size=8, num_generations=4)
    first = make(tmp_path, **kw)
    first.train(callback=lambda step, m: setattr(first, "_stop_requested", step >= 2))
    capsys.readouterr()
    make(tmp_path, **kw).train(resume=True)
    ck = tmp_path / "run" / "checkpoint-2"
    assert f"r1fast: resuming grpo from {ck} at step 2 of 4" in capsys.readouterr().err


def test_a_config_holding_reward_functions_saves_and_resumes(tmp_path):
    # GRPOConfig(reward_funcs=[a function]) trained until its first save, which failed in json.dump
    # ("Object of type function is not JSON serializable"): with save_steps=0, at the very end
    model, tok = tiny_model()
    cfg = GRPOConfig(reward_funcs=[sevens], per_device_train_batch_size=8, num_generations=4, max_steps=2,
                     max_completion_length=4, output_dir=str(tmp_path / "run"), progress_bar=False)
    ck = GRPOTrainer(model, None, ROWS, cfg, tokenizer=tok).train()["checkpoint"]
    recorded = json.load(open(os.path.join(ck, "trainer_state.json")))["config"]["reward_funcs"]
    assert recorded == [f"{sevens.__module__}:sevens"]   # the name reward_funcs reads it by
    model, tok = tiny_model()
    cfg.max_steps = 3
    assert GRPOTrainer(model, None, ROWS, cfg, tokenizer=tok).train(resume=True)["global_step"] == 3


def test_resume_with_other_options_names_them(tmp_path, capsys):
    # a new seed (another data order from the saved position), beta, dataset... were applied on resume
    # without a word; only the schedule's options and learning_rate were named
    kw = dict(max_steps=6, save_steps=2, per_device_train_batch_size=8, num_generations=4)
    first = make(tmp_path, **kw)
    first.train(callback=lambda step, m: setattr(first, "_stop_requested", step >= 2))
    capsys.readouterr()
    make(tmp_path, **{**kw, "max_steps": 4, "progress_bar": True}).train(resume=True)   # schedule, display only
    assert "options other than the checkpoint's" not in capsys.readouterr().err
    make(tmp_path, **{**kw, "seed": 4, "beta": 0.0, "output_dir": str(tmp_path / "run")}).train(resume=True)
    assert ("r1fast: resuming at step 4 with options other than the checkpoint's: seed 3 -> 4; the steps from "
            "here on use the new values") in capsys.readouterr().err


def test_a_bare_resume_without_a_checkpoint_starts_the_run(tmp_path, capsys):
    # a job that always passes --resume failed on its first launch, or after a preemption before its first
    # checkpoint ("--resume: no checkpoint found"), where a pipeline's --resume starts from its first stage
    kw = dict(max_steps=1, per_device_train_batch_size=8, num_generations=4)
    assert make(tmp_path, **kw).train(resume=True)["global_step"] == 1
    assert f"r1fast: --resume: no checkpoint in {tmp_path / 'run'}; starting from the first step" in \
        capsys.readouterr().err
    # a path named is still an error, which says it does not exist (it said "neither a checkpoint folder nor a run
    # folder holding checkpoint-<step> folders", as if the folder were there but wrong)
    with pytest.raises(ValueError, match=rf"^--resume '{re.escape(str(tmp_path))}/missing': no such file or folder$"):
        make(tmp_path, "other", **kw).train(resume=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a checkpoint folder"):   # there, but holding no checkpoint
        make(tmp_path, "other", **kw).train(resume=str(tmp_path / "empty"))


def test_a_chat_template_that_refuses_a_row_is_an_error_naming_it_before_training(tmp_path):
    # Gemma's and Mistral's templates raise_exception on a system message: GRPO encodes prompts as steps draw
    # them, so row 11 failed at step 4 with jinja's bare "TemplateError: System role not supported" (a traceback
    # from the CLI), after three steps of training
    from r1fast.data.tokenizer import CHAT_TEMPLATE
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    tok = build_char_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + CHAT_TEMPLATE)
    model, tok = tiny_model(tok=tok)
    rows = [{"prompt": str(i), "answer": "7", "completion": "7"} for i in range(16)]
    rows[11]["prompt"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "11"}]
    cfg = GRPOConfig(max_steps=4, per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                     output_dir=str(tmp_path / "run"), progress_bar=False)
    refused = r"row 11: the tokenizer's chat template cannot render a prompt of roles \['system', 'user'\] " \
              r"\(TemplateError: System role not supported\)"
    with pytest.raises(ValueError, match="train dataset: " + refused):
        GRPOTrainer(model, [sevens], rows, cfg, tokenizer=tok)
    with pytest.raises(ValueError, match="SFT dataset: " + refused):
        SFTTrainer(model, tok, rows, SFTConfig(progress_bar=False))
    assert not (tmp_path / "run").exists()
    # one refused for its content (check_prompts renders one prompt per sequence of roles): the row is named,
    # before SFT trains and at the GRPO step that draws it
    tok.chat_template = ("{% if messages[-1]['content'] == '11' %}{{ raise_exception('no 11') }}{% endif %}"
                         + CHAT_TEMPLATE)
    rows[11]["prompt"] = "11"
    refused = r"row 11: the tokenizer's chat template cannot render a prompt of roles \['user'\] " \
              r"\(TemplateError: no 11\)"
    with pytest.raises(ValueError, match="SFT dataset: " + refused):
        SFTTrainer(model, tok, rows, SFTConfig(progress_bar=False))
    tr = GRPOTrainer(model, [sevens], rows, cfg, tokenizer=tok)
    with pytest.raises(ValueError, match="train dataset: " + refused):
        tr._prompt_ids([rows[3], rows[11]], [3, 11])   # a step's prompts (the engine is not needed to see it)
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.evaluate import evaluate_accuracy
    from r1fast.trainer.sampling import rejection_sample

    with pytest.raises(ValueError, match="rejection sampling: dataset: " + refused):
        rejection_sample(model, tok, rows, SampleConfig(reward_funcs=["format"]), progress=False)
    with pytest.raises(ValueError, match="evaluation: held-out rows: " + refused):
        evaluate_accuracy(model, tok, rows, max_tokens=2)


def r1_distill_tokenizer():
    """The built-in tokenizer with a template whose generation prompt opens <think>, as DeepSeek-R1-Distill's does."""
    from r1fast.data.tokenizer import CHAT_TEMPLATE

    tok = build_char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("{% if add_generation_prompt %}<|assistant|>",
                                              "{% if add_generation_prompt %}<|assistant|><think>\n")
    return tok


def test_a_template_that_opens_think_gets_it_once_in_sft_and_in_kept_samples():
    """R1-Distill's generation prompt ends with "<think>\\n": a `messages` row whose answer opens <think> again
    trained on "<think>\\n<think>\\n...", and rejection sampling wrote completions without the opening, so a
    student with another template learned to close a block it never opened."""
    from r1fast.data import encode_prompt
    from r1fast.data.loading import prefilled_think
    from r1fast.trainer.config import SampleConfig, SFTConfig
    from r1fast.trainer.sampling import rejection_sample
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model(tok=r1_distill_tokenizer())
    assert prefilled_think(tok) == "<think>\n" and prefilled_think(build_char_tokenizer()) == ""
    answer = "<think>\n1+1=2\n</think><answer>2</answer>"
    rows = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": answer}]}]
    (p, c), = SFTTrainer(model, tok, rows, SFTConfig(progress_bar=False)).examples
    assert tok.decode(p + c) == "<bos><|user|>1+1=<|assistant|><think>\n1+1=2\n</think><answer>2</answer><eos>"
    assert p == encode_prompt(tok, "1+1=")
    # the built-in template opens nothing: the same answer is trained whole
    (_, c_plain), = SFTTrainer(tiny_model()[0], build_char_tokenizer(), rows, SFTConfig(progress_bar=False)).examples
    assert build_char_tokenizer().decode(c_plain) == answer + "<eos>"

    kept, _ = rejection_sample(model, tok, [{"prompt": "1+1=", "answer": "2"}],
                               SampleConfig(reward_funcs=[lambda prompts, completions, **kw: [1.0] * len(completions)],
                                            num_samples=2, max_completion_length=6, keep_truncated=True,
                                            progress_bar=False), progress=False)
    assert kept and all(r["completion"].startswith("<think>\n") for r in kept)
    # a prompt that continues the assistant's own message gets no generation prompt, and so no opening
    continued = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "Sure."}]
    kept_on, _ = rejection_sample(model, tok, [{"prompt": continued, "answer": "2"}],
                                  SampleConfig(reward_funcs=[lambda prompts, completions, **kw: [1.0] * len(completions)],
                                               num_samples=1, max_completion_length=6, keep_truncated=True,
                                               progress_bar=False), progress=False)
    assert not kept_on[0]["completion"].startswith("<think>\n")
    (_, c_on), = SFTTrainer(model, tok, [{"prompt": continued, "completion": answer}], SFTConfig(progress_bar=False)).examples
    assert tok.decode(c_on) == answer + "<eos>"
    # SFT of the same model on its kept samples leaves the opening to the prompt again
    (p, c), = SFTTrainer(model, tok, kept[:1], SFTConfig(progress_bar=False)).examples
    assert tok.decode(p + c, skip_special_tokens=False).count("<think>") == 1


def _stepped_gradients(monkeypatch):
    """The gradients each AdamW step applies (an fp16 model's: its fp32 copies'), as the step starts."""
    stepped = []
    step = torch.optim.AdamW.step

    def spy(self, closure=None):
        stepped.append([p.grad.double().clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return step(self, closure)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return stepped


def _logprob_times(grouped_logprob, factor):
    """grouped_logprob with its log-probs times `factor`; SFT's argmax hits (a tuple's last output) as they are."""
    def scaled(*a, **k):
        out = grouped_logprob(*a, **k)
        return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor
    return scaled


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_fp16_training_scales_the_loss_so_small_gradients_survive(tmp_path, monkeypatch, stage):
    """fp16 flushes gradients below 6e-8 to zero: at a token mean over a large batch most of a model's
    gradients were 0 (measured: 90% at 64k tokens, 48% of the signs AdamW steps wrong), silently. The
    backward now runs on loss * S (dynamic loss scaling; GRPO's fused loss forms its gradients at S too)
    and the fp32 copies' gradients are divided by S."""
    from r1fast import ops
    from r1fast.trainer import SFTConfig, sft

    # the loss of a batch 2^20 times larger than this one: gradients of 1e-8 and less
    if stage == "grpo":
        loss_options = GRPOConfig.loss_options
        monkeypatch.setattr(GRPOConfig, "loss_options", lambda self, n=None: loss_options(self, n and n * 2.0 ** 20))
    else:
        monkeypatch.setattr(ops, "grouped_logprob", _logprob_times(ops.grouped_logprob, 2.0 ** -20))
    stepped = _stepped_gradients(monkeypatch)

    def first_step(dtype):
        model, tok = tiny_model()
        model = model.half().to(dtype)
        common = dict(per_device_train_batch_size=8, progress_bar=False, output_dir=str(tmp_path / str(dtype)))
        if stage == "grpo":
            tr = GRPOTrainer(model, [_lengths], ROWS, GRPOConfig(max_completion_length=6, **common), tokenizer=tok)
            return tr.step()["metrics"]
        rows = [{"prompt": str(i), "completion": "7" * (1 + i % 3)} for i in range(16)]
        return sft.SFTTrainer(model, tok, rows, SFTConfig(**common)).step()

    fp32, fp16 = first_step(torch.float32), first_step(torch.float16)
    want, got = stepped
    err = float(torch.stack([(a - b).norm() for a, b in zip(got, want)]).norm() /
                torch.stack([b.norm() for b in want]).norm())
    assert err < 1e-2                                  # fp16's rounding, not its underflow (about 0.9 unscaled)
    assert fp16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=1e-2)   # the norm of the unscaled gradients
    assert "loss_scale" not in fp32 and fp16["loss_scale"] == 2.0 ** 16 and fp16["nonfinite_skipped"] == 0


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_fp16_overflow_halves_the_loss_scale_and_skips_the_step(tmp_path, stage):
    """An inf gradient of a finite loss under a loss scale is an overflow: the step is skipped (counted in
    nonfinite_skipped) and the scale halved, without counting towards max_nonfinite_steps; the scale
    travels in the checkpoint."""
    import math

    from r1fast.trainer import SFTConfig, sft

    def trainer(name):
        model, tok = tiny_model()
        common = dict(per_device_train_batch_size=8, learning_rate=1e-3, max_nonfinite_steps=1, max_steps=3,
                      progress_bar=False, output_dir=str(tmp_path / name))
        if stage == "grpo":
            return GRPOTrainer(model.half(), [_lengths], ROWS, GRPOConfig(max_completion_length=6, **common),
                               tokenizer=tok)
        rows = [{"prompt": str(i), "completion": "7" * (1 + i % 3)} for i in range(24)]
        return sft.SFTTrainer(model.half(), tok, rows, SFTConfig(**common))

    tr = trainer("run")
    tr.loss_scale.scale = 2.0 ** 60   # any gradient times 2^60 overflows fp16 (65504)
    before = [p.detach().clone() for p in tr.model.parameters()]
    m = tr.step()
    m = m["metrics"] if stage == "grpo" else m
    assert math.isfinite(m["loss"]) and tr.nonfinite_skipped == 1 and m["nonfinite_skipped"] == 1
    assert tr.loss_scale.scale == 2.0 ** 59 == m["loss_scale"]
    assert all(torch.equal(p, q) for p, q in zip(tr.model.parameters(), before))   # no update applied
    tr.loss_scale.scale = 2.0 ** 10
    tr.step()
    assert tr.nonfinite_skipped == 1 and tr.loss_scale.good_steps == 1
    assert any(not torch.equal(p, q) for p, q in zip(tr.model.parameters(), before))
    path = tr.save()
    again = trainer("run")
    again.load(path)
    assert (again.loss_scale.scale, again.loss_scale.good_steps) == (2.0 ** 10, 1)


def test_fp16_nan_loss_leaves_the_loss_scale_alone(tmp_path, monkeypatch):
    """A NaN loss is no fp16 overflow (the loss is formed before the scale): its skipped step must not halve the
    scale, which only costs the gradients precision, nor reset the count towards doubling it."""
    from r1fast import ops
    from r1fast.trainer import SFTConfig, sft

    model, tok = tiny_model()
    rows = [{"prompt": str(i), "completion": "7"} for i in range(8)]
    tr = sft.SFTTrainer(model.half(), tok, rows, SFTConfig(per_device_train_batch_size=8, progress_bar=False,
                                                            output_dir=str(tmp_path / "run")))
    tr.loss_scale.good_steps = 5
    monkeypatch.setattr(ops, "grouped_logprob", _logprob_times(ops.grouped_logprob, float("nan")))
    m = tr.step()
    assert tr.nonfinite_skipped == 1 and m["loss_scale"] == 2.0 ** 16 and tr.loss_scale.good_steps == 5


def test_fp16_without_fp32_gradient_sums_warns_that_no_loss_is_scaled(tmp_path, caplog):
    """The loss scale is divided out of the fp32 copies' gradients; without them fp16 trains unscaled, and says so."""
    import logging

    from r1fast.trainer import SFTConfig, sft

    rows = [{"prompt": str(i), "completion": "7"} for i in range(8)]

    def fp16_trainer(name, **over):
        model, tok = tiny_model()
        return sft.SFTTrainer(model.half(), tok, rows, SFTConfig(output_dir=str(tmp_path / name), **over))

    with caplog.at_level(logging.WARNING, logger="r1fast.trainer.common"):
        assert fp16_trainer("scaled").loss_scale is not None and "without loss scaling" not in caplog.text
        assert fp16_trainer("plain", fp32_grad_accumulation=False).loss_scale is None
    assert "float16 parameters without fp32_master_weights and fp32_grad_accumulation train without loss " \
           "scaling" in caplog.text
    assert make(tmp_path, "fp32").loss_scale is None   # fp32 and bf16 need none


def test_loss_scale_halves_on_overflow_and_doubles_after_a_run_of_finite_steps():
    from r1fast.trainer.loss_scale import LossScale

    s = LossScale(scale=8.0, growth_interval=3)
    for finite in (True, True, False, True, True):
        s.update(finite)
    assert (s.scale, s.good_steps) == (4.0, 2)   # the overflow reset the count
    s.update(True)
    assert (s.scale, s.good_steps) == (8.0, 0)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), 24.0)
    s.unscale_([p, torch.nn.Parameter(torch.zeros(1))])   # a tensor without a gradient is passed over
    assert torch.equal(p.grad, torch.full((3,), 3.0))
    fresh = LossScale()
    fresh.load_state_dict(s.state_dict())
    assert (fresh.scale, fresh.good_steps) == (8.0, 0)
    fresh.load_state_dict(None)   # a checkpoint of a run without one keeps the start values
    with pytest.raises(ValueError, match="trainer_state.json: loss_scale is"):
        fresh.load_state_dict({"scale": -1.0, "good_steps": 0})


def thinking_switch_tokenizer():
    """The built-in tokenizer with a template whose generation prompt opens <think> only when asked (`thinking`,
    as DeepSeek-V3.1's template reads it)."""
    from r1fast.data.tokenizer import CHAT_TEMPLATE

    tok = build_char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("{% if add_generation_prompt %}<|assistant|>",
                                              "{% if add_generation_prompt %}<|assistant|>"
                                              "{% if thinking %}<think>\n{% endif %}")
    return tok


def test_chat_template_kwargs_template_grpo_sft_and_sampling_prompts(tmp_path):
    # no option passed the template's own variables: every prompt was rendered with the template's defaults
    from r1fast.data import encode_prompt
    from r1fast.trainer.common import option_change_note
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    on = {"thinking": True}
    model, tok = tiny_model(tok=thinking_switch_tokenizer())
    opened = encode_prompt(tok, "1+1=", chat_template_kwargs=on)
    assert tok.decode(opened) == "<bos><|user|>1+1=<|assistant|><think>\n" and opened != encode_prompt(tok, "1+1=")
    answer = "<think>\n1+1=2\n</think><answer>2</answer>"
    rows = [{"prompt": "1+1=", "completion": answer}]
    (p, c), = SFTTrainer(model, tok, rows, SFTConfig(progress_bar=False, chat_template_kwargs=on)).examples
    assert p == opened and tok.decode(c) == answer[len("<think>\n"):] + "<eos>"   # the opening is the prompt's
    kept = _kept_samples(model, tok, on)
    assert kept and all(r["completion"].startswith("<think>\n") for r in kept)
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                     output_dir=str(tmp_path / "run"), progress_bar=False, chat_template_kwargs=on)
    tr = GRPOTrainer(model, [sevens], ROWS[:4], cfg, tokenizer=tok)
    assert tr._prompt_ids(ROWS[:1], [0]) == [encode_prompt(tok, "0", chat_template_kwargs=on)]
    # a checkpoint records them (its state's config), and a resume with others names the change
    state = json.loads(json.dumps({"config": cfg.to_json_dict()}))
    assert state["config"]["chat_template_kwargs"] == on
    note = option_change_note(state, GRPOConfig(**{**cfg.to_dict(), "chat_template_kwargs": {"thinking": False}})
                              .to_json_dict(), 3)
    assert "options other than the checkpoint's: chat_template_kwargs {'thinking': True} -> {'thinking': False}" in note


def _kept_samples(model, tok, chat_template_kwargs):
    """Two samples of "1+1=" kept whatever they say, prompted with these chat_template_kwargs."""
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.sampling import rejection_sample

    always = [lambda prompts, completions, **kw: [1.0] * len(completions)]
    kept, _ = rejection_sample(model, tok, [{"prompt": "1+1=", "answer": "2"}],
                               SampleConfig(reward_funcs=always, num_samples=2, max_completion_length=4,
                                            keep_truncated=True, progress_bar=False,
                                            chat_template_kwargs=chat_template_kwargs), progress=False)
    return kept


def test_an_empty_reasoning_block_the_prompt_closes_is_not_trained_twice():
    # Qwen3's template with enable_thinking: false ends its generation prompt with "<think>\n\n</think>\n\n": a
    # completion recorded with that block (the assistant's whole turn) trained on it twice, and sampling kept
    # completions without it
    from r1fast.data.loading import prefilled_think
    from r1fast.data.tokenizer import CHAT_TEMPLATE
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    tok = build_char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace(
        "<|assistant|>{% endif %}",
        "<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
        "{% endif %}{% endif %}")
    off = {"enable_thinking": False}
    assert prefilled_think(tok, off) == "<think>\n\n</think>\n\n" and prefilled_think(tok) == ""
    model, tok = tiny_model(tok=tok)
    rows = [{"prompt": "1+1=", "completion": "<think>\n\n</think>\n\n<answer>2</answer>"}]
    (p, c), = SFTTrainer(model, tok, rows, SFTConfig(progress_bar=False, chat_template_kwargs=off)).examples
    assert tok.decode(p + c) == "<bos><|user|>1+1=<|assistant|><think>\n\n</think>\n\n<answer>2</answer><eos>"
    (p, c), = SFTTrainer(model, tok, [{"prompt": "1+1=", "completion": "<answer>2</answer>"}],
                         SFTConfig(progress_bar=False, chat_template_kwargs=off)).examples
    assert tok.decode(c) == "<answer>2</answer><eos>"
    kept = _kept_samples(model, tok, off)
    assert kept and all(r["completion"].startswith("<think>\n\n</think>\n\n") for r in kept)


def test_stop_tokens_end_completions_in_the_engine_and_leave_the_rewards_text(tmp_path):
    """Only the tokenizer's and the model's eos ended a completion: a base model whose chat template ends the
    assistant's turn with another special token (Qwen2.5's <|im_end|>) wrote on to max_completion_length."""
    from dataclasses import replace

    from r1fast.data.loading import decode_completion

    model, tok = tiny_model()
    stop = tok.convert_tokens_to_ids("<|assistant|>")
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_steps=1, max_completion_length=12,
                     output_dir=str(tmp_path / "o"), progress_bar=False, seed=3, stop_tokens=["<|assistant|>"])
    tr = GRPOTrainer(model, [sevens], ROWS[:4], cfg, tokenizer=tok)
    assert tr.stop_ids == [tok.eos_token_id, stop] and tr.end_ids == [tok.eos_token_id, stop]
    _, stopped, _, finish = tr.generate(ROWS[:2], [0, 1], 4, 1.0, 5)
    # the same draws without the extra stop: each stopped completion is its run-on twin cut after the first stop
    params = tr._sampling_params(4, 1.0, 5)
    run_on = [c.token_ids for r in tr.engine.generate(tr._prompt_ids(ROWS[:2], [0, 1]),
                                                      replace(params, stop_token_ids=[tok.eos_token_id]))
              for c in r.completions]
    assert sum(stop in ids for ids in run_on) >= 2   # this seed draws the stop token: the test has teeth
    for ids, twin, why in zip(stopped, run_on, finish):
        twin = list(twin)
        assert ids == (twin[:twin.index(stop) + 1] if stop in twin else twin)
        assert why == ("stop" if stop in twin else "length")
        # the rewards see the text before the stop token, as for eos
        assert decode_completion(tok, ids, tr.end_ids) == tok.decode(ids[:-1] if ids[-1] == stop else ids)


def _tokenizer_ending_turns_with(end: str):
    """The built-in tokenizer with a Qwen-like template: the assistant's turn closes with `end`, not with eos."""
    from r1fast.data.tokenizer import CHAT_TEMPLATE

    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE.replace("{{ message['content'] }}{{ eos_token }}",
                                              "{{ message['content'] }}" + end)
    return tok


def test_a_template_ending_turns_with_a_token_that_is_no_stop_is_warned_of_once(tmp_path, monkeypatch):
    import warnings

    from r1fast.data import loading
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.evaluate import evaluate_accuracy
    from r1fast.trainer.sampling import rejection_sample

    monkeypatch.setattr(loading, "_WARNED_TURN_END", set())
    tok = _tokenizer_ending_turns_with("<|im_end|>\n")
    assert loading.turn_end_token(tok) == ("<|im_end|>", len(tok) - 1)
    model, _ = tiny_model(tok=tok)
    rows = [{"prompt": "1", "answer": "1"}]
    cfg = dict(per_device_train_batch_size=2, num_generations=2, max_steps=1, max_completion_length=2,
               output_dir=str(tmp_path / "o"), progress_bar=False)
    with pytest.warns(UserWarning, match=rf"ends the assistant's turn with '<\|im_end\|>' \(id {len(tok) - 1}\), but "
                                         r"completions stop only at \['<eos>'\].*add it to the option 'stop_tokens'"):
        GRPOTrainer(model, [sevens], rows, GRPOConfig(**cfg), tokenizer=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GRPOTrainer(model, [sevens], rows, GRPOConfig(**cfg), tokenizer=tok)   # said once
        monkeypatch.setattr(loading, "_WARNED_TURN_END", set())
        # stopped at, or a template whose turn ends with eos (the built-in one) or with plain text: nothing to say
        tr = GRPOTrainer(model, [sevens], rows, GRPOConfig(**cfg, stop_tokens=["<|im_end|>"]), tokenizer=tok)
        evaluate_accuracy(model, tok, rows, max_tokens=2, stop_tokens=["<|im_end|>"], engine=tr.engine)
        GRPOTrainer(tiny_model()[0], [sevens], rows, GRPOConfig(**cfg), tokenizer=build_char_tokenizer())
        GRPOTrainer(model, [sevens], rows, GRPOConfig(**cfg), tokenizer=_tokenizer_ending_turns_with("\n###\n"))
    # the evaluation and rejection sampling name their own option
    with pytest.warns(UserWarning, match=r"add it to the option 'eval_stop_tokens'"):
        evaluate_accuracy(model, tok, rows, max_tokens=2, stop_option="eval_stop_tokens", engine=tr.engine)
    monkeypatch.setattr(loading, "_WARNED_TURN_END", set())
    with pytest.warns(UserWarning, match=r"add it to the option 'stop_tokens'"):
        rejection_sample(model, tok, rows, SampleConfig(num_samples=1, max_completion_length=2), progress=False)
    # a pipeline's GRPO stage named 'stop_tokens', which the user sets there as <stage>.stop_tokens
    monkeypatch.setattr(loading, "_WARNED_TURN_END", set())
    with pytest.warns(UserWarning, match=r"""add it to the option 'rl.stop_tokens' \('rl.stop_tokens=\["<\|im_end\|>"\]'\)"""):
        GRPOTrainer(model, [sevens], rows, GRPOConfig(**cfg), tokenizer=tok, stage_name="rl", eval_at_ends=False)
    with pytest.raises(ValueError, match=r"option 'rl.stop_tokens': '</s>' must be exactly one token"):
        GRPOTrainer(model, [sevens], rows, GRPOConfig(**cfg, stop_tokens=["</s>"]), tokenizer=tok, stage_name="rl",
                    eval_at_ends=False)


def test_a_pipelines_turn_end_warning_names_each_stage_and_option_that_draws(tmp_path, monkeypatch):
    # a pipeline's sample stage was told to set 'stop_tokens' (no stage), and once one stage had warned, the
    # next stages and the held-out evaluation (eval_stop_tokens) drew without a word
    import warnings

    from r1fast.data import loading
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.evaluate import evaluate_accuracy
    from r1fast.trainer.sampling import rejection_sample

    monkeypatch.setattr(loading, "_WARNED_TURN_END", set())
    tok = _tokenizer_ending_turns_with("<|im_end|>\n")
    model, _ = tiny_model(tok=tok)
    rows = [{"prompt": "1", "answer": "1"}]
    cfg = GRPOConfig(per_device_train_batch_size=2, num_generations=2, max_steps=1, max_completion_length=2,
                     output_dir=str(tmp_path / "o"), progress_bar=False, eval_steps=1)
    with pytest.warns(UserWarning, match=r"r1fast: pipeline stage 'rl': the chat template ends .* add it to the "
                                         r"option 'rl.stop_tokens'"):
        tr = GRPOTrainer(model, [sevens], rows, cfg, tokenizer=tok, stage_name="rl", eval_at_ends=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.evaluate(rows)   # the stage's own evaluation (eval_steps) draws with the stage's stops: said already
    with pytest.warns(UserWarning, match=r"r1fast: pipeline stage 'rs': .* add it to the option 'rs.stop_tokens' "
                                         r"""\('rs.stop_tokens=\["<\|im_end\|>"\]'\)"""):
        rejection_sample(model, tok, rows, SampleConfig(num_samples=1, max_completion_length=2), progress=False,
                         stop_option="rs.stop_tokens")
    with pytest.raises(ValueError, match=r"option 'rs.stop_tokens': '</s>' must be exactly one token"):
        rejection_sample(model, tok, rows, SampleConfig(stop_tokens=["</s>"]), progress=False,
                         stop_option="rs.stop_tokens")
    with pytest.warns(UserWarning, match=r"r1fast: the chat template ends .* add it to the option 'eval_stop_tokens' "
                                         r"\(eval_stop_tokens: \['<\|im_end\|>'\]\)"):
        evaluate_accuracy(model, tok, rows, max_tokens=2, stop_option="eval_stop_tokens", engine=tr.engine)


def test_a_stop_token_that_is_not_one_token_is_an_error_naming_it(tmp_path):
    from r1fast.data.loading import resolve_stop_tokens
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.evaluate import evaluate_accuracy
    from r1fast.trainer.sampling import rejection_sample

    tok = build_char_tokenizer()
    assert resolve_stop_tokens(tok, ["<|user|>", "\n", "<eos>"]) == [8, tok("\n").input_ids[0], tok.eos_token_id]
    assert resolve_stop_tokens(tok, None) == []
    # a lone string (evaluate_accuracy(stop_tokens="<|user|>"), an edited Pipeline.eval_stop_tokens) is one token's
    # text: it was iterated, stopping at each character ('<', '|', 'u', 's', 'e', 'r', ...)
    assert resolve_stop_tokens(tok, "<|user|>") == [8]
    with pytest.raises(ValueError, match=r"option 'stop_tokens': '<\|im_end\|>' must be exactly one token of the "
                                         r"tokenizer, but it encodes to 10 tokens \['<', '\|', 'i'"):
        resolve_stop_tokens(tok, ["<|im_end|>"])
    with pytest.raises(ValueError, match=r"'é' must be exactly one token .* encodes to the unknown token"):
        resolve_stop_tokens(tok, ["é"])
    model, _ = tiny_model()
    rows = [{"prompt": "1", "answer": "1"}]
    with pytest.raises(ValueError, match=r"option 'stop_tokens': '</s>' must be exactly one token"):
        GRPOTrainer(model, [sevens], rows, GRPOConfig(per_device_train_batch_size=2, num_generations=2,
                                                      output_dir=str(tmp_path / "o"), stop_tokens=["</s>"]),
                    tokenizer=tok)
    with pytest.raises(ValueError, match=r"option 'eval_stop_tokens': '</s>' must be exactly one token"):
        evaluate_accuracy(model, tok, rows, stop_tokens=["</s>"], stop_option="eval_stop_tokens")
    with pytest.raises(ValueError, match=r"option 'stop_tokens': '</s>' must be exactly one token"):
        rejection_sample(model, tok, rows, SampleConfig(stop_tokens=["</s>"]), progress=False)


def _cut_at(stop):
    """What draws give when `stop` ends them: the text before it, the token itself left out."""
    return lambda text: text.split(stop)[0]


def test_stop_tokens_end_the_evaluations_completions():
    from r1fast.trainer.evaluate import evaluate_accuracy

    model, tok = tiny_model()
    rows, stop = ROWS[:2], "<|assistant|>"
    cut = _cut_at(stop)

    def evaluated(**kw):
        res, samples = evaluate_accuracy(model, tok, rows, samples_per_prompt=4, max_tokens=12, seed=5,
                                         return_samples=True, **kw)
        return res, [s["completion"] for s in samples]

    res, run_on = evaluated()
    assert sum(stop in t for t in run_on) >= 2   # this seed draws the stop token: the test has teeth
    res_stopped, stopped = evaluated(stop_tokens=[stop])
    assert stopped == [cut(t) for t in run_on] and res_stopped["eval/completion_length"] < res["eval/completion_length"]


def test_stop_tokens_end_the_rejection_samplings_completions():
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.sampling import rejection_sample

    model, tok = tiny_model()
    rows, stop = ROWS[:2], "<|assistant|>"
    cut = _cut_at(stop)

    def sampled(**kw):
        cfg = SampleConfig(num_samples=4, keep_per_prompt=4, keep_truncated=True, max_completion_length=12, seed=3,
                           reward_funcs=["format"], reward_thresholds=[0.0], progress_bar=False, **kw)
        kept, stats = rejection_sample(model, tok, rows, cfg, progress=False)
        return {(r["prompt"], r["completion"]) for r in kept}, stats

    kept, stats = sampled()
    kept_stopped, stats_stopped = sampled(stop_tokens=[stop])
    assert sum(stop in t for _, t in kept) >= 2
    assert kept_stopped == {(p, cut(t)) for p, t in kept}
    assert stats_stopped["truncated"] == stats["truncated"] - sum(stop in t for _, t in kept)


def test_a_dict_of_columns_as_dataset_is_named_not_a_key_error():
    # {"prompt": [...], "answer": [...]} (datasets.Dataset.from_dict's input) was indexed as rows: KeyError: 0
    from r1fast.trainer.common import dataset_rows

    with pytest.raises(TypeError, match=r"train dataset is a dict \(columns \['answer', 'prompt'\]\); give a list of "
                                        r"row dicts or datasets.Dataset.from_dict"):
        dataset_rows({"prompt": ["1+1"], "answer": ["2"]}, "train", split=None, seed=0)
    model, tok = tiny_model()
    with pytest.raises(TypeError, match="SFT dataset is a dict"):
        from r1fast.trainer.sft import SFTTrainer
        SFTTrainer(model, tok, {"prompt": ["1"], "completion": ["2"]})



def test_a_datasets_dataset_dict_reads_its_split_as_a_saved_one_does():
    # load_dataset(...) without split= gives a DatasetDict, a dict of splits: it was refused as
    # "a dict (columns ['test', 'train'])"; now its train split (or dataset_split, or eval's test split) is read
    datasets = pytest.importorskip("datasets")
    from r1fast.data.loading import EVAL_SPLITS
    from r1fast.trainer.common import dataset_rows

    dd = datasets.DatasetDict(train=datasets.Dataset.from_list([{"prompt": "1+1", "answer": "2"}]),
                              test=datasets.Dataset.from_list([{"prompt": "2+2", "answer": "4"}]))
    assert dataset_rows(dd, "train", split=None, seed=0) == [{"prompt": "1+1", "answer": "2"}]
    assert dataset_rows(dd, "eval", split=None, seed=0, default_splits=EVAL_SPLITS)[0]["prompt"] == "2+2"
    assert dataset_rows(dd, "train", split="test", seed=0)[0]["prompt"] == "2+2"
    with pytest.raises(ValueError, match=r"train dataset \(a DatasetDict\) has no split 'dev'; splits: "
                                         r"\['train', 'test'\]"):
        dataset_rows(dd, "train", split="dev", seed=0)


def test_a_pandas_dataframe_as_dataset_is_named_not_a_key_error():
    # a DataFrame has __getitem__ and __len__ as a datasets.Dataset does, but df[0] is its column 0: KeyError: 0
    pd = pytest.importorskip("pandas")
    from r1fast.trainer.common import dataset_rows

    df = pd.DataFrame({"prompt": ["1+1"], "answer": ["2"]})
    with pytest.raises(TypeError, match=r"eval dataset is a pandas DataFrame \(columns \['prompt', 'answer'\]\); "
                                        r"give datasets.Dataset.from_pandas\(df\)"):
        dataset_rows(df, "eval", split=None, seed=0)


def test_an_empty_datasets_dataset_is_named_not_an_index_error():
    # SFTTrainer, rejection_sample and evaluate_accuracy said "empty" for an empty list only: an empty
    # datasets.Dataset (a filter that kept nothing) became [] and failed with IndexError at rows[0]
    datasets = pytest.importorskip("datasets")
    from r1fast.trainer.evaluate import evaluate_accuracy
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    empty = datasets.Dataset.from_dict({"prompt": [], "completion": [], "answer": []})
    with pytest.raises(ValueError, match=r"SFT dataset is empty \(Dataset of 0 rows\)"):
        SFTTrainer(model, tok, empty)
    with pytest.raises(ValueError, match="evaluation: held-out dataset is empty"):
        evaluate_accuracy(model, tok, empty)
    with pytest.raises(ValueError, match="dataset is empty"):
        GRPOTrainer(model, ["format"], empty, GRPOConfig(progress_bar=False), tokenizer=tok)

@pytest.mark.parametrize("which", ["grpo", "grpo_eval", "sft", "sample"])
def test_a_wrong_dataset_path_is_said_before_the_model_loads(tmp_path, monkeypatch, which):
    # the model (minutes for a large one) was loaded first, then the dataset path failed
    from r1fast.trainer import common
    from r1fast.trainer.config import SampleConfig, SFTConfig
    from r1fast.trainer.sampling import rejection_sample
    from r1fast.trainer.sft import SFTTrainer

    def no_load(*a, **kw):
        raise AssertionError("the model loaded before the dataset was read")

    monkeypatch.setattr(common, "load_model_and_tokenizer", no_load)
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises((ValueError, FileNotFoundError), match="missing.jsonl"):
        if which == "grpo":
            GRPOTrainer("builtin:micro", ["format"], missing, GRPOConfig(progress_bar=False))
        elif which == "grpo_eval":   # the held-out rows too: they were read after the model had loaded
            GRPOTrainer("builtin:micro", ["format"], ROWS, GRPOConfig(progress_bar=False), eval_dataset=missing)
        elif which == "sft":
            SFTTrainer("builtin:micro", None, missing, SFTConfig(progress_bar=False))
        else:
            rejection_sample("builtin:micro", None, missing, SampleConfig(progress_bar=False), progress=False)


def test_evaluate_reads_a_path_and_says_when_it_has_nothing_to_evaluate(tmp_path):
    # evaluate("test.jsonl") iterated the path's characters ("must be a non-empty list of row dicts"), and
    # evaluate() on a trainer without an eval dataset returned {}, as if it had evaluated
    model, tok = tiny_model()
    cfg = GRPOConfig(per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
                     output_dir=str(tmp_path / "p"), progress_bar=False, format_pattern=r".*")
    tr = GRPOTrainer(model, ["format"], ROWS, cfg, tokenizer=tok)
    with pytest.raises(ValueError, match=r"GRPOTrainer.evaluate: no held-out rows; pass them \(evaluate\(rows\)\)"):
        tr.evaluate()
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    ev = tr.evaluate(str(data))
    assert ev["eval/format"] == 1.0 and ev["eval/num_samples"] == 3


def test_reward_functions_given_to_the_trainer_are_what_the_checkpoint_records(tmp_path, capsys):
    # GRPOTrainer(model, [sevens], ...) recorded the config's default reward_funcs [accuracy, format] in its
    # checkpoint (and tracker config), and a resume given the same functions through the config said "options
    # other than the checkpoint's: reward_funcs ['accuracy', 'format'] -> ['...:sevens']", though nothing changed
    from r1fast.trainer.config import _callable_name

    tr = make(tmp_path, max_steps=1, per_device_train_batch_size=4, num_generations=2)
    assert tr.cfg.reward_funcs == [sevens] and tr.cfg.to_json_dict()["reward_funcs"] == [_callable_name(sevens)]
    tr.train()
    capsys.readouterr()
    model, tok = tiny_model()
    cfg = GRPOConfig(max_steps=2, per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                     output_dir=str(tmp_path / "run"), progress_bar=False, seed=3, reward_funcs=[sevens])
    GRPOTrainer(model, None, ROWS, cfg, tokenizer=tok).train(resume=True)
    said = "".join(capsys.readouterr())
    assert "resuming grpo" in said and "reward_funcs" not in said
    cfg = GRPOConfig()
    GRPOTrainer(tiny_model()[0], [sevens], ROWS, cfg, tokenizer=tiny_model()[1])
    assert cfg.reward_funcs == ["accuracy", "format"]   # the caller's config is left as it was


def test_a_reward_object_holding_a_lock_is_recorded_by_name_not_copied(tmp_path):
    # a reward function object (a judge holding a model, a cache behind a lock) in the trainer's config (given in a
    # RewardSet or a list): to_dict deep-copied it, so the run's first log failed with "cannot pickle
    # '_thread.lock' object" (and a judge's model would have been copied); it is now kept as it is, named in JSON
    import threading

    from r1fast.rewards import RewardSet

    class Judge:
        def __init__(self):
            self.lock = threading.Lock()

        def __call__(self, completions, **kw):
            return [c.count("7") / max(len(c), 1) for c in completions]

    judge = Judge()
    model, tok = tiny_model()
    tr = GRPOTrainer(model, RewardSet([judge, "format"]), ROWS, GRPOConfig(output_dir=str(tmp_path / "r")),
                     tokenizer=tok)
    assert tr.cfg.to_dict()["reward_funcs"][0] is judge
    named = json.loads(json.dumps(tr.cfg.to_json_dict()))["reward_funcs"]
    assert named == [f"{Judge.__module__}:{Judge.__qualname__}", "format"]


def test_two_lambdas_are_recorded_under_names_of_their_own(tmp_path):
    # two lambdas (or two closures of one factory) were both recorded as "__main__:<lambda>" in the checkpoint's
    # config and the tracker's: which metric column (<lambda>, <lambda>_2) was which function was lost
    low = lambda prompts, completions, **kw: [0.25] * len(completions)   # noqa: E731
    high = lambda prompts, completions, **kw: [0.75] * len(completions)   # noqa: E731
    model, tok = tiny_model()
    tr = GRPOTrainer(model, [low, high, sevens, low], ROWS, GRPOConfig(output_dir=str(tmp_path / "run")),
                     tokenizer=tok)
    name = f"{__name__}:test_two_lambdas_are_recorded_under_names_of_their_own.<locals>.<lambda>"
    # one function given twice keeps its (loadable) name; "#" never makes the name of another function
    recorded = json.loads(json.dumps(tr.cfg.to_json_dict()))["reward_funcs"]
    assert recorded == [name, name + "#2", f"{__name__}:sevens", name]
    assert tr.rewards.names == ["<lambda>", "<lambda>_2", "sevens", "<lambda>_3"]   # the metric columns


def test_a_tokenizer_in_grpo_trainers_reward_funcs_place_is_named(tmp_path):
    # GRPOTrainer(model, tok, rows, cfg), SFTTrainer's argument order: the (callable) tokenizer was taken for a
    # reward function and the error said only "a tokenizer is required to decode completions"
    model, tok = tiny_model()
    with pytest.raises(TypeError, match=r"reward_funcs is a tokenizer; GRPOTrainer's arguments are \(model, "
                                        r"reward_funcs, train_dataset, config, tokenizer=...\)"):
        GRPOTrainer(model, tok, ROWS, GRPOConfig(output_dir=str(tmp_path), progress_bar=False))



def _trl_config(name):
    # stands for trl.GRPOConfig / trl.SFTConfig without importing TRL: a class of the same name from another module
    return type(name, (), {"__module__": f"trl.trainer.{name.lower()}"})()


def test_grpo_trainer_takes_a_trl_scripts_keywords(tmp_path):
    # GRPOTrainer(model=..., args=..., processing_class=...), TRL's call, was "unexpected keyword argument 'args'";
    # a trl.GRPOConfig read "config must be a GRPOConfig, got GRPOConfig"; peft_config=... was Python's bare error
    model, tok = tiny_model()
    cfg = GRPOConfig(output_dir=str(tmp_path), progress_bar=False, max_steps=3)
    tr = GRPOTrainer(model=model, reward_funcs=[sevens], args=cfg, train_dataset=ROWS, eval_dataset=None,
                     processing_class=tok, peft_config=None, callbacks=None, optimizers=(None, None))
    assert tr.cfg.max_steps == 3 and tr.tokenizer is tok
    with pytest.raises(TypeError, match="GRPOTrainer: config and args are the same argument"):
        GRPOTrainer(model, [sevens], ROWS, cfg, args=cfg, tokenizer=tok)
    with pytest.raises(TypeError, match="GRPOTrainer: tokenizer and processing_class are the same argument"):
        GRPOTrainer(model, [sevens], ROWS, cfg, tokenizer=tok, processing_class=tok)
    with pytest.raises(TypeError, match=r"GRPOTrainer: config must be an r1fast GRPOConfig, got "
                                        r"trl\.trainer\.grpoconfig\.GRPOConfig; build r1fast\.GRPOConfig .*"
                                        r"from r1fast\.integrations\.trl import GRPOTrainer \(docs/trl\.md\)"):
        GRPOTrainer(model, [sevens], ROWS, args=_trl_config("GRPOConfig"), processing_class=tok)
    with pytest.raises(TypeError, match=r"config must be an r1fast GRPOConfig, got dict; GRPOConfig\.from_dict"):
        GRPOTrainer(model, [sevens], ROWS, {"max_steps": 1}, tokenizer=tok)
    with pytest.raises(TypeError, match=r"GRPOTrainer: peft_config is TRL's, not r1fast's: r1fast trains every "
                                        r"weight"):
        GRPOTrainer(model, [sevens], ROWS, args=cfg, processing_class=tok, peft_config=object())
    with pytest.raises(TypeError, match="callbacks is TRL's, not r1fast's: r1fast's trainers take no callbacks"):
        GRPOTrainer(model, [sevens], ROWS, args=cfg, processing_class=tok, callbacks=[object()])
    with pytest.raises(TypeError, match=r"GRPOTrainer.__init__\(\) got an unexpected keyword argument 'confg'"):
        GRPOTrainer(model, [sevens], ROWS, confg=cfg, processing_class=tok)
    # TRL's positional order (model, reward_funcs, args, train_dataset) was "config must be an r1fast GRPOConfig,
    # got list": the rows had landed in config's place
    with pytest.raises(TypeError, match=r"GRPOTrainer: the train_dataset argument is a GRPOConfig: TRL's positional "
                                        r"order is \(model, reward_funcs, args, train_dataset\), r1fast's"):
        GRPOTrainer(model, [sevens], cfg, ROWS, processing_class=tok)


def test_sft_trainer_takes_a_trl_scripts_keywords(tmp_path):
    # SFTTrainer(model=..., args=..., train_dataset=..., processing_class=...), TRL's call, was a TypeError
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    model, tok = tiny_model()
    rows = [{"prompt": "1", "completion": "7"}]
    cfg = SFTConfig(output_dir=str(tmp_path), progress_bar=False, max_steps=2)
    tr = SFTTrainer(model=model, args=cfg, train_dataset=rows, processing_class=tok, eval_dataset=None,
                    peft_config=None)
    assert tr.cfg.max_steps == 2 and tr.tokenizer is tok and len(tr.examples) == 1
    with pytest.raises(TypeError, match="SFTTrainer: config and args are the same argument"):
        SFTTrainer(model, tok, rows, cfg, args=cfg)
    with pytest.raises(TypeError, match="SFTTrainer: tokenizer and processing_class are the same argument"):
        SFTTrainer(model, tok, rows, cfg, processing_class=tok)
    with pytest.raises(TypeError, match=r"SFTTrainer: config must be an r1fast SFTConfig, got "
                                        r"trl\.trainer\.sftconfig\.SFTConfig; build r1fast\.trainer\.SFTConfig"):
        SFTTrainer(model, args=_trl_config("SFTConfig"), train_dataset=rows, processing_class=tok)
    with pytest.raises(TypeError, match=r"eval_dataset is TRL's, not r1fast's: r1fast's SFTTrainer does not "
                                        r"evaluate: r1fast\.trainer\.evaluate_accuracy"):
        SFTTrainer(model, args=cfg, train_dataset=rows, processing_class=tok, eval_dataset=rows)
    # TRL's positional order (model, args, ...): the config landed in the tokenizer's place, and was "tokenizer and
    # processing_class are the same argument"
    for config in (cfg, _trl_config("SFTConfig")):
        with pytest.raises(TypeError, match=r"SFTTrainer: the tokenizer argument is an SFTConfig: TRL's positional "
                                            r"order is \(model, args, ...\), r1fast's \(model, tokenizer, rows, config\)"):
            SFTTrainer(model, config, train_dataset=rows, processing_class=tok)


def test_the_python_api_loads_from_r1fast_trainer():
    # rejection_sample, evaluate_accuracy and the pipeline functions were only in their submodules:
    # `from r1fast.trainer import rejection_sample` was an ImportError
    import r1fast.trainer
    from r1fast.trainer import evaluate_accuracy, load_pipeline, rejection_sample, run_pipeline
    from r1fast.trainer.evaluate import evaluate_accuracy as ev
    from r1fast.trainer.pipeline import load_pipeline as lp, run_pipeline as rp
    from r1fast.trainer.sampling import rejection_sample as rs

    assert (rejection_sample, evaluate_accuracy, load_pipeline, run_pipeline) == (rs, ev, lp, rp)
    assert all(hasattr(r1fast.trainer, name) for name in r1fast.trainer.__all__)


def test_resume_on_other_training_rows_says_so(tmp_path, capsys):
    # rows passed in Python recorded dataset: None, so a resume on other rows went on without a word
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    def sft(rows):
        model, tok = tiny_model()
        cfg = SFTConfig(max_steps=1, per_device_train_batch_size=1, output_dir=str(tmp_path / "s"), progress_bar=False)
        return SFTTrainer(model, tok, rows, cfg)

    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]
    other = [dict(r, completion="5") for r in rows]
    ck = sft(rows).train()["checkpoint"]
    capsys.readouterr()
    sft(rows).train(resume=True)
    assert "options other than the checkpoint's" not in capsys.readouterr().err
    sft(other).train(resume=True)
    assert "options other than the checkpoint's: the training rows (sha256 " in capsys.readouterr().err
    state_file = os.path.join(ck, "trainer_state.json")
    state = json.load(open(state_file))
    del state["data_sha256"]   # a checkpoint of an earlier r1fast: nothing to compare
    json.dump(state, open(state_file, "w"))
    sft(other).train(resume=True)
    assert "options other than the checkpoint's" not in capsys.readouterr().err


def test_rows_fingerprint_is_the_same_in_every_process_and_follows_the_values():
    # values JSON has no form of were hashed as str(value): an object's default str holds its address (a new
    # fingerprint each process: every resume said the training rows had changed), a set's order is not its
    # value's, and numpy elides a long array's middle (arrays differing there had one fingerprint)
    import hashlib

    import numpy as np

    from r1fast.trainer.common import rows_fingerprint

    class Tag:   # default repr: '<...Tag object at 0x7f...>'
        pass

    first, second = Tag(), Tag()
    assert rows_fingerprint([{"x": first}]) == rows_fingerprint([{"x": second}])
    assert rows_fingerprint([{"x": {8, 16}}]) == rows_fingerprint([{"x": {16, 8}}])
    assert str({8, 16}) != str({16, 8})
    long, edited = np.arange(2000), np.arange(2000)
    edited[1000] = -1
    assert rows_fingerprint([{"x": long}]) != rows_fingerprint([{"x": edited}])
    assert rows_fingerprint([{"x": np.int64(3), "y": np.float32(0.5)}]) == rows_fingerprint([{"x": 3, "y": 0.5}])
    assert rows_fingerprint([{"x": b"ab"}]) != rows_fingerprint([{"x": b"ac"}])
    assert rows_fingerprint([{1: "a", "b": (2,)}]) != rows_fingerprint([{1: "a", "b": (3,)}])   # was a TypeError
    # plain JSON rows keep the fingerprint checkpoints already hold
    rows = [{"prompt": "1+1=", "answer": 2, "meta": {"w": [0.5, None, True]}}]
    old = hashlib.sha256(b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows)).hexdigest()[:16]
    assert rows_fingerprint(rows) == old


def test_resume_on_the_same_rows_from_a_moved_file_says_nothing(tmp_path, capsys):
    # the checkpoint records the rows' sha256: a data folder moved or copied was "options other than the
    # checkpoint's: dataset 'a/train.jsonl' -> 'b/train.jsonl'; the steps from here on use the new values"
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    def sft(path):
        model, tok = tiny_model()
        cfg = SFTConfig(max_steps=1, per_device_train_batch_size=1, output_dir=str(tmp_path / "s"), progress_bar=False,
                        dataset=str(path))
        return SFTTrainer(model, tok, config=cfg)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    text = '{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": "4"}\n'
    (tmp_path / "a" / "train.jsonl").write_text(text)
    (tmp_path / "b" / "train.jsonl").write_text(text)
    (tmp_path / "b" / "other.jsonl").write_text(text.replace('"4"', '"5"'))
    sft(tmp_path / "a" / "train.jsonl").train()
    capsys.readouterr()
    sft(tmp_path / "b" / "train.jsonl").train(resume=True)
    assert "options other than the checkpoint's" not in capsys.readouterr().err
    sft(tmp_path / "b" / "other.jsonl").train(resume=True)   # other rows: the path and the sha256 are said
    err = capsys.readouterr().err
    assert "other.jsonl'" in err and "the training rows (sha256 " in err


def test_stop_handlers_put_the_default_back_where_the_handler_before_came_from_c(monkeypatch):
    # signal.getsignal returns None for a handler installed from C (an embedding host's). stop_handlers left its
    # own handler installed then, so after train() a SIGTERM became a stop request of a finished trainer (a
    # printed line) instead of ending the process. It now puts the default back, as `r1fast bench` does.
    import signal
    import types

    from r1fast.trainer import grpo

    real_getsignal = signal.getsignal
    before = {s: real_getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(signal, "getsignal", lambda sig: None)
    try:
        with grpo.stop_handlers(types.SimpleNamespace(_stop_requested=False)):
            assert real_getsignal(signal.SIGTERM) not in (None, signal.SIG_DFL)   # the trainer's own
        # Python's own defaults: a Ctrl-C after train() raises KeyboardInterrupt; SIG_DFL for SIGINT killed the
        # process outright (a notebook's kernel, its state lost)
        assert [real_getsignal(s) for s in before] == [signal.default_int_handler, signal.SIG_DFL]
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_folder_refused_for_a_killed_saves_checkpoint_says_to_rename_it_before_resume(tmp_path):
    # the refusal of a folder whose last checkpoint a killed save set aside (checkpoint-N.old-<pid>) offered
    # "continue it with --resume", which found no checkpoint there, said it started from the first step and
    # was refused again; the checkpoint is renamed back first, and overwrite_output_dir keeps it
    import random

    from r1fast.trainer.checkpoints import STATE_FILE, RunFolderInUse, start_fresh
    from r1fast.trainer.cli import _in_use_message

    run = tmp_path / "run"
    step, pid = random.randint(2, 90), random.randint(100, 99999)
    old = run / f"checkpoint-{step}.old-{pid}"
    old.mkdir(parents=True)
    (old / STATE_FILE).write_text("{}")
    with pytest.raises(RunFolderInUse) as info:
        start_fresh(str(run), False)
    back = run / f"checkpoint-{step}"
    assert f"rename {old} to {back}, then continue it with --resume" in str(info.value)
    assert "; continue it with --resume" not in str(info.value)
    msg = _in_use_message("train", ["g.yaml"], info.value)
    assert f"  mv {old} {back} && r1fast train g.yaml --resume " in msg
    assert f"(deletes its checkpoints and metrics; keeps {old.name})" in msg
    start_fresh(str(run), True)
    assert old.is_dir()


def test_a_bare_resume_refused_for_a_killed_saves_checkpoint_does_not_say_it_starts(tmp_path, capsys):
    # a bare --resume where the only checkpoint is one a killed save set aside printed "no checkpoint in <run>;
    # starting from the first step", then refused the folder: it started nothing
    from r1fast.trainer.checkpoints import STATE_FILE, RunFolderInUse

    old = tmp_path / "run" / "checkpoint-3.old-4242"
    old.mkdir(parents=True)
    (old / STATE_FILE).write_text("{}")
    with pytest.raises(RunFolderInUse, match="rename .*checkpoint-3.old-4242 to "):
        make(tmp_path, max_steps=1, per_device_train_batch_size=8, num_generations=4).train(resume=True)
    assert "starting from the first step" not in capsys.readouterr().err


def test_a_killed_saves_checkpoint_beside_earlier_ones_names_them_all_and_what_overwrite_deletes(tmp_path):
    # a killed save of step N beside the run's earlier checkpoint-M (M < N, save_steps): the refusal named only
    # checkpoint-N.old-<pid> and said overwrite_output_dir kept it and replaced the metrics, not that it deletes
    # checkpoint-M
    import random

    from r1fast.trainer.checkpoints import STATE_FILE, RunFolderInUse, start_fresh
    from r1fast.trainer.cli import _in_use_message

    run = tmp_path / "run"
    early, step = sorted(random.sample(range(1, 60), 2))
    old = run / f"checkpoint-{step}.old-{random.randint(100, 99999)}"
    for folder in (old, run / f"checkpoint-{early}"):
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_text("{}")
    with pytest.raises(RunFolderInUse) as info:
        start_fresh(str(run), False)
    assert f"; checkpoints checkpoint-{early})" in str(info.value)
    msg = _in_use_message("train", ["g.yaml"], info.value)
    assert f"(deletes its checkpoints and metrics; keeps {old.name})" in msg
    start_fresh(str(run), True)
    assert sorted(os.listdir(run)) == [old.name]


def test_a_logging_window_reads_the_logged_infinity_back_as_inf():
    # the window keeps each rollout's metrics as the log writes them (an inf as +-1e308, JSON for the checkpoint):
    # averaged as numbers, one inf loss among finite ones logged 3.3e307 and an inf with a -inf 0
    import random

    from r1fast.trainer.grpo import window_metrics
    from r1fast.trainer.metrics import plain_number

    finite = [random.uniform(-5, 5) for _ in range(2)]
    rows = [{"loss": plain_number(v), "completion_length_max": plain_number(v)} for v in [math.inf, *finite]]
    out = window_metrics(rows)
    assert out["loss"] == math.inf and out["completion_length_max"] == math.inf
    rows = [{"loss": plain_number(v), "is_weight/min": plain_number(v)} for v in [math.inf, finite[0], -math.inf]]
    out = window_metrics(rows)
    assert math.isnan(out["loss"]) and out["is_weight/min"] == -math.inf
    assert window_metrics([{"loss": v} for v in finite])["loss"] == sum(finite) / 2
