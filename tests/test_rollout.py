"""Engine end to end on a tiny random model: greedy parity with transformers, scheduling, seeds."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("r1fast._C")

from r1fast.models import ModelConfig, from_pretrained  # noqa: E402
from r1fast.rollout import Engine, SamplingParams  # noqa: E402

CFG = dict(architecture="Qwen2ForCausalLM", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
PROMPT_LENS = [3, 4, 5, 9, 13]  # block_size 4: inside, on, and across block boundaries
MAX_NEW = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _random_pair(CFG, tmp_path_factory.mktemp("tiny") / "ck")


def _random_pair(fields: dict, path):
    """(transformers model, r1fast model) with the same random weights, through a checkpoint."""
    cfg = ModelConfig(**fields)
    hf_config = transformers.AutoConfig.for_model(cfg.model_type, **{
        k: v for k, v in cfg.to_hf_config(torch.float32).items() if k != "model_type"})
    hf_config._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn(p.shape, generator=g)) if name.endswith("norm.weight")
                    else 0.3 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(path)
    return hf, from_pretrained(path).eval()


def _hf_greedy(hf, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                      min_new_tokens=new, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, CFG["vocab_size"], (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_greedy(models, prompts):
    return [_hf_greedy(models[0], p, MAX_NEW) for p in prompts]


@pytest.mark.parametrize("opts,expect", [
    (dict(num_blocks=64), "plain"),
    (dict(num_blocks=64, max_num_batched_tokens=5), "chunked"),
    (dict(num_blocks=9, max_num_seqs=4), "preempted"),
    (dict(num_blocks=64, max_num_seqs=2, enable_prefix_caching=False), "few seats"),
])
def test_greedy_matches_transformers(models, prompts, hf_greedy, opts, expect):
    _, model = models
    engine = Engine(model, block_size=4, **opts)
    results = engine.generate(prompts, SamplingParams(n=2, temperature=0, max_tokens=MAX_NEW))
    for p, res, want in zip(prompts, results, hf_greedy):
        assert res.prompt_token_ids == p
        assert len(res.completions) == 2
        for c in res.completions:
            assert c.token_ids == want
            assert c.finish_reason == "length" and len(c.logprobs) == MAX_NEW
    stats = engine.last_stats
    # no stop tokens: a row leaves at launch of the step that reaches its limit, and no token is discarded
    assert stats["discarded_tokens"] == 0
    if expect == "chunked":
        assert stats["prefill"] >= sum(PROMPT_LENS) // 5
    if expect == "preempted":
        assert stats["preemptions"] > 0
    assert engine.block_manager.num_free_blocks == engine.num_blocks  # nothing leaked


def test_greedy_mistral_matches_transformers_up_to_its_sliding_window(tmp_path, prompts):
    # head_dim 12 (not hidden / heads = 10), GQA, tied, and a window of 23 tokens: the longest prompt (13)
    # plus MAX_NEW fills it, which is where the engine's default max_model_len stops
    from r1fast.integrations.hf_rollout import HFRollout

    mistral = dict(CFG, architecture="MistralForCausalLM", hidden_size=40, head_dim=12, tie_word_embeddings=True,
                   extra={"sliding_window": 23})
    hf, model = _random_pair(mistral, tmp_path / "mistral")
    engine = Engine(model, block_size=4, num_blocks=64)
    assert engine.max_model_len == 23
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    two = [prompts[2], prompts[4]]  # 5 and 13 tokens
    want = [_hf_greedy(hf, p, MAX_NEW) for p in two]
    assert [r.completions[0].token_ids for r in engine.generate(two, params)] == want
    assert HFRollout(hf, block_size=4, num_blocks=64).generate(two, params) == want


def test_greedy_logprobs_match_transformers_scores(models, prompts):
    hf, model = models
    engine = Engine(model, block_size=4, num_blocks=32)
    res = engine.generate([prompts[3]], SamplingParams(temperature=0, max_tokens=4))[0].completions[0]
    ids = torch.tensor([prompts[3] + res.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
    n = len(prompts[3])
    want = [logp[n - 1 + i, t].item() for i, t in enumerate(res.token_ids)]
    assert res.logprobs == pytest.approx(want, abs=1e-4)


def test_seeded_samples_do_not_depend_on_batch_or_preemption(models, prompts):
    _, model = models
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_tokens=8, seed=123)
    alone = Engine(model, block_size=4, num_blocks=64).generate([prompts[2]], params)[0]
    engine = Engine(model, block_size=4, num_blocks=10, max_num_seqs=6)
    batch = engine.generate([prompts[0], prompts[2], prompts[4], prompts[2]], params)
    assert engine.last_stats["preemptions"] > 0
    tokens = [c.token_ids for c in alone.completions]
    assert [c.token_ids for c in batch[1].completions] == tokens
    for a, b in zip(alone.completions, batch[1].completions):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert len({tuple(t) for t in tokens}) > 1  # the samples of a group differ
    assert [c.token_ids for c in batch[3].completions] != tokens  # a repeated prompt gets fresh samples
    other_seed = Engine(model, block_size=4, num_blocks=64).generate(
        [prompts[2]], SamplingParams(n=3, temperature=1.0, top_p=0.95, max_tokens=8, seed=124))[0]
    assert [c.token_ids for c in other_seed.completions] != tokens


class RecordingBlockManager:
    """Wraps the C++ block manager and records how many blocks are in use after each call."""

    def __init__(self, real):
        self.real, self.used = real, []

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            out = attr(*args, **kwargs)
            self.used.append((name, self.real.num_blocks - self.real.num_free_blocks))
            return out
        return call


def test_group_samples_share_prompt_blocks(models):
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=32)
    rec = engine.block_manager = RecordingBlockManager(engine.block_manager)
    prompt = list(range(9))  # 3 blocks, the last one partial
    engine.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=2, seed=0))
    forks = [u for name, u in rec.used if name == "fork"]
    assert forks == [3, 3, 3]  # 4 samples hold the prompt's 3 blocks once
    appends = [u for name, u in rec.used if name == "append_batch"]
    assert appends[0] == 3 + 3  # then 3 copy-on-writes of the shared partial block, not 4 x 3 blocks


def test_prefix_cache_reuses_prompt_blocks_until_reset(models, prompts):
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=3)
    first = engine.generate([prompts[4]], params)
    assert engine.last_stats["cached_tokens"] == 0
    again = engine.generate([prompts[4]], params)
    assert engine.last_stats["cached_tokens"] == 12
    assert again[0].completions[0].token_ids == first[0].completions[0].token_ids
    twice = engine.generate([prompts[4], prompts[4]], params)  # the count covers every request of the call
    assert engine.last_stats["cached_tokens"] == 24
    assert [r.completions[0].token_ids for r in twice] == [first[0].completions[0].token_ids] * 2
    engine.reset_prefix_cache()
    engine.generate([prompts[4]], params)
    assert engine.last_stats["cached_tokens"] == 0


def test_identical_prompts_in_one_call_share_the_prompt_blocks(models, prompts):
    # the copies were admitted before any was prefilled: each computed and held all 4 blocks. The later
    # ones now wait one step (not one each) and take the first's 3 full blocks from the prefix cache.
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=64)
    rec = engine.block_manager = RecordingBlockManager(engine.block_manager)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=5, ignore_eos=True)
    copies = [prompts[4]] * 3  # 13 tokens: 3 full blocks + 1
    shared = engine.generate(copies, params)
    assert [u for name, u in rec.used if name == "allocate"] == [4, 5, 6]
    assert engine.last_stats["cached_tokens"] == 24 and engine.last_stats["prefill"] == 2
    alone = Engine(model, block_size=4, num_blocks=64, enable_prefix_caching=False).generate(copies, params)
    for a, b in zip(shared, alone):
        for x, y in zip(a.completions, b.completions):
            assert x.token_ids == y.token_ids
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-5)


def test_a_weight_update_drops_the_cached_prompt_blocks_without_a_reset(tmp_path, models, prompts):
    """A user who updates the weights and forgets reset_prefix_cache() got completions from prompt KV
    the old weights made: the engine now notices an in-place update and computes the prompt again."""
    import copy

    _, shared = models
    model = copy.deepcopy(shared)
    engine = Engine(model, block_size=4, num_blocks=64)
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=3)
    engine.generate([prompts[4]], params)
    engine.generate([prompts[4]], params)
    assert engine.last_stats["cached_tokens"] == 12   # the cache is on, and holds the prompt's blocks
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():   # an optimizer step's kind of change: in place
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    after = engine.generate([prompts[4]], params)[0].completions[0]
    assert engine.last_stats["cached_tokens"] == 0
    fresh = Engine(model, block_size=4, num_blocks=64).generate([prompts[4]], params)[0].completions[0]
    assert after.token_ids == fresh.token_ids
    torch.testing.assert_close(torch.tensor(after.logprobs), torch.tensor(fresh.logprobs), rtol=0, atol=0)
    engine.generate([prompts[4]], params)
    assert engine.last_stats["cached_tokens"] == 12   # unchanged weights: the cache serves again


@pytest.mark.parametrize("how", ["fused AdamW", "p.data", "one row", "two sign flips", "two rows swapped",
                                 "two columns swapped"])
def test_a_weight_change_no_version_counter_records_drops_the_cached_prompt_blocks(models, prompts, how):
    """A fused optimizer (AdamW(fused=True)) and writes through p.data bump no version counter: generate()
    reused the prompt KV the old weights made (other tokens, log-probs off by nats) until a manual reset."""
    import copy

    _, shared = models
    model = copy.deepcopy(shared)
    engine = Engine(model, block_size=4, num_blocks=64)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=3, ignore_eos=True)
    engine.generate([prompts[4]], params)
    engine.generate([prompts[4]], params)
    assert engine.last_stats["cached_tokens"] == 12
    versions = [p._version for p in model.parameters()]
    g = torch.Generator().manual_seed(5)
    if how == "fused AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    elif how == "p.data":
        for p in model.parameters():
            p.data.copy_(p.data + 0.3 * torch.randn(p.shape, generator=g))
    elif how == "one row":  # a single embedding row of the prompt's first token, by one float step
        row = model.embed_tokens.weight.data[prompts[4][0]]
        row.copy_(torch.nextafter(row, torch.full_like(row, math.inf)))
    elif how == "two sign flips":  # each flip moves the bit sum by 2^31, so two left it unchanged modulo 2^32
        row = model.embed_tokens.weight.data[prompts[4][0]]
        row[[int(row.argmax()), int(row.argmin())]] *= -1
    elif how == "two rows swapped":  # the prompt's first token's embedding row traded with another's
        table, a, b = model.embed_tokens.weight.data, prompts[4][0], (prompts[4][0] + 1) % CFG["vocab_size"]
        table[[a, b]] = table[[b, a]]
    else:  # two hidden features of the embedding traded: every row's sum stays, row sums alone missed it
        table = model.embed_tokens.weight.data
        table[:, [0, 1]] = table[:, [1, 0]]
    assert [p._version for p in model.parameters()] == versions  # no counter saw it
    after = engine.generate([prompts[4]], params)
    assert engine.last_stats["cached_tokens"] == 0
    fresh = Engine(model, block_size=4, num_blocks=64).generate([prompts[4]], params)
    for a, b in zip(after[0].completions, fresh[0].completions):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_weight_bit_sums_are_exact_in_one_piece_and_chunk_by_chunk(monkeypatch, dtype):
    # parameters up to one chunk take a single clamp (the chunk loop's extra ops per parameter made the
    # check 4x slower on models of many small parameters); both ways must give the exact wrapped sums
    from r1fast.rollout import engine as engine_module

    g = torch.Generator().manual_seed(2)
    for shape in ((0,), (1,), (37,), (64,), (8, 8), (2, 3, 5), (0, 4)):
        p = torch.randn(shape, generator=g).to(dtype)
        bits = p.view(engine_module._INT_OF_SIZE[p.element_size()])
        wrap = 1 << (8 * p.element_size())

        def wrapped(v: int) -> int:
            return (v + wrap // 2) % wrap - wrap // 2

        by_row = bits.reshape(-1, shape[-1]) if len(shape) > 1 else bits.reshape(1, -1)
        want_rows = [wrapped(int(r)) for r in by_row.long().sum(-1)]
        want_columns = [wrapped(int(c)) for c in by_row.long().sum(0)]
        want_negative = wrapped(int(bits.long().clamp(max=0).sum()))
        for chunk in (1 << 22, 16):  # one piece; chunks of 16 (a last partial one)
            monkeypatch.setattr(engine_module, "_SIGN_CHUNK", chunk)
            rows, columns, negative = engine_module._bit_sums(p)
            assert rows.tolist() == want_rows and columns.tolist() == want_columns, (shape, chunk)
            assert negative.item() == want_negative, (shape, chunk)


def _signature_without_versions(model):
    from types import SimpleNamespace

    per_param, placed = Engine._weights_signature(SimpleNamespace(model=model))
    return [(ptr, negative) for ptr, _, negative in per_param], placed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["1.0 to inf in row 3", "two bias entries swapped", "square weight transposed",
                                 "a row rolled"])
def test_the_weight_signature_sees_changes_that_keep_sums(dtype, how):
    # Places weighted g + 1 lost an fp64 change of 2^62 (1.0 -> inf) in row 3 (2^62 * 4 = 0 modulo 2^64); sums
    # by row alone lost elements moved within a row (a bias's entries swapped, a row rolled), and one placed sum
    # of rows and columns together lost a square weight transposed (its row and column sums traded places).
    g = torch.Generator().manual_seed(4)
    model = torch.nn.Linear(8, 8).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.randn(8, 8, generator=g) if how != "1.0 to inf in row 3" else torch.ones(8, 8))
    before = _signature_without_versions(model)
    assert _signature_without_versions(model) == before
    w, b = model.weight.data, model.bias.data
    if how == "1.0 to inf in row 3":
        w[3, 0] = math.inf
    elif how == "two bias entries swapped":
        b[[2, 5]] = b[[5, 2]]
    elif how == "square weight transposed":
        w.copy_(w.t().clone())
    else:
        w[6] = w[6].roll(1)
    assert _signature_without_versions(model) != before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["rectangle exchange", "+1, -2, +1 along a row", "+3 and -1 on a diagonal"])
def test_the_weight_signature_misses_only_the_crafted_changes_docs_rollout_md_names(dtype, pattern):
    # The signature is linear checksums of the bits, not a hash: docs/rollout.md (Prefix cache) names changes it
    # cannot see, to the bit; each is missed as written there, and one bit more or less is seen. If this fails
    # because the signature grew stronger, update that paragraph.
    bits_of = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    model = torch.nn.Linear(8, 8).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.rand(8, 8, generator=torch.Generator().manual_seed(6)) + 0.5)  # one sign
    before = _signature_without_versions(model)
    where = {"rectangle exchange": {(2, 3): 5, (6, 1): 5, (2, 1): -5, (6, 3): -5},
             "+1, -2, +1 along a row": {(4, 2): 1, (4, 3): -2, (4, 4): 1},
             "+3 and -1 on a diagonal": {(0, 0): 3, (1, 1): -1}}[pattern]
    bits = model.weight.data.view(bits_of)
    for (i, j), d in where.items():
        bits[i, j] += d
    assert _signature_without_versions(model) == before
    bits[next(iter(where))] += 1
    assert _signature_without_versions(model) != before


def test_a_model_cast_after_the_engine_was_built_is_a_clear_error(models, prompts):
    # model.to(bfloat16) after Engine(model): the KV cache stayed fp32 and generate() failed inside store_kv
    # ("key, value, k_cache, v_cache must share a float dtype")
    import copy

    _, shared = models
    model = copy.deepcopy(shared)
    engine = Engine(model, block_size=4, num_blocks=64)
    engine.generate([prompts[0]], SamplingParams(max_tokens=2, seed=0))
    model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"model is now torch.bfloat16 on cpu, but this engine's KV cache was "
                                           r"built for torch.float32 on cpu; build a new Engine"):
        engine.generate([prompts[0]], SamplingParams(max_tokens=2, seed=0))
    model.to(torch.float32)
    assert len(engine.generate([prompts[0]], SamplingParams(max_tokens=2, seed=0))[0].completions[0].token_ids) == 2


def test_generation_config_eos_ids_stop_a_completion_as_transformers_and_vllm_do(models, prompts):
    """An instruct checkpoint lists its end-of-text in generation_config.json beside config.json's eos
    (Qwen2.5-Instruct: [<|im_end|>, <|endoftext|>]); the engine stopped at config.json's only and wrote on
    past the other until max_tokens."""
    import copy

    _, shared = models
    model = copy.deepcopy(shared)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    free = Engine(model, block_size=4, num_blocks=64).generate([prompts[2]], params)[0].completions[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    model.config.eos_token_id = None
    model.generation_config_json = {"eos_token_id": [stop_at, stop_at, 10**9]}   # repeated, out of the vocabulary
    assert model.eos_token_ids == [stop_at]
    out = Engine(model, block_size=4, num_blocks=64).generate([prompts[2]], params)[0].completions[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"
    model.config.eos_token_id = 1
    assert model.eos_token_ids == [1, stop_at]


def test_prompts_as_tensors_or_numpy_arrays_generate_as_lists_do(models, prompts):
    import numpy as np

    _, model = models
    engine = Engine(model, block_size=4, num_blocks=64)
    params = SamplingParams(temperature=1.0, max_tokens=4, seed=5)
    want = [c.token_ids for r in engine.generate(prompts[:3], params) for c in r.completions]
    for as_array in (torch.tensor, np.array, lambda p: np.array(p, dtype=np.int32)):
        got = engine.generate([as_array(p) for p in prompts[:3]], params)   # a numpy array was a TypeError
        assert [c.token_ids for r in got for c in r.completions] == want


def test_stop_tokens_and_eos_finish_with_stop(models, prompts):
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=64)
    greedy = engine.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=MAX_NEW))[0].completions[0]
    stop = greedy.token_ids[3]
    first = greedy.token_ids.index(stop)
    res = engine.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[stop]))
    c = res[0].completions[0]
    assert c.finish_reason == "stop" and c.token_ids == greedy.token_ids[: first + 1]
    model.config.eos_token_id = stop
    try:
        c = Engine(model, block_size=4, num_blocks=64).generate([prompts[1]], SamplingParams(temperature=0,
                                                                                             max_tokens=MAX_NEW))
        assert c[0].completions[0].finish_reason == "stop"
        c = Engine(model, block_size=4, num_blocks=64).generate(
            [prompts[1]], SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
        assert c[0].completions[0].token_ids == greedy.token_ids
    finally:
        model.config.eos_token_id = None


def test_rows_stopping_mid_batch_leave_the_other_rows_unchanged(models, prompts):
    """Sequences leave the decode batch at different steps; the rows that stay keep their own
    tokens, positions and random streams: each completion is the stop-free one cut at its first stop."""
    _, model = models
    params = dict(n=4, temperature=1.0, max_tokens=12, seed=5)
    free = Engine(model, block_size=4, num_blocks=128).generate(prompts, SamplingParams(**params))
    firsts = [t for r in free for c in r.completions for t in c.token_ids[:6]]
    stop = max(set(firsts), key=firsts.count)  # a token many completions draw early
    engine = Engine(model, block_size=4, num_blocks=128)
    got = engine.generate(prompts, SamplingParams(**params, stop_token_ids=[stop]))
    lengths = set()
    for want_req, got_req in zip(free, got):
        for want, c in zip(want_req.completions, got_req.completions):
            cut = want.token_ids.index(stop) + 1 if stop in want.token_ids else len(want.token_ids)
            assert c.token_ids == want.token_ids[:cut]
            assert c.logprobs == pytest.approx(want.logprobs[:cut], abs=1e-5)
            assert c.finish_reason == ("stop" if stop in want.token_ids else "length")
            lengths.add(cut)
    assert len(lengths) > 2  # rows really did leave at different steps
    assert engine.block_manager.num_free_blocks == 128


def test_max_model_len_ends_with_length(models, prompts):
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=64, max_model_len=16)
    c = engine.generate([prompts[4]], SamplingParams(temperature=0, max_tokens=50))[0].completions[0]
    assert len(prompts[4]) + len(c.token_ids) == 16 and c.finish_reason == "length"


def test_engine_reads_weights_in_place(models, prompts):
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=64, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=6)
    before = engine.generate([prompts[3]], params)[0].completions[0].token_ids
    w = model.lm_head_weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(-1.0)
    try:
        after = engine.generate([prompts[3]], params)[0].completions[0].token_ids
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert after != before


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_weights_are_a_clear_error_not_garbage_tokens(models, prompts, temperature):
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=64, enable_prefix_caching=False)
    w = model.lm_head_weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[3, 0] = float("nan")
    try:
        with pytest.raises(RuntimeError, match="NaN logits"):
            engine.generate([prompts[0]], SamplingParams(temperature=temperature, max_tokens=4, seed=0))
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert engine.block_manager.num_free_blocks == engine.num_blocks  # nothing leaked by the failed call


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_only_in_decode_steps_is_a_clear_error(models, temperature, ahead):
    """NaN embeddings for every token but the prompt's: the prompt's logits (the first token) are finite,
    the first decode step that feeds a generated token produces NaN logits, seen when its tokens arrive."""
    _, model = models
    prompt = [4, 9, 9, 17]
    engine = Engine(model, block_size=4, num_blocks=64, enable_prefix_caching=False, async_decode=ahead)
    w = model.embed_tokens.weight
    saved = w.detach().clone()
    with torch.no_grad():
        others = torch.ones(w.shape[0], dtype=torch.bool)
        others[prompt] = False
        w[others] = float("nan")
    try:
        params = SamplingParams(n=2, temperature=temperature, max_tokens=6, seed=0, ignore_eos=True)
        first = engine.generate([prompt], SamplingParams(n=2, temperature=temperature, max_tokens=1, seed=0))
        assert all(math.isfinite(c.logprobs[0]) for c in first[0].completions)
        with pytest.raises(RuntimeError, match="NaN logits"):
            engine.generate([prompt], params)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_unknown_decode_backend_is_refused_when_the_engine_is_built(models):
    _, model = models
    with pytest.raises(ValueError, match="'trition' is not a backend"):
        Engine(model, block_size=4, num_blocks=8, decode_backend="trition")


def test_a_decode_backend_without_a_path_for_the_models_dtype_is_refused_when_the_engine_is_built(models):
    # the Triton decode kernel has no float64 path: the engine was built, prefilled, then failed at the first
    # decode step
    fp64 = from_pretrained_copy(models[1], "cpu", torch.float64)
    with pytest.raises(ValueError, match="decode_backend='triton'.*float64"):
        Engine(fp64, block_size=4, num_blocks=8, decode_backend="triton")
    engine = Engine(fp64, block_size=4, num_blocks=8, decode_backend="torch")
    assert len(engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))[0].completions[0].token_ids) == 3


def test_a_model_other_than_r1fasts_is_refused_when_the_engine_is_built(tmp_path):
    # a transformers Llama/Qwen3 has a config with every field the engine read, and was accepted; its
    # forward then took the positions for an attention mask and failed deep inside transformers
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64))
    with pytest.raises(TypeError, match=r"model must be an r1fast.models.CausalLM, got transformers\..*"
                                        r"LlamaForCausalLM; load a Hugging Face folder with "
                                        r"r1fast.models.from_pretrained\(path\).*HFRollout"):
        Engine(hf, num_blocks=8)
    with pytest.raises(TypeError, match="got builtins.object"):
        Engine(object())
    with pytest.raises(TypeError, match=r"OptimizedModule; load a Hugging Face folder"):  # compiled transformers
        Engine(torch.compile(hf), num_blocks=8)


def test_a_wrapped_r1fast_model_is_refused_with_the_module_to_pass(models):
    # a compiled (or DDP-wrapped) CausalLM was told to load a checkpoint or use HFRollout, neither of which its
    # caller needs: the message names the wrapped module instead
    _, model = models

    class DataParallelLike(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    for wrapped, path in ((torch.compile(model), "_orig_mod"), (DataParallelLike(model), "module"),
                          (torch.compile(DataParallelLike(model)), "_orig_mod.module")):
        with pytest.raises(TypeError, match=rf"a wrapper around one; pass the wrapped module, model\.{path} "):
            Engine(wrapped, num_blocks=8)
    assert Engine(torch.compile(model)._orig_mod, block_size=4, num_blocks=8).model is model


def test_bad_token_ids_are_named_by_prompt_position_and_value(models):
    # "prompt 1 must hold ints only" named neither the token nor its place; "token ids outside [0, 50)
    # (min -3, max 1)" no place either
    import numpy as np

    _, model = models
    engine = Engine(model, block_size=4, num_blocks=16, max_model_len=20)

    def fails(error, match, prompt):
        with pytest.raises(error, match=match):
            engine.generate([[1, 2], prompt], SamplingParams(max_tokens=1))

    fails(ValueError, r"^generate: prompt 1 has token id 1180591620717411303424 at position 2, outside the "
                      r"vocabulary \[0, 50\)$", [3, 4, 2**70])
    fails(ValueError, r"prompt 1 has token id -3 at position 1, outside the vocabulary \[0, 50\) \(and 1 more\)$",
          [3, -3, 60])
    fails(ValueError, r"prompt 1 has token id 9223372036854775808 at position 0", np.array([2**63, 1], dtype=np.uint64))
    fails(TypeError, r"^generate: prompt 1 must hold ints only; position 1 holds None \(NoneType\)$", [3, None])
    fails(TypeError, r"position 2 holds 2.0 \(float\)$", [3, 4, 2.0])
    fails(TypeError, r"position 0 holds True \(bool\)$", [True, 4])
    fails(TypeError, r"position 1 holds '7' \(str\)$", [3, "7"])
    fails(TypeError, r"prompt 1 must hold ints only, got an array of float64$", np.array([1.0, 2.0]))
    fails(TypeError, r"prompt 1 must hold ints only, got a tensor of torch.bfloat16$", torch.ones(2, dtype=torch.bfloat16))
    fails(TypeError, r"prompt 1 must be a 1-D list of token ids, got 2 dimensions", torch.tensor([[1, 2]]))
    fails(ValueError, r"^generate: prompt 1 is a tensor on the meta device, which holds no token ids",
          torch.tensor([1, 2], device="meta"))
    # numpy ints, numpy arrays and integer tensors are token ids; the result holds Python ints
    # an object array of ints (a pandas object column's values) passed before the checks moved to numpy dtypes
    fails(TypeError, r"prompt 1 must hold ints only; position 1 holds None", np.array([3, None], dtype=object))
    for prompt in ([np.int64(3), 4], np.array([3, 4], dtype=np.int8), torch.tensor([3, 4]),
                   np.array([3, 4], dtype=object)):
        got = engine.generate([prompt], SamplingParams(max_tokens=1, seed=0))[0].prompt_token_ids
        assert got == [3, 4] and all(type(t) is int for t in got)


def test_bad_requests_raise_clear_errors(models, prompts):
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=16, max_model_len=20)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([list(range(20))], SamplingParams())
    with pytest.raises(ValueError, match="n must"):
        engine.generate([[1]], SamplingParams(n=0))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1]], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.generate([[1]], SamplingParams(stop_token_ids=[50]))
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, 99]], SamplingParams())
    with pytest.raises(ValueError, match="exceed max_num_seqs"):
        Engine(model, block_size=4, num_blocks=16, max_num_seqs=2).generate([[1]], SamplingParams(n=3))
    with pytest.raises(ValueError, match="KV blocks"):
        Engine(model, block_size=4, num_blocks=2).generate([[1, 2, 3]], SamplingParams(max_tokens=30))
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate([[1]], dict(n=1))
    with pytest.raises(TypeError, match="list of token-id lists, got str"):
        engine.generate("12", SamplingParams())
    with pytest.raises(ValueError, match="block_size"):
        Engine(model, block_size=0)
    with pytest.raises(ValueError, match="memory_fraction"):
        Engine(model, memory_fraction=1.5)
    with pytest.raises(ValueError, match="pool_tokens_per_seq must be an int >= 1"):
        Engine(model, pool_tokens_per_seq=0)
    # the pool is sized for max_num_seqs sequences of pool_tokens_per_seq, not of max_model_len
    small = Engine(model, block_size=4, max_num_seqs=8, pool_tokens_per_seq=10)
    assert small.num_blocks == 8 * 3 + 1 and small.max_model_len == model.config.max_position_embeddings
    # ... but never smaller than one sequence of max_model_len: 3 x 3 blocks (+1) refused any request past
    # 36 tokens with "needs 16 KV blocks; the pool has 10 (raise num_blocks or memory_fraction)"
    tiny = Engine(model, block_size=4, max_num_seqs=3, pool_tokens_per_seq=10)
    assert tiny.num_blocks == 64 // 4 + 1
    out = tiny.generate([[1, 2, 3]], SamplingParams(max_tokens=100, seed=0))
    assert len(out[0].completions[0].token_ids) == 61 and tiny.block_manager.num_free_blocks == tiny.num_blocks
    with pytest.raises(TypeError, match="async_decode must be True or False, got 'no'"):
        Engine(model, block_size=4, num_blocks=16, async_decode="no")
    with pytest.raises(TypeError, match="progress must be True or False, got 'no'"):  # was taken as on
        engine.generate([[1]], SamplingParams(), progress="no")
    assert engine.generate([], SamplingParams()) == []


def test_an_integer_temperature_past_int64_samples_as_its_float_does(models, prompts):
    # SamplingParams took temperature=2**70 (a finite number >= 1e-5) and generate() then failed in the
    # sampler's division with "OverflowError: int too big to convert"
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=16)
    params = dict(n=2, max_tokens=4, seed=3)
    got = engine.generate([prompts[1]], SamplingParams(temperature=2**70, **params))
    assert got == engine.generate([prompts[1]], SamplingParams(temperature=float(2**70), **params))
    assert SamplingParams(temperature=2**70).temperature == float(2**70)
    with pytest.raises(ValueError, match="temperature must be 0 .greedy. or a finite number"):
        SamplingParams(temperature=10**400)   # past float's range


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_near_tie_that_rounding_reorders_draws_the_same_token(backend):
    """With top-k/top-p the draw walked the kept tokens in rank order: two tokens whose logits differ by
    a rounding step (the batch's shape changes it) swapped places there, and every uniform in their two
    intervals drew the other token (seen: a seeded vocab-2500 run drew 1937 in a tiny pool, 1759 in a
    huge one, both log-prob -6.5774021). The draw now walks vocabulary order, where the swap moves
    interval edges by a rounding step only."""
    from r1fast import ops

    row = torch.randn(64, generator=torch.Generator().manual_seed(0))
    row[5] = 3.0   # the two most likely tokens, 5 and 40: tied up to one float step either way
    below, above = row.clone(), row.clone()
    below[40] = torch.nextafter(torch.tensor(3.0), torch.tensor(-math.inf))
    above[40] = torch.nextafter(torch.tensor(3.0), torch.tensor(math.inf))
    u = torch.arange(400, dtype=torch.float64) / 400
    for params in (SamplingParams(top_p=0.9), SamplingParams(top_k=10),
                   SamplingParams(top_k=20, top_p=0.95, min_p=0.01, temperature=0.7)):
        drawn = [ops.sample_tokens(r.expand(len(u), -1).contiguous(), params, u, backend=backend)[0]
                 for r in (below, above)]
        assert {5, 40} <= set(drawn[0].tolist())
        assert torch.equal(drawn[0], drawn[1]), params


def test_an_empty_call_reports_no_steps_not_the_previous_calls(models, prompts):
    # generate([]) returned early and left last_stats as the call before had set them (7 decode steps...)
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=32)
    engine.generate([prompts[4], prompts[4]], SamplingParams(temperature=0, max_tokens=8))
    assert engine.last_stats["decode"] > 0
    assert engine.generate([], SamplingParams()) == []
    assert engine.last_stats == dict.fromkeys(engine.last_stats, 0)
    engine.generate([prompts[4]], SamplingParams(temperature=0, max_tokens=8))
    keys = set(engine.last_stats)
    engine.generate([], SamplingParams())
    assert set(engine.last_stats) == keys   # the same keys as a call that ran


def test_engine_sizes_may_be_numpy_integers_as_sampling_params_are(models):
    # Engine(num_blocks=np.int64(8)) was refused ("must be an int >= 1, got np.int64(8)") while
    # SamplingParams(max_tokens=np.int64(8)) was taken: a pool size computed with numpy now works too
    import numpy as np

    _, model = models
    engine = Engine(model, num_blocks=np.int64(8), block_size=np.int32(4), max_num_seqs=np.int64(4),
                    max_num_batched_tokens=np.int16(16), max_model_len=np.int64(32), memory_fraction=np.float32(0.5))
    assert all(type(v) is int for v in (engine.num_blocks, engine.block_size, engine.max_num_seqs,
                                        engine.max_num_batched_tokens, engine.max_model_len))
    assert len(engine.generate([[1, 2]], SamplingParams(max_tokens=3, seed=0))[0].completions[0].token_ids) == 3
    for bad in (8.0, torch.tensor(8), True):
        with pytest.raises(ValueError, match="num_blocks must be an int >= 1"):
            Engine(model, num_blocks=bad, block_size=4)
    with pytest.raises(ValueError, match="memory_fraction"):
        Engine(model, memory_fraction=True)


def test_a_pool_sized_from_memory_stops_at_the_block_managers_limit(models, monkeypatch, caplog):
    # a tiny KV per block (block_size 1) and many seats of a long context: memory_fraction asked for more
    # blocks than BlockManager takes (2**26), and Engine() failed in C++ with "num_blocks ... exceeds the limit"
    import logging
    import types

    from r1fast import _ext
    from r1fast.rollout import engine as engine_module

    _, model = models
    limit = _ext.require().BlockManager.max_num_blocks
    monkeypatch.setattr(engine_module.ModelRunner, "kv_bytes_per_block", staticmethod(lambda *a: 1))
    monkeypatch.setattr(engine_module.os, "sysconf", lambda name: 2**20)  # 2**40 bytes of RAM
    sizing = types.SimpleNamespace(config=model.config, block_size=1, model=model, max_num_seqs=2**21,
                                   max_model_len=64)
    with caplog.at_level(logging.WARNING, logger="r1fast.rollout.engine"):
        assert Engine._blocks_from_memory(sizing, 0.5, 64) == limit
    assert f"past the block manager's limit of {limit}" in caplog.text
    sizing.max_num_seqs = 4   # under the limit: sized as before, nothing logged
    caplog.clear()
    assert Engine._blocks_from_memory(sizing, 0.5, 64) == 4 * 64 + 1 and not caplog.text


def test_engine_refuses_a_max_model_len_without_room_for_a_prompt_and_a_new_token(models):
    # Engine(max_model_len=1) was taken, and generate() then refused every prompt (one token or more: "a prompt must
    # leave room for at least one new token"); 2, a prompt token and one new token, is the least an engine runs
    import random

    from r1fast.models import CausalLM

    _, model = models
    positions = model.config.max_position_embeddings
    for bad in (1, 0, -random.randrange(1, 100), 2.0, True):
        with pytest.raises(ValueError, match=rf"^Engine: max_model_len must be an int >= 2 \(a prompt token and one "
                                             rf"new token\), got {bad!r}$"):
            Engine(model, block_size=4, num_blocks=8, max_model_len=bad)
    with pytest.raises(ValueError, match=rf"^Engine: max_model_len {positions + 1} exceeds the model's "
                                         rf"max_position_embeddings {positions}$"):
        Engine(model, block_size=4, num_blocks=8, max_model_len=positions + 1)
    one = CausalLM(ModelConfig(**{**CFG, "max_position_embeddings": 1}))
    with pytest.raises(ValueError, match=r"^Engine: the model runs sequences of 1 token .*below the least an engine "
                                         r"runs, 2$"):
        Engine(one, block_size=4, num_blocks=8)
    # the least: a one-token prompt gets its one token, as the greedy reference's first
    prompt = [random.randrange(CFG["vocab_size"])]
    want = Engine(model, block_size=4, num_blocks=8).generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    got = Engine(model, block_size=3, num_blocks=1, max_model_len=2).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=random.randrange(2, 9)))
    assert got[0].completions[0].token_ids == want[0].completions[0].token_ids
    assert got[0].completions[0].finish_reason == "length"


def test_engine_refuses_max_num_seqs_past_what_any_pool_can_run(models):
    # Engine(max_num_seqs=2**40) was accepted; on CUDA its pinned step buffers are sized by it and failed inside
    # torch's allocator. Each decoding sequence writes into a block of its own, and no pool holds more than the
    # block manager's limit of blocks, so no more sequences than that can ever run at once
    from r1fast import _ext

    _, model = models
    limit = _ext.require().BlockManager.max_num_blocks
    for seats in (limit + 1, 2**40):
        with pytest.raises(ValueError, match=rf"^Engine: max_num_seqs={seats} exceeds {limit}, the most blocks a KV "
                                             rf"pool holds; each running sequence"):
            Engine(model, block_size=4, num_blocks=8, max_num_seqs=seats)
    assert Engine(model, block_size=4, num_blocks=8, max_num_seqs=limit, use_cuda_graphs=False).max_num_seqs == limit


def test_a_pool_of_exactly_one_sequences_kv_is_accepted(models):
    # 10 prompt + 7 new tokens: the 17th token is sampled and never stored, so 16 slots (4 blocks) suffice
    _, model = models
    prompt, params = [list(range(1, 11))], SamplingParams(max_tokens=7, seed=0)
    roomy = Engine(model, block_size=4, num_blocks=64).generate(prompt, params)
    for ahead in (True, False):  # the step-by-step engine schedules every decode step with schedule()
        exact = Engine(model, block_size=4, num_blocks=4, async_decode=ahead)
        got = exact.generate(prompt, params)
        assert got[0].completions[0].token_ids == roomy[0].completions[0].token_ids
        assert exact.block_manager.num_free_blocks == 4 and exact.last_stats["preemptions"] == 0
    with pytest.raises(ValueError, match="needs 4 KV blocks"):
        Engine(model, block_size=4, num_blocks=3).generate(prompt, params)


def test_an_exception_between_fork_and_running_leaks_no_blocks(models):
    """A child forked in the block manager but not yet in any scheduler list (the window before
    prefill_done; likewise allocate before prefilling.append, preempt after running.pop) is freed."""
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=32)
    real = engine.block_manager

    class InterruptedFork:
        def __getattr__(self, name):
            return getattr(real, name)

        def fork(self, parent, child):
            real.fork(parent, child)
            if len(real.seq_ids()) == 3:  # the parent and two children: interrupt the group's fork
                raise KeyboardInterrupt

    engine.block_manager = InterruptedFork()
    params = SamplingParams(n=4, max_tokens=3, seed=0)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([list(range(9))], params)
    engine.block_manager = real
    assert real.seq_ids() == [] and real.num_free_blocks == 32
    assert len(engine.generate([list(range(9))], params)[0].completions) == 4


def test_group_too_large_for_the_pool_decodes_by_preemption_with_unchanged_samples(models):
    _, model = models
    prompt = [list(range(1, 10))]
    params = SamplingParams(n=8, temperature=1.0, max_tokens=6, seed=5)
    roomy = Engine(model, block_size=4, num_blocks=64).generate(prompt, params)
    tight = Engine(model, block_size=4, num_blocks=6)
    squeezed = tight.generate(prompt, params)
    assert tight.last_stats["preemptions"] > 0
    assert [c.token_ids for c in squeezed[0].completions] == [c.token_ids for c in roomy[0].completions]


@pytest.mark.gpu
def test_cuda_engine_graphs_and_backends_match_cpu(models, prompts):
    _, model = models
    # top-k: the torch sampler; min-p with stop ids: the Triton sampler, rows stopping mid-run while the
    # next step is already launched (async_decode)
    top_k = SamplingParams(n=2, temperature=0.8, top_k=20, max_tokens=MAX_NEW, seed=11)
    min_p = SamplingParams(n=2, temperature=1.0, min_p=0.02, max_tokens=MAX_NEW, seed=12, stop_token_ids=[3, 11, 20])
    gpu_model = from_pretrained_copy(model, "cuda")
    for params in (top_k, min_p):
        cpu = Engine(model, block_size=4, num_blocks=64).generate(prompts, params)
        # the shared-prefix tiles forced on for both kernels: by default they are used only where timed faster,
        # which on an H200 they are not, and then no other GPU test decoded with them inside the graphs
        for opts in (dict(), dict(async_decode=False), dict(use_cuda_graphs=False), dict(decode_backend="triton"),
                     dict(decode_backend="cuda", max_num_batched_tokens=5),
                     dict(decode_backend="triton", shared_prefix_attention=True),
                     dict(decode_backend="cuda", shared_prefix_attention=True)):
            engine = Engine(gpu_model, block_size=4, num_blocks=64, max_num_seqs=16, **opts)
            if opts.get("use_cuda_graphs", True):
                assert engine.runner.graphs, "CUDA graph capture fell back to eager"
            if opts.get("shared_prefix_attention"):
                assert engine.runner.shared_prefix, opts
            out = engine.generate(prompts, params)
            for a, b in zip(cpu, out):
                assert [(c.token_ids, c.finish_reason) for c in a.completions] == \
                    [(c.token_ids, c.finish_reason) for c in b.completions], opts
                for ca, cb in zip(a.completions, b.completions):
                    assert ca.logprobs == pytest.approx(cb.logprobs, abs=1e-3)
    bf16 = from_pretrained_copy(model, "cuda", torch.bfloat16)
    res = Engine(bf16, block_size=16, max_num_seqs=16).generate(prompts, top_k)
    assert all(len(c.token_ids) == MAX_NEW for r in res for c in r.completions)


def from_pretrained_copy(model, device, dtype=None):
    import copy

    m = copy.deepcopy(model).to(device)
    return m.to(dtype) if dtype is not None else m


def test_random_engine_limits_never_change_seeded_outputs(models):
    """Pool size, batch-token budget and seat count change the schedule, never the samples."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    _, model = models
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, CFG["vocab_size"], (n,), generator=g).tolist() for n in (2, 7, 12)]
    params = SamplingParams(n=3, temperature=1.0, min_p=0.05, max_tokens=7, seed=99)
    want = [[c.token_ids for c in r.completions] for r in Engine(model, block_size=4, num_blocks=64).generate(
        prompts, params)]

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(num_blocks=st.integers(5, 20), budget=st.integers(1, 16), seats=st.integers(3, 9),
           block_size=st.sampled_from([2, 4, 8]), prefix=st.booleans())
    def check(num_blocks, budget, seats, block_size, prefix):
        if math.ceil((12 + 7) / block_size) > num_blocks:
            num_blocks = math.ceil((12 + 7) / block_size)
        engine = Engine(model, block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=budget,
                        max_num_seqs=seats, enable_prefix_caching=prefix)
        got = [[c.token_ids for c in r.completions] for r in engine.generate(prompts, params)]
        assert got == want, engine.last_stats
        assert engine.block_manager.num_free_blocks == num_blocks

    check()


def test_decode_steps_run_with_fp8_layers_disabled(models, monkeypatch):
    # Decode (and so every captured CUDA graph) runs FP8 layers in high precision; prefill does not.
    from r1fast.fp8 import fp8_enabled

    _, model = models
    seen = []
    forward = type(model).forward

    def spy(self, *args, attn=None, **kwargs):
        seen.append((type(attn).__name__, fp8_enabled()))
        return forward(self, *args, attn=attn, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    Engine(model, block_size=4, num_blocks=64).generate([[1, 2, 3]], SamplingParams(max_tokens=4, seed=0))
    assert ("PrefillContext", True) in seen
    decode = [enabled for kind, enabled in seen if kind == "DecodeContext"]
    assert decode and not any(decode)


def test_float64_greedy_under_random_engine_settings_equals_transformers_with_its_logprobs(models):
    """A float64 model (no other engine test decodes one) under random pools (down to one sequence's blocks),
    block sizes, chunk budgets, seats, max_model_len, stops and n: every completion is transformers' greedy
    continuation cut at its first stop or limit, with that finish reason, and its logprobs are
    log_softmax(logits)[token] of the float64 model (the engine's are fp32 values of fp32 logits)."""
    import numpy as np

    hf, model = models
    hf64, model64 = from_pretrained_copy(hf, "cpu", torch.float64), from_pretrained_copy(model, "cpu", torch.float64)
    rng = np.random.default_rng(5)
    for _ in range(6):
        block_size, max_model_len = int(rng.choice([1, 3, 4, 8])), int(rng.integers(8, 40))
        prompts = [rng.integers(0, CFG["vocab_size"], size=int(rng.integers(1, min(14, max_model_len)))).tolist()
                   for _ in range(int(rng.integers(1, 4)))]
        n, max_tokens = int(rng.integers(1, 4)), int(rng.integers(1, 16))
        stops = rng.integers(0, CFG["vocab_size"], size=int(rng.integers(0, 3))).tolist()
        need = max(math.ceil((min(len(p) + max_tokens, max_model_len) - 1) / block_size) for p in prompts)
        engine = Engine(model64, block_size=block_size, num_blocks=max(need, 1) + int(rng.integers(0, 3)),
                        max_num_seqs=n + int(rng.integers(0, 4)), max_num_batched_tokens=int(rng.integers(1, 20)),
                        max_model_len=max_model_len, enable_prefix_caching=bool(rng.random() < 0.7),
                        async_decode=bool(rng.random() < 0.5))
        results = engine.generate(prompts, SamplingParams(n=n, temperature=0, max_tokens=max_tokens,
                                                          stop_token_ids=stops))
        for p, res in zip(prompts, results):
            limit = min(max_tokens, max_model_len - len(p))
            want = _hf_greedy(hf64, p, limit)
            hit = next((i for i, t in enumerate(want) if t in stops), None)
            cut = limit if hit is None else hit + 1
            with torch.no_grad():
                logp = torch.log_softmax(hf64(torch.tensor([p + want[:cut]])).logits[0], -1)
            want_logprobs = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(want[:cut])]
            for c in res.completions:
                assert (c.token_ids, c.finish_reason) == (want[:cut], "length" if hit is None else "stop")
                assert c.logprobs == pytest.approx(want_logprobs, abs=1e-5)
        assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_random_limits_and_stops_equal_the_free_run_cut_at_the_first_stop(models):
    """The Running rows' bookkeeping under stress: random stop tokens, max_tokens, max_model_len, pool,
    batch-token budget and seats; every completion is the stop-free, limit-free one cut at its first
    stop (reason "stop"), else at max_tokens or max_model_len (reason "length")."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    _, model = models
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, CFG["vocab_size"], (n,), generator=g).tolist() for n in (1, 4, 9, 4)]
    prompts[3] = list(prompts[1])  # a repeated prompt: its own random streams
    free_params = dict(n=3, temperature=1.3, seed=17)
    free = Engine(model, block_size=4, num_blocks=128).generate(prompts, SamplingParams(**free_params, max_tokens=12))

    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
    @given(stops=st.lists(st.integers(0, CFG["vocab_size"] - 1), max_size=3), max_tokens=st.integers(1, 12),
           max_model_len=st.integers(10, 64), num_blocks=st.integers(1, 24), budget=st.integers(1, 12),
           seats=st.integers(3, 10), block_size=st.sampled_from([1, 2, 4]), prefix=st.booleans(),
           ahead=st.booleans())
    def check(stops, max_tokens, max_model_len, num_blocks, budget, seats, block_size, prefix, ahead):
        longest = min(9 + max_tokens, max_model_len)
        num_blocks = max(num_blocks, math.ceil((longest - 1) / block_size))
        engine = Engine(model, block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=budget,
                        max_num_seqs=seats, max_model_len=max_model_len, enable_prefix_caching=prefix,
                        async_decode=ahead)
        got = engine.generate(prompts, SamplingParams(**free_params, max_tokens=max_tokens, stop_token_ids=stops))
        for p, want_req, got_req in zip(prompts, free, got):
            for want, c in zip(want_req.completions, got_req.completions):
                limit = min(max_tokens, max_model_len - len(p))
                hit = next((i for i, t in enumerate(want.token_ids[:limit]) if t in stops), None)
                cut = limit if hit is None else hit + 1
                assert c.token_ids == want.token_ids[:cut], engine.last_stats
                assert c.logprobs == pytest.approx(want.logprobs[:cut], abs=1e-5)
                assert c.finish_reason == ("length" if hit is None else "stop")
        assert engine.block_manager.num_free_blocks == num_blocks

    check()


@pytest.mark.parametrize("opts", [dict(num_blocks=64), dict(num_blocks=8, max_num_seqs=5)])
def test_decoding_one_step_ahead_changes_no_output(models, prompts, opts, monkeypatch):
    """async_decode launches step k+1 from step k's samples still on the device, then reads step k's
    tokens: completions, log-probs and finish reasons equal the step-by-step engine's, also with
    stops mid-run, seats freed by finishing rows and preemption; only the discarded rows differ."""
    _, model = models
    params = SamplingParams(n=3, temperature=1.2, max_tokens=9, seed=5, stop_token_ids=[3, 11, 20, 41])
    runs = {}
    for ahead in (False, True):
        engine = Engine(model, block_size=4, async_decode=ahead, **opts)
        calls = []
        decode = engine.runner.decode
        monkeypatch.setattr(engine.runner, "decode", lambda *a, **k: calls.append(sorted(k)) or decode(*a, **k))
        out = engine.generate(prompts, params)
        runs[ahead] = ([[(c.token_ids, c.finish_reason) for c in r.completions] for r in out],
                       [[c.logprobs for c in r.completions] for r in out], engine.last_stats, calls)
        assert engine.block_manager.num_free_blocks == engine.num_blocks
    (tokens, logprobs, stats, calls), (tokens_a, logprobs_a, stats_a, calls_a) = runs[False], runs[True]
    assert tokens_a == tokens
    assert {r for req in tokens for _, r in req} == {"stop", "length"}
    for want, got in zip(logprobs, logprobs_a):
        for w, g in zip(want, got):
            assert g == pytest.approx(w, abs=1e-5)
    assert stats["discarded_tokens"] == 0 and all(c == ["last_tokens"] for c in calls)
    assert ["tokens_from"] in calls_a and stats_a["discarded_tokens"] > 0
    if "max_num_seqs" in opts:
        assert stats["preemptions"] > 0 and stats_a["preemptions"] > 0


def _engine_with_pinned_buffers(model, monkeypatch, waits: list):
    """An engine on the GPU engine's path for a step's samples (two sets of host buffers, copies marked
    ready by an event), over plain CPU tensors with a stand-in event that appends to `waits` when waited on."""
    class Event:
        def record(self, stream):
            pass

        def synchronize(self):
            waits.append(self)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    engine = Engine(model, block_size=4, num_blocks=64, max_num_seqs=16)
    engine._pinned = [{name: torch.full((16,), -1, dtype=dt) for name, dt in
                       (("uniforms", torch.float64), ("tokens", torch.int64), ("logprobs", torch.float32))}
                      for _ in range(2)]
    return engine


def test_pinned_buffers_of_steps_in_flight_are_not_overwritten_before_they_are_read(models, prompts, monkeypatch):
    """The GPU engine's two alternating sets of host buffers (uniforms in, samples out), run here over
    plain CPU tensors with a stand-in event: a step's samples are read from its own set after the next
    step has filled the other, and the outputs equal the CPU engine's."""
    _, model = models
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=3, stop_token_ids=[5, 17])
    want = Engine(model, block_size=4, num_blocks=64).generate(prompts, params)
    engine = _engine_with_pinned_buffers(model, monkeypatch, [])
    got = engine.generate(prompts, params)
    assert engine.last_stats["discarded_tokens"] > 0
    for a, b in zip(want, got):
        assert [(c.token_ids, c.finish_reason) for c in a.completions] == \
            [(c.token_ids, c.finish_reason) for c in b.completions]
        for ca, cb in zip(a.completions, b.completions):
            assert cb.logprobs == pytest.approx(ca.logprobs, abs=1e-6)


def test_a_decode_step_waits_for_the_device_once(models, prompts, monkeypatch):
    """The design's budget of host syncs: a decode step's launch and collection wait on the device once
    (the event of its samples' copy) and read no tensor value besides (no .item(), .tolist(), .cpu(),
    bool()), on the GPU engine's path for samples, with stops, discarded rows and rows reaching their
    limit. The sampler is left out: its torch form reads one flag on the CPU only."""
    from r1fast.rollout import engine as engine_module

    _, model = models
    waits, reads, counting = [], [], [False]
    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__"):
        def read(self, *args, _name=name, _real=getattr(torch.Tensor, name), **kwargs):
            if counting[0]:
                reads.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    def counted(fn, on):
        def run(*args, **kwargs):
            before, counting[0] = counting[0], on
            try:
                return fn(*args, **kwargs)
            finally:
                counting[0] = before
        return run

    monkeypatch.setattr(engine_module.Engine, "_launch_decode", counted(engine_module.Engine._launch_decode, True))
    monkeypatch.setattr(engine_module.Engine, "_collect", counted(engine_module.Engine._collect, True))
    monkeypatch.setattr(engine_module.ops, "sample_tokens", counted(engine_module.ops.sample_tokens, False))
    engine = _engine_with_pinned_buffers(model, monkeypatch, waits)
    engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=3, stop_token_ids=[5, 17]))
    stats = engine.last_stats
    assert stats["decode"] > 0 and stats["discarded_tokens"] > 0
    assert len(waits) == stats["decode"]
    assert reads == []


@pytest.mark.parametrize("opts", [dict(num_blocks=64), dict(num_blocks=12, max_num_seqs=6)])
def test_shared_prefix_decode_matches_transformers(models, prompts, hf_greedy, opts, monkeypatch):
    """The triton decode path with shared-prefix tiles (the G samples read their prompt's blocks once):
    greedy tokens still equal transformers', with and without preemption, and the tiles were used."""
    from r1fast import ops

    _, model = models
    seen = []
    real = ops.paged_decode_attention

    def recording(*args, shared_prefix=None, **kwargs):
        if shared_prefix is not None:
            seen.append(int(shared_prefix.tile_prefix.max()))
        return real(*args, shared_prefix=shared_prefix, **kwargs)

    skip_without_triton_on_cpu()
    monkeypatch.setattr(ops, "paged_decode_attention", recording)
    engine = Engine(model, block_size=4, decode_backend="triton", **opts)
    assert engine.runner.shared_prefix
    results = engine.generate(prompts, SamplingParams(n=3, temperature=0, max_tokens=MAX_NEW))
    for res, want in zip(results, hf_greedy):
        assert [c.token_ids for c in res.completions] == [want] * 3
    assert seen and max(seen) >= 8  # prompts of 9 and 13 tokens share 2 and 3 whole blocks
    if opts["num_blocks"] == 12:
        assert engine.last_stats["preemptions"] > 0


def test_shared_prefix_attention_follows_the_start_up_timing_unless_forced(models, monkeypatch, caplog):
    """Where the runner checks its kernels (a GPU; stood in for here), the default
    shared_prefix_attention=None keeps the shared-prefix tiles only where the chosen backend's decode
    step is timed 5% faster or more with them (at H200's 0.157 against 0.114 ms it was on, and slower);
    True keeps them untimed wherever they pass the check, False never; other values are refused."""
    import logging

    from r1fast.rollout import runner as runner_module, self_check

    skip_without_triton_on_cpu()
    _, model = models
    # a CPU engine keeps them wherever the backend reads them, untimed (no graphs there)
    assert Engine(model, block_size=4, num_blocks=16, decode_backend="triton").runner.shared_prefix
    monkeypatch.setattr(runner_module, "_checks_kernels", lambda device: True)
    correct = {"paged_decode_attention": ["triton"], "store_kv": ["torch"]}
    monkeypatch.setattr(self_check, "correct_backends", lambda op, *args, **kwargs: correct[op])
    checked, timed, seconds, contexts, graphs = [], [], {}, [], []

    def check(backend, *args):
        checked.append(backend)
        return seconds.get("correct", True)

    def fake_seconds(backend, device, dtype, *shape, batch, group, shared_prefix, context=1024, graph=True):
        timed.append((backend, batch, group, shared_prefix))
        contexts.append(context)
        graphs.append(graph)
        return seconds[shared_prefix]
    monkeypatch.setattr(self_check, "shared_prefix_ok", check)
    monkeypatch.setattr(self_check, "decode_seconds", fake_seconds)

    def uses_tiles(**opts):
        checked.clear()
        timed.clear()
        return Engine(model, block_size=4, num_blocks=16, max_num_seqs=24, **opts).runner.shared_prefix

    for plain, shared, kept in ((100e-6, 90e-6, True), (100e-6, 96e-6, False), (114e-6, 157e-6, False)):
        seconds.update({False: plain, True: shared})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="r1fast.rollout.self_check"):
            assert uses_tiles() is kept
        assert checked == ["triton"] and timed == [("triton", 24, 8, False), ("triton", 24, 8, True)]
        assert f"triton {plain * 1e6:.1f} us, triton+tiles {shared * 1e6:.1f} us; " \
            f"using {'triton+tiles' if kept else 'triton'}" in caplog.text
    assert uses_tiles(shared_prefix_attention=True) and checked == ["triton"] and timed == []
    assert not uses_tiles(shared_prefix_attention=False) and checked == [] and timed == []
    assert not uses_tiles(decode_backend="torch") and timed == []  # a backend that ignores tiles is not timed
    # a forced backend is not checked (as before) but still timed by default
    seconds[True] = 50e-6
    assert uses_tiles(decode_backend="triton") and checked == [] and len(timed) == 2
    # timed on sequences no longer than the engine's longest (under the timing's usual 1024 tokens)
    longest = Engine(model, block_size=4, num_blocks=16, decode_backend="torch").max_model_len
    assert longest < 1024 and contexts and set(contexts) == {longest}
    contexts.clear()
    assert uses_tiles(max_model_len=40) and contexts == [40, 40]
    # timed as the engine will decode: graph replays, or eager launches without graphs
    assert set(graphs) == {True}
    graphs.clear()
    assert uses_tiles(use_cuda_graphs=False) and graphs == [False, False]
    seconds["correct"] = False  # a path that fails its check is neither used nor timed, even when asked for
    assert not uses_tiles() and timed == []
    assert not uses_tiles(shared_prefix_attention=True)
    # two correct backends: the pair is chosen together, cuda+tiles over the triton that beats plain cuda
    seconds["correct"] = True
    correct["paged_decode_attention"] = ["cuda", "triton"]
    pair_us = {("cuda", False): 100e-6, ("cuda", True): 80e-6, ("triton", False): 90e-6, ("triton", True): 88e-6}
    monkeypatch.setattr(self_check, "decode_seconds",
                        lambda backend, *args, shared_prefix, **kwargs: pair_us[backend, shared_prefix])
    checked.clear()
    runner = Engine(model, block_size=4, num_blocks=16, max_num_seqs=24).runner
    assert (runner.decode_backend, runner.shared_prefix) == ("cuda", True) and checked == ["cuda", "triton"]
    # an engine of one row can hold no tile: no shared-prefix check or timing, tiles off even when asked for;
    # its two backends are raced plain (group 1)
    monkeypatch.setattr(self_check, "decode_seconds", fake_seconds)
    for opts in ({}, dict(shared_prefix_attention=True)):
        checked.clear()
        timed.clear()
        assert not Engine(model, block_size=4, num_blocks=16, max_num_seqs=1, **opts).runner.shared_prefix
        assert checked == [] and timed == [("cuda", 1, 1, False), ("triton", 1, 1, False)]
    # a failed capture (here: no pinned memory on a CPU) leaves eager decoding: the choice, timed for graph
    # replays, is made again timed eagerly; the tiles paid only as replays
    correct["paged_decode_attention"] = ["triton"]
    modes = []

    def by_mode(backend, *args, shared_prefix, graph, **kwargs):
        modes.append((shared_prefix, graph))
        return (50e-6 if graph else 120e-6) if shared_prefix else 100e-6
    monkeypatch.setattr(self_check, "decode_seconds", by_mode)
    monkeypatch.setattr(runner_module, "_captures_graphs", lambda device: True)
    checked.clear()
    with caplog.at_level(logging.WARNING):
        runner = Engine(model, block_size=4, num_blocks=16, max_num_seqs=24).runner
    assert runner.graphs == {} and "CUDA graph capture failed" in caplog.text
    assert modes == [(False, True), (True, True), (False, False), (True, False)] and not runner.shared_prefix
    assert checked == ["triton"]  # timed again, not checked again
    modes.clear()
    assert not Engine(model, block_size=4, num_blocks=16, max_num_seqs=24, use_cuda_graphs=False).runner.shared_prefix
    assert modes == [(False, False), (True, False)]  # no capture asked for: timed eagerly once
    for bad in ("auto", 1, 0):
        with pytest.raises(TypeError, match=f"shared_prefix_attention must be None .*, True or False, got {bad!r}"):
            Engine(model, block_size=4, num_blocks=16, shared_prefix_attention=bad)


def skip_without_triton_on_cpu():
    """Tests that run the Triton backend on a CPU model: Triton takes CPU tensors only under
    TRITON_INTERPRET=1, which conftest sets on a machine without CUDA and not on a GPU machine."""
    from r1fast import backends
    try:
        backends.resolve("paged_decode_attention", torch.device("cpu"), "triton")
    except ValueError:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (unset on a machine with CUDA)")


def test_graph_inputs_staged_in_one_buffer_match_the_eager_inputs(models):
    """A CUDA-graph decode step fills one host buffer (typed views at 16-byte aligned offsets) and copies
    it in one go; here the same layout over CPU bytes: what the graph's tensor views read back equals
    the eager step's inputs on the batch rows, and the padding rows and tiles are the graph's."""
    import numpy as np

    from r1fast.ops.shared_prefix import pad_shared_prefix
    from r1fast.rollout.runner import _layout, _views

    skip_without_triton_on_cpu()
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=64, decode_backend="triton")
    runner, bm = engine.runner, engine.block_manager
    bm.allocate(0, list(range(10)))
    for child in (1, 2):
        bm.fork(0, child)
    bm.allocate(3, [7, 7, 7, 7, 7])
    ids = np.array([0, 3, 1, 2], dtype=np.int64)
    slots, _ = bm.append_batch(ids, np.array([1, 2, 3, 4], dtype=np.int32))
    last, positions = np.array([1, 2, 3, 4]), np.array([10, 5, 10, 10])

    eager = {n: np.empty(shape, dt) for n, dt, shape in runner._decode_fields(4, 0)}
    eager["block_tables"] = bm.block_tables(ids)
    runner._fill_decode_inputs(eager, ids, positions, slots, False, last_tokens=last)
    assert eager["row_start"].tolist() == [8, 0, 8, 8]  # the forks share 2 whole blocks

    layout, nbytes = _layout(runner._decode_fields(8, runner.max_blocks_per_seq))
    assert all(off % 16 == 0 for *_, off in layout)
    host, dev = torch.zeros(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    staged, static = _views(host, layout, as_numpy=True), _views(dev, layout, as_numpy=False)
    bm.block_tables(ids, 0, 0, out=staged["block_tables"])
    runner._fill_decode_inputs(staged, ids, positions, slots, True, last_tokens=last)
    dev.copy_(host)  # the one copy a GPU step makes
    got = {k: v.numpy() for k, v in static.items()}
    for name in ("input_ids", "positions", "slots", "context_lens"):
        assert got[name][:4].tolist() == eager[name].tolist(), name
    # a step one ahead takes its tokens from the last step's samples on the device instead
    runner._fill_decode_inputs(staged, ids, positions, slots, True, source_rows=np.array([3, 0, 2, 1]))
    dev.copy_(host)
    assert static["source_rows"].tolist() == [3, 0, 2, 1, 0, 0, 0, 0]
    assert static["input_ids"].tolist() == [0] * 8
    assert (got["block_tables"][:4, : eager["block_tables"].shape[1]] == eager["block_tables"]).all()
    assert (got["block_tables"][:4, eager["block_tables"].shape[1]:] == 0).all() and (got["block_tables"][4:] == 0).all()
    assert got["slots"][4:].tolist() == [-1] * 4 and got["context_lens"][4:].tolist() == [1] * 4
    want = pad_shared_prefix(engine.runner._shared_prefix(ids, eager["block_tables"], eager["context_lens"]), 4, 8)
    for name, arr in want._asdict().items():
        assert got[name].tolist() == arr.tolist(), name
    # the tables are written in place only into a buffer that fits them
    with pytest.raises(ValueError, match="int32 numpy array"):
        bm.block_tables(ids, 0, 0, out=np.zeros((4, 20), dtype=np.int64))
    with pytest.raises(ValueError, match="needs at least"):
        bm.block_tables(ids, 0, 0, out=np.zeros((4, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="C-contiguous"):
        bm.block_tables(ids, 0, 0, out=np.zeros((4, 40), dtype=np.int32)[:, ::2])


def test_sampled_tokens_obey_the_filters_and_logprobs_follow_the_temperature(models, prompts):
    """End to end through the engine (not just the sampling op): each token lies in the top-k / top-p /
    min-p support of the tempered distribution, and its logprob is log_softmax(logits / T) before the
    filters, as the model scores the finished sequence (docs/rollout.md)."""
    _, model = models
    t, top_k, top_p, min_p = 0.7, 5, 0.8, 0.1
    params = SamplingParams(n=4, temperature=t, top_k=top_k, top_p=top_p, min_p=min_p, max_tokens=8, seed=3,
                            ignore_eos=True)
    out = Engine(model, block_size=4, num_blocks=64).generate(prompts[:3], params)
    checked = 0
    for prompt, res in zip(prompts[:3], out):
        for c in res.completions:
            ids = torch.tensor(prompt + c.token_ids)
            with torch.no_grad():
                logits = model.logits(model(ids))[len(prompt) - 1:-1].double() / t
            logp = torch.log_softmax(logits, -1)
            for pos, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
                row = logp[pos]
                assert lp == pytest.approx(row[tok].item(), abs=2e-4)
                better = row > row[tok]
                # loose bounds valid in any order of the filters: rank, mass above the token, ratio to the best
                assert int(better.sum()) < top_k
                assert float(row[better].exp().sum()) < top_p + 1e-6
                assert row[tok].exp() >= min_p * row.max().exp() - 1e-9
                checked += 1
    assert checked == 3 * 4 * 8


def test_generate_calls_from_two_threads_take_turns(models, prompts):
    # a call's cleanup frees every sequence the block manager holds: two threads sharing one engine
    # failed with "BlockManager: unknown sequence id" (each freed the other's sequences)
    import threading

    _, model = models
    engine = Engine(model, block_size=4, num_blocks=64)
    jobs = [(prompts, SamplingParams(n=3, max_tokens=MAX_NEW, seed=1)),
            (prompts[:2], SamplingParams(n=2, max_tokens=3, seed=2))]
    want = [[[c.token_ids for c in r.completions] for r in engine.generate(p, params)] for p, params in jobs]
    got, errors = [[], []], []

    def work(k):
        try:
            for _ in range(3):
                got[k].append([[c.token_ids for c in r.completions] for r in engine.generate(*jobs[k])])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == [[want[0]] * 3, [want[1]] * 3]
    assert engine.block_manager.num_free_blocks == 64


class _EagerGraph:
    """A CPU stand-in for a captured decode graph: replay() runs the step eagerly on the graph's input tensors."""

    def __init__(self, runner, static):
        self.runner, self.static = runner, static

    def replay(self):
        self.static["hidden"] = self.runner._run_decode(self.static)


@pytest.mark.parametrize("decode_backend", [None, "triton"])
def test_graph_steps_copy_only_the_table_columns_they_read(models, prompts, decode_backend, monkeypatch):
    """A graph decode step copied its block tables at the full max_model_len width every step (2 MiB at
    256 rows and 32k tokens); it copies the columns its longest context reads now, into the first
    columns of the graph's full-width tables. The columns past them keep an earlier step's block ids
    (the longest prompt's rows leave first here), which the kernels must not read: the greedy tokens
    equal an eager engine's. The graphs are emulated on the CPU over the same staging buffers."""
    import contextlib
    import types

    import numpy as np

    if decode_backend == "triton":
        skip_without_triton_on_cpu()
    _, model = models
    params = SamplingParams(n=2, temperature=0, max_tokens=MAX_NEW)
    opts = dict(block_size=2, num_blocks=128, max_model_len=20, max_num_seqs=16, decode_backend=decode_backend)
    ordered = sorted(prompts, key=len, reverse=True)  # the 13-token prompt's rows first; they stop at 20 tokens
    want = Engine(model, **opts).generate(ordered, params)

    engine = Engine(model, **opts)
    runner = engine.runner
    buckets = [1, 2, 4, 8, 16]
    layouts = runner._make_staging(buckets, pin_memory=False)
    runner._staging_free = types.SimpleNamespace(synchronize=lambda: None)
    for b in buckets:
        graph = _EagerGraph(runner, runner._graph_inputs(b, layouts[b][0]))
        runner.graphs[b] = (graph, graph.static)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    uploads, upload = [], runner._upload_staged

    def recording(bucket, nbytes, width):
        upload(bucket, nbytes, width)
        rows = int((runner._staged[bucket]["context_lens"] > 1).sum())  # the batch's rows (padding has 1)
        lens = runner._staged[bucket]["context_lens"][:rows]
        stale = bool((runner._graph_tables[:rows, width:] != 0).any())
        uploads.append((bucket, nbytes, width, -(-int(lens.max()) // 2), stale))

    monkeypatch.setattr(runner, "_upload_staged", recording)
    got = engine.generate(ordered, params)
    assert [[c.token_ids for c in r.completions] for r in got] == [[c.token_ids for c in r.completions] for r in want]
    assert len(uploads) == engine.last_stats["decode"]
    for bucket, nbytes, width, blocks, _ in uploads:
        assert width == blocks < runner.max_blocks_per_seq or width == blocks == runner.max_blocks_per_seq
        assert nbytes == runner._tables_offset[bucket] + bucket * width * np.dtype(np.int32).itemsize
    assert min(width for _, _, width, _, _ in uploads) < runner.max_blocks_per_seq
    assert any(stale for *_, stale in uploads)  # stale block ids sat past the copied columns


def test_an_unseeded_generate_leaves_the_callers_torch_random_stream_alone(models, prompts):
    # its seed was drawn with torch.randint: a user's torch.rand after the call gave other numbers
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=32)
    torch.manual_seed(1234)
    want = torch.rand(5)
    torch.manual_seed(1234)
    engine.generate([prompts[1], prompts[2]], SamplingParams(n=2, temperature=1.0, max_tokens=4, ignore_eos=True))
    assert torch.equal(torch.rand(5), want)
    # still a fresh seed per call: two unseeded calls on one prompt draw other samples (16 tokens, 2 of each)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, ignore_eos=True)
    draws = {tuple(c.token_ids) for _ in range(2) for c in engine.generate([prompts[2]], params)[0].completions}
    assert len(draws) > 2


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_generate_under_an_enclosing_autocast_samples_as_without_it(models, prompts, autocast_dtype):
    # a training step wrapped in torch.autocast ran the engine's projections in bf16/fp16 against an fp32 KV
    # cache: the first prefill failed in store_kv ("must share a float dtype")
    _, model = models
    engine = Engine(model, block_size=4, num_blocks=32)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=5, seed=21, ignore_eos=True)
    want = engine.generate(prompts[:3], params)
    with torch.autocast("cpu", dtype=autocast_dtype):
        got = engine.generate(prompts[:3], params)
    assert [[(c.token_ids, c.logprobs) for c in r.completions] for r in got] == \
        [[(c.token_ids, c.logprobs) for c in r.completions] for r in want]


def test_decode_graphs_are_captured_with_the_callers_autocast_off(models, monkeypatch):
    # an Engine built inside torch.autocast captured its CUDA graphs under it: every decode step replayed its
    # bf16/fp16 matmuls (generate() turns autocast off, a replayed graph keeps what it captured). On the CPU no
    # graph is captured: the capture is stood in for, and sees whether autocast is on
    from r1fast.rollout import runner as runner_module

    _, model = models
    seen = []
    monkeypatch.setattr(runner_module, "_captures_graphs", lambda device: True)
    monkeypatch.setattr(runner_module.ModelRunner, "_capture_graphs",
                        lambda self, max_num_seqs: seen.append(torch.is_autocast_enabled("cpu")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Engine(model, block_size=4, num_blocks=8)
    assert seen == [False]


def test_a_model_on_the_meta_device_is_refused_naming_its_parameters():
    # a model built under torch.device("meta") (weights not loaded yet) failed in the weights' checksum with a bare
    # "Cannot copy out of meta tensor; no data!"
    from r1fast.models import CausalLM

    with torch.device("meta"):
        model = CausalLM(ModelConfig(**CFG))
    with pytest.raises(ValueError, match=r"parameters \(embed_tokens\.weight and \d+ more\) are on the meta device.*"
                                         r"load its weights first"):
        Engine(model, block_size=4, num_blocks=8)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    assert len(Engine(model, block_size=4, num_blocks=8).generate([[1, 2]], SamplingParams(max_tokens=2, seed=0))[0]
               .completions[0].token_ids) == 2
