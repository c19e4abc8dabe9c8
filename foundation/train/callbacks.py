"""Callbacks: a checkpoint callback whose last.ckpt is always the latest state, prediction
figures every N epochs and the inference export at the end of fit."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch

from foundation import keys
from foundation.data.graph import collate_graphs, record_to_graph

log = logging.getLogger(__name__)


class LatestModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that ``last.ckpt`` is rewritten at every epoch end
    and when the run is preempted.

    Since pytorch-lightning 2.6 the epoch-end save writes ``last.ckpt`` only when a top-k
    checkpoint was written at the same step: once the monitored validation MAE stops improving,
    ``last.ckpt`` would stay at the best epoch and a resumed run would silently repeat epochs.
    Resuming from ``last.ckpt`` must continue where the run stopped, so it is refreshed here.
    """

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """SIGTERM (preemption, SLURM requeue, ``kill``): Lightning stops after the current
        optimizer step on every rank and raises SIGTERMException; ``last.ckpt`` is written
        first, so the rerun (ckpt_path=… or auto_resume=true) continues exactly there."""
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and self.save_last and self.dirpath:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            log.warning(
                "SIGTERM: checkpoint of step %d written to %s",
                trainer.global_step,
                self.last_model_path,
            )


class PredictionFigures(pl.Callback):
    """Every ``every_n_epochs`` validation epochs: bands of one validation structure
    (model vs target H vs stored DFT eigenvalues) and a parity plot of its H entries.

    PNGs go to ``<dirpath>/`` and to every logger that takes images (TensorBoard, wandb).
    Runs while the module holds its EMA weights (before the module's epoch-end hook).
    """

    def __init__(self, dirpath: str | Path, every_n_epochs: int = 5, structure_index: int = 0):
        self.dirpath = Path(dirpath)
        self.every_n_epochs = int(every_n_epochs)
        self.structure_index = int(structure_index)
        self._record = None

    def _validation_record(self, trainer: pl.Trainer):
        if self._record is None:
            from itertools import islice

            from foundation.data.datamodule import _read_records

            records = _read_records(trainer.datamodule.shards("val"))
            self._record = next(islice(records, self.structure_index, None), None)
        return self._record

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        from foundation.train.figures import band_figure, parity_figure, predicted_record

        record = self._validation_record(trainer)
        if record is None:
            return
        model = pl_module.model
        universal = model.universal
        targets = [
            t
            for t in (keys.H, keys.S)
            if t in model.heads and (t == keys.H or record.s is not None)
        ]
        batch = collate_graphs([record_to_graph(record, universal, targets)])
        batch = {k: v.to(pl_module.device) for k, v in batch.items()}
        with torch.no_grad():  # every rank runs it: a ZeRO-3 forward is collective
            pred = {k: v.float().cpu() for k, v in model(batch).items()}
        if not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        stem = f"epoch{trainer.current_epoch:04d}"
        mask = batch[keys.BLOCK_MASK].cpu()
        figures = {
            "parity_h": parity_figure(
                pred[keys.H][mask].numpy(),
                batch[keys.H].cpu()[mask].numpy(),
                self.dirpath / f"{stem}_parity_h.png",
                title=record.key,
            )
        }
        try:
            figures["bands"] = band_figure(
                record,
                predicted_record(record, pred, universal),
                self.dirpath / f"{stem}_bands.png",
            )
        except Exception as exc:  # a non-positive predicted S early in training, …
            log.warning("Band figure for %s skipped: %s", record.key, exc)
        _log_images(trainer, figures)


def _log_images(trainer: pl.Trainer, figures: dict[str, Path]) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        for name, path in figures.items():
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key=f"figures/{name}", images=[str(path)], step=trainer.global_step
                )
            elif isinstance(logger, TensorBoardLogger):
                import matplotlib.image

                image = matplotlib.image.imread(path)[..., :3]
                logger.experiment.add_image(
                    f"figures/{name}", image, trainer.global_step, dataformats="HWC"
                )


class ExportInference(pl.Callback):
    """At the end of fit, write the inference checkpoint (EMA weights) to ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = list(pl_module.model.parameters())
        gathered = nullcontext()
        if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: collect the partitions (all ranks)
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gathered:
            if trainer.is_global_zero:
                pl_module.export(self.path, extra={"global_step": trainer.global_step})
                log.info("Inference checkpoint written to %s", self.path)
