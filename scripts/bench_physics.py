"""Benchmark of the physics stack on large Si cells (2 CPU cores; --threads per process).

(a) Si supercells of ~500 … 10 000 atoms: time and peak memory of building H, S blocks,
    sparse assembly, and 20 eigenpairs near the gap by shift-invert with the sparse LU
    (nested-dissection order); fitted scaling exponents. Blocks: a real PySCF Si record
    (2-atom cell, gth-szv-molopt-sr, PBE) tiled onto the supercell
    (`BlochHamiltonian.supercell`); the supercell Γ spectrum is exactly the primitive
    spectrum folded, so σ = the primitive cell's midgap. Up to --compare-max-atoms the LU
    of H − σS is also timed with SuperLU's minimum-degree ordering (the previous solver),
    and one MINRES solve is timed at every size (the linear-memory alternative).
    Model inference: `predict_record` (graph, chunked forward of the tiny preset at the
    data's 9 Å cutoff with untrained weights, flat blocks) on the same supercell, in its own
    process, up to --model-max-atoms.
(b) Predict + diagonalize vs a PySCF SCF of the same 64-atom cell (Γ only); --no-speedup
    skips it.
(c) Dense vs sparse eigenvalues on the ~500-atom cell (max |Δε| in meV).

Each size and part runs in its own process so its peak RSS is its own. Prints a table and
writes JSON (default runs/bench_physics.json).

    python scripts/bench_physics.py [--quick] [--no-speedup] [--out runs/bench_physics.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
for var in THREAD_VARS:  # before numpy is imported; the driver sets them for its children
    os.environ.setdefault(var, "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    504: (6, 6, 7),
    1024: (8, 8, 8),
    2000: (10, 10, 10),
    5096: (13, 14, 14),
    9826: (17, 17, 17),
}
QUICK_SIZES = {128: (4, 4, 4), 250: (5, 5, 5), 504: (6, 6, 7)}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kB


def si_record(path: Path | None):
    """The Si record: --record dir, the pbe_mini shards, a cache under runs/, or PySCF now."""
    from foundation.data.record import HamiltonianRecord

    if path is not None:
        return HamiltonianRecord.load(path)
    shards = ROOT / "data_shards" / "pbe_mini"
    if (shards / "manifest.json").is_file():
        from foundation.data.shards import iter_records

        for rec in iter_records(shards):
            if rec.numbers.tolist() == [14, 14]:
                return rec
    cache = ROOT / "runs" / "bench_physics" / "si_record"
    if (cache / "structure.json").is_file():
        return HamiltonianRecord.load(cache)
    from ase.build import bulk

    from foundation.data.dft.pyscf import compute_record

    rec = compute_record(bulk("Si", "diamond", a=5.43), key="si2")
    rec.save(cache)
    return rec


def midgap(ham) -> float:
    from foundation.physics.bands import fermi_level, mesh_kpoints

    return fermi_level(ham.eigenvalues(mesh_kpoints((4, 4, 4))), ham.n_electrons).fermi_level_eV


def tiny_model(cutoff: float):
    import torch
    from omegaconf import OmegaConf

    from foundation.basis import BasisSet
    from foundation.model import build_model

    torch.manual_seed(0)
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")
    return build_model(cfg, basis=BasisSet.from_pyscf("gth-szv-molopt-sr", ["Si"]), cutoff_A=cutoff)


def model_inference(atoms, cutoff: float, edge_chunk: int, threads: int) -> dict:
    """`predict_record` of the tiny preset on ``atoms``: graph, chunked forward, flat blocks
    (seconds each), after an untimed warm-up on the 2-atom cell (einsum paths, allocator)."""
    import torch
    from ase.build import bulk

    from foundation.physics.predict import predict_record

    torch.set_num_threads(threads)
    model = tiny_model(cutoff).eval()
    predict_record(model, bulk("Si"), n_electrons=8, progress=False)
    rss_model = peak_rss_gb()
    record, timings = predict_record(
        model, atoms, n_electrons=4 * len(atoms), edge_chunk=edge_chunk, progress=False
    )
    return timings | {
        "n_edges": record.n_edges,
        "edge_chunk": edge_chunk,
        "rss_before_GB": rss_model,
    }


# --------------------------------------------------------------------------- (a) one size
def compare_orderings(a, layout) -> dict:
    """Factor time (s) and stored LU entries of A = H − σS: the solver's nested dissection
    (symmetric mode) vs SuperLU's minimum degree on Aᵀ+A, with partial pivoting (the previous
    solver) and in symmetric mode (ordering effect alone)."""
    import scipy.sparse.linalg as spla

    from foundation.physics.sparse import (
        PIVOT_THRESHOLD,
        Factorization,
        nested_dissection_order,
    )

    out = {}
    t0 = time.perf_counter()
    nd = Factorization(a, nested_dissection_order(layout))
    out["nested_dissection"] = {"factor_s": time.perf_counter() - t0, "lu_entries": nd.fill}
    del nd
    symmetric = {"diag_pivot_thresh": PIVOT_THRESHOLD, "options": {"SymmetricMode": True}}
    for name, kw in {"mmd_at_plus_a": {}, "mmd_at_plus_a_symmetric": symmetric}.items():
        t0 = time.perf_counter()
        lu = spla.splu(a.tocsc(), permc_spec="MMD_AT_PLUS_A", **kw)
        out[name] = {"factor_s": time.perf_counter() - t0, "lu_entries": int(lu.nnz)}
        del lu
    return out


def worker(n_atoms: int, reps, args) -> dict:
    import scipy.sparse.linalg as spla

    from foundation.physics.kspace import BlochHamiltonian
    from foundation.physics.sparse import assemble_hs, eigs_near

    prim = BlochHamiltonian.from_record(si_record(args.record))
    sigma = midgap(prim)
    out: dict = {"n_atoms": n_atoms, "reps": list(reps), "sigma_eV": sigma}
    base = peak_rss_gb()  # interpreter + libraries + the 2-atom record
    out["rss_baseline_GB"] = base
    t0 = time.perf_counter()
    sc = prim.supercell(reps)
    out["tile_s"] = time.perf_counter() - t0
    out["n_orbitals"] = sc.n_orb
    out["n_edges"] = len(sc.layout.edges)
    t0 = time.perf_counter()
    h, s = assemble_hs(sc)
    out["assemble_s"] = time.perf_counter() - t0
    out["nnz"] = int(h.nnz)
    out["rss_after_assembly_GB"] = peak_rss_gb()
    out["assembly_memory_GB"] = peak_rss_gb() - base  # blocks + layout + CSR H, S
    # one MINRES application of (H − σS)⁻¹ (the linear-memory path), to rtol 1e-9
    a = (h - sigma * s).tocsr()
    b = np.random.default_rng(0).normal(size=a.shape[0])
    it = [0]
    t0 = time.perf_counter()
    _, info = spla.minres(a, b, rtol=1e-9, callback=lambda _: it.__setitem__(0, it[0] + 1))
    out["minres_solve_s"] = time.perf_counter() - t0
    out["minres_iterations"] = it[0]
    del a
    t0 = time.perf_counter()
    pairs = eigs_near(sc, sigma, n=20, solver="direct", vectors=False, matrices=(h, s))
    out["eigs20_direct_s"] = time.perf_counter() - t0
    out["eigs20_residual_eV"] = pairs.residual
    out["eigs20_solves"] = pairs.n_solves
    out["eigs20_lu_entries"] = pairs.factor_entries
    out["eigs20_values_eV"] = pairs.values.tolist()
    out["rss_after_direct_GB"] = peak_rss_gb()
    if n_atoms <= args.compare_max_atoms:
        out["orderings"] = compare_orderings((h - sigma * s).tocsr(), sc.layout)
    if args.compare_dense and sc.n_orb <= 2500:  # (c)
        t0 = time.perf_counter()
        dense = np.sort(sc.eigh((0, 0, 0)))
        out["dense_eigh_s"] = time.perf_counter() - t0
        nearest = np.sort(dense[np.argsort(np.abs(dense - sigma))[:20]])
        out["dense_vs_sparse_max_meV"] = float(1e3 * np.abs(nearest - pairs.values).max())
    out["peak_rss_GB"] = peak_rss_gb()
    return out


def model_worker(n_atoms: int, reps, args) -> dict:
    """Model inference on the (reps) supercell of the Si record's cell, in its own process."""
    from foundation.physics.kspace import BlochHamiltonian

    atoms = BlochHamiltonian.from_record(si_record(args.record)).atoms.repeat(reps)
    base = peak_rss_gb()
    out = model_inference(atoms, prim_cutoff(args), args.edge_chunk, args.threads)
    return out | {"n_atoms": len(atoms), "rss_baseline_GB": base, "peak_rss_GB": peak_rss_gb()}


def prim_cutoff(args) -> float:
    return float(si_record(args.record).meta.get("edge_cutoff_A", 9.0))


# --------------------------------------------------------------------------- (b) SCF vs predict
def scf_worker(n_cell: int, args) -> dict:
    from ase.build import bulk

    from foundation.data.dft.pyscf import run_scf

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((n_cell,) * 3)
    t0 = time.perf_counter()
    run_scf(atoms, key=f"si{len(atoms)}", kmesh=(1, 1, 1))
    return {"n_atoms": len(atoms), "scf_s": time.perf_counter() - t0, "kmesh": [1, 1, 1]}


def predict_worker(n_cell: int, args) -> dict:
    from ase.build import bulk

    from foundation.physics.kspace import BlochHamiltonian

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((n_cell,) * 3)
    m = model_inference(atoms, prim_cutoff(args), args.edge_chunk, args.threads)
    # diagonalize at Γ a Hamiltonian of the model's block layout (tiled DFT blocks: the
    # untrained model's S is not positive definite; the cost is the same)
    prim = BlochHamiltonian.from_record(si_record(args.record))
    conv = _conventional(prim, n_cell)
    t0 = time.perf_counter()
    conv.eigh((0, 0, 0))
    return m | {"n_atoms": len(atoms), "diag_gamma_s": time.perf_counter() - t0}


def _conventional(prim, n_cell: int):
    """A cell with the orbital count of the cubic n_cell³ supercell (8·n_cell³ atoms): the
    primitive-cell supercell (2n, 2n, n) has the same atom count and H layout density."""
    return prim.supercell((2 * n_cell, 2 * n_cell, n_cell))


# --------------------------------------------------------------------------- driver
def run_child(kind: str, arg: str, args, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, arg, "--compare-max-atoms",
           str(args.compare_max_atoms), "--edge-chunk", str(args.edge_chunk),
           "--threads", str(args.threads)]  # fmt: skip
    if args.record:
        cmd += ["--record", str(args.record)]
    if args.compare_dense:
        cmd += ["--compare-dense"]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    out["loadavg_after"] = os.getloadavg()
    return out


def fit_exponent(n: list[float], y: list[float]) -> float | None:
    """Least-squares slope of log y against log n (y ∝ n^slope); None below two points."""
    pts = [(a, b) for a, b in zip(n, y, strict=True) if b is not None and b > 0]
    if len(pts) < 2:
        return None
    x, v = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, v, 1)[0])


def exponents(rows: list[dict], quantities: dict) -> dict:
    """Fitted exponents of each quantity (name → function of a row, None when absent) over
    all sizes and over the sizes ≥ 2000 atoms, where the fill of the LU is no longer
    nearly dense."""
    out = {}
    for name, get in quantities.items():
        pts = [(r["n_atoms"], get(r)) for r in rows if get(r) is not None]
        large = [p for p in pts if p[0] >= 2000]
        out[name] = {
            "all_sizes": fit_exponent([p[0] for p in pts], [p[1] for p in pts]),
            "n_atoms_ge_2000": fit_exponent([p[0] for p in large], [p[1] for p in large]),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_physics.json"))
    p.add_argument("--record", type=Path, default=None, help="saved Si record directory")
    p.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    p.add_argument("--compare-max-atoms", type=int, default=2100,
                   help="time minimum-degree LU orderings up to this size")  # fmt: skip
    p.add_argument("--model-max-atoms", type=int, default=10_000)
    p.add_argument("--edge-chunk", type=int, default=10_000, help="model inference chunk")
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch and BLAS threads per child (on a busy 2-core machine 1 avoids the "
        "oversubscription stalls of 2 threads; SuperLU itself runs on one core)",
    )
    p.add_argument("--no-speedup", action="store_true", help="skip (b), the SCF comparison")
    p.add_argument("--scf-cells", type=int, nargs="+", default=[2, 1],
                   help="cubic repeats for (b): tried in order until one finishes in --scf-timeout")  # fmt: skip
    p.add_argument("--scf-timeout", type=float, default=420)
    p.add_argument("--size-timeout", type=float, default=3600)
    p.add_argument("--compare-dense", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        kind, arg = args.worker
        all_sizes = {**SIZES, **QUICK_SIZES}
        if kind == "size":
            res = worker(int(arg), all_sizes[int(arg)], args)
        elif kind == "model":
            res = model_worker(int(arg), all_sizes[int(arg)], args)
        elif kind == "scf":
            res = scf_worker(int(arg), args)
        else:
            res = predict_worker(int(arg), args)
        print(json.dumps(res))
        return 0

    t_start = time.perf_counter()
    for var in THREAD_VARS:
        os.environ[var] = str(args.threads)
    rec = si_record(args.record)  # compute/cache once before the children
    args.record = args.record or _cached_record_path(rec)
    sizes = QUICK_SIZES if args.quick else SIZES
    report: dict = {
        "machine": {
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "note": "shared machine: other jobs may run (loadavg per child in loadavg_after)",
        },
        "blocks": "real PySCF Si record (2 atoms, gth-szv-molopt-sr, PBE, "
        f"{rec.meta.get('edge_cutoff_A')} Å edges, {rec.n_edges} edges) tiled onto each supercell",
        "solver": "eigs_near(solver='direct'): ARPACK shift-invert, SuperLU of H − σS in "
        "METIS nested-dissection order of the atom graph (symmetric mode)",
        "sizes": [],
        "model": [],
    }
    first = True
    for n in sizes:
        args.compare_dense = first
        r = run_child("size", str(n), args, args.size_timeout)
        first = False
        report["sizes"].append(r)
        print(
            f"size {n}: {json.dumps({k: v for k, v in r.items() if k != 'eigs20_values_eV'})}",
            flush=True,
        )
        if n <= args.model_max_atoms:
            m = run_child("model", str(n), args, args.size_timeout)
            report["model"].append(m)
            print(f"model {n}: {json.dumps(m)}", flush=True)
    ok = [r for r in report["sizes"] if "error" not in r]
    ok_model = [r for r in report["model"] if "error" not in r]
    report["exponents"] = exponents(
        ok,
        {
            "assemble_time": lambda r: r["assemble_s"],
            "assembly_memory": lambda r: r["assembly_memory_GB"],
            "minres_solve_time": lambda r: r["minres_solve_s"],
            "eigs20_direct_time": lambda r: r.get("eigs20_direct_s"),
            "eigs20_peak_memory": lambda r: r["rss_after_direct_GB"] - r["rss_baseline_GB"],
            "lu_entries": lambda r: r.get("eigs20_lu_entries"),
        },
    ) | exponents(
        ok_model,
        {
            "model_time": lambda r: r["model_s"],
            "model_peak_memory": lambda r: r["peak_rss_GB"] - r["rss_baseline_GB"],
        },
    )
    solves = [r["eigs20_solves"] for r in ok if "eigs20_solves" in r]
    n_solves = int(np.max(solves)) if solves else 180
    report["eigs20_iterative_estimate"] = (
        f"ARPACK needed up to {n_solves} applications of (H − σS)⁻¹ for 20 pairs at midgap "
        "(measured with the LU path); iterative estimate = that × one measured MINRES solve"
    )
    for r in ok:
        r["eigs20_iterative_estimate_s"] = n_solves * r["minres_solve_s"]
    if not args.no_speedup:  # (b)
        report["speedup"] = speedup(args)
    report["loadavg_end"] = os.getloadavg()
    report["total_wall_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"wrote {args.out}")
    return 0


def speedup(args) -> dict:
    """(b): the first cell of --scf-cells whose SCF finishes, vs predict + Γ diagonalization."""
    for n_cell in args.scf_cells:
        scf = run_child("scf", str(n_cell), args, args.scf_timeout)
        if "error" not in scf:
            pred = run_child("predict", str(n_cell), args, args.size_timeout)
            total = sum(pred.get(k, 0) for k in ("graph_s", "model_s", "blocks_s", "diag_gamma_s"))
            return scf | {"predict": pred, "predict_plus_diag_s": total,
                          "speedup": scf["scf_s"] / total if total else None}  # fmt: skip
        print(
            f"SCF of the {8 * n_cell**3}-atom cell: {scf['error']}; trying a smaller cell",
            flush=True,
        )
    return {"error": "no SCF finished in time", "tried": args.scf_cells}


def _cached_record_path(rec) -> Path:
    cache = ROOT / "runs" / "bench_physics" / "si_record"
    if not (cache / "structure.json").is_file():
        rec.save(cache)
    return cache


def print_table(rep: dict) -> None:
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    print(f"\nBlocks: {rep['blocks']}; {rep['machine']}")
    models = {m["n_atoms"]: m for m in rep["model"] if "error" not in m}
    print(f"{'atoms':>6} {'orbs':>6} {'nnz(H)':>10} {'asm s':>6} {'MINRES s':>8} "
          f"{'eig20 s':>8} {'eig GB':>6} {'LU entries':>11} {'residual':>8} "
          f"{'model s':>8} {'model GB':>8}")  # fmt: skip
    for r in rep["sizes"]:
        if "error" in r:
            print(f"  error: {r['error']}")
            continue
        m = models.get(r["n_atoms"], {})
        print(f"{r['n_atoms']:>6} {r['n_orbitals']:>6} {r['nnz']:>10} {f(r['assemble_s']):>6} "
              f"{f(r['minres_solve_s']):>8} {f(r['eigs20_direct_s'], 1):>8} "
              f"{f(r['rss_after_direct_GB']):>6} {r['eigs20_lu_entries']:>11} "
              f"{r['eigs20_residual_eV']:>8.1e} {f(m.get('model_s'), 1):>8} "
              f"{f(m.get('peak_rss_GB')):>8}")  # fmt: skip
        for name, o in r.get("orderings", {}).items():
            print(f"{'':>8}LU {name}: {o['factor_s']:.1f} s, {o['lu_entries']} entries")
    print("scaling exponents (time or memory ∝ N^x):")
    for k, v in rep["exponents"].items():
        print(f"  {k}: all sizes {f(v['all_sizes'])}, ≥ 2000 atoms {f(v['n_atoms_ge_2000'])}")
    first = rep["sizes"][0]
    if "dense_vs_sparse_max_meV" in first:
        print(f"(c) dense vs sparse, {first['n_atoms']} atoms, 20 eigenvalues near midgap: "
              f"max |Δε| = {first['dense_vs_sparse_max_meV']:.2e} meV "
              f"(dense eigh {first['dense_eigh_s']:.1f} s, sparse {first['eigs20_direct_s']:.1f} s)")  # fmt: skip
    s = rep.get("speedup")
    if s is None:
        print("(b) skipped (--no-speedup)")
    elif "error" in s:
        print(f"(b) {s['error']}")
    else:
        print(f"(b) {s['n_atoms']}-atom Si, PySCF SCF (Γ) {s['scf_s']:.1f} s vs predict+diagonalize "
              f"{s['predict_plus_diag_s']:.2f} s: speedup {s['speedup']:.0f}×")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
