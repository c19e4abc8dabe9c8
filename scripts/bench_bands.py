#!/usr/bin/env python
"""Band energies of a trained model against DFT on a dataset split, by split group.

    python scripts/bench_bands.py outputs/train/<run>/model.pt                  # pbe_mini test
    python scripts/bench_bands.py pretrained/tiny_pbe_mini.pt --split val --out x.json
    python scripts/bench_bands.py pretrained/small_pbe_mini.pt --overlap model   # learned S

For every structure of the split: the model's H on the record's own edges, bands on the
seekpath path with the record's DFT S, each band set aligned to its own Fermi level (Γ-centred
mesh, electron count of the record), MAE within ±3 eV of the DFT Fermi level; gaps and the
metal/insulator call (`foundation.physics.band_validation`). ``--overlap model`` gives the
predicted bands the model's S head instead of the exact S (a structure whose predicted S(k)
is not positive definite is counted as failed). Prints per-structure rows and a
per-group table (seen composition / unseen composition / unseen element); writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from foundation import keys
from foundation.data.shards import load_records, policy_group, read_manifest
from foundation.physics.band_validation import model_blocks, record_band_errors, summarize
from foundation.physics.kspace import OverlapError
from foundation.physics.predict import load_model


def evaluate(
    model_path: str, dataset: str, split: str, window_eV: float, overlap: str = "exact"
) -> dict:
    model = load_model(model_path)
    policy = read_manifest(dataset)["split_policy"]
    rows = []
    start = time.perf_counter()
    failed = []
    for record in load_records(dataset, split):
        s = model_blocks(model, record, keys.S) if overlap == "model" else None
        group = keys.SPLIT_GROUPS[policy_group(record.numbers, policy)]
        try:
            errors = record_band_errors(
                record, model_blocks(model, record), window_eV=window_eV, predicted_s=s
            )
        except OverlapError as exc:
            failed.append({"key": record.key, "group": group, "error": str(exc)})
            print(f"{record.key:<28} {group:<19} FAILED: {exc}", file=sys.stderr)
            continue
        rows.append({"key": record.key, "group": group} | errors)
        r = rows[-1]
        print(
            f"{r['key']:<28} {group:<19} window MAE {r.get('window_mae_meV', float('nan')):8.1f} meV"
            f"  gap DFT {r['gap_dft_eV']:6.3f} model {r['gap_pred_eV']:6.3f} eV",
            file=sys.stderr,
        )
    return {
        "model": str(model_path),
        "dataset": str(dataset),
        "split": split,
        "window_eV": window_eV,
        "overlap": overlap,
        "failed": failed,
        "seconds": time.perf_counter() - start,
        "groups": summarize(rows, keys.SPLIT_GROUPS),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", help="model.pt (inference export) or a Lightning checkpoint")
    p.add_argument("--dataset", default="data_shards/pbe_mini")
    p.add_argument("--split", default="test")
    p.add_argument("--window", type=float, default=3.0, help="±eV around the DFT Fermi level")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--overlap",
        choices=["exact", "model"],
        default="exact",
        help="S of the predicted bands: the exact (DFT) overlap or the model's S head",
    )
    p.add_argument("--out", default="outputs/bench_bands.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate(args.model, args.dataset, args.split, args.window, args.overlap)
    header = f"{'group':<19} {'n':>3} {'band MAE meV':>13} {'max meV':>9} {'gap MAE eV':>11} {'insul.':>7} {'→metal':>7}"
    print(header)
    print("-" * len(header))
    for group, g in result["groups"].items():
        mae = g["band_window_mae_meV"]
        print(
            f"{group:<19} {g['structures']:>3} {mae if mae is not None else float('nan'):>13.1f} "
            f"{g['band_window_max_meV']:>9.1f} {g['gap_mae_eV']:>11.3f} {g['insulators']:>7} "
            f"{g['insulator_as_metal']:>7}"
        )
    for row in result["failed"]:
        print(f"failed ({row['group']}): {row['key']}: S(k) not positive definite")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
