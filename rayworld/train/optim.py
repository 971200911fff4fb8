"""The optimiser step both trainers share: per-module learning rates, warmup + cosine schedule,
gradient accumulation, clipping and mixed precision. Plain torch, testable without Ray.

`batch_size` in the configs is the micro-batch of one worker, so one optimiser step sees
batch_size * grad_accum * num_workers samples.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def param_groups(model: nn.Module, modules: dict[str, tuple[str, ...]], lrs: dict[str, float],
                 lr: float) -> list[dict]:
    """One optimiser group per named part of the model; an lr of 0 means "use lr".

    `modules` maps a group name to the attribute names it owns, e.g.
    {"encoder": ("encoder", "fc_mu"), "decoder": ("decoder",)}; every parameter must be owned.
    """
    owner = {}
    for group, attrs in modules.items():
        for attr in attrs:
            for p in getattr(model, attr).parameters():
                owner[id(p)] = group
    groups = {g: [] for g in modules}
    for name, p in model.named_parameters():
        if id(p) not in owner:
            raise ValueError(f"parameter {name} is in no learning-rate group of {list(modules)}")
        groups[owner[id(p)]].append(p)
    return [{"params": ps, "name": g, "base_lr": lrs.get(g) or lr}
            for g, ps in groups.items() if ps]


def lr_factor(step: int, total: int, schedule: str, warmup: int, min_ratio: float) -> float:
    """Multiplier of every group's base lr at optimiser step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Stepper:
    """Accumulates `grad_accum` micro-batches per optimiser step.

    Usage per micro-batch:
        with stepper.micro_batch():
            loss = loss_fn(model(x))        # forward under autocast when amp is on
            stepper.backward(loss)          # steps the optimiser on the last micro-batch
    Under DDP the gradients are all-reduced only on the micro-batch that completes a step.
    """

    def __init__(self, model: nn.Module, groups: list[dict], opt_cfg, total_steps: int, device):
        self.model = model
        self.cfg = opt_cfg
        self.accum = max(1, int(opt_cfg.grad_accum))
        self.total = max(1, int(total_steps))
        self.device = torch.device(device)
        self.opt = torch.optim.Adam(groups, lr=groups[0]["base_lr"])
        self.amp = opt_cfg.amp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.step = 0  # optimiser steps taken
        self.micro = 0  # micro-batches since the last optimiser step
        self.min_ratio = opt_cfg.min_lr / opt_cfg.lr if opt_cfg.lr > 0 else 0.0
        self._set_lr()

    def _set_lr(self):
        f = lr_factor(self.step, self.total, self.cfg.schedule, self.cfg.warmup_steps,
                      self.min_ratio)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f

    @property
    def lrs(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.opt.param_groups}

    def micro_batch(self):
        stack = contextlib.ExitStack()
        last = self.micro + 1 == self.accum
        if not last and hasattr(self.model, "no_sync"):  # DDP: skip the all-reduce
            stack.enter_context(self.model.no_sync())
        if self.amp != "off":
            stack.enter_context(torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp]))
        return stack

    def backward(self, loss: torch.Tensor) -> bool:
        """Backward of one micro-batch; True when it completed an optimiser step."""
        self.scaler.scale(loss / self.accum).backward()
        self.micro += 1
        if self.micro < self.accum:
            return False
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.micro = 0
        self.step += 1
        self._set_lr()
        return True

    def state_dict(self) -> dict:
        return {"optim": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "opt_step": self.step}

    def load_state_dict(self, state: dict):
        """Moments and step count from a checkpoint; the config's lrs win over the saved ones."""
        base = [g["base_lr"] for g in self.opt.param_groups]
        self.opt.load_state_dict(state["optim"])
        for g, b in zip(self.opt.param_groups, base):
            g["base_lr"] = b
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state.get("opt_step", 0))
        self.micro = 0
        self._set_lr()
