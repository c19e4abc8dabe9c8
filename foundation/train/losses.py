"""Masked losses on padded blocks: only entries inside keys.BLOCK_MASK ever count.

Every function returns *sums* and *counts* rather than means, so the trainer can normalise
by the global number of entries over all ranks (the gradient of a data-parallel step then
equals the gradient of one process holding the whole global batch).
"""

from __future__ import annotations

import torch

from foundation import keys

LOSSES = ("mse", "l1", "huber")


def target_mask(batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """(E, n_uni, n_uni) bool: the entries of target ``name`` that count — real orbitals
    (``keys.BLOCK_MASK``) of edges whose structure has the target (``keys.present(name)``,
    when the batch carries presence flags; e.g. replayed pretraining data lacks ``h_hse``)."""
    mask = batch[keys.BLOCK_MASK]
    flags = batch.get(keys.present(name))
    return mask if flags is None else mask & flags[:, None, None]


def masked_residual(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-D residuals pred − target over the real (unpadded) entries, in float32 or wider."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return pred[mask].to(dtype) - target[mask].to(dtype)


def loss_sum(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "mse",
    huber_delta: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ loss over masked entries, number of masked entries) for one target.

    ``kind``: ``mse`` (eV²), ``l1`` (eV) or ``huber`` (quadratic below ``huber_delta`` eV).
    """
    r = masked_residual(pred, target, mask)
    if kind == "mse":
        terms = r.square()
    elif kind == "l1":
        terms = r.abs()
    elif kind == "huber":
        terms = torch.nn.functional.huber_loss(
            r, torch.zeros_like(r), reduction="none", delta=huber_delta
        )
    else:
        raise ValueError(f"Unknown loss {kind!r}; choose one of {', '.join(LOSSES)}.")
    return terms.sum(), torch.tensor(float(r.numel()), device=r.device, dtype=torch.float64)
