"""SFT defects found by a randomized differential sweep of SFTTrainer against an independent float64
training loop: what each example trains on, and bad rows refused with an error naming them."""
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
