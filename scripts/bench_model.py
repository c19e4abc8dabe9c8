"""Benchmark the model presets: parameters, forward and forward+backward time, peak memory.

    python scripts/bench_model.py                       # tiny and base on CPU, built-in crystals
    python scripts/bench_model.py --convs so2 tensor_product   # both convolutions, same irreps
    python scripts/bench_model.py --device cuda --presets tiny base large
    python scripts/bench_model.py --dataset data_shards/pbe_mini --n-structures 8

Structures: the first records of a shard dataset (its edges and basis), or rattled ase.build
crystals on `neighbor_edges` at the model's cutoff with the PySCF gth-szv-molopt-sr basis.
Each structure is one batch. Times are medians over ``--repeat`` runs after a warm-up;
"per edge" divides by the structure's edge count. Peak memory: on CUDA
torch.cuda.max_memory_allocated; on CPU the growth of the process's peak RSS (ru_maxrss)
over the measurement, each preset measured in a fresh process so presets do not mask
each other. Prints a table and writes JSON (``--out``, default outputs/bench_model.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _crystals():
    from ase.build import bulk

    structures = [
        ("Si2", bulk("Si", "diamond", a=5.43)),
        ("GaAs", bulk("GaAs", "zincblende", a=5.65)),
        ("TiO-4", bulk("TiO", "rocksalt", a=4.2) * (1, 1, 2)),
        ("NaCl-8", bulk("NaCl", "rocksalt", a=5.64, cubic=True)),
    ]
    for k, (_, atoms) in enumerate(structures):
        atoms.rattle(0.05, seed=k)
    return structures


def _graphs(args, cutoff_A: float):
    from foundation import keys
    from foundation.basis import BasisSet
    from foundation.data.graph import record_to_graph, structure_to_graph

    if args.dataset:
        from foundation.data.shards import load_records, read_manifest

        basis = BasisSet.from_dict(read_manifest(Path(args.dataset))["basis"])
        records = load_records(Path(args.dataset), args.split)[: args.n_structures]
        graphs = [(r.key, record_to_graph(r, basis.universal, targets=(keys.H,))) for r in records]
        return basis, graphs
    structures = _crystals()[: args.n_structures]
    symbols = sorted({s for _, a in structures for s in a.get_chemical_symbols()})
    basis = BasisSet.from_pyscf("gth-szv-molopt-sr", symbols)
    graphs = [
        (
            name,
            structure_to_graph(a.numbers, a.positions, a.cell[:], a.pbc, basis.universal, cutoff_A),
        )
        for name, a in structures
    ]
    return basis, graphs


def _to(graph: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in graph.items()}


def _timed(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(job: str, args) -> dict:
    """Measure one ``preset`` or ``preset:conv`` (the preset with another convolution, same
    irreps and everything else) in this process."""
    from foundation.model import build_model, count_parameters

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset, _, conv = job.partition(":")
    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text())
    if conv:
        cfg["conv"] = conv
        if conv != "so2":
            cfg["mmax"] = None
    basis, graphs = _graphs(args, float(cfg["cutoff_A"]))
    start = time.perf_counter()
    model = build_model(cfg, basis=basis).to(device)
    build_s = time.perf_counter() - start
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for name, graph in graphs:
        batch = _to(graph, device)
        n_edges = int(batch["edge_index"].shape[1])

        def forward(batch=batch):
            with torch.no_grad():
                model(batch)

        def forward_backward(batch=batch):
            model.zero_grad(set_to_none=True)
            out = model(batch)
            sum(v.square().sum() for v in out.values()).backward()

        t_fwd = _timed(forward, device, args.repeat)
        t_bwd = _timed(forward_backward, device, args.repeat)
        rows.append(
            {"structure": name, "atoms": int(batch["numbers"].shape[0]), "edges": n_edges,
             "forward_s": t_fwd, "forward_backward_s": t_bwd}
        )  # fmt: skip
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        memory = "cuda max_memory_allocated"
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        memory = "cpu ru_maxrss growth"
    edges = sum(r["edges"] for r in rows)
    return {
        "preset": preset,
        "conv": cfg["conv"],
        "parameters": count_parameters(model),
        "n_uni": basis.universal.n_orb,
        "build_s": build_s,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "structures": rows,
        "forward_ms_per_structure": 1e3 * statistics.mean(r["forward_s"] for r in rows),
        "forward_backward_ms_per_structure": 1e3
        * statistics.mean(r["forward_backward_s"] for r in rows),
        "forward_us_per_edge": 1e6 * sum(r["forward_s"] for r in rows) / edges,
        "forward_backward_us_per_edge": 1e6 * sum(r["forward_backward_s"] for r in rows) / edges,
        "peak_memory_MB": peak_mb,
        "memory_measure": memory,
    }


def _speedups(results: list[dict], reference: str = "tensor_product") -> list[dict]:
    """Per preset, every other convolution against ``reference`` (time and memory ratios)."""
    ref = {r["preset"]: r for r in results if r["conv"] == reference}
    rows = []
    for r in results:
        base = ref.get(r["preset"])
        if base is None or r is base:
            continue
        rows.append(
            {
                "preset": r["preset"],
                "conv": r["conv"],
                "reference": reference,
                "forward_speedup": base["forward_us_per_edge"] / r["forward_us_per_edge"],
                "forward_backward_speedup": base["forward_backward_us_per_edge"]
                / r["forward_backward_us_per_edge"],
                "memory_ratio": r["peak_memory_MB"] / max(base["peak_memory_MB"], 1e-9),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument(
        "--convs",
        nargs="+",
        default=[],
        help="convolutions to compare (default: each preset's own)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    p.add_argument("--dataset", help="shard dataset directory (default: built-in crystals)")
    p.add_argument("--split", default="train")
    p.add_argument("--n-structures", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--out", default="outputs/bench_model.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one preset, print JSON
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda requested but torch sees no CUDA device.")

    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    results = []
    jobs = [f"{p}:{c}" if c else p for p in args.presets for c in (args.convs or [""])]
    for job in jobs:
        cmd = [sys.executable, __file__, "--worker", job] + [
            a for a in (argv if argv is not None else sys.argv[1:])
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        print(f"measured {job}: {r['parameters']:,} parameters", file=sys.stderr)

    header = (
        f"{'preset':<15} {'params':>11} {'struct':>7} {'atoms':>5} {'edges':>6} "
        f"{'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd µs/edge':>12} {'f+b µs/edge':>12}"
    )
    print(
        f"device {args.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        name = f"{r['preset']}:{r['conv']}"
        for s in r["structures"]:
            print(
                f"{name:<15} {r['parameters']:>11,} {s['structure']:>7} {s['atoms']:>5} "
                f"{s['edges']:>6} {1e3 * s['forward_s']:>9.1f} {1e3 * s['forward_backward_s']:>11.1f} "
                f"{1e6 * s['forward_s'] / s['edges']:>12.1f} "
                f"{1e6 * s['forward_backward_s'] / s['edges']:>12.1f}"
            )
        print(
            f"{name:<15} mean per structure: forward {r['forward_ms_per_structure']:.1f} ms, "
            f"forward+backward {r['forward_backward_ms_per_structure']:.1f} ms; per edge "
            f"{r['forward_us_per_edge']:.1f} / {r['forward_backward_us_per_edge']:.1f} µs; peak "
            f"memory {r['peak_memory_MB']:.0f} MB ({r['memory_measure']}); build {r['build_s']:.1f} s"
        )
    speedups = _speedups(results)
    for row in speedups:
        print(
            f"{row['preset']}: {row['conv']} vs {row['reference']}: forward "
            f"{row['forward_speedup']:.2f}×, forward+backward {row['forward_backward_speedup']:.2f}× "
            f"faster, peak memory {row['memory_ratio']:.2f}× of the reference"
        )
    payload = {
        "device": args.device,
        "speedups": speedups,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
