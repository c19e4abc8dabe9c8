"""Data benchmarks: shard reading throughput (and, from the PySCF side, generation cost).

Reader: samples/s and edges/s of the webdataset pipeline (`foundation.data.shards.
record_pipeline`: tar → samples → checksummed-free decode to `HamiltonianRecord`) driven
by a torch DataLoader with 1 and 2 workers, shards split across workers. Each setting is
run ``repeats`` times after one warm-up pass (page cache warm); the median is reported.
Wall time includes worker start-up, as a training epoch would.

    python scripts/bench_data.py reader data_shards/pbe_mini
    python scripts/bench_data.py reader --synthetic 400      # no dataset: synthetic shards

Results are merged into ``bench_results/bench_data.json`` under the key ``"reader"``
(other keys of that file are kept).
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
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's own package first
from foundation.data.shards import SPLITS, read_manifest, record_pipeline, shard_paths  # noqa: E402

DEFAULT_JSON = Path("bench_results/bench_data.json")


def _identity(x):
    return x


def _read_all(urls: list[Path], workers: int) -> tuple[float, int, int]:
    pipeline = record_pipeline(urls, split_by_node=False, split_by_worker=True)
    loader = torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=workers, collate_fn=_identity
    )
    t0 = time.perf_counter()
    n = edges = 0
    for record in loader:
        n += 1
        edges += record.n_edges
    return time.perf_counter() - t0, n, edges


def bench_reader(
    dataset_dir: str | os.PathLike, workers: Sequence[int] = (1, 2), repeats: int = 3
) -> dict:
    """Median samples/s and edges/s over ``repeats`` full passes for each worker count."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    urls = [p for s in SPLITS if s in manifest["splits"] for p in shard_paths(dataset_dir, s)]
    size_mb = sum(p.stat().st_size for p in urls) / 1e6
    _read_all(urls, 0)  # warm-up: page cache, imports
    rows = []
    for w in workers:
        runs = [_read_all(urls, w) for _ in range(repeats)]
        t = statistics.median(r[0] for r in runs)
        n, e = runs[0][1], runs[0][2]
        rows.append(
            {
                "workers": w,
                "seconds": t,
                "samples": n,
                "edges": e,
                "samples_per_s": n / t,
                "edges_per_s": e / t,
                "MB_per_s": size_mb / t,
            }
        )
    return {
        "dataset": manifest["name"],
        "path": str(dataset_dir),
        "n_shards": len(urls),
        "size_MB": size_mb,
        "repeats": repeats,
        "machine": f"{platform.node()} · {os.cpu_count()} CPUs · torch {torch.__version__}",
        "results": rows,
    }


def print_reader_table(result: dict) -> None:
    print(
        f"reader benchmark: {result['dataset']} ({result['n_shards']} shards, "
        f"{result['size_MB']:.1f} MB) — median of {result['repeats']}"
    )
    print(
        f"  {'workers':>7} {'samples':>8} {'edges':>9} {'s':>8} {'samples/s':>10} {'edges/s':>10} {'MB/s':>7}"
    )
    for r in result["results"]:
        print(
            f"  {r['workers']:>7} {r['samples']:>8} {r['edges']:>9} {r['seconds']:>8.3f} "
            f"{r['samples_per_s']:>10.0f} {r['edges_per_s']:>10.0f} {r['MB_per_s']:>7.1f}"
        )


def merge_json(path: Path, key: str, value: dict) -> None:
    """Set ``key`` in the JSON file at ``path`` (atomic rewrite, other keys kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _synthetic_dataset(n: int, root: Path) -> Path:
    """pbe_mini-like sizes: 2–8 atoms, s/p/d elements, a 6 Å cutoff (images up to ±1 cell)."""
    from foundation.data.shards import write_shards
    from foundation.data.synthetic import random_dataset

    out = root / f"synthetic_{n}"
    records = random_dataset(n, seed=0, atoms=(2, 8), cutoff_A=6.0)
    write_shards(records, out, name=f"synthetic_{n}", samples_per_shard=32)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reader", help="shard → record throughput with a torch DataLoader")
    p.add_argument("dataset", nargs="?", help="dataset directory (with manifest.json)")
    p.add_argument("--synthetic", type=int, help="benchmark N synthetic records instead")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.command == "reader":
        with tempfile.TemporaryDirectory() as tmp:
            if args.synthetic:
                dataset = _synthetic_dataset(args.synthetic, Path(tmp))
            elif args.dataset:
                dataset = Path(args.dataset)
            else:
                parser.error("give a dataset directory or --synthetic N")
            result = bench_reader(dataset, workers=args.workers, repeats=args.repeats)
        if args.synthetic:
            result["path"] = f"synthetic ({args.synthetic} records, foundation.data.synthetic)"
        print_reader_table(result)
        merge_json(args.json, "reader", result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
