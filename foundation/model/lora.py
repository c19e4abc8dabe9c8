"""Low-rank adapters (LoRA) on the backbone's linear maps, exactly E(3)-equivariant.

Fine-tuning with ``backbone: lora`` keeps every pretrained weight W frozen and learns a
low-rank update: the map uses W + A·B, with A (m_in × r) random and B (r × m_out) zero at the
start, so the adapted model reproduces the pretrained one exactly until B moves.

* **e3nn `o3.Linear`** (every linear map between irreps in the backbone, gates' inputs and
  the convolutions' path mixers): its weights are one (mul_in × mul_out) matrix per pair of
  input and output irreps of the same type, and the map applies each to whole irreps. A
  low-rank update of each such matrix is the parallel path irreps_in → r×ir → irreps_out
  through r copies of that irrep, so the adapted map commutes with every rotation and
  inversion exactly like the original (no new irrep types, no mixing across l or parity).
* **Radial MLPs** (`e3nn.nn.FullyConnectedNet` layers, plain h_in × h_out matrices on the
  rotation-invariant radial features): the usual W + A·B.

The update is a `torch.nn.utils.parametrize` parametrization of the ``weight`` tensor, so the
module code is unchanged and the pretrained tensor stays a separate, frozen parameter
(``…parametrizations.weight.original``). `add_lora` records ``{"rank": r}`` under ``lora`` in
the model config, and `foundation.model.build_model` applies it when it rebuilds a model
from that config (exported checkpoints load with their adapters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet
from torch import nn
from torch.nn.utils import parametrize


class LowRankUpdate(nn.Module):
    """Parametrization W ↦ W + Δ of a flat or 2-D weight made of consecutive row-major blocks
    of shapes ``blocks``; Δ's block k is A_k B_k with rank min(``rank``, m_in, m_out).

    A_k ~ N(0, 1/m_in) and B_k = 0 at construction, so Δ = 0 exactly and the gradient of B_k
    is not zero.
    """

    def __init__(self, blocks: Sequence[tuple[int, int]], rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}.")
        self.blocks = [tuple(int(n) for n in shape) for shape in blocks]
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for m_in, m_out in self.blocks:
            r = min(rank, m_in, m_out)
            self.down.append(nn.Parameter(torch.randn(m_in, r) / math.sqrt(m_in)))
            self.up.append(nn.Parameter(torch.zeros(r, m_out)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = torch.cat([(a @ b).reshape(-1) for a, b in zip(self.down, self.up, strict=True)])
        return weight + delta.reshape(weight.shape).to(weight.dtype)


def _weight_blocks(module: nn.Module) -> list[tuple[int, int]] | None:
    """The (m_in, m_out) blocks of ``module.weight`` that LoRA adapts, or None to skip it."""
    if isinstance(module, o3.Linear):
        paths = [ins.path_shape for ins in module.instructions if ins.i_in != -1]
        if module.weight_numel == 0 or not paths:
            return None
        return paths
    if isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.ndim == 2:
        return [tuple(module.weight.shape)]
    return None


def adapted_modules(backbone: nn.Module) -> list[tuple[str, nn.Module, list[tuple[int, int]]]]:
    """(name, module, weight blocks) of every map LoRA adapts in ``backbone``: each
    `o3.Linear` with weights and each layer of a radial `FullyConnectedNet`."""
    radial_layers = {
        id(layer) for m in backbone.modules() if isinstance(m, FullyConnectedNet) for layer in m
    }
    out = []
    for name, module in backbone.named_modules():
        if isinstance(module, o3.Linear) or id(module) in radial_layers:
            blocks = _weight_blocks(module)
            if blocks is not None:
                out.append((name, module, blocks))
    return out


def add_lora(model: nn.Module, rank: int) -> int:
    """Add rank-``rank`` adapters to every linear map of ``model.backbone`` (in place).

    Freezes the adapted pretrained weights, records ``{"rank": rank}`` in ``model.config``
    (when the model has one) and returns the number of adapter parameters. Raises if the
    backbone already has adapters.
    """
    count = 0
    for name, module, blocks in adapted_modules(model.backbone):
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"backbone.{name} already has a LoRA adapter.")
        update = LowRankUpdate(blocks, rank).to(module.weight)
        parametrize.register_parametrization(module, "weight", update)
        module.parametrizations.weight.original.requires_grad_(False)
        count += sum(p.numel() for p in update.parameters())
    if getattr(model, "config", None) is not None:
        model.config["lora"] = {"rank": int(rank)}
    return count


LORA_KEYS = ("rank",)
"""Keys of a model config's ``lora`` entry."""


__all__ = ["LORA_KEYS", "LowRankUpdate", "adapted_modules", "add_lora"]
