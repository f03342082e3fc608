"""AdamW over fp32 master copies of 16-bit parameters.

A bf16 weight of magnitude 0.02 moves only in steps of about 1e-4, so AdamW's steps near the GRPO
learning rates (about 1e-6 per weight) round away when applied to the weight itself: the run learns
nothing and says nothing. Here the optimizer owns an fp32 copy of every 16-bit parameter and steps
that; after each step the model's parameter is the copy rounded to its dtype. The model keeps
computing (and the rollout engine keeps reading it in place) in 16 bits.

The copies travel in the optimizer's state_dict (state "master"), so a checkpoint resumes them
exactly; a checkpoint without them (written before, or in fp32) starts them from the model's weights.
"""
from __future__ import annotations

import torch


class MasterWeightAdamW(torch.optim.AdamW):
    # fp32 gradient copies exist for this many elements at a time (256 MB): the step goes through the
    # parameters in groups of about this size rather than holding 4 bytes per parameter at once
    STEP_CHUNK_ELEMENTS = 1 << 26

    def __init__(self, params, **kwargs):
        self.model_params = list(params)
        # fp32 leaves the AdamW below steps; fp32 model parameters are their own master
        self.masters = [p if p.dtype in (torch.float32, torch.float64) else
                        torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        super().__init__(self.masters, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
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
