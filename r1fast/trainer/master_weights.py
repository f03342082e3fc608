"""AdamW over fp32 master copies of 16-bit parameters.

A bf16 weight of magnitude 0.02 moves only in steps of about 1e-4, so AdamW's steps near the GRPO
learning rates (about 1e-6 per weight) round away when applied to the weight itself: the run learns
nothing and says nothing. Here the optimizer owns an fp32 copy of every 16-bit parameter and steps
that; after each step the model's parameter is the copy rounded to its dtype. The model keeps
computing (and the rollout engine keeps reading it in place) in 16 bits.

The copies travel in the optimizer's state_dict (state "master"), so a checkpoint resumes them
exactly; a checkpoint without them (written before, or in fp32) starts them from the model's weights.

Gradient accumulation in fp32 (accumulate_fp32=True): summed over micro-batches in the 16-bit
gradient itself, each addition rounds to 8 bits of mantissa, and the error grows with the number of
micro-batches (relative error of the sum, random gradients: 0.4% at 16 micro-batches, 1-7% at 256,
against 0.17% for one rounding). Inside `with opt.accumulating():` each 16-bit parameter's gradient
is added into its fp32 copy's gradient as soon as autograd has formed it, and the 16-bit one freed:
4 bytes per parameter held between the backward passes instead of 2. The optimizer also folds in a
16-bit gradient left outside that block before it clips or steps, so every path gets the same update.
"""
from __future__ import annotations

import contextlib
import weakref

import torch


def _into_master(optimizer_ref, index: int, param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: param.grad joins the fp32 copy's gradient (only inside accumulating();
    a weak reference, so a model outliving its optimizer keeps neither the optimizer nor its copies)."""
    opt = optimizer_ref()
    if opt is None or not opt._accumulating or param.grad is None:
        return
    opt._fold(index)


def _remove_hooks(handles) -> None:
    for h in handles:
        h.remove()


class MasterWeightAdamW(torch.optim.AdamW):
    # without accumulate_fp32, fp32 gradient copies exist for this many elements at a time (256 MB):
    # the step goes through the parameters in groups of about this size rather than holding 4 bytes
    # per parameter at once
    STEP_CHUNK_ELEMENTS = 1 << 26

    def __init__(self, params, accumulate_fp32: bool = False, **kwargs):
        """`params`: parameters, or param groups (dicts with "params" and per-group options) as torch takes."""
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        groups = [{**g, "params": list(g["params"])} for g in groups]
        self.model_params = [p for g in groups for p in g["params"]]
        # fp32 leaves the AdamW below steps; fp32 model parameters are their own master
        self.masters = [p if p.dtype in (torch.float32, torch.float64) else
                        torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        masters = iter(self.masters)
        super().__init__([{**g, "params": [next(masters) for _ in g["params"]]} for g in groups], **kwargs)
        self.accumulate_fp32 = bool(accumulate_fp32)
        self._accumulating = False
        if self.accumulate_fp32:
            me = weakref.ref(self)
            hooks = [p.register_post_accumulate_grad_hook(lambda param, i=i: _into_master(me, i, param))
                     for i, (p, m) in enumerate(zip(self.model_params, self.masters)) if m is not p]
            # gone with the optimizer: a model handed through many stages does not gather dead hooks
            weakref.finalize(self, _remove_hooks, hooks)

    @contextlib.contextmanager
    def accumulating(self):
        """Backward passes inside this block add their 16-bit gradients into the fp32 copies' gradients."""
        prev, self._accumulating = self._accumulating, self.accumulate_fp32
        try:
            yield self
        finally:
            self._accumulating = prev

    @torch.no_grad()
    def _fold(self, i: int) -> None:
        p, m = self.model_params[i], self.masters[i]
        if m.grad is None:
            m.grad = p.grad.to(torch.float32)
        else:
            m.grad.add_(p.grad)
        p.grad = None

    def grad_tensors(self) -> list[torch.Tensor]:
        """The tensors whose .grad the next step() applies: what gradient clipping must see. With
        accumulate_fp32, the fp32 copies (every 16-bit gradient folded in first); else the model's."""
        if not self.accumulate_fp32:
            return list(self.model_params)
        for i, (p, m) in enumerate(zip(self.model_params, self.masters)):
            if m is not p and p.grad is not None:
                self._fold(i)
        return list(self.masters)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        if self.accumulate_fp32:
            stepped = [(p, m) for p, m in zip(self.model_params, self.grad_tensors()) if m.grad is not None]
            super().step()
            for p, m in stepped:
                if m is not p:
                    p.copy_(m)
                    m.grad = None  # 4 bytes per parameter, not kept past the step that used them
            return
        # AdamW steps exactly the parameters that have a gradient, each keeping its own step count: a
        # group at a time, the others' gradients hidden, is the same update as all at once
        todo = [(p, m) for p, m in zip(self.model_params, self.masters) if p.grad is not None]
        own = {id(p): p.grad for p, m in todo if m is p}  # fp32 parameters step on their own gradient
        for p in (p for p, m in todo if m is p):
            p.grad = None
        for group in _groups(todo, self.STEP_CHUNK_ELEMENTS):
            for p, m in group:
                m.grad = own[id(p)] if m is p else p.grad.to(torch.float32)
            super().step()
            for p, m in group:
                m.grad = None  # hidden from the next groups' steps (an fp32 copy: gone)
                if m is not p:
                    p.copy_(m)
        for p, m in todo:
            if m is p:
                p.grad = own[id(p)]  # as a plain AdamW leaves it

    def zero_grad(self, set_to_none: bool = True):
        for p in self.model_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        super().zero_grad(set_to_none)

    def state_dict(self):
        sd = super().state_dict()
        # torch hands out its live per-parameter dicts: copies, or "master" would join the live state
        sd["state"] = {i: dict(s) for i, s in sd["state"].items()}
        for i, (p, m) in enumerate(zip(self.model_params, self.masters)):
            if m is not p:
                sd["state"].setdefault(i, {})["master"] = m.detach()
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        state = {i: dict(s) for i, s in state_dict["state"].items()}
        saved = {i: s.pop("master") for i, s in state.items() if "master" in s}
        super().load_state_dict({**state_dict, "state": {i: s for i, s in state.items() if s}})
        for i, (p, m) in enumerate(zip(self.model_params, self.masters)):
            if m is p:
                continue
            # the saved copy, when it is the one the model's (just loaded) weights were rounded from; else
            # (none saved, or a stale one a run without master weights carried along) those weights
            good = i in saved and torch.equal(saved[i].to(device=p.device, dtype=p.dtype), p)
            m.copy_(saved[i] if good else p)
            p.copy_(m)


def _groups(pairs, elements: int):
    """Consecutive runs of (parameter, master) pairs of about `elements` elements each."""
    group, size = [], 0
    for pair in pairs:
        group.append(pair)
        size += pair[1].numel()
        if size >= elements:
            yield group
            group, size = [], 0
    if group:
        yield group
