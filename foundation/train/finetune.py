"""Fine-tuning a pretrained model on a new target: ``task=finetune_hybrid`` (HSE06 from PBE).

    foundation-train task=finetune_hybrid data=hse_mini task.pretrained=pretrained/tiny_pbe_mini.pt

The architecture and weights come from the pretrained checkpoint (the ``model`` config group
is not used); the dataset's basis must be the checkpoint's on every element it holds
(`check_compatible`). A new head predicts the target (``h_hse``, eV) from the pretrained
backbone's features:

* ``head: delta`` — H_HSE = H_PBE + ΔH: the new head is a ΔH head whose output is added to
  the pretrained H head's (model config ``heads: {h_hse: {type: block, base: h}}``); its
  output layers start at zero, so the first prediction is exactly the pretrained PBE H. It
  takes the H head's per-species scales without its on-site reference.
* ``head: direct`` — a separate H_HSE head, started as a copy of the pretrained H head
  (weights and target statistics).

The pretrained heads keep the target statistics of pretraining (`foundation.model.standardize`):
they are buffers of the checkpoint and are never refitted on the fine-tuning data.
* ``head_cutoff_A`` (optional, Å, ≥ the backbone's cutoff): the new head is a
  `heads.PairBlockHead` that also predicts blocks for edges up to this longer cutoff from
  the two atoms' node features (its extra path starts at zero).

What trains (``backbone:``):

* ``frozen`` — only the new head; backbone and pretrained heads keep their exact weights.
* ``lora`` — the new head and rank-``lora_rank`` adapters on every linear map of the
  backbone (`foundation.model.lora`; zero at the start, exactly equivariant); pretrained
  weights frozen.
* ``full`` — everything; pretrained weights at ``pretrained_lr_scale`` × lr.

Every head of the model is in ``targets`` (heads without a configured weight are monitored
with weight 0), so every head is in every step's graph. Replay of pretraining data is a
data option (``data.replay``, `foundation.data.datamodule.ShardDataModule`): replayed
structures lack ``h_hse`` and count only in the other targets' losses and metrics.
The exported ``model.pt`` holds the new head and adapters in its config
(`foundation.train.checkpoint.load_inference_model` rebuilds it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from foundation import keys
from foundation.basis import BasisSet, shell_spec
from foundation.model.lora import add_lora
from foundation.model.universal import UniversalHamiltonianModel
from foundation.train.config import ConfigError
from foundation.train.module import HamiltonianModule

log = logging.getLogger(__name__)

HEAD_MODES = ("delta", "direct")
BACKBONE_MODES = ("frozen", "full", "lora")


def load_pretrained(path: str | Path | None) -> UniversalHamiltonianModel:
    """The pretrained model of an exported ``model.pt`` or a foundation-train Lightning
    ``.ckpt`` (its trained, non-EMA weights), loaded with ``torch.load(weights_only=True)``."""
    from foundation.physics.predict import PredictError, load_model

    if path is None:
        raise ConfigError(
            "task.pretrained is required: the checkpoint to fine-tune, e.g. "
            "task.pretrained=pretrained/tiny_pbe_mini.pt (an exported model.pt of foundation-train)."
        )
    try:
        return load_model(path).train()
    except PredictError as exc:
        raise ConfigError(f"task.pretrained: {exc}") from None


def check_compatible(model: UniversalHamiltonianModel, dataset: BasisSet, path: str | Path) -> None:
    """The dataset's blocks must be in the checkpoint's basis: same basis name, and every
    dataset element known to the checkpoint with identical shells. Raises `ConfigError`
    naming the checkpoint, the offending basis or element, and the fix."""
    ours = model.basis
    if dataset.name != ours.name:
        raise ConfigError(
            f"Checkpoint {path} was trained in basis {ours.name!r} but the fine-tuning dataset "
            f"is in basis {dataset.name!r}: their blocks are not comparable. Fix: generate the "
            f"dataset in basis {ours.name!r}, or fine-tune a checkpoint pretrained in {dataset.name!r}."
        )
    missing = [el for el in dataset.elements if el not in ours.shells]
    if missing:
        raise ConfigError(
            f"Checkpoint {path} does not know element(s) {', '.join(missing)} of the fine-tuning "
            f"dataset (it knows {', '.join(ours.elements)}). Fix: fine-tune a checkpoint pretrained "
            "on these elements, or leave the structures containing them out of the dataset."
        )
    for el in dataset.elements:
        if dataset.shells[el] != ours.shells[el]:
            raise ConfigError(
                f"Element {el} has shells {shell_spec(ours.shells[el])} in checkpoint {path} but "
                f"{shell_spec(dataset.shells[el])} in the fine-tuning dataset (basis "
                f"{dataset.name!r}). Fix: regenerate the dataset with the checkpoint's basis "
                f"{ours.name!r} (shells {shell_spec(ours.shells[el])} for {el})."
            )


def prepare_model(
    model: UniversalHamiltonianModel,
    *,
    target: str = keys.H_HSE,
    base: str = keys.H,
    head: str = "delta",
    backbone: str = "frozen",
    lora_rank: int = 4,
    head_cutoff_A: float | None = None,
) -> UniversalHamiltonianModel:
    """Add the ``target`` head to a pretrained ``model`` and set what trains (in place).

    ``head``: ``delta`` (target = ``base`` head + ΔH, ΔH zero at the start) or ``direct``
    (a copy of the ``base`` head); ``head_cutoff_A``: a `PairBlockHead` reaching that far.
    ``backbone``: ``frozen`` | ``lora`` (rank ``lora_rank``) | ``full``. At return the model
    predicts ``target`` = its ``base`` prediction exactly, in every mode.
    """
    if head not in HEAD_MODES:
        raise ConfigError(f"task.head={head!r}; choose one of {', '.join(HEAD_MODES)}.")
    if backbone not in BACKBONE_MODES:
        raise ConfigError(f"task.backbone={backbone!r}; choose one of {', '.join(BACKBONE_MODES)}.")
    if target in model.heads:
        raise ConfigError(
            f"The pretrained model already has a head {target!r} (heads: {list(model.heads)}); "
            "set task.target to a new name."
        )
    if base not in model.heads:
        raise ConfigError(
            f"task.base_target={base!r} is not a head of the pretrained model "
            f"(heads: {list(model.heads)})."
        )
    config = model.config
    spec: dict[str, Any] = {"type": "block", "scale": config["heads"][base].get("scale", 1.0)}
    if head_cutoff_A is not None:
        if head_cutoff_A < model.backbone.cutoff_A:
            raise ConfigError(
                f"task.head_cutoff_A={head_cutoff_A} Å is below the backbone's cutoff "
                f"{model.backbone.cutoff_A} Å; use null or a value ≥ {model.backbone.cutoff_A}."
            )
        radial = ("sh_lmax", "num_radial", "radial_hidden", "radial_layers", "envelope_p")
        spec |= {"type": "pair", "cutoff_A": float(head_cutoff_A)}
        spec |= {k: config[k] for k in radial}
    if head == "delta":
        spec["base"] = base
    if backbone != "full":
        model.requires_grad_(False)
    new = model.new_head(target, spec)  # trainable: built after the freeze
    new.zero_output_()
    if head == "delta":  # ΔH: the base's per-species scales, no on-site reference
        new.statistics.inherit_scales_(model.heads[base].statistics)
    else:  # the base head's weights and statistics; a PairBlockHead's pair path stays zero
        result = new.load_state_dict(model.heads[base].state_dict(), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"Head {base!r} does not fit {target!r}: {result.unexpected_keys}.")
    if backbone == "lora":
        add_lora(model, lora_rank)
    return model


def parameter_counts(model: torch.nn.Module, target: str) -> dict[str, int]:
    """Trainable and frozen parameter counts, and those of the new head and LoRA adapters."""
    counts = {"trainable": 0, "frozen": 0, "new_head": 0, "lora": 0}
    for name, p in model.named_parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
        if name.startswith(f"heads.{target}."):
            counts["new_head"] += p.numel()
        elif ".parametrizations.weight.0." in name:
            counts["lora"] += p.numel()
    return counts


class FinetuneModule(HamiltonianModule):
    """`HamiltonianModule` on a pretrained model with a new target head (module notes).

    Args:
        model: ignored (the architecture comes from ``pretrained``); set by foundation-train.
        basis: the dataset's basis (set by foundation-train), checked against the checkpoint.
        pretrained: exported ``model.pt`` (or Lightning ``.ckpt``) to fine-tune. Required.
        head: ``delta`` | ``direct``. backbone: ``frozen`` | ``lora`` | ``full``.
        target: name of the new target and head (default ``h_hse``); base_target: the
            pretrained head it starts from (``h``).
        lora_rank: rank of the LoRA adapters (``backbone: lora``).
        head_cutoff_A: optional longer cutoff (Å) of the new head (`heads.PairBlockHead`).
        pretrained_lr_scale: lr factor of the pretrained weights (``backbone: full``).
        targets: name → loss weight; must include ``target``; every other head is added
            with weight 0 (monitored). E.g. ``{h_hse: 1.0, h: 0.1, s: 0.1}`` keeps the PBE
            heads honest when the backbone trains.
        **task: the remaining `HamiltonianModule` arguments (lr, loss, ema_decay, …).
    """

    def __init__(
        self,
        model: Mapping[str, Any] | None = None,
        basis: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
        head: str = "delta",
        backbone: str = "frozen",
        target: str = keys.H_HSE,
        base_target: str = keys.H,
        lora_rank: int = 4,
        head_cutoff_A: float | None = None,
        pretrained_lr_scale: float = 1.0,
        targets: Mapping[str, float] | None = None,
        **task: Any,
    ):
        finetuned = load_pretrained(pretrained)
        if basis is not None:
            check_compatible(finetuned, BasisSet.from_dict(basis), pretrained)
        prepare_model(
            finetuned,
            target=target,
            base=base_target,
            head=head,
            backbone=backbone,
            lora_rank=lora_rank,
            head_cutoff_A=head_cutoff_A,
        )
        targets = dict(targets if targets is not None else {target: 1.0})
        if target not in targets:
            raise ConfigError(f"task.targets {targets} must include the new target {target!r}.")
        targets |= {name: 0.0 for name in finetuned.heads if name not in targets}
        super().__init__(model=finetuned, basis=finetuned.basis.to_dict(), targets=targets, **task)
        self.monitor_target = target
        self.parameter_counts = parameter_counts(self.model, target)
        log.info(
            "Fine-tuning %s (head %s, backbone %s): %s parameters",
            pretrained,
            head,
            backbone,
            ", ".join(f"{k} {v:,}" for k, v in self.parameter_counts.items()),
        )

    def _is_new(self, name: str) -> bool:
        return (
            name.startswith(f"heads.{self.hparams.target}.")
            or ".parametrizations.weight.0." in name
        )

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The base groups, each split into new weights (lr) and pretrained ones
        (``pretrained_lr_scale`` × lr)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        scale = float(self.hparams.pretrained_lr_scale)
        groups = []
        for group in super().parameter_groups():
            new = [p for p in group["params"] if self._is_new(names[id(p)])]
            old = [p for p in group["params"] if not self._is_new(names[id(p)])]
            groups.append(group | {"params": new})
            groups.append(group | {"params": old, "lr": self.hparams.lr * scale})
        return groups

    def on_fit_start(self) -> None:
        super().on_fit_start()
        for logger in self.loggers:
            logger.log_hyperparams({f"params_{k}": v for k, v in self.parameter_counts.items()})


__all__ = [
    "BACKBONE_MODES",
    "FinetuneModule",
    "HEAD_MODES",
    "check_compatible",
    "load_pretrained",
    "parameter_counts",
    "prepare_model",
]
