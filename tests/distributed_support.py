"""Helpers of the multi-step distributed equivalence tests (tests/test_train_distributed.py):
the single-process reference that trains on the union of the ranks' batches, and parameter
comparison."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset
from train_support import compose

from foundation.data.datamodule import BATCH_POSITION


class UnionStream(IterableDataset):
    """Batch k = rank 0's batch k + rank 1's batch k of a ``world``-rank run, collated into
    one: what one process must see to take the same optimizer steps as the ranks together."""

    def __init__(self, datamodule, world: int = 2):
        self.streams = [datamodule.train_stream(rank=r, world_size=world) for r in range(world)]

    def __len__(self) -> int:
        return len(self.streams[0])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        per_rank = [s.record_batches() for s in self.streams]
        for parts in zip(*per_rank, strict=True):
            index = parts[0][0]
            batch = self.streams[0]._collate([r for _, records in parts for r in records])
            batch[BATCH_POSITION] = torch.tensor([0, index], dtype=torch.long)
            yield batch


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the model computes with: every parameter, except that a LoRA-adapted
    weight is W + A·B (`foundation.model.lora`) instead of W, A and B apart. (Adapters of
    maps whose gradient is at rounding level hold values ~1e-10 whose relative differences
    between runs mean nothing; their product adds nothing measurable to W.)"""
    from torch.nn.utils import parametrize

    out = {
        f"{name}.weight": module.weight.detach().clone()
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module, "weight")
    }
    for name, p in model.named_parameters():
        if ".parametrizations." not in name:
            out[name] = p.detach().clone()
    return out


def fit_union_batches(args: list[str]) -> dict[str, torch.Tensor]:
    """Train in this process on the union of both ranks' batches (``args``: the overrides of
    the 2-process run, with trainer.devices=1 appended); the model's final weights."""
    from foundation.train.cli import build

    trainer, module, datamodule = build(compose([*args, "trainer.devices=1", "strategy=single"]))
    union = UnionStream(datamodule)
    datamodule.train_dataloader = lambda: DataLoader(union, batch_size=None)
    trainer.fit(module, datamodule=datamodule)
    return effective_weights(module.model)


def exported_weights(out: Path) -> dict[str, torch.Tensor]:
    """`effective_weights` of the inference export (model.pt) a run wrote."""
    from foundation.train.checkpoint import load_inference_model

    return effective_weights(load_inference_model(out / "model.pt"))


def relative_difference(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names: list[str] | None = None
) -> float:
    """max over tensors of ‖a − b‖∞ / ‖a‖∞ (tensors with ‖a‖∞ = 0: the absolute difference)."""
    assert set(a) == set(b), set(a) ^ set(b)
    worst = 0.0
    for name in names or list(a):
        x, y = a[name].double(), b[name].double()
        scale = float(x.abs().max()) if x.numel() else 0.0
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
