"""Exponential moving average of model weights (used for validation, test and export).

Kept outside the module's parameters and buffers so that DDP and DeepSpeed never see it;
the LightningModule stores its state in the checkpoint and swaps it in around evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """shadow ← d·shadow + (1 − d)·param after every optimizer step, in float32.

    The effective decay warms up as min(decay, (1 + n)/(10 + n)) over the first updates so
    early weights do not dominate a short run.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}.")
        self.decay = float(decay)
        self.updates = 0
        self._backup: list[torch.Tensor] | None = None
        self.shadow = {
            name: p.detach().float().clone()
            for name, p in module.named_parameters()
            if p.requires_grad
        }

    def _params(self, module: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        named = dict(module.named_parameters())
        for name, shadow in self.shadow.items():
            yield named[name], shadow

    def to(self, device: torch.device) -> EMA:
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        return self

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for p, shadow in self._params(module):
            shadow.lerp_(p.detach().float(), 1.0 - d)

    @property
    def active(self) -> bool:
        return self._backup is not None

    @torch.no_grad()
    def swap_in(self, module: nn.Module) -> None:
        """Give ``module`` the EMA weights (the trained ones are kept for `swap_out`)."""
        if self._backup is not None:
            return
        self._backup = []
        for p, shadow in self._params(module):
            self._backup.append(p.detach().clone())
            p.copy_(shadow.to(p.dtype))

    @torch.no_grad()
    def swap_out(self, module: nn.Module) -> None:
        """Put the trained weights back after `swap_in`."""
        if self._backup is None:
            return
        for (p, _), saved in zip(self._params(module), self._backup, strict=True):
            p.copy_(saved)
        self._backup = None

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Within the block ``module`` holds the EMA weights."""
        self.swap_in(module)
        try:
            yield
        finally:
            self.swap_out(module)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model: parameters {sorted(missing)[:5]}…")
        device = next(iter(self.shadow.values())).device if self.shadow else "cpu"
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.shadow = {n: t.float().to(device) for n, t in state["shadow"].items()}
