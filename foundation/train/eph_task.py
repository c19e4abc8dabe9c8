"""Fine-tuning on electron–phonon data: ``task=finetune_eph`` (dH/du from DFT displacements).

    foundation-train experiment=finetune_eph_demo
    foundation-train task=finetune_eph data=eph_mini task.pretrained=pretrained/tiny_pbe_mini.pt

The model and its weights come from a pretrained checkpoint (`finetune.load_pretrained`,
checked against the dataset's basis with `finetune.check_compatible`; the ``model`` config
group is not used). No head is added: the pretrained H head learns its own derivative.

**Derivative targets.** ``dh`` (eV/Å) and ``ds`` (1/Å) hold d/du_κα of the stored ``h``
(= H − μS) and ``s`` for every Cartesian displacement of every atom
(`foundation.data.record`). The model's derivative is forward-mode autograd of the
predicted blocks with respect to the positions (`foundation.physics.eph.
model_hamiltonian_derivative`: `torch.func.jvp` vectorised with `vmap`); the lattice is
fixed and edge vectors τ_j + R·cell − τ_i are built from the positions inside the model, so
an atom's periodic images move with it, as in the finite-difference data. The loss on it
is the masked loss of the value targets (only real orbitals count), summed per target and
normalised by the global entry count; backpropagating it differentiates the jvp with
respect to the weights (a mixed second derivative; `tests/test_eph_task.py` checks that
gradient against finite differences of the loss).

* ``projections: null`` (exact): the 3·max N tangents "atom a of every structure moves
  along α" (`graph.displacement_tangents`) give every structure's 3N Cartesian
  derivatives at once (structures in a batch do not interact).
* ``projections: K`` (mse only): K random tangents z ~ N(0, 1) over all atoms; the
  loss compares J z with the stored derivatives contracted with the same z. Since
  E_z ‖(J − T) z‖² = ‖J − T‖²_F it is an unbiased estimate of the exact loss at K instead
  of 3·max N directional derivatives per step.

What trains (``backbone``, as in `finetune`): ``frozen`` — only the heads with a
derivative or value target of nonzero weight; ``lora`` — those heads plus rank-``lora_rank``
adapters on the backbone; ``full`` — everything. Every head is in ``targets`` (weight 0:
monitored), so every head is in every step's graph on every rank; a batch without
derivative data (e.g. replayed pretraining structures, which lack ``dh``) contributes an
exact zero that still depends on the head. Strategies: single, DDP, DeepSpeed ZeRO 1–2;
ZeRO-3 is refused (its partitioned parameters are gathered by module hooks that the
functorch transforms behind the derivative do not go through).

Validation/test metrics: those of `HamiltonianModule` plus ``mae_dh_meV_per_A`` (and
``mae_ds_e-3_per_A``), exact derivatives, EMA weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from foundation import keys
from foundation.basis import BasisSet
from foundation.data.datamodule import EVAL_WEIGHT
from foundation.data.graph import displacement_rows, displacement_tangents
from foundation.model.lora import add_lora
from foundation.model.universal import UniversalHamiltonianModel
from foundation.physics.eph import model_hamiltonian_derivative
from foundation.train.config import ConfigError
from foundation.train.finetune import BACKBONE_MODES, check_compatible, load_pretrained
from foundation.train.losses import loss_sum, target_mask
from foundation.train.metrics import unit
from foundation.train.module import HamiltonianModule

log = logging.getLogger(__name__)

DERIVATIVE_OF = {keys.DH: keys.H, keys.DS: keys.S}
"""Derivative target → the head whose position derivative it is."""


def set_trainable(
    model: UniversalHamiltonianModel, backbone: str, heads: list[str], lora_rank: int = 4
) -> None:
    """``frozen``: only ``heads`` train; ``lora``: ``heads`` and LoRA adapters of rank
    ``lora_rank`` on the backbone; ``full``: every weight (in place)."""
    if backbone not in BACKBONE_MODES:
        raise ConfigError(f"task.backbone={backbone!r}; choose one of {', '.join(BACKBONE_MODES)}.")
    if backbone == "full":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    for name in heads:
        model.heads[name].requires_grad_(True)
    if backbone == "lora":
        add_lora(model, lora_rank)


def cartesian_derivative_rows(
    forward,
    batch: dict[str, torch.Tensor],
    targets: list[str],
    chunk_size: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per derivative target: (predicted rows (R, n_uni, n_uni), row mask) — the model's
    d/du_κα of the target's head, in the layout of the collated target
    (`graph.displacement_rows`). One vectorised jvp for all ``targets``' heads.
    ``forward``: batch → {head: padded blocks} (the module or the model)."""
    heads = sorted({DERIVATIVE_OF[t] for t in targets})
    derivative = model_hamiltonian_derivative(
        forward, batch, displacement_tangents(batch), heads=heads, chunk_size=chunk_size
    )
    out = {}
    for name in targets:
        tangent, edge = displacement_rows(batch, name)
        out[name] = derivative[DERIVATIVE_OF[name]][tangent, edge], batch[keys.BLOCK_MASK][edge]
    return out


def projected_derivative(
    forward, batch: dict[str, torch.Tensor], targets: list[str], projections: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random-projection form (module notes), per derivative target: (J z, T z, mask, all
    (K, E, n_uni, n_uni); number of entries of the exact loss), K tangents z ~ N(0, 1)
    shared by the targets."""
    positions = batch[keys.POSITIONS]
    z = torch.randn(projections, *positions.shape, dtype=positions.dtype, device=positions.device)
    heads = sorted({DERIVATIVE_OF[t] for t in targets})
    derivative = model_hamiltonian_derivative(forward, batch, z, heads=heads)
    n_atoms = batch[keys.N_ATOMS]
    block_mask = batch[keys.BLOCK_MASK]
    out = {}
    for name in targets:
        predicted = derivative[DERIVATIVE_OF[name]]
        tangent, edge = displacement_rows(batch, name)
        first_atom = (torch.cumsum(n_atoms, 0) - n_atoms)[batch[keys.EDGE_BATCH][edge]]
        weight = z[:, first_atom + tangent // 3, tangent % 3]  # (K, R)
        rows = batch[name].to(predicted.dtype)
        expected = torch.zeros_like(predicted).index_add_(1, edge, weight[..., None, None] * rows)
        has_rows = torch.zeros(predicted.shape[1], dtype=torch.bool, device=edge.device)
        has_rows[edge] = True
        mask = (block_mask & has_rows[:, None, None]).expand_as(predicted)
        out[name] = predicted, expected, mask, block_mask[edge].sum()
    return out


class EphFinetuneModule(HamiltonianModule):
    """`HamiltonianModule` on a pretrained model with derivative targets (module notes).

    Args:
        model: ignored (the architecture comes from ``pretrained``); set by foundation-train.
        basis: the dataset's basis (set by foundation-train), checked against the checkpoint.
        pretrained: exported ``model.pt`` (or Lightning ``.ckpt``) to fine-tune. Required.
        backbone: ``frozen`` | ``lora`` | ``full``; lora_rank: rank of the adapters.
        targets: name → loss weight; derivative targets (``dh``, ``ds``) and value targets
            (``h``, ``s``); every head missing here is monitored with weight 0. A derivative
            target of weight 0 is evaluated in validation/test only (its train loss reads 0).
        projections: None (exact Cartesian derivatives) or K random projections per step
            (mse only).
        chunk_size: tangents per vectorised jvp in the exact mode (None: all at once).
        **task: the remaining `HamiltonianModule` arguments (lr, loss, ema_decay, …).
    """

    def __init__(
        self,
        model: Mapping[str, Any] | None = None,
        basis: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
        backbone: str = "frozen",
        lora_rank: int = 4,
        targets: Mapping[str, float] | None = None,
        projections: int | None = None,
        chunk_size: int | None = None,
        **task: Any,
    ):
        pretrained_model = load_pretrained(pretrained)
        if basis is not None:
            check_compatible(pretrained_model, BasisSet.from_dict(basis), pretrained)
        targets = dict(targets if targets is not None else {keys.DH: 1.0, keys.H: 0.1})
        derivatives = {t: float(w) for t, w in targets.items() if t in DERIVATIVE_OF}
        if not derivatives:
            raise ConfigError(
                f"task.targets {targets} has no derivative target ({', '.join(DERIVATIVE_OF)}); "
                "task=finetune_eph trains on dH/du, e.g. task.targets={dh: 1.0, h: 0.1}."
            )
        for name in derivatives:
            if DERIVATIVE_OF[name] not in pretrained_model.heads:
                raise ConfigError(
                    f"Target {name!r} is the derivative of head {DERIVATIVE_OF[name]!r}, which "
                    f"the pretrained model lacks (heads: {list(pretrained_model.heads)})."
                )
        values = {t: float(w) for t, w in targets.items() if t not in DERIVATIVE_OF}
        values |= {name: 0.0 for name in pretrained_model.heads if name not in values}
        if projections is not None and (projections < 1 or task.get("loss", "mse") != "mse"):
            raise ConfigError(
                f"task.projections={projections}: random projections need a positive count and "
                "task.loss=mse (they estimate a squared error); use task.projections=null otherwise."
            )
        trained = {DERIVATIVE_OF[t] for t, w in derivatives.items() if w > 0}
        trained |= {t for t, w in values.items() if w > 0}
        set_trainable(pretrained_model, backbone, sorted(trained), lora_rank)
        super().__init__(
            model=pretrained_model, basis=pretrained_model.basis.to_dict(), targets=values, **task
        )
        self.derivative_targets = derivatives
        self.targets = values | derivatives  # step_losses weighs every entry of loss_terms
        self._derivative_errors = {
            stage: torch.zeros(len(derivatives), 2, dtype=torch.float64)
            for stage in ("val", "test")
        }
        counts = {
            "trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "frozen": sum(p.numel() for p in self.model.parameters() if not p.requires_grad),
        }
        log.info("finetune_eph from %s (backbone %s): %s parameters", pretrained, backbone, counts)

    # ------------------------------------------------------------------ losses
    def loss_terms(
        self, pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(Σ loss, count) per target: value targets as in `HamiltonianModule`, derivative
        targets exact or projected (module notes)."""
        hp = self.hparams
        terms = {
            name: loss_sum(
                pred[name], batch[name], target_mask(batch, name), hp.loss, hp.huber_delta
            )
            for name in self.targets
            if name not in DERIVATIVE_OF
        }
        trained = [name for name, w in self.derivative_targets.items() if w > 0]
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        terms |= {name: (zero, zero) for name in self.derivative_targets if name not in trained}
        if not trained:
            return terms
        if hp.projections is None:
            for name, (rows, mask) in cartesian_derivative_rows(
                self, batch, trained, hp.chunk_size
            ).items():
                terms[name] = loss_sum(rows, batch[name], mask, hp.loss, hp.huber_delta)
        else:
            projected = projected_derivative(self, batch, trained, hp.projections)
            for name, (jz, tz, mask, count) in projected.items():
                total, _ = loss_sum(jz, tz, mask, hp.loss, hp.huber_delta)
                terms[name] = (total / hp.projections, count.to(torch.float64))
        return terms

    # ------------------------------------------------------------------ strategy check
    def setup(self, stage: str) -> None:
        """Refuse DeepSpeed ZeRO-3 (module notes) before anything runs."""
        from pytorch_lightning.strategies import DeepSpeedStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            zero = strategy.config.get("zero_optimization", {})
            if int(zero.get("stage", 0)) >= 3:
                raise ConfigError(
                    "task=finetune_eph cannot run under DeepSpeed ZeRO-3: the derivative loss "
                    "differentiates the model with torch.func (jvp/vmap), which does not gather "
                    "ZeRO-3's partitioned parameters. Use strategy=deepspeed_stage_2, ddp or single."
                )

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        weight = float(batch.get(EVAL_WEIGHT, torch.ones(1))[0])
        super()._eval_step(batch, stage)
        if weight == 0:
            return
        derivatives = cartesian_derivative_rows(
            self, batch, list(self.derivative_targets), self.hparams.chunk_size
        )
        for t, (name, (rows, mask)) in enumerate(derivatives.items()):
            err = (rows.double() - batch[name].double()).abs()[mask]
            self._derivative_errors[stage][t] += torch.tensor(
                [float(err.sum()), float(err.numel())], dtype=torch.float64
            )

    def _eval_epoch_start(self, stage: str) -> None:
        super()._eval_epoch_start(stage)
        self._derivative_errors[stage].zero_()

    def _eval_epoch_end(self, stage: str) -> None:
        super()._eval_epoch_end(stage)
        errors = self._reduce_sum(self._derivative_errors[stage].to(self.device)).cpu()
        for t, name in enumerate(self.derivative_targets):
            if errors[t, 1] > 0:
                label, factor = unit(name)
                self.log(f"{stage}/mae_{name}_{label}", factor * float(errors[t, 0] / errors[t, 1]))


__all__ = [
    "DERIVATIVE_OF",
    "EphFinetuneModule",
    "cartesian_derivative_rows",
    "projected_derivative",
    "set_trainable",
]
