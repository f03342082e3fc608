"""Checks shared by every public op (r1fast.ops.checks), run against each op in turn."""
import pytest
import torch

from r1fast import ops
from r1fast.rollout.params import SamplingParams

META = torch.device("meta")


def _decode(dev):
    cache = torch.zeros(4, 2, 1, 8, device=dev)
    return ops.paged_decode_attention(torch.zeros(2, 2, 8, device=dev), cache, cache.clone(),
                                      torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=dev),
                                      torch.tensor([3, 2], dtype=torch.int32, device=dev), backend="torch")


def _prefill(dev):
    cache = torch.zeros(4, 2, 1, 8, device=dev)
    return ops.paged_prefill_attention(torch.zeros(3, 2, 8, device=dev), cache, cache.clone(),
                                       torch.arange(3, device=dev), [3], [3], backend="torch")


def _store_kv(dev):
    cache = torch.zeros(4, 2, 1, 8, device=dev)
    return ops.store_kv(torch.zeros(2, 1, 8, device=dev), torch.zeros(2, 1, 8, device=dev), cache, cache.clone(),
                        torch.tensor([0, 3], device=dev))


def _logprob(dev, **kw):
    return ops.grouped_logprob(torch.zeros(2, 3, 8, device=dev), torch.zeros(16, 8, device=dev),
                               torch.zeros(2, 3, dtype=torch.long, device=dev), backend="torch", **kw)


def _loss_inputs(dev):
    return (torch.zeros(2, 3, device=dev), torch.zeros(2, 3, device=dev), None, torch.ones(2, device=dev),
            torch.ones(2, 3, dtype=torch.bool, device=dev))


def _fused(dev):
    return ops.fused_linear_grpo_loss(torch.zeros(2, 3, 8, device=dev), torch.zeros(16, 8, device=dev),
                                      torch.zeros(2, 3, dtype=torch.long, device=dev),
                                      torch.ones(2, 3, dtype=torch.bool, device=dev), torch.ones(2, device=dev),
                                      backend="torch")


def _sample(dev):
    return ops.sample_tokens(torch.zeros(2, 10, device=dev), SamplingParams(temperature=0.7),
                             torch.full((2,), 0.5, dtype=torch.float64, device=dev), backend="torch")


# each op's call, on a device, with its value checks on (the default)
VALUE_CHECKED = {
    "store_kv": _store_kv,
    "paged_decode_attention": _decode,
    "paged_decode_attention (reference)": lambda dev: ops.paged_decode_attention(
        torch.zeros(1, 1, 8, device=dev), torch.zeros(1, 2, 1, 8, device=dev), torch.zeros(1, 2, 1, 8, device=dev),
        torch.zeros(1, 1, dtype=torch.int32, device=dev), torch.ones(1, dtype=torch.int32, device=dev),
        backend="reference", check_bounds=False),
    "paged_prefill_attention": _prefill,
    "grouped_logprob": _logprob,
    "grouped_logprob (mask)": lambda dev: _logprob(dev, mask=torch.ones(2, 3, dtype=torch.bool, device=dev),
                                                   check_targets=False),
    "group_advantages": lambda dev: ops.group_advantages(torch.arange(4.0, device=dev), 2, backend="torch"),
    "grpo_loss": lambda dev: ops.grpo_loss(*_loss_inputs(dev), backend="torch"),
    "fused_linear_grpo_loss": _fused,
    "sample_tokens": _sample,
}


@pytest.mark.parametrize("op", list(VALUE_CHECKED))
def test_value_checks_of_meta_tensors_are_refused_naming_the_op(op):
    # meta tensors hold no values: torch's own 'Tensor.item() cannot be called on meta tensors' (or 'Cannot copy
    # out of meta tensor') named neither the op nor the check that read them
    VALUE_CHECKED[op](torch.device("cpu"))  # the same call runs on the CPU
    name = op.split(" ")[0]
    with pytest.raises(ValueError, match=rf"^{name}: the tensors are on the meta device, which holds shapes but no "
                                         rf"values, and .+ reads them"):
        VALUE_CHECKED[op](META)


def test_meta_tensors_still_run_where_no_value_is_read():
    # shape-only tracing: with the value checks off, the torch backends take meta tensors as before
    cache = torch.zeros(4, 2, 1, 8, device=META)
    out = ops.paged_decode_attention(torch.zeros(2, 2, 8, device=META), cache, cache,
                                     torch.zeros(2, 2, dtype=torch.int32, device=META),
                                     torch.ones(2, dtype=torch.int32, device=META), backend="torch", check_bounds=False)
    assert out.shape == (2, 2, 8) and out.is_meta
    out = ops.paged_prefill_attention(torch.zeros(3, 2, 8, device=META), cache, cache, torch.arange(3, device=META),
                                      [3], [3], backend="torch", check_bounds=False)
    assert out.shape == (3, 2, 8) and out.is_meta
    assert _logprob(META, check_targets=False).shape == (2, 3)
    loss, _ = ops.grpo_loss(*_loss_inputs(META), backend="torch", check_values=False)
    assert loss.is_meta
    tokens, _ = ops.sample_tokens(torch.zeros(2, 10, device=META), SamplingParams(temperature=0.7),
                                  torch.zeros(2, dtype=torch.float64, device=META), check_inputs=False)
    assert tokens.shape == (2,)
