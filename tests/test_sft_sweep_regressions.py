"""SFT defects found by a randomized differential sweep of SFTTrainer against an independent float64
training loop: what each example trains on, and bad rows refused with an error naming them."""
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
