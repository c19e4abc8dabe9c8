#!/usr/bin/env python
"""Soak test: stream data_shards/pbe_mini for a long time and watch for leaks.

Trains the tiny model (conf/model/tiny.yaml) through `foundation.train.cli.build` — the
code path of ``foundation-train`` — with 2 DataLoader workers (re-created every epoch:
``persistent_workers=False``), validation every epoch, for ``--minutes`` of wall time.
Every ``--every`` seconds it samples: resident memory (RSS) of the training process and of
its loader workers, open file descriptors of both, optimizer steps so far, the 1-minute
load average. At the end it fits a line to RSS(t) after the warm-up (the first
``--warmup`` fraction of the run: allocator pools, e3nn caches and page cache settle) and
reports its slope in MB/hour, steps/s per window (mean, coefficient of variation) and the
range of open files; a table on stdout and JSON under bench_results/.

    nice -n 5 python scripts/bench_soak.py                      # 30 min
    python scripts/bench_soak.py --minutes 2 --every 5          # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytorch_lightning as pl

REPO = Path(__file__).resolve().parents[1]


class ResourceSampler(pl.Callback):
    """Samples RSS, open files, steps and load average every ``every`` seconds of training."""

    def __init__(self, every: float):
        self.every = float(every)
        self.samples: list[dict] = []
        self._t0 = self._next = 0.0
        self._me = psutil.Process()

    def _sample(self, trainer: pl.Trainer) -> None:
        workers = self._me.children(recursive=True)
        worker_rss = worker_fds = 0
        for child in workers:
            try:
                worker_rss += child.memory_info().rss
                worker_fds += child.num_fds()
            except psutil.Error:  # a worker that just exited
                pass
        self.samples.append(
            {
                "t_s": round(time.perf_counter() - self._t0, 2),
                "steps": int(trainer.global_step),
                "rss_MB": self._me.memory_info().rss / 2**20,
                "worker_rss_MB": worker_rss / 2**20,
                "n_workers": len(workers),
                "open_fds": self._me.num_fds(),
                "worker_open_fds": worker_fds,
                "loadavg_1min": os.getloadavg()[0],
            }
        )

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._next = self._t0
        self._sample(trainer)
        self._next += self.every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if time.perf_counter() >= self._next:
            self._sample(trainer)
            self._next += self.every


def analyse(samples: list[dict], warmup: float) -> dict:
    """RSS slope after warm-up, steps/s per sampling window, file-handle range."""
    t_end = samples[-1]["t_s"]
    steady = [s for s in samples if s["t_s"] >= warmup * t_end]
    t_h = np.array([s["t_s"] for s in steady]) / 3600.0
    rss = np.array([s["rss_MB"] for s in steady])
    total = rss + np.array([s["worker_rss_MB"] for s in steady])
    slope, intercept = np.polyfit(t_h, rss, 1)
    slope_total = np.polyfit(t_h, total, 1)[0]
    rates = [
        (b["steps"] - a["steps"]) / (b["t_s"] - a["t_s"])
        for a, b in zip(samples, samples[1:], strict=False)
        if b["t_s"] > a["t_s"]
    ]
    steady_rates = rates[len(samples) - len(steady) :] or rates
    fds = [s["open_fds"] for s in samples]
    return {
        "duration_min": t_end / 60,
        "steps": samples[-1]["steps"],
        "rss_start_MB": samples[0]["rss_MB"],
        "rss_after_warmup_MB": float(rss[0]),
        "rss_end_MB": samples[-1]["rss_MB"],
        "rss_max_MB": max(s["rss_MB"] for s in samples),
        "rss_slope_MB_per_hour": float(slope),
        "rss_fit_intercept_MB": float(intercept),
        "rss_slope_relative_per_hour": float(slope / intercept),
        "rss_incl_workers_slope_MB_per_hour": float(slope_total),
        "steps_per_s_mean": statistics.fmean(steady_rates),
        "steps_per_s_cv": statistics.pstdev(steady_rates) / statistics.fmean(steady_rates),
        "steps_per_s_min": min(steady_rates),
        "steps_per_s_max": max(steady_rates),
        "open_fds_min": min(fds),
        "open_fds_max": max(fds),
        "open_fds_end": fds[-1],
        "worker_open_fds_max": max(s["worker_open_fds"] for s in samples),
        "loadavg_1min_mean": statistics.fmean(s["loadavg_1min"] for s in samples),
        "loadavg_1min_max": max(s["loadavg_1min"] for s in samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=20.0, help="seconds between samples")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction left out of the fit")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "bench_soak.json")
    parser.add_argument("--note", default="", help="free text stored in the JSON")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))  # the compose helper of the training tests
    from train_support import compose

    from foundation.train.cli import build

    seconds = int(args.minutes * 60)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_soak_"))
    overrides = [
        f"data.root={REPO / 'data_shards' / 'pbe_mini'}",
        f"paths.output_dir={run_dir}",
        "model=tiny",
        f"data.num_workers={args.workers}",
        "data.steps_per_epoch=200",
        "trainer.max_epochs=100000",
        f"trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=50",
        "logger=csv",
        "callbacks=none",
        "test=false",
        f"num_threads={args.threads}",
    ]
    trainer, module, datamodule = build(compose(overrides))
    sampler = ResourceSampler(args.every)
    trainer.callbacks.append(sampler)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - start
    result = analyse(sampler.samples, args.warmup)
    result.update(
        {
            "wall_s": wall,
            "epochs": trainer.current_epoch,
            "config": {
                "dataset": "data_shards/pbe_mini",
                "model": "tiny",
                "loader_workers": args.workers,
                "persistent_workers": False,
                "torch_threads": args.threads,
                "steps_per_epoch": 200,
                "validation": "every epoch",
                "warmup_fraction_excluded": args.warmup,
            },
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "shared": "other jobs ran on this machine during the soak (see loadavg)",
            },
            "note": args.note,
            "samples": sampler.samples,
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("duration", f"{result['duration_min']:.1f} min, {result['steps']} steps"),
        ("RSS start / end", f"{result['rss_start_MB']:.0f} / {result['rss_end_MB']:.0f} MB"),
        ("RSS slope (steady)", f"{result['rss_slope_MB_per_hour']:+.2f} MB/h"),
        ("RSS+workers slope", f"{result['rss_incl_workers_slope_MB_per_hour']:+.2f} MB/h"),
        (
            "steps/s",
            f"{result['steps_per_s_mean']:.2f} (cv {result['steps_per_s_cv']:.2f}, "
            f"{result['steps_per_s_min']:.2f}–{result['steps_per_s_max']:.2f})",
        ),
        ("open fds", f"{result['open_fds_min']}–{result['open_fds_max']}"),
        (
            "loadavg 1 min",
            f"mean {result['loadavg_1min_mean']:.1f}, max {result['loadavg_1min_max']:.1f}",
        ),
    ]
    for name, value in rows:
        print(f"{name:<20} {value}")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
