"""model: decoder training forward+backward over a packed batch, r1fast vs transformers.

Both sides run the decoder body only (embedding, layers, final norm) and backpropagate a fixed
random cotangent from the final hidden states; the vocabulary projection belongs to the logprob
suite. transformers gets the same sequences twice: as one packed row with restarting position_ids,
its own packed-sequence path (flash-attn varlen when installed, else SDPA with a block-diagonal mask
over all the tokens), and as a right-padded batch with an attention mask, as TRL feeds it.
"""
import torch

from r1fast.bench.harness import QWEN25_15B, Case, Impl, gpu_size, suite

TINY = dict(architecture="Qwen2ForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _batch(lengths, vocab, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g).to(device)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    return ids, cu, pos


def _cotangent(tokens, hidden, dtype, device):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(tokens, hidden, generator=g) * 1e-2).to(device=device, dtype=dtype)


def _r1fast(cfg_kwargs, lengths, dtype, device):
    def setup():
        from r1fast.models import CausalLM, ModelConfig

        cfg = ModelConfig(**cfg_kwargs)
        with torch.device(device):
            model = CausalLM(cfg).to(dtype)
        ids, cu, _ = _batch(lengths, cfg.vocab_size, device)
        dy = _cotangent(ids.numel(), cfg.hidden_size, dtype, device)

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, cu_seqlens=cu).backward(dy)
        return step
    return setup


def _transformers(cfg_kwargs, lengths, dtype, device, padded=False):
    """padded: the sequences as rows of a right-padded [B, longest] batch with an attention mask, as TRL
    feeds transformers (the padding's tokens are computed too); else one packed row (without flash-attn
    transformers' SDPA then gets a tokens x tokens block-diagonal mask)."""
    def setup():
        import transformers

        from r1fast.models import ModelConfig

        cfg = ModelConfig(**cfg_kwargs)
        hf = {k: v for k, v in cfg.to_hf_config(dtype).items() if k != "model_type"}
        hf_config = transformers.AutoConfig.for_model(cfg.model_type, **hf)
        try:
            import flash_attn  # noqa: F401
            impl = "flash_attention_2" if device.type == "cuda" and dtype != torch.float32 else "sdpa"
        except ImportError:
            impl = "sdpa"
        hf_config._attn_implementation = impl
        with torch.device(device):
            try:
                model = transformers.AutoModel.from_config(hf_config, dtype=dtype)
            except TypeError:  # transformers < 4.56 names it torch_dtype
                model = transformers.AutoModel.from_config(hf_config, torch_dtype=dtype)
        model = model.to(device=device, dtype=dtype)
        model.train()
        ids, _, pos = _batch(lengths, cfg.vocab_size, device)
        dy = _cotangent(ids.numel(), cfg.hidden_size, dtype, device)[None]
        kwargs = dict(input_ids=ids[None], position_ids=pos[None])
        if padded:
            width = max(lengths)
            keep = torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
            rows = torch.zeros(len(lengths), width, dtype=ids.dtype, device=device)
            rows[keep] = ids
            kwargs = dict(input_ids=rows, attention_mask=keep.long())
            grad = torch.zeros(len(lengths), width, cfg.hidden_size, dtype=dtype, device=device)
            grad[keep] = dy[0]
            dy = grad

        def step():
            model.zero_grad(set_to_none=True)
            model(**kwargs, use_cache=False).last_hidden_state.backward(dy)
        return step
    return setup


def _flops(cfg, lengths):
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer_params = h * (q + 2 * kv) + q * h + 3 * h * i
    tokens = sum(lengths)
    linear = 6 * per_layer_params * cfg["num_hidden_layers"] * tokens   # fwd 2, bwd 4 FLOPs per weight per token
    # Causal attention: QK^T and PV over half the L x L square, forward once and backward twice.
    attention = 3 * 2 * 2 * q * sum(n * n / 2 for n in lengths) * cfg["num_hidden_layers"]
    return linear + attention, per_layer_params * cfg["num_hidden_layers"]


@suite("model")
def cases(size, device):
    """Decoder training fwd+bwd tokens/s on a packed batch (Qwen2.5-1.5B shape on GPU), vs transformers."""
    if gpu_size(size, device):
        cfg, lengths, dtype = QWEN25_15B, [512, 1536] * 8, torch.bfloat16     # 16384 tokens
    else:
        cfg, lengths, dtype = TINY, [64, 128, 32, 32], torch.float32
    flops, params = _flops(cfg, lengths)
    elt = torch.finfo(dtype).bits // 8
    nbytes = 3 * params * elt  # weights read forward and backward, gradients written once
    from r1fast.models.attention import training_attention_path

    # the label names the kernel that runs: on a GPU without flash-attn, torch's varlen one (torch >= 2.10)
    attention = training_attention_path(device, dtype, cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                        cfg["hidden_size"] // cfg["num_attention_heads"])
    impls = [Impl("r1fast", attention, _r1fast(cfg, lengths, dtype, device)),
             Impl("transformers", "hf packed", _transformers(cfg, lengths, dtype, device), requires=("transformers",)),
             Impl("transformers", "hf padded", _transformers(cfg, lengths, dtype, device, padded=True),
                  requires=("transformers",))]
    name = f"{cfg['architecture']} h={cfg['hidden_size']} L={cfg['num_hidden_layers']} tokens={sum(lengths)}"
    return [Case(name, "fwd_bwd", str(dtype).removeprefix("torch."), impls, flops=flops, bytes=nbytes,
                 items=sum(lengths), item_name="tokens")]
