#!/usr/bin/env python
"""Training throughput: steps/s and structures/s for 1 vs N processes (single, DDP, ZeRO-2).

Runs ``foundation-train`` as a subprocess for each configuration (the same code path as a
real run), reads the CSV logger's per-step timings and prints a table plus a JSON file.
Every process gets cores // processes threads; the per-rank edge budget is fixed, so N
processes take N times the structures per step (weak scaling).

    python scripts/bench_train.py                                   # CPU: 1 vs 2 processes
    python scripts/bench_train.py --accelerator gpu --devices 1 2 4 8 --extra trainer.precision=bf16-mixed
    python scripts/bench_train.py --data /tmp/synth --synthetic     # no shipped dataset needed
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def synthetic_dataset(path: Path) -> Path:
    from foundation.data.shards import write_shards
    from foundation.data.synthetic import random_dataset

    if not (path / "manifest.json").exists():
        write_shards(
            random_dataset(64, seed=0, elements=("C", "O", "Si", "Ga", "As")),
            path,
            name=path.name,
            samples_per_shard=8,
        )
    return path


def run(
    name: str, args: argparse.Namespace, data: Path, nproc: int, strategy: str, out: Path
) -> dict:
    threads = args.threads or (
        max(1, (os.cpu_count() or 1) // nproc) if args.accelerator == "cpu" else 4
    )
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        WANDB_MODE="disabled",
    )
    cmd = [
        sys.executable,
        "-m",
        "foundation.train.cli",
        f"hydra.run.dir={out}",
        f"paths.output_dir={out}",
        f"data.root={data}",
        f"model={args.model}",
        f"strategy={strategy}",
        f"trainer.accelerator={args.accelerator}",
        f"trainer.devices={nproc}",
        f"data.max_edges={args.max_edges}",
        f"data.steps_per_epoch={args.steps}",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "callbacks=none",
        "test=false",
        "+trainer.limit_val_batches=0",
        *args.extra,
    ]
    manifest = json.loads((data / "manifest.json").read_text())
    if manifest.get("edge_cutoff_A"):  # the model must reach the dataset's longest edges
        cmd.insert(-len(args.extra) or len(cmd), f"model.cutoff_A={manifest['edge_cutoff_A']}")
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return {"config": name, "error": f"exit {result.returncode}"}
    (metrics,) = sorted(out.glob("csv/version_*/metrics.csv"))[-1:]
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/step_time_s")]
    rows = rows[args.warmup :]  # first steps: allocation, thread pools
    step = statistics.median(float(r["train/step_time_s"]) for r in rows)
    return {
        "config": name,
        "processes": nproc,
        "strategy": strategy,
        "threads_per_process": threads,
        "steps_per_s": 1.0 / step,
        "structures_per_s": statistics.median(float(r["train/structures_per_s"]) for r in rows),
        "edges_per_s": statistics.median(float(r["train/edges_per_s"]) for r in rows),
        "steps_timed": len(rows),
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=REPO / "data_shards" / "pbe_mini")
    p.add_argument(
        "--synthetic", action="store_true", help="write synthetic shards to --data first"
    )
    p.add_argument("--model", default="tiny")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument(
        "--devices", type=int, nargs="+", default=[1, 2], help="process counts to compare"
    )
    p.add_argument("--strategies", nargs="+", default=["ddp", "deepspeed_stage_2"])
    p.add_argument("--steps", type=int, default=12, help="train steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--max-edges", type=int, default=1024, help="edge budget per batch and rank")
    p.add_argument(
        "--threads", type=int, default=0, help="threads per process (0: cores / processes)"
    )
    p.add_argument("--extra", nargs="*", default=[], help="more foundation-train overrides")
    p.add_argument("--json", type=Path, default=Path("bench_train.json"))
    args = p.parse_args()
    data = synthetic_dataset(args.data) if args.synthetic else args.data

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.devices:
            for strategy in ["single"] if n == 1 else args.strategies:
                name = f"{n}x {strategy}"
                print(f"running {name} …", flush=True)
                results.append(
                    run(name, args, data, n, strategy, Path(tmp) / name.replace(" ", "_"))
                )
    base = next((r for r in results if r.get("processes") == 1 and "error" not in r), None)
    print(f"\n{'config':<22}{'steps/s':>9}{'structures/s':>14}{'edges/s':>11}{'speed-up':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['config']:<22}{r['error']:>44}")
            continue
        speedup = r["structures_per_s"] / base["structures_per_s"] if base else float("nan")
        r["structures_speedup"] = speedup
        print(
            f"{r['config']:<22}{r['steps_per_s']:>9.2f}{r['structures_per_s']:>14.1f}"
            f"{r['edges_per_s']:>11.0f}{speedup:>10.2f}"
        )
    meta = {
        "model": args.model,
        "data": str(data),
        "accelerator": args.accelerator,
        "max_edges_per_rank": args.max_edges,
        "cpu_count": os.cpu_count(),
    }
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
