#!/usr/bin/env python
"""Exact overlaps from two-center tables (`foundation.physics.overlap`): build cost, accuracy
against PySCF, and time/memory of S(R) for large Si cells.

    python scripts/bench_overlap.py                       # all three parts
    python scripts/bench_overlap.py --parts accuracy scaling --sizes 512 1000

* ``tables``: every element pair of every element the basis covers (gth-szv-molopt-sr: 71)
  built into an empty cache: seconds per pair, total, cache size, largest spline error.
* ``accuracy``: every shipped structure (pbe_mini, hse_mini, eph_mini): max |S_tables −
  S_PySCF| per element (PySCF two-center integrals in float64, the generator's reference)
  and against the stored float32 blocks (with their Wigner–Seitz weights); dS/du along the
  Cartesian displacements of the eph_mini cells against PySCF central differences.
* ``scaling``: diamond Si supercells (500 … 10⁴ atoms) with edges to ``--cutoff`` Å: seconds
  for the neighbour list and for S(R), and the peak resident memory of a fresh process doing
  just that (one process per size, ``--threads`` torch threads).

Prints tables and writes ``--out`` (JSON; parts not rerun keep their earlier results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASIS = "gth-szv-molopt-sr"
DATASETS = ("pbe_mini", "hse_mini", "eph_mini")


def bench_tables(basis_name: str) -> dict:
    from ase.data import chemical_symbols
    from pyscf import gto

    from foundation.basis import BasisSet
    from foundation.physics.overlap import OverlapTables

    elements = []
    for sym in chemical_symbols[1:]:
        try:
            gto.basis.load(basis_name, sym)
            elements.append(sym)
        except Exception:  # noqa: BLE001 — PySCF raises several types for a missing element
            continue
    basis = BasisSet.from_pyscf(basis_name, elements)
    with tempfile.TemporaryDirectory() as cache:
        tables = OverlapTables(basis, cache=cache)
        t0 = time.perf_counter()
        seconds, errors = [], []
        for n, a in enumerate(elements):
            for b in elements[n:]:
                table = tables.pair(a, b)
                seconds.append(table.build_seconds)
                errors.append(table.max_error)
        total = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(cache).iterdir())
        t1 = time.perf_counter()
        reloaded = OverlapTables(basis, cache=cache)
        for n, a in enumerate(elements):
            for b in elements[n:]:
                reloaded.pair(a, b)
        load_s = time.perf_counter() - t1
    return {
        "basis": basis_name,
        "elements": len(elements),
        "pairs": len(seconds),
        "total_s": total,
        "per_pair_median_s": float(np.median(seconds)),
        "per_pair_max_s": float(np.max(seconds)),
        "cache_MB": size / 1e6,
        "load_all_from_cache_s": load_s,
        "max_spline_error": float(np.max(errors)),
    }


def bench_accuracy() -> dict:
    import ase
    from ase.data import chemical_symbols

    from foundation.basis import BasisSet
    from foundation.data.dft.pyscf import overlap_blocks, overlap_derivatives
    from foundation.data.shards import iter_records, read_manifest
    from foundation.physics.kspace import flatten_blocks
    from foundation.physics.overlap import (
        OverlapTables,
        exact_overlap,
        exact_overlap_derivative,
        record_overlap_error,
    )

    per_element: dict[str, float] = {}
    stored: dict[str, float] = {}
    deriv: list[float] = []
    n_structures = 0
    for name in DATASETS:
        root = REPO / "data_shards" / name
        basis = BasisSet.from_dict(read_manifest(root)["basis"])
        tables = OverlapTables(basis)
        for rec in iter_records(root):
            atoms = ase.Atoms(numbers=rec.numbers, positions=rec.positions, cell=rec.cell, pbc=True)
            ours = exact_overlap(tables, rec.numbers, rec.positions, rec.cell, rec.edges)
            ref = flatten_blocks(overlap_blocks(atoms, rec.edges, basis.name))
            n_orb = basis.n_orb_array(rec.numbers)
            edge_of = np.repeat(
                np.arange(len(rec.edges)), n_orb[rec.edges[:, 0]] * n_orb[rec.edges[:, 1]]
            )
            diff = np.abs(ours - ref)
            for z in set(rec.numbers.tolist()):
                touches = (rec.numbers[rec.edges[:, :2]] == z).any(axis=1)
                el = chemical_symbols[z]
                per_element[el] = max(per_element.get(el, 0.0), float(diff[touches[edge_of]].max()))
            stored[name] = max(stored.get(name, 0.0), record_overlap_error(tables, rec))
            n_structures += 1
            if name == "eph_mini":  # dS/du along every Cartesian displacement
                patterns = np.eye(3 * len(rec.numbers)).reshape(-1, len(rec.numbers), 3)
                ours = exact_overlap_derivative(
                    tables, rec.numbers, rec.positions, rec.cell, rec.edges, patterns
                )
                ref = overlap_derivatives(atoms, rec.edges, patterns, basis=basis.name)
                deriv.append(float(np.abs(ours - ref).max() / np.abs(ref).max()))
    return {
        "structures": n_structures,
        "max_abs_vs_pyscf_per_element": dict(sorted(per_element.items())),
        "max_abs_vs_pyscf": max(per_element.values()),
        "max_abs_vs_stored_float32": stored,
        "dS_du_max_relative_error_vs_pyscf_fd": max(deriv),
        "dS_du_note": "PySCF central differences with δ = 1e-4 Å (truncation ~δ²)",
    }


def _peak_rss_MB() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not carried over from
    the parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_size(n_rep: int, cutoff: float, threads: int) -> dict:
    """Run in a fresh process: neighbour list + exact S(R) of an (n_rep)³ diamond Si cell."""
    import torch
    from ase.build import bulk

    from foundation.basis import BasisSet
    from foundation.data.graph import neighbor_edges
    from foundation.physics.overlap import OverlapTables, exact_overlap

    torch.set_num_threads(threads)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (n_rep, n_rep, n_rep)
    tables = OverlapTables(BasisSet.from_pyscf(BASIS, ["Si"]))
    tables.pair("Si", "Si")  # table from the cache: not part of the per-cell cost
    base = _peak_rss_MB()
    t0 = time.perf_counter()
    edges = neighbor_edges(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    t1 = time.perf_counter()
    s = exact_overlap(tables, atoms.numbers, atoms.positions, atoms.cell.array, edges)
    t2 = time.perf_counter()
    peak = _peak_rss_MB()
    return {
        "atoms": len(atoms),
        "edges": int(len(edges)),
        "entries": int(s.size),
        "neighbors_s": t1 - t0,
        "overlap_s": t2 - t1,
        "peak_MB": peak,
        "peak_above_imports_MB": peak - base,
        "overlap_array_MB": s.nbytes / 1e6,
    }


def bench_scaling(sizes: list[int], cutoff: float, threads: int) -> list[dict]:
    rows = []
    for n_atoms in sizes:
        n_rep = max(1, round((n_atoms / 8) ** (1 / 3)))
        cmd = [sys.executable, __file__, "--one", str(n_rep), "--cutoff", str(cutoff),
               "--threads", str(threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  {r['atoms']:>6} atoms: {r['edges']:>9} edges, neighbours {r['neighbors_s']:.1f} s, "
              f"S {r['overlap_s']:.1f} s, peak {r['peak_MB']:.0f} MB", file=sys.stderr)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["tables", "accuracy", "scaling"])
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1000, 2744, 5832, 10648])
    p.add_argument("--cutoff", type=float, default=9.0, help="edge cutoff, Å (pbe_mini's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_results/bench_overlap.json")
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.cutoff, args.threads)))
        return
    out = Path(args.out)  # parts not rerun keep their earlier results
    result: dict = json.loads(out.read_text()) if out.is_file() else {}
    result |= {
        "meta": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "threads": args.threads, "cutoff_A": args.cutoff, "basis": BASIS},
    }  # fmt: skip
    if "tables" in args.parts:
        t = result["tables"] = bench_tables(BASIS)
        print(f"tables: {t['elements']} elements, {t['pairs']} pairs in {t['total_s']:.0f} s "
              f"(median {1e3 * t['per_pair_median_s']:.0f} ms, max {1e3 * t['per_pair_max_s']:.0f} ms "
              f"per pair), {t['cache_MB']:.0f} MB on disk, reloaded in {t['load_all_from_cache_s']:.1f} s, "
              f"max spline error {t['max_spline_error']:.1e}")  # fmt: skip
    if "accuracy" in args.parts:
        a = result["accuracy"] = bench_accuracy()
        print(f"accuracy over {a['structures']} shipped structures:")
        print(f"{'element':<8} {'max |S_tables − S_PySCF|':>26}")
        for el, err in a["max_abs_vs_pyscf_per_element"].items():
            print(f"{el:<8} {err:>26.1e}")
        print(f"vs stored float32 blocks: {a['max_abs_vs_stored_float32']}")
        print(
            f"dS/du vs PySCF finite differences: max relative {a['dS_du_max_relative_error_vs_pyscf_fd']:.1e}"
        )
    if "scaling" in args.parts:
        rows = result["scaling"] = bench_scaling(args.sizes, args.cutoff, args.threads)
        print(
            f"{'atoms':>6} {'edges':>9} {'neighbours s':>13} {'S(R) s':>8} {'peak MB':>8} {'S array MB':>11}"
        )
        for r in rows:
            print(f"{r['atoms']:>6} {r['edges']:>9} {r['neighbors_s']:>13.2f} {r['overlap_s']:>8.2f} "
                  f"{r['peak_MB']:>8.0f} {r['overlap_array_MB']:>11.0f}")  # fmt: skip
        if len(rows) > 1:
            x = np.log([r["atoms"] for r in rows])
            result["overlap_time_exponent"] = float(
                np.polyfit(x, np.log([r["overlap_s"] for r in rows]), 1)[0]
            )
            print(f"fitted exponent of S(R) time in N: {result['overlap_time_exponent']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
