"""LightningModule that trains a `UniversalHamiltonianModel` on padded H (and S) blocks.

* **Loss**: per target Σ loss over masked entries / global entry count (all ranks), weighted
  per target; only ``keys.BLOCK_MASK`` entries count. The normalisation uses the global
  count, so a data-parallel step has exactly the loss and gradient of one process holding
  the whole global batch. Optional band-space term (``band_loss``, `train.band_loss`):
  squared eigenvalue errors of H(k) near E_F at random k-points, normalised the same way.
* **Optimisation** (manual, so a bad step can be skipped on every strategy): AdamW, linear
  warmup + cosine decay, gradient clipping by norm (DeepSpeed: its own clipping, same
  value), EMA weights used for validation, test and export.
* **NaN/Inf guard**: after the forward pass the ranks all-reduce a non-finite flag with the
  loss sums; if any rank saw a non-finite loss every rank skips backward and the optimizer
  step, the skip is counted and logged, and after ``max_bad_steps`` the run stops with
  `NonFiniteLossError`. A non-finite gradient norm (identical on all ranks after the
  gradient all-reduce) is skipped the same way.
* **Metrics** (validation/test, EMA weights): MAE in meV overall, on-site, off-site and per
  element pair (`metrics.BlockErrors`), summed over ranks at epoch end.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from foundation import keys
from foundation.data.datamodule import EVAL_WEIGHT
from foundation.train.band_loss import BANDS, BandLossConfig, band_term, sample_kpoints
from foundation.train.checkpoint import checkpoint_metadata, checkpoint_mismatch, code_version
from foundation.train.ema import EMA
from foundation.train.losses import LOSSES, loss_sum, target_mask
from foundation.train.metrics import BlockErrors, unit

# Epoch metrics are summed over ranks by the module itself (BlockErrors.all_reduce), so
# Lightning's advice to add sync_dist=True does not apply.
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


class NonFiniteLossError(RuntimeError):
    """Too many steps with a non-finite loss or gradient."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup 0→1 over ``warmup_steps``, cosine 1→min_lr_ratio after."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class HamiltonianModule(pl.LightningModule):
    """Train the universal model on the targets of ``targets`` (name → loss weight).

    Args:
        model: model config (conf/model/*.yaml) for `foundation.model.build_model`, or a
            built `UniversalHamiltonianModel` (subclasses that load pretrained weights).
        basis: orbital basis (``BasisSet.to_dict()``; the trainer passes the dataset's).
        targets: target name → loss weight (weight 0: monitored only). Each needs a head.
        loss: ``mse`` | ``l1`` | ``huber`` (``huber_delta`` in eV; in units of the scale when
            ``normalize_loss``).
        normalize_loss: divide each residual by its entry's scale from the head's target
            statistics (σ_on, σ_off(r); `foundation.model.standardize`), so long edges, whose
            blocks are 10³ smaller than nearest-neighbour ones but whose errors add up in the
            bands, weigh as much as short ones. Metrics stay in target units.
        lr, weight_decay, betas, eps: AdamW.
        warmup_steps, min_lr_ratio: linear warmup then cosine to ``min_lr_ratio``·lr.
        grad_clip_norm: clip the global gradient norm (None: no clipping).
        ema_decay: EMA of the weights for evaluation/export (None: off).
        max_bad_steps: non-finite steps tolerated before the run stops.
        log_pairs: log per-element-pair MAE at the end of each validation epoch.
        band_loss: the band-space term (`band_loss.BandLossConfig`: weight, kpoints,
            window_eV, target, seed, align); None or weight 0: off (costs nothing).
        run_config: the resolved run config, stored in checkpoints (not used otherwise).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        basis: Mapping[str, Any],
        targets: Mapping[str, float] | None = None,
        loss: str = "mse",
        huber_delta: float = 0.01,
        normalize_loss: bool = False,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.05,
        grad_clip_norm: float | None = 10.0,
        ema_decay: float | None = 0.99,
        max_bad_steps: int = 20,
        log_pairs: bool = True,
        band_loss: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        from foundation.model import build_model

        built = isinstance(model, torch.nn.Module)
        self.save_hyperparameters(ignore=["run_config", "model"] if built else ["run_config"])
        self.run_config = run_config
        self.automatic_optimization = False
        self.model = model if built else build_model(model, basis=basis)
        self.fresh_model = not built
        """Built here from a config (not pretrained): foundation-train fits its target
        statistics on the training split (`foundation.model.standardize`)."""
        self.monitor_target = keys.H
        """Target whose MAE is also logged as ``<stage>/mae_meV`` (checkpoint monitor, summary)."""
        self.targets = dict(targets if targets is not None else {keys.H: 1.0, keys.S: 1.0})
        missing = [t for t in self.targets if t not in self.model.heads]
        if missing:
            raise ValueError(
                f"Target(s) {missing} have no model head (heads: {list(self.model.heads)}); "
                "add them to model.heads or remove them from task.targets."
            )
        if loss not in LOSSES:
            raise ValueError(f"Unknown loss {loss!r}; choose one of {', '.join(LOSSES)}.")
        self.band_loss = BandLossConfig.from_config(band_loss)
        if self.band_loss.enabled:
            need = [t for t in (self.band_loss.target, keys.S) if t not in self.targets]
            if need:
                raise ValueError(
                    f"task.band_loss needs {need} in task.targets (weight 0 is enough: the batch "
                    "must carry the DFT blocks); add them or set task.band_loss.weight=0."
                )
        self._orbital_table = torch.as_tensor(self.model.universal.mask_table())
        self.ema: EMA | None = None
        self._pending_ema: dict | None = None  # EMA state from a checkpoint, until fit start
        self.bad_steps = 0
        self._metrics = {
            stage: BlockErrors(self.model.basis.atomic_numbers, list(self.targets))
            for stage in ("val", "test")
        }
        self._last_step_time: float | None = None
        self.autocast_dtype: torch.dtype | None = None
        """Set by foundation-train for DeepSpeed + bf16-mixed: DeepSpeed then runs in fp32
        and the forward pass autocasts (DeepSpeed's own bf16 mode casts every parameter and
        buffer, which the e3nn model does not support)."""

    # ------------------------------------------------------------------ forward / loss
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.autocast_dtype is None:
            return self.model(batch)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self.model(batch)

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer  # None when the module is used without a Trainer
        if trainer is None or trainer.world_size == 1:
            return tensor
        return trainer.strategy.reduce(tensor, reduce_op="sum")

    def loss_terms(
        self, pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per target of ``self.targets``: (Σ loss, number of entries counted) on this rank.

        Entries are those of `losses.target_mask` (real orbitals of structures that have the
        target); a batch without any (replayed data lacking ``h_hse``) gives an exact zero
        that still depends on the head's output, so the head is in every step's graph.
        Subclasses with other kinds of targets extend the dict (one entry per target)."""
        hp = self.hparams
        terms = {}
        for name in self.targets:
            p, t = pred[name], batch[name]
            scales = self._entry_scales(name, batch)
            if scales is not None:
                p, t = p / scales.to(p.dtype), t / scales.to(t.dtype)
            terms[name] = loss_sum(p, t, target_mask(batch, name), hp.loss, hp.huber_delta)
        if self.band_loss.enabled:
            cfg = self.band_loss
            kpts = sample_kpoints(batch, cfg.kpoints, cfg.seed, self.global_step)
            term = band_term(
                pred[cfg.target],
                batch,
                self._orbital_table,
                kpts,
                cfg.window_eV,
                cfg.target,
                cfg.align,
            )
            dtype = next(iter(terms.values()))[0].dtype  # float64 inside, the block sums' dtype out
            terms[BANDS] = (term.loss_sum.to(dtype), term.count)
        return terms

    @property
    def loss_weights(self) -> dict[str, float]:
        """Loss term → weight: ``self.targets`` plus the band term when it is on."""
        extra = {BANDS: self.band_loss.weight} if self.band_loss.enabled else {}
        return dict(self.targets) | extra

    def _entry_scales(self, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per-entry scales of target ``name`` when ``normalize_loss`` is on and its head has
        statistics (`heads.BlockHead.entry_scales`), else None (loss in target units)."""
        head = self.model.heads[name]
        if not self.hparams.get("normalize_loss") or not hasattr(head, "entry_scales"):
            return None
        return head.entry_scales(batch)

    def step_losses(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Forward + loss. Returns (loss to backpropagate, global per-target losses, global
        [n_structures, n_edges, non-finite flag]). Loss values are those of the global batch."""
        terms = self.loss_terms(self(batch), batch)
        weight_of = self.loss_weights
        missing = [name for name in weight_of if name not in terms]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.loss_terms returned no {missing} term(s); this task does "
                "not support them (e.g. task.band_loss: set its weight to 0)."
            )
        local_sums = torch.stack([terms[name][0] for name in weight_of])
        counts = torch.stack([terms[name][1] for name in weight_of])
        finite = torch.isfinite(local_sums).all()
        device = local_sums.device
        n_edges = batch[keys.EDGE_INDEX].shape[1]
        extra = [float(~finite), float(batch[keys.N_ATOMS].numel()), float(n_edges)]
        stats = torch.cat(
            [
                local_sums.detach().double(),
                counts.double(),
                torch.tensor(extra, dtype=torch.float64, device=device),
            ]
        )
        stats = self._reduce_sum(stats)
        n = len(weight_of)
        global_sums, global_counts = stats[:n], stats[n : 2 * n].clamp_min(1.0)
        world = self._trainer.world_size if self._trainer is not None else 1
        weights = torch.tensor(
            list(weight_of.values()), dtype=local_sums.dtype, device=local_sums.device
        )
        # DDP and DeepSpeed average gradients over ranks, hence the factor world.
        loss = (weights * local_sums / global_counts.to(local_sums.dtype)).sum() * world
        per_target = {name: global_sums[i] / global_counts[i] for i, name in enumerate(weight_of)}
        per_target["total"] = sum(float(w) * per_target[t] for t, w in weight_of.items())
        return loss, per_target, stats[2 * n :]

    # ------------------------------------------------------------------ training
    def _skip(self, reason: str) -> None:
        self.bad_steps += 1
        self.log("train/bad_steps", float(self.bad_steps), on_step=True, rank_zero_only=True)
        rank_zero_warn(
            f"Step {self.global_step}: {reason}; skipped the optimizer update "
            f"({self.bad_steps}/{self.hparams.max_bad_steps} bad steps)."
        )
        if self.bad_steps > self.hparams.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps} steps had a non-finite loss or gradient (task.max_bad_steps="
                f"{self.hparams.max_bad_steps}); last at step {self.global_step}. Lower task.lr, "
                "check the data (foundation-data inspect) or raise task.max_bad_steps."
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        loss, per_target, (nonfinite, n_structures, n_edges) = self.step_losses(batch)
        if nonfinite > 0:
            self._skip("non-finite loss on at least one rank")
            return
        opt.zero_grad()
        self.manual_backward(loss)
        grad_norm = self._clip_gradients()
        if grad_norm is not None and not torch.isfinite(grad_norm):
            opt.zero_grad()
            self._skip("non-finite gradient norm")
            return
        opt.step()
        self.lr_schedulers().step()
        if self.ema is not None:
            self.ema.update(self.model)
        self._log_train(per_target, grad_norm, float(n_structures), float(n_edges))

    def _clip_gradients(self) -> torch.Tensor | None:
        """Global gradient norm (after the all-reduce), clipped; DeepSpeed clips inside its
        step (configured from the same task.grad_clip_norm) and reports None here."""
        if self._is_deepspeed:
            return None
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return None
        max_norm = self.hparams.grad_clip_norm or float("inf")  # inf: measure, never clip
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    @property
    def _is_deepspeed(self) -> bool:
        from pytorch_lightning.strategies import DeepSpeedStrategy

        return self._trainer is not None and isinstance(self._trainer.strategy, DeepSpeedStrategy)

    def _log_train(
        self,
        per_target: dict[str, torch.Tensor],
        grad_norm: torch.Tensor | None,
        n_struct: float,
        n_edges: float,
    ) -> None:
        log = {f"train/loss_{t}": v for t, v in per_target.items() if t != "total"}
        log["train/loss"] = per_target["total"]
        log["train/lr"] = self.optimizers().param_groups[0]["lr"]
        if grad_norm is not None:
            log["train/grad_norm"] = grad_norm
        now = time.perf_counter()
        if self._last_step_time is not None:
            dt = now - self._last_step_time
            log["train/step_time_s"] = dt
            log["train/structures_per_s"] = n_struct / dt
            log["train/edges_per_s"] = n_edges / dt
        self._last_step_time = now
        if torch.cuda.is_available() and self.device.type == "cuda":
            log["train/gpu_mem_GB"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.log_dict({k: float(v) for k, v in log.items()}, on_step=True)

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        weight = float(batch.pop(EVAL_WEIGHT, torch.ones(1))[0])
        pred = self(batch)
        self._metrics[stage].update(pred, batch, weight)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_start(self, stage: str) -> None:
        self._metrics[stage].reset()
        if self.ema is not None:
            self.ema.swap_in(self.model)

    def _eval_epoch_end(self, stage: str) -> None:
        if self.ema is not None:
            self.ema.swap_out(self.model)
        metrics = self._metrics[stage]
        metrics.all_reduce(lambda t: self._reduce_sum(t.to(self.device)))
        values = metrics.compute(per_pair=self.hparams.log_pairs)
        target = self.monitor_target
        values["mae_meV"] = values.get(f"mae_{target}_{unit(target)[0]}", float("nan"))
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()})

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start("val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start("test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ optimizer, EMA, checkpoints
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups of the trainable weights: weight decay on matrices only.
        Subclasses may split them further (e.g. a smaller ``lr`` for pretrained weights)."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(
            [g for g in self.parameter_groups() if g["params"]],
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
        )
        trainer = self._trainer
        total = int(trainer.estimated_stepping_batches) if trainer is not None else 10_000
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _ensure_ema(self) -> None:
        if self.hparams.ema_decay is None or self.ema is not None:
            return
        if any(hasattr(p, "ds_id") for p in self.model.parameters()):
            raise ValueError(
                "EMA needs every parameter whole on each rank, but DeepSpeed ZeRO-3 partitions them; "
                "set task.ema_decay=null or use strategy=deepspeed_stage_2."
            )
        self.ema = EMA(self.model, self.hparams.ema_decay).to(self.device)

    def on_fit_start(self) -> None:
        self._ensure_ema()
        if self._pending_ema is not None and self.ema is not None:
            self.ema.load_state_dict(self._pending_ema)
            self.ema.to(self.device)
        self._pending_ema = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["foundation"] = checkpoint_metadata(self.model, self.run_config) | {
            "bad_steps": self.bad_steps,
            "ema": None if self.ema is None else self.ema.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("foundation", {})
        problems = checkpoint_mismatch(checkpoint, self, compare_tensors=not self._is_deepspeed)
        if problems:
            from foundation.train.config import ConfigError

            path = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            raise ConfigError(
                f"Cannot resume from {path} (written by foundation "
                f"{meta.get('code_version', 'of an unknown version')}; this is "
                f"{code_version()}): {'; '.join(problems)}. Resume with the run's own model and "
                "data settings (its resolved config is the checkpoint's foundation.config and "
                "<run dir>/config_resolved.yaml), or start a new run from its weights with "
                "task=finetune_hybrid task.pretrained=<checkpoint> instead of ckpt_path."
            )
        self.bad_steps = int(meta.get("bad_steps", 0))
        self._pending_ema = meta.get("ema")
        if self.ema is not None and self._pending_ema is not None:
            self.ema.load_state_dict(self._pending_ema)
            self._pending_ema = None
        rng = meta.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"].cpu())
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def export(self, path, extra: Mapping[str, Any] | None = None):
        """Write the inference checkpoint (EMA weights when EMA is on); see checkpoint.py."""
        from foundation.train.checkpoint import export_inference_checkpoint

        if self.ema is not None:
            with self.ema.applied(self.model):
                return export_inference_checkpoint(
                    self.model, path, run_config=self.run_config, extra=extra
                )
        return export_inference_checkpoint(
            self.model, path, run_config=self.run_config, extra=extra
        )
