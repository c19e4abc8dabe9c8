"""Shared helpers of the training tests (tests/test_train*.py, tests/test_datamodule.py)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data_shards" / "pbe_mini"

# A very small model (one interaction layer, few channels): fast enough for multi-process
# tests on 2 CPU cores; same code path as conf/model/tiny.yaml.
MICRO_MODEL = [
    "model.num_layers=1",
    "model.irreps_node=4x0e+4x0o+2x1o+2x1e+2x2e+2x2o+1x3o+1x3e+1x4e+1x4o",
    "model.radial_hidden=8",
    "model.sh_lmax=2",
]


def make_dataset(path: Path, n: int = 40, distinct: int = 5) -> Path:
    """Synthetic shards with train/val/test splits: ``n`` random but valid H/S records that
    repeat ``distinct`` structures (under different keys), so a few steps visibly learn."""
    import numpy as np

    from foundation.data.shards import write_shards
    from foundation.data.synthetic import random_record

    if not (path / "manifest.json").is_file():
        elements = ["C", "O", "Si", "Ga", "As"]
        records = []
        for k in range(n):
            rng = np.random.default_rng(k % distinct)
            symbols = [elements[k % distinct], *rng.choice(elements, size=int(rng.integers(1, 5)))]
            records.append(random_record(f"synthetic-{k:04d}", symbols, seed=k % distinct))
        write_shards(
            records,
            path,
            name=path.name,
            samples_per_shard=8,
            seed=0,
            val_fraction=0.15,
            test_fraction=0.15,
        )
    return path


def overrides(data_root: Path, out: Path, *extra: str) -> list[str]:
    """Small, fast run settings on ``data_root`` writing to ``out``."""
    return [
        f"data.root={data_root}",
        f"paths.output_dir={out}",
        "data.max_edges=400",
        "data.steps_per_epoch=4",
        "data.shuffle_buffer=16",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "task.warmup_steps=2",
        "task.lr=5e-3",
        "logger=csv",
        "test=false",
        "num_threads=1",  # robust timing on a busy 2-core machine
        *MICRO_MODEL,
        *extra,
    ]


def compose(overrides_: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from foundation.train.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides_)


def run_cli(args: list[str], out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``foundation-train`` in a subprocess (its own Hydra run dir ``out``)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.setdefault("WANDB_MODE", "disabled")
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m etc. before overrides
    overrides_ = [a for a in args if not a.startswith("-")]
    cmd = [
        sys.executable,
        "-m",
        "foundation.train.cli",
        *flags,
        f"hydra.run.dir={out}",
        *overrides_,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(out: Path) -> list[dict[str, float]]:
    """Rows of the CSV logger's metrics.csv (empty cells dropped)."""
    (path,) = sorted(out.glob("csv/version_*/metrics.csv"))[-1:]
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def train_losses(out: Path) -> dict[int, float]:
    """step → train/loss."""
    return {int(r["step"]): r["train/loss"] for r in read_metrics(out) if "train/loss" in r}


def fit(cfg, callbacks=(), ckpt_path=None):
    """Build from ``cfg`` (in this process), add test ``callbacks``, fit; (trainer, module)."""
    from foundation.train.cli import build

    trainer, module, datamodule = build(cfg)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, module


class LossRecorder:
    """Callback recording (global_step, train/loss) after every batch."""

    def __new__(cls):
        import pytorch_lightning as pl

        class _Recorder(pl.Callback):
            def __init__(self):
                self.losses: list[tuple[int, float]] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if "train/loss" in trainer.callback_metrics:
                    self.losses.append(
                        (trainer.global_step, float(trainer.callback_metrics["train/loss"]))
                    )

        return _Recorder()


def tiny_float64_model(cutoff_A: float):
    """Untrained tiny model (seed 0, float64 throughout: built under double precision) on the
    pbe_mini basis with edges to ``cutoff_A``: derivative checks to float64 precision."""
    import torch
    import yaml

    from foundation.basis import BasisSet
    from foundation.data.shards import read_manifest
    from foundation.model import build_model
    from foundation.rotations import double_precision

    basis = BasisSet.from_dict(read_manifest(SHIPPED)["basis"])
    cfg = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())
    torch.manual_seed(0)
    with double_precision():
        return build_model(cfg, basis=basis, cutoff_A=cutoff_A, optimize_einsums=False).double()
