#!/usr/bin/env python
"""Fine-tuning benchmark: HSE06 band gaps and e-ph matrix elements on held-out structures.

HSE06 (``data_shards/hse_mini``; its test split holds the held-out composition PbTe, an
*unseen composition* whose elements train, and PbSe, the *unseen element* set: Se occurs in
no training structure; the two are reported apart):

* band gap of every validation (seen compositions, not trained on) and test structure (CBM − VBM on a Γ-centred 6×6×6 mesh plus the record's
  three generic k-points, 0 for a metal; `foundation.physics.bands.band_gap`) from
  - the HSE06 DFT blocks (the reference), and the PBE DFT blocks (context: how far PBE is);
  - (a) the pretrained PBE model (its ``h`` head): what one gets without fine-tuning;
  - (b) the model fine-tuned with ``experiment=finetune_hybrid_demo`` (ΔH head on the frozen
    backbone) on 10, 30 and all training structures (a seeded shuffle of the train split,
    taking first one structure for each element not yet covered, so every element keeps
    training structures as the split policy requires; the validation and test splits are
    kept), same number of steps each;
* (c) ``dft+dH_<run>``: the DFT PBE blocks plus the fine-tuned model's correction
  h_hse − h — the learned ΔH alone, without the error of the pretrained PBE prediction it
  is added to (on held-out compositions that error, not ΔH, limits (b));
* all gaps use the DFT overlap S, so they differ only through H; MAE against HSE06 DFT, per
  split group of the test structures (`foundation.data.shards.policy_group`).

E-ph (``data_shards/eph_mini``): |g_mnν(k, q = 0)| of the Γ optical phonons at Γ and the
record's band k-points from the pretrained model and from the shipped e-ph fine-tuned model
(``pretrained/tiny_pbe_eph_mini.pt``, ``experiment=finetune_eph_demo``) against the DFT
finite-difference dh/ds, as the relative error of the gauge-invariant |g|
(`foundation.physics.eph_validation`: "vertex" = the model's ∂H with DFT bands and ∂S,
"model" = everything from the model, "model_exact_s" = the model's H with the exact overlap of
the basis). eph_mini has no held-out cell: a fit, not a
generalisation measurement.

    python scripts/bench_finetune.py                        # prints a table, writes JSON
    python scripts/bench_finetune.py --sizes 10 all --steps 200

JSON: ``bench_results/bench_finetune.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from foundation import keys  # noqa: E402
from foundation.data.record import HamiltonianRecord  # noqa: E402
from foundation.data.shards import (  # noqa: E402
    element_symbols,
    load_records,
    policy_group,
    read_manifest,
    write_shards,
)
from foundation.physics.band_validation import model_blocks, with_h  # noqa: E402
from foundation.physics.bands import band_gap  # noqa: E402
from foundation.physics.eph_validation import coupling_errors, load_cases  # noqa: E402
from foundation.physics.kspace import BlochHamiltonian  # noqa: E402
from foundation.physics.predict import load_model  # noqa: E402

MESH = (6, 6, 6)


# --------------------------------------------------------------------------- gaps
def gap_eV(record: HamiltonianRecord) -> float:
    kpts = np.asarray(record.meta["dft_bands"]["kpts_frac"])
    return band_gap(BlochHamiltonian.from_record(record), mesh=MESH, kpts=kpts)


def gap_table(records: list[HamiltonianRecord], models: dict[str, tuple], policy: dict) -> dict:
    """Per structure: split group, HSE06 and PBE DFT gaps and each model's; MAE vs HSE06 per
    source and split group (``policy``: the dataset manifest's split policy).

    For a model with an ``h_hse`` head also ``dft+dH_<name>``: the DFT PBE blocks plus the
    model's correction h_hse − h, which isolates the learned ΔH from the error of the
    pretrained PBE prediction it is added to."""
    rows = []
    for r in records:
        row = {
            "key": r.key,
            "group": keys.SPLIT_GROUPS[policy_group(r.numbers, policy)],
            "hse06_dft": gap_eV(r.with_target(keys.H_HSE)),
            "pbe_dft": gap_eV(r),
        }
        for name, (model, head) in models.items():
            blocks = model_blocks(model, r, head)
            row[name] = gap_eV(with_h(r, blocks))
            if head == keys.H_HSE:
                delta = blocks - model_blocks(model, r, keys.H)
                row[f"dft+dH_{name}"] = gap_eV(with_h(r, r.h + delta))
        rows.append(row)
    sources = [s for s in rows[0] if s not in ("key", "group", "hse06_dft")]
    mae = {
        group: {
            s: float(np.mean([abs(row[s] - row["hse06_dft"]) for row in members])) for s in sources
        }
        for group in keys.SPLIT_GROUPS
        if (members := [row for row in rows if row["group"] == group])
    }
    return {"rows": rows, "mae_vs_hse06_eV": mae}


# --------------------------------------------------------------------------- fine-tuning
def covering_subset(
    records: list[HamiltonianRecord], n: int | None, seed: int
) -> list[HamiltonianRecord]:
    """``n`` records (None: all) in a seeded shuffle, taking first, in that order, one record
    for each element no earlier pick holds, so the subset keeps every element of ``records``."""
    order = list(records)
    random.Random(seed).shuffle(order)
    if n is None:
        return order
    picked: list[HamiltonianRecord] = []
    covered: set[str] = set()
    for r in order:
        if not element_symbols(r.numbers) <= covered:
            picked.append(r)
            covered |= element_symbols(r.numbers)
    picked += [r for r in order if r not in picked]
    return picked[:n]


def subset_dataset(src: Path, dst: Path, n_train: int | None, seed: int) -> tuple[Path, int]:
    """A copy of ``src`` with only ``n_train`` training structures (`covering_subset`; None:
    all); validation and test splits unchanged (same split policy)."""
    manifest = read_manifest(src)
    train = covering_subset(load_records(src, "train"), n_train, seed)
    others = load_records(src, "val") + load_records(src, "test")
    policy = manifest["split_policy"]
    write_shards(
        train + others, dst, name=dst.name, samples_per_shard=16, seed=policy["seed"],
        val_fraction=policy["val_fraction"], test_fraction=policy["test_fraction"],
        test_compositions=policy["test_compositions"], test_elements=policy["test_elements"],
    )  # fmt: skip
    for split in ("val", "test"):
        if (
            read_manifest(dst)["splits"][split]["n_samples"]
            != manifest["splits"][split]["n_samples"]
        ):
            raise RuntimeError(f"subset {dst}: the {split} split changed (split policy?).")
    return dst, len(train)


def finetune(data: Path, out: Path, args: argparse.Namespace) -> dict:
    """One ``experiment=finetune_hybrid_demo`` run on ``data``; returns timing + metrics."""
    from hydra import compose, initialize_config_dir

    from foundation.train.cli import config_dir, train

    overrides = [
        "experiment=finetune_hybrid_demo",
        f"data.root={data}",
        f"paths.output_dir={out}",
        f"task.pretrained={args.pretrained}",
        f"data.steps_per_epoch={args.steps // args.epochs}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.max_time=null",
        "trainer.enable_progress_bar=false",
        "callbacks.figures=null",
        "logger=csv",
        *args.extra,
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    t0 = time.perf_counter()
    metrics = train(cfg)
    return {"wall_s": time.perf_counter() - t0, "metrics": metrics, "model": out / "model.pt"}


# --------------------------------------------------------------------------- e-ph
def eph_errors(root: Path, models: dict[str, Path]) -> dict:
    """Per model: per-cell and mean relative |g| errors (`coupling_errors`) against DFT."""
    cases = load_cases(root)
    out = {}
    for name, path in models.items():
        model = load_model(path)
        per_cell = {case.record.key: coupling_errors(model, case) for case in cases}
        columns = next(iter(per_cell.values()))
        mean = {q: float(np.mean([e[q] for e in per_cell.values()])) for q in columns}
        out[name] = {"checkpoint": str(path.relative_to(REPO)), "cells": per_cell, "mean": mean}
    return out


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "data_shards" / "hse_mini")
    ap.add_argument("--eph-data", type=Path, default=REPO / "data_shards" / "eph_mini")
    ap.add_argument("--pretrained", type=Path, default=REPO / "pretrained" / "tiny_pbe_mini.pt")
    ap.add_argument(
        "--eph-model", type=Path, default=REPO / "pretrained" / "tiny_pbe_eph_mini.pt",
        help="e-ph fine-tuned checkpoint compared with --pretrained",
    )  # fmt: skip
    ap.add_argument("--sizes", nargs="+", default=["10", "30", "all"])
    ap.add_argument("--steps", type=int, default=400, help="fine-tuning steps per run")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="training-subset shuffle")
    ap.add_argument("--skip-eph", action="store_true", help="HSE06 part only")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides per run")
    ap.add_argument("--out", type=Path, default=REPO / "bench_results" / "bench_finetune.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")

    held = load_records(args.data, "val") + load_records(args.data, "test")  # never trained on
    models: dict[str, tuple] = {"pbe_model": (load_model(args.pretrained), keys.H)}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        for size in args.sizes:
            n = None if size == "all" else int(size)
            data, n_train = subset_dataset(args.data, Path(tmp) / f"hse_{size}", n, args.seed)
            run = finetune(data, Path(tmp) / f"run_{size}", args)
            name = f"finetuned_{n_train}"
            models[name] = (load_model(run["model"]), keys.H_HSE)
            runs[name] = {"n_train": n_train, "wall_s": run["wall_s"],
                          "test_mae_h_hse_meV": run["metrics"].get("test/mae_meV"),
                          "test_mae_h_hse_meV_per_group": {
                              g: run["metrics"].get(f"test/mae_h_hse_{g}_meV")
                              for g in keys.SPLIT_GROUPS}}  # fmt: skip
        gaps = gap_table(held, models, read_manifest(args.data)["split_policy"])
    eph_models = {"pretrained": args.pretrained, "eph_finetuned": args.eph_model}
    eph = {} if args.skip_eph else eph_errors(args.eph_data, eph_models)

    print(f"\nHSE06 band gaps of the {len(held)} validation and test structures, eV:")
    names = [n for n in gaps["rows"][0] if n not in ("key", "group", "hse06_dft")]
    print(f"{'key':22s} {'HSE06 DFT':>10s} " + " ".join(f"{n:>19s}" for n in names))
    for row in gaps["rows"]:
        print(f"{row['key']:22s} {row['hse06_dft']:10.3f} "
              + " ".join(f"{row[n]:19.3f}" for n in names))  # fmt: skip
    for group, mae in gaps["mae_vs_hse06_eV"].items():
        print(f"{'MAE ' + group:22s} {'':10s} "
              + " ".join(f"{mae[n]:19.3f}" for n in names))  # fmt: skip
    for name, run in runs.items():
        per_group = ", ".join(
            f"{g} {v:.1f}" for g, v in run["test_mae_h_hse_meV_per_group"].items() if v is not None
        )
        print(f"{name}: {run['n_train']} training structures, {run['wall_s']:.0f} s, "
              f"test h_hse MAE {run['test_mae_h_hse_meV']:.1f} meV ({per_group})")  # fmt: skip
    if eph:
        print("\ne-ph relative |g| error vs DFT finite differences (eph_mini, Γ modes, 4 k):")
        print(f"{'model':14s} {'cell':22s} {'vertex':>8s} {'all-model':>10s} {'exact S':>8s}")
    for name, result in eph.items():
        for key, e in [*result["cells"].items(), ("mean", result["mean"])]:
            print(f"{name:14s} {key:22s} {e['vertex']:8.3f} {e['model']:10.3f} "
                  f"{e['model_exact_s']:8.3f}")  # fmt: skip

    result = {
        "bench": "finetune",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_avg": os.getloadavg(),
        },  # fmt: skip
        "settings": {
            "steps": args.steps,
            "epochs": args.epochs,
            "sizes": args.sizes,
            "mesh": MESH,
            "pretrained": str(args.pretrained.relative_to(REPO)),
            "experiment": "finetune_hybrid_demo",
            "extra": args.extra,
        },  # fmt: skip
        "runs": runs,
        "gaps": gaps,
        "eph": eph,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
