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


def make_dataset(path: Path, n: int = 40, seed: int = 1) -> Path:
    """Synthetic shards (random but valid H/S records) with train/val/test splits."""
    from foundation.data.shards import write_shards
    from foundation.data.synthetic import random_dataset

    if not (path / "manifest.json").is_file():
        write_shards(
            random_dataset(n, seed=seed, elements=("C", "O", "Si", "Ga", "As")),
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
        "data.max_edges=160",
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
    cmd = [sys.executable, "-m", "foundation.train.cli", f"hydra.run.dir={out}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(out: Path) -> list[dict[str, float]]:
    """Rows of the CSV logger's metrics.csv (empty cells dropped)."""
    (path,) = sorted(out.glob("csv/version_*/metrics.csv"))[-1:]
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def train_losses(out: Path) -> dict[int, float]:
    """step → train/loss."""
    return {int(r["step"]): r["train/loss"] for r in read_metrics(out) if "train/loss" in r}
