"""``foundation-train``: the Hydra main over conf/ (see conf/train.yaml for the groups).

Builds, from the composed config, the datamodule, the module (model + task), callbacks,
loggers, strategy and trainer, then fits (and tests). Configuration mistakes — unknown keys,
a missing shard directory, dataset elements outside the model's basis — stop the run before
anything trains, with exit status 2 and a message that names the key or path and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PREEMPTED_EXIT_STATUS = 143
"""Exit status after SIGTERM (128 + 15, as a shell reports a process killed by it): not
success, so a scheduler or ``torchrun --max-restarts`` starts the run again."""


def config_dir() -> str:
    """conf/ of this source tree (editable install), or $FOUNDATION_CONF_DIR."""
    env = os.environ.get("FOUNDATION_CONF_DIR")
    if env:
        return str(Path(env).resolve())
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "conf" / "train.yaml").is_file():
            return str(parent / "conf")
    return str(here.parents[2] / "conf")


def check_dataset_fits_model(datamodule: Any, model: Any) -> None:
    """The model must know every element of the dataset and reach its longest edges."""
    from foundation.train.config import ConfigError

    missing = [el for el in datamodule.elements if el not in model.elements]
    if missing:
        raise ConfigError(
            f"Dataset {datamodule.root} has element(s) {', '.join(missing)} that the model's basis "
            f"{model.basis.name!r} lacks (it has {', '.join(model.elements)}). Leave model.basis "
            "unset to use the dataset's basis, or use a basis that covers these elements."
        )
    cutoff = datamodule.manifest.get("edge_cutoff_A")
    if cutoff is not None and float(cutoff) > float(model.cutoff_A) + 1e-9:
        raise ConfigError(
            f"Dataset {datamodule.root} has edges up to {cutoff} Å but the model reaches "
            f"{model.cutoff_A} Å (the larger of model.cutoff_A and a head's own cutoff_A; its "
            f"features vanish there); set model.cutoff_A={cutoff} or more."
        )


def fit_target_statistics(module: Any, datamodule: Any) -> None:
    """Fit the per-species target statistics of a freshly built model with
    ``model.standardize`` (`foundation.model.standardize`) on the dataset's training split
    (at most `standardize.MAX_STRUCTURES` structures, shards in a fixed order). Every rank
    fits the same files in the same order in float64, so all ranks hold identical
    statistics; a fine-tuned model keeps its pretrained ones."""
    from foundation.model.standardize import fit_model_statistics, sample_records

    model = module.model
    if not (getattr(module, "fresh_model", False) and model.config.get("standardize")):
        return
    start = time.perf_counter()
    datamodule.setup("fit")  # checksums first; with data.on_error=skip bad shards are left out
    records = sample_records(datamodule.shards("train"))
    fitted = fit_model_statistics(model, records, datamodule.targets)
    for name, stats in fitted.items():
        log.info(
            "Target statistics of %s fitted on %d training structures in %.1f s",
            name,
            int(stats.n_structures),
            time.perf_counter() - start,
        )


def _multirun_job_needs_own_process(cfg: DictConfig) -> bool:
    """A multi-process job of a multirun, launched here (not by torchrun/srun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    devices = cfg.trainer.get("devices", 1)
    processes = devices if isinstance(devices, int) else 2  # "auto", lists: assume several
    external = any(k in os.environ for k in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_STEP_ID"))
    return processes * int(cfg.trainer.get("num_nodes", 1)) > 1 and not external


def _run_job_in_subprocess() -> None:
    """Run this multirun job as a single run in a fresh process (which starts its own ranks):
    process groups and DeepSpeed's global state cannot be rebuilt inside one process."""
    import subprocess

    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    cmd = [
        sys.executable,
        "-m",
        "foundation.train.cli",
        *hc.overrides.task,
        f"hydra.run.dir={hc.runtime.output_dir}",
        "hydra.output_subdir=null",
    ]
    subprocess.run(cmd, check=True)


def last_checkpoint(cfg: DictConfig) -> Path:
    """``last.ckpt`` of the run's checkpoint callback (default <output dir>/checkpoints/)."""
    checkpoint = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    dirpath = checkpoint.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints"
    return Path(dirpath) / "last.ckpt"


def build(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """(trainer, module, datamodule) for a composed config; validates it first."""
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate
    from pytorch_lightning.strategies import DeepSpeedStrategy

    from foundation.basis import BasisSet
    from foundation.train.checkpoint import AtomicCheckpointIO, plain
    from foundation.train.config import ConfigError, resolve_overlap_head, validate_config

    validate_config(cfg)
    if cfg.get("auto_resume") and cfg.ckpt_path is None and last_checkpoint(cfg).exists():
        cfg.ckpt_path = str(last_checkpoint(cfg))
        log.info("auto_resume: resuming from %s", cfg.ckpt_path)
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).exists():
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} does not exist; point it at a checkpoint (…/checkpoints/last.ckpt)."
        )
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    given = cfg.model.get("basis")
    basis = plain(given) if given else datamodule.basis.to_dict()
    log.info(resolve_overlap_head(cfg, BasisSet.from_dict(basis)))
    model_cfg = plain(cfg.model)
    model_cfg.pop("basis", None)
    module = instantiate(
        cfg.task,
        model=model_cfg,
        basis=basis,
        run_config=plain(cfg),
        _convert_="all",
        _recursive_=False,
    )
    check_dataset_fits_model(datamodule, module.model)
    datamodule.use_basis(module.model.basis)
    if cfg.ckpt_path is None:  # a resumed run takes the statistics from its checkpoint
        fit_target_statistics(module, datamodule)

    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    strategy = instantiate(
        cfg.strategy,
        accelerator=cfg.trainer.accelerator,
        gradient_clip_norm=cfg.task.grad_clip_norm,
    )
    extra: dict[str, Any] = {"plugins": [AtomicCheckpointIO()]}
    if isinstance(strategy, DeepSpeedStrategy):
        extra["plugins"] = []  # DeepSpeed writes its own checkpoint directories
        if str(cfg.trainer.precision).startswith("bf16"):
            # DeepSpeed's bf16 mode casts every parameter and buffer to bf16, which the e3nn
            # model does not support: run DeepSpeed in fp32 and autocast the forward pass
            # (the numerics of bf16-mixed on the other strategies).
            module.autocast_dtype = torch.bfloat16
            extra["precision"] = "32-true"
    trainer = instantiate(
        cfg.trainer, strategy=strategy, callbacks=callbacks, logger=loggers or False, **extra
    )
    return trainer, module, datamodule


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) as configured; returns the final logged metrics."""
    from foundation.train.strategies import init_elastic_process_group

    trainer, module, datamodule = build(cfg)
    if all(
        os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    ):
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
    init_elastic_process_group(trainer.strategy)  # torchrun restarts: per-attempt store keys
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    fit_s = time.perf_counter() - start
    if cfg.test:
        for result in trainer.test(module, datamodule=datamodule, verbose=trainer.is_global_zero):
            metrics.update({k: float(v) for k, v in result.items()})
    if trainer.is_global_zero:
        targets = [module.monitor_target] + [
            t for t in module.targets if t != module.monitor_target
        ]
        out = Path(cfg.paths.output_dir)
        skipped = getattr(datamodule, "skipped", {})
        if skipped:
            (out / "skipped_data.json").write_text(json.dumps(skipped, indent=1) + "\n")
        line = summary(metrics, trainer.global_step, fit_s, out, targets)
        log.info(line + faults_summary(skipped, getattr(module, "bad_steps", 0), out))
    return metrics


def faults_summary(skipped: Mapping[str, int], bad_steps: int, out: Path, show: int = 5) -> str:
    """What the run left out: data skipped under data.on_error=skip (each damaged shard or
    sample once, the first ``show`` by name; all in ``skipped_data.json``) and optimizer
    steps the NaN guard skipped. Empty when nothing was left out."""
    parts = []
    if skipped:
        names = "; ".join(list(skipped)[:show])
        more = f"; … {len(skipped) - show} more" if len(skipped) > show else ""
        parts.append(
            f" Skipped data (data.on_error=skip): {len(skipped)} damaged shard(s)/sample(s), "
            f"{sum(skipped.values())} time(s) in all: {names}{more} "
            f"(full list: {out / 'skipped_data.json'})."
        )
    if bad_steps:
        parts.append(
            f" Non-finite steps skipped by the NaN guard: {bad_steps} (task.max_bad_steps)."
        )
    return "".join(parts)


def summary(
    metrics: dict[str, float],
    steps: int,
    fit_s: float,
    out: Path,
    targets: Sequence[str] = ("h",),
) -> str:
    """One line that ends a run: steps, wall time, and the last validation and test MAE of
    each of ``targets`` (meV for H-like targets, with on-/off-site; 10⁻³ for S); where a split
    holds unseen compositions or unseen elements, the MAE of each split group too."""
    from foundation import keys
    from foundation.train.metrics import unit

    group_words = dict(
        zip(
            keys.SPLIT_GROUPS,
            ("seen compositions", "unseen compositions", "unseen elements"),
            strict=True,
        )
    )

    def groups(split: str, target: str, label: str) -> str:
        values = {g: metrics.get(f"{split}/mae_{target}_{g}_{label}") for g in group_words}
        if all(v is None for g, v in values.items() if g != "seen"):
            return ""
        return "; " + ", ".join(
            f"{group_words[g]} " + ("none" if v is None else f"{v:.1f}") for g, v in values.items()
        )

    parts = [f"{steps} steps in {fit_s / 60:.1f} min"]
    for split in ("val", "test"):
        for target in targets:
            label = unit(target)[0]
            key = f"{split}/mae_{target}_{label}"
            if key not in metrics:
                continue
            detail = ", ".join(
                f"{word} {metrics[f'{split}/mae_{target}_{part}_{label}']:.1f}"
                for part, word in (("onsite", "on-site"), ("offsite", "off-site"))
                if f"{split}/mae_{target}_{part}_{label}" in metrics
            )
            name = "H" if target == "h" else "S" if target == "s" else target
            detail += groups(split, target, label)
            detail = f" ({detail.removeprefix('; ')})" if detail else ""
            parts.append(
                f"{split} {name} MAE {metrics[key]:.2f} {label.replace('_per_A', '/Å')}{detail}"
            )
    return f"Finished: {'; '.join(parts)}. Run directory: {out}"


def user_error(exc: BaseException) -> Exception | None:
    """The configuration or data error behind ``exc`` (Hydra wraps errors raised inside
    ``instantiate``), or None for anything else."""
    from foundation.data.datamodule import DataConfigError
    from foundation.data.shards import ShardError
    from foundation.train.config import ConfigError

    while exc is not None:
        if isinstance(exc, (ConfigError, DataConfigError, ShardError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    if _multirun_job_needs_own_process(cfg):
        _run_job_in_subprocess()
        return None
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        metrics = train(cfg)
    except SIGTERMException:
        print(
            f"foundation-train: stopped by SIGTERM (preemption); the latest state is in "
            f"{last_checkpoint(cfg)}. Rerun the same command with auto_resume=true (or "
            f"ckpt_path={last_checkpoint(cfg)}) to continue exactly where it stopped.",
            file=sys.stderr,
        )
        sys.exit(PREEMPTED_EXIT_STATUS)
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        print(f"foundation-train: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("val/mae_meV")


if __name__ == "__main__":
    main()
