"""SFT defects found by a randomized differential sweep of SFTTrainer against an independent float64
training loop: what each example trains on, and bad rows refused with an error naming them."""
import math

import pytest

from r1fast.data import build_char_tokenizer
from r1fast.models import CausalLM, ModelConfig
from r1fast.trainer import SFTConfig, SFTTrainer


def tiny(tok):
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    model = CausalLM(cfg)
    model.reset_parameters(seed=0)
    return model


def trainer(rows, tok=None, tmp_path=None, **over):
    tok = tok or build_char_tokenizer()
    cfg = SFTConfig(progress_bar=False, output_dir=str(tmp_path), max_steps=1, **over)
    return SFTTrainer(tiny(tok), tok, rows, cfg)


def test_a_completion_that_already_ends_with_eos_trains_one_eos_as_trl_does(tmp_path):
    # TRL appends the EOS only to a completion that does not end with it; r1fast appended a second one,
    # training the model to write EOS after its EOS and counting that token in the loss's mean
    tok = build_char_tokenizer()
    rows = [{"prompt": "12", "completion": "7" + tok.eos_token}, {"prompt": "12", "completion": "7"}]
    tr = trainer(rows, tok, tmp_path)
    want = tok("7", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert tr.examples[0][1] == want and tr.examples[1][1] == want


def test_a_completion_list_of_plain_strings_is_refused_naming_the_row(tmp_path):
    # ["a", "b"] is no message list; its last string alone was trained on, the rest dropped without a word
    rows = [{"prompt": "1", "completion": "2"}, {"prompt": "12", "completion": ["34", "56"]}]
    with pytest.raises(ValueError, match=r"row 1: a completion must be a string or a list of"):
        trainer(rows, tmp_path=tmp_path)
    mixed = [{"prompt": "1", "completion": ["34", {"role": "assistant", "content": "56"}]}]
    with pytest.raises(ValueError, match=r"row 0: a completion must be a string or a list of"):
        trainer(mixed, tmp_path=tmp_path)
    # a list of messages still trains on its last one
    ok = trainer([{"prompt": "1", "completion": [{"role": "assistant", "content": "56"}]}], tmp_path=tmp_path)
    assert ok.examples[0][1][:-1] == build_char_tokenizer()("56", add_special_tokens=False).input_ids


def test_an_empty_completion_without_an_eos_token_is_refused_naming_the_row(tmp_path):
    # with no EOS to train on, an empty completion has no token: the first step failed with pack's
    # "every prompt and completion needs at least one token", naming no row, after the model had loaded
    tok = build_char_tokenizer()
    tok.eos_token = None
    assert tok.eos_token_id is None
    rows = [{"prompt": "1", "completion": "2"}, {"prompt": "12", "completion": ""}]
    with pytest.raises(ValueError, match=r"SFT dataset: row 1: the completion is empty"):
        trainer(rows, tok, tmp_path)
    trainer(rows[:1], tok, tmp_path).step()   # a non-empty one still trains


def test_examples_cut_to_max_length_are_said_naming_the_first_and_the_lost_eos(tmp_path):
    # an example past max_length (or the model's positions) lost its prompt's start, or its completion's end and
    # EOS (teaching the model not to stop), without a word; GRPO says so of the prompts it cuts
    rows = [{"prompt": "12", "completion": "7"}, {"prompt": "0123456789", "completion": "abc"},
            {"prompt": "9", "completion": "x" * 20}, {"prompt": "3", "completion": "4"}]
    with pytest.warns(UserWarning, match=r"SFT dataset: 2 of 4 examples are longer than the 12 tokens an example "
                                         r"keeps \(max_length\): row 1 has 1[0-9] tokens.*1 of them loses the end "
                                         r"of its completion and its EOS"):
        tr = trainer(rows, tmp_path=tmp_path, max_length=12)
    assert [len(p) + len(c) for p, c in tr.examples][1:3] == [12, 12]
    with pytest.warns(UserWarning, match=r"1 of 2 examples are longer than the 64 tokens an example keeps "
                                         r"\(the model's positions\): row 1"):
        trainer([rows[0], {"prompt": "1", "completion": "y" * 70}], tmp_path=tmp_path)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing cut, nothing said
        trainer([rows[0], rows[3]], tmp_path=tmp_path, max_length=12)


def _reference_nll(model, examples, hits):
    """Summed NLL of the completions (float64 logits of the plain unpacked forward), argmax hits counted."""
    import torch

    nll = torch.zeros((), dtype=torch.float64)
    for p, c in examples:
        logits = model.logits(model(torch.tensor(p + c))).double()[len(p) - 1:-1]
        hits.append(int((logits.argmax(-1) == torch.tensor(c)).sum()))
        nll = nll - torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None]).sum()
    return nll


def _rate_factor(step, kind, total, warmup):
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return {"constant": 1.0, "linear": max(0.0, 1 - progress), "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[kind]


@pytest.mark.parametrize("case", [
    dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2.0, lr_scheduler_type="cosine",
         warmup_steps=2, max_grad_norm=0.3, weight_decay=0.1, max_length=14, share_prompts=True),
    dict(per_device_train_batch_size=3, gradient_accumulation_steps=1, max_steps=4, lr_scheduler_type="linear",
         warmup_ratio=0.5, max_grad_norm=0.0, weight_decay=0.0, max_length=1024, share_prompts=False),
    dict(per_device_train_batch_size=1, gradient_accumulation_steps=3, num_train_epochs=1.0,
         lr_scheduler_type="constant", max_grad_norm=100.0, weight_decay=0.2, max_length=9, share_prompts=True),
])
def test_sft_steps_match_an_independent_float64_loop(tmp_path, case):
    """Several steps of SFTTrainer on a float64 model against a loop written here: rows of very different
    lengths (some cut to max_length, prompts shared), the seeded shuffle that fills an epoch's last step from
    the next, the loss over the completion tokens of all micro-batches, the clipped gradients, AdamW with
    decay on matrices only, the warmed-up schedule; the weights after each step, and the logged metrics."""
    import copy
    import random
    import warnings

    import torch

    rng = random.Random(len(str(case)))
    text = lambda lo, hi: "".join(rng.choice("0123456789+-=xyz") for _ in range(rng.randint(lo, hi)))  # noqa: E731
    prompts = [text(1, 9) for _ in range(3)]
    rows = [{"prompt": rng.choice(prompts), "completion": text(0, 14)} for _ in range(7)]
    rows.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                              {"role": "user", "content": text(1, 3)}, {"role": "assistant", "content": text(1, 4)}]})
    rows = [r if "messages" not in r else {"prompt": r["messages"][:-1], "completion": r["messages"][-1]} for r in rows]
    tok = build_char_tokenizer()
    model = tiny(tok).double()
    ref = copy.deepcopy(model)
    cfg = SFTConfig(learning_rate=2e-2, seed=5, progress_bar=False, output_dir=str(tmp_path), **case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the examples cut to max_length
        tr = SFTTrainer(model, tok, rows, cfg)

    def encoded(r):
        msgs = [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"]
        p = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        c = r["completion"]["content"] if isinstance(r["completion"], dict) else r["completion"]
        p, c = p.input_ids, tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id]
        limit = min(cfg.max_length, 64)
        if len(p) + len(c) > limit:
            p = p[-max(1, limit - len(c)):]
            c = c[:limit - len(p)]
        return p, c

    examples = [encoded(r) for r in rows]
    assert [tuple(e) for e in tr.examples] == examples
    per = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * len(rows) / per)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
    order = [i for epoch in range(4) for i in torch.randperm(
        len(rows), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).tolist()]
    params = list(ref.parameters())
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    grads = []
    tr.optimizer.register_step_pre_hook(lambda opt, a, k: grads.append([p.grad.clone() for p in model.parameters()]))
    assert tr.total_steps == total
    for step in range(total):
        got = tr.step()
        batch = [examples[i] for i in order[step * per:(step + 1) * per]]
        n_tokens, hits = sum(len(c) for _, c in batch), []
        ref.zero_grad(set_to_none=True)
        loss = _reference_nll(ref, batch, hits) / n_tokens
        loss.backward()
        norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in params)))
        scale = min(1.0, cfg.max_grad_norm / (norm + 1e-6)) if cfg.max_grad_norm > 0 else 1.0
        lr = cfg.learning_rate * _rate_factor(step, cfg.lr_scheduler_type, total, warmup)
        assert got["loss"] == pytest.approx(float(loss.detach()), rel=1e-6) and got["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert got["lr"] == pytest.approx(lr, rel=1e-12) and got["mean_token_accuracy"] == sum(hits) / n_tokens
        assert got["epoch"] == pytest.approx((step + 1) * per / len(rows))
        for g, p in zip(grads[-1], params):
            torch.testing.assert_close(g, p.grad * scale, rtol=0, atol=1e-5 * max(norm, 1e-3))
        # AdamW on the trainer's own gradients (its log-prob runs in fp32), so the weights must agree to float64
        with torch.no_grad():
            for g, p, (m, v) in zip(grads[-1], params, moments):
                p.mul_(1 - lr * cfg.weight_decay if p.dim() >= 2 else 1.0)
                m.mul_(cfg.adam_beta1).add_(g, alpha=1 - cfg.adam_beta1)
                v.mul_(cfg.adam_beta2).addcmul_(g, g, value=1 - cfg.adam_beta2)
                denom = (v.sqrt() / math.sqrt(1 - cfg.adam_beta2 ** (step + 1))).add_(cfg.adam_epsilon)
                p.addcdiv_(m, denom, value=-lr / (1 - cfg.adam_beta1 ** (step + 1)))
            for (name, a), b in zip(model.named_parameters(), params):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m: f"step {step} {name}: {m}")
                b.copy_(a)


def test_a_boolean_completion_is_refused_naming_its_row_and_column_and_a_number_trains_on_its_digits(tmp_path):
    # a JSON `true` completion trained on Python's "True", a text the file never held (bytes on their repr
    # "b'7'"); a prompt that is not text was already refused. A number is still its digits (a JSON number).
    import json

    import numpy as np

    tok = build_char_tokenizer()
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1", "reply": "2"}\n\n{"prompt": "2", "reply": true}\n')
    with pytest.raises(ValueError, match=r"^SFT dataset: row 1 \('.*d.jsonl' line 3\): a completion must be text "
                                         r"\(or a number\); got the boolean True, whose text the data does not say "
                                         r".*\(column 'reply'\)$"):
        trainer(str(path), tok, tmp_path / "r", completion_column="reply")
    for bad, shown in ((np.bool_(False), "the boolean False"), (b"7", "a bytes \\(b'7'\\)")):
        with pytest.raises(ValueError, match=rf"^SFT dataset: row 0: a completion must be text \(or a number\); "
                                             rf"got {shown}"):
            trainer([{"prompt": "1", "completion": bad}], tok, tmp_path / "b")
    numbers = [7, -12, 2.5, np.int64(40), json.loads("1e2")]
    tr = trainer([{"prompt": "1", "completion": n} for n in numbers], tok, tmp_path / "n")
    texts = ["7", "-12", "2.5", "40", "100.0"]
    assert [c for _, c in tr.examples] == [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
                                           for t in texts]
