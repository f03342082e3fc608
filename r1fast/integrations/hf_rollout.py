"""r1fast's rollout engine generating for a transformers causal LM (Llama, Qwen2, Qwen3, Mistral).

    rollout = HFRollout(hf_model, max_num_seqs=512, max_model_len=1024)
    completion_ids = rollout.generate(prompt_ids, SamplingParams(n=..., temperature=...))
    ...optimizer step on hf_model...
    rollout.sync()            # before the next generation

The engine decodes an r1fast `CausalLM` built around the transformers model's own parameters: the
embedding, norms, o/down projections and lm_head are the same tensors, so an optimizer step on the
transformers model is seen without a copy. The decoder's two fused projections per layer (q/k/v and
gate/up, one GEMM each) are copies of their parts; `sync()` refreshes them in place (about two
thirds of the weights, one device copy) and resets the prefix cache, whose KV is stale after a
weight update. With `dtype` other than the parameters' (e.g. bf16 decoding of fp32 master weights
under autocast), every parameter is such a copy.

Only transformers' own class for the config's architecture is taken: a checkpoint's custom code (loaded with
trust_remote_code=True, a subclass of transformers' class included) is refused, since the engine would decode
transformers' model, not that code's. A torch.compile wrapper is decoded as the module it wraps.

TRL's GRPOTrainer uses it through `r1fast.integrations.trl.GRPOTrainer(..., r1fast_generation=True)`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from r1fast.models import CausalLM, ModelConfig
from r1fast.rollout import Engine, SamplingParams

__all__ = ["HFRollout"]


def _set_param(root: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, value)


def _check_is_transformers_class(hf_model: nn.Module, architecture: str) -> None:
    """The engine decodes r1fast's implementation of transformers' own class for the config's architecture. Another
    class with that config and the same parameter names (a checkpoint's custom code, loaded with
    trust_remote_code=True from its auto_map) computes what its own code says: the engine would sample from a
    different model than the one trained. Such code often subclasses transformers' class (overriding its forward),
    so a class from transformers' module of trust_remote_code imports is refused too, subclass or not."""
    import transformers
    from transformers.utils import TRANSFORMERS_DYNAMIC_MODULE_NAME  # where trust_remote_code modules are imported

    own = getattr(transformers, architecture, None)
    cls = type(hf_model)
    remote = any(c.__module__.split(".")[0] == TRANSFORMERS_DYNAMIC_MODULE_NAME for c in cls.__mro__)
    if own is not None and (remote or not isinstance(hf_model, own)):
        raise ValueError(f"r1fast's rollout engine decodes transformers' {architecture}; the model is "
                         f"{cls.__module__}.{cls.__qualname__}, another implementation (custom code, e.g. "
                         f"from config.json's auto_map with trust_remote_code=True) whose generations it would "
                         f"not reproduce: load the model without trust_remote_code, or generate without r1fast")


# the dtypes r1fast's decoder computes in (its norms refuse any other, at the first generate)
DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_decode_dtype(dtype) -> None:
    """`dtype=` given to HFRollout: a string, an integer or fp8 dtype failed at the first generate() after the
    weights were cast (an int64 copy of the weights is all zeros), with an error of torch.empty or rms_norm
    that named neither HFRollout nor its `dtype`."""
    if dtype is not None and dtype not in DECODE_DTYPES:
        raise ValueError(f"HFRollout: dtype={dtype!r} is not one the engine decodes in; pass one of "
                         f"{', '.join(map(str, DECODE_DTYPES))}, or None for the model parameters' own")


def _without_compile_wrapper(model: nn.Module) -> nn.Module:
    """The module a torch.compile wrapper (OptimizedModule, its parameters named _orig_mod.*) wraps: the wrapper
    computes what that module computes, so the engine decodes it and aliases its tensors."""
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


def _as_list(prompt):
    """A prompt as a list, for comparing prompts; what is not a sequence (one token id: a single prompt passed
    unwrapped) is left for the engine, whose error names the prompt. list() of it failed with "'int' object is
    not iterable"."""
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    return list(prompt) if isinstance(prompt, Iterable) else prompt


class HFRollout:
    def __init__(self, hf_model: nn.Module, dtype: torch.dtype | None = None, **engine_kwargs):
        _check_decode_dtype(dtype)
        hf_model = _without_compile_wrapper(hf_model)
        config = getattr(hf_model, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            raise TypeError(f"HFRollout takes a transformers causal LM, got {type(hf_model).__name__}")
        try:
            cfg = ModelConfig.from_hf_config(config.to_dict())
        except (ValueError, TypeError) as e:
            raise ValueError(f"r1fast's rollout engine cannot run {type(hf_model).__name__}: {e}") from e
        _check_is_transformers_class(hf_model, cfg.architecture)
        hf = dict(hf_model.named_parameters())
        # what the engine reads: sync() checks the model still holds these very tensors
        self._hf_model, self._hf_params = hf_model, dict(hf)
        devices = {p.device for p in hf.values()}
        if len(devices) != 1:
            raise ValueError(f"HFRollout needs the model on one device, found {sorted(map(str, devices))} "
                             f"(a device_map spreading it over several is not supported)")
        dtype = dtype or next(iter(hf.values())).dtype
        with torch.device("meta"):
            model = CausalLM(cfg)
        # (r1fast parameter, [(rows or None, transformers tensor)]): aliased when one whole tensor of
        # the right dtype, else a copy that sync() refreshes
        self._copies: list[tuple[torch.Tensor, list]] = []
        parts: dict[str, list] = {}
        for key, name, rows in model.hf_layout():
            if key not in hf:
                raise ValueError(f"{type(hf_model).__name__} has no parameter {key!r}, which r1fast's "
                                 f"{cfg.architecture} decoder needs")
            parts.setdefault(name, []).append((rows, hf.pop(key)))
        if hf:
            raise ValueError(f"{type(hf_model).__name__} has parameters r1fast's decoder would not use: "
                             f"{sorted(hf)[:4]}: its generations would differ from the model's")
        shapes = dict(model.named_parameters())
        for name, sources in parts.items():
            whole = sources[0][1]
            if len(sources) == 1 and sources[0][0] is None and whole.dtype == dtype:
                if whole.shape != shapes[name].shape:
                    raise ValueError(f"{name}: the transformers tensor has shape {tuple(whole.shape)}, r1fast's "
                                     f"config implies {tuple(shapes[name].shape)}")
                _set_param(model, name, whole)  # the same tensor: optimizer steps are seen as they happen
                continue
            buf = torch.empty(shapes[name].shape, dtype=dtype, device=whole.device)
            for rows, src in sources:
                if (buf if rows is None else buf[rows]).shape != src.shape:
                    raise ValueError(f"{name}: a transformers part has shape {tuple(src.shape)}, r1fast's config "
                                     f"implies {tuple((buf if rows is None else buf[rows]).shape)}")
            _set_param(model, name, nn.Parameter(buf, requires_grad=False))
            self._copies.append((buf, sources))
        model.rotary.inv_freq(model.device)  # on the device before any CUDA graph is captured
        self.model = model.eval()
        self.sync(reset_cache=False)
        self.engine = Engine(model, **engine_kwargs)

    @torch.no_grad()
    def sync(self, reset_cache: bool = True):
        """Copies the transformers weights into the fused (and recast) parameters; call after every
        weight update, before generating. A parameter replaced rather than updated in place (load_state_dict with
        assign=True, a resized embedding) is an error: the engine would go on reading the tensor it replaced."""
        self._check_same_parameters()
        for buf, sources in self._copies:
            for rows, src in sources:
                (buf if rows is None else buf[rows]).copy_(src)
        if reset_cache:
            self.engine.reset_prefix_cache()

    def _check_same_parameters(self):
        current = dict(self._hf_model.named_parameters())
        replaced = [key for key, tensor in self._hf_params.items() if current.get(key) is not tensor]
        if replaced:
            raise ValueError(f"HFRollout: the transformers model's {', '.join(replaced[:4])}"
                             f"{' ...' if len(replaced) > 4 else ''} ({len(replaced)} parameters) were replaced, not "
                             f"updated in place, since the rollout was made (load_state_dict(assign=True), a resized "
                             f"embedding): it would generate with the old ones; make a new HFRollout")

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Completion token ids, one list per prompt in `prompt_ids` and per sample: prompts that come in
        runs of params.n identical ones (as a GRPO batch lists each prompt once per sample) are
        prefilled once and forked; otherwise each prompt gets one sample."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"HFRollout.generate: params must be an r1fast.rollout.SamplingParams, got "
                            f"{type(params).__name__}")
        n = params.n
        # as lists: comparing two tensors (or numpy arrays) with == below is elementwise, and all() of that
        # failed with "Boolean value of Tensor with more than one value is ambiguous"
        prompt_ids = [_as_list(p) for p in prompt_ids]
        grouped = len(prompt_ids) % n == 0 and all(
            prompt_ids[i] == prompt_ids[i - i % n] for i in range(len(prompt_ids)))
        if grouped:
            results = self.engine.generate(list(prompt_ids[::n]), params)
        else:
            results = self.engine.generate(list(prompt_ids), dataclasses.replace(params, n=1))
        return [list(c.token_ids) for r in results for c in r.completions]
