"""Benchmark of the large-cell physics stack on Si (2 CPU cores; --threads per process).

(a) Si supercells of ~500 … 10⁴ (and, with --sizes, 10⁵) atoms: the large-cell path of
    foundation-predict (`foundation.physics.large_cell`): sparse assembly, DOS / integrated
    DOS / Fermi level / gap by the kernel polynomial method (stochastic, no factorization),
    and 20 eigenpairs near E_F with the default solver (`choose_eig_solver`: MKL PARDISO when
    installed); then the other interior solvers on the same matrices at the same energy
    (SuperLU up to --superlu-max-atoms, Chebyshev filtering and PRIMME up to
    --compare-max-atoms). Blocks: a real PySCF Si record (2-atom cell, gth-szv-molopt-sr,
    PBE, 9 Å edges) tiled onto the supercell (`BlochHamiltonian.supercell`), so the spectrum
    is known exactly (the primitive spectrum folded).
    Model inference: `predict_record` (graph, chunked forward at 9 Å with untrained weights,
    blocks, exact S from the overlap tables) of the tiny preset on the same supercell up to
    --model-max-atoms, and of the base preset at --base-atoms, each in its own process.
(b) Speedup over DFT: PySCF PBE SCF of 64- and 128-atom Si cells with the data generator's
    settings and k-mesh rule, against model inference + S + diagonalization on the same
    number of k-points (--no-speedup skips it).
(c) Errors against dense diagonalization on the first size: KPM E_F and DOS (L1 distance
    under the same kernel), eigenpairs.

The JSON starts with a "summary" block (n_atoms_largest, total_s_largest, time_exponent,
speedup_vs_pyscf_64, peak_GB_largest). Each size and part runs in its own process so its
peak RSS is its own. Prints a table and writes JSON (default runs/bench_physics.json).

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
    20328: (22, 22, 21),
}
QUICK_SIZES = {128: (4, 4, 4), 250: (5, 5, 5)}
HUGE_SIZES = {101306: (37, 37, 37)}  # only with --sizes 101306


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


def preset_model(preset: str, cutoff: float):
    import torch
    from omegaconf import OmegaConf

    from foundation.basis import BasisSet
    from foundation.model import build_model

    torch.manual_seed(0)
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{preset}.yaml")
    return build_model(cfg, basis=BasisSet.from_pyscf("gth-szv-molopt-sr", ["Si"]), cutoff_A=cutoff)


def model_inference(
    atoms, cutoff: float, edge_chunk: int, threads: int, preset: str = "tiny"
) -> dict:
    """`predict_record` of the tiny preset on ``atoms``: graph, chunked forward, flat blocks
    (seconds each), after an untimed warm-up on the 2-atom cell (einsum paths, allocator)."""
    import torch
    from ase.build import bulk

    from foundation.physics.predict import predict_record

    torch.set_num_threads(threads)
    model = preset_model(preset, cutoff).eval()
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
def worker(n_atoms: int, reps, args) -> dict:
    """Tile the Si record onto the supercell, then the large-cell path of foundation-predict
    (`large_cell_spectrum`: assembly, KPM DOS/E_F, 20 eigenpairs near E_F with the default
    solver), then the other interior solvers on the same matrices at the same energy, and
    (first size) dense diagonalization for the errors."""
    from foundation.physics import kpm
    from foundation.physics.kspace import BlochHamiltonian
    from foundation.physics.large_cell import large_cell_spectrum
    from foundation.physics.sparse import assemble_hs, choose_eig_solver, eigs_near

    prim = BlochHamiltonian.from_record(si_record(args.record))
    out: dict = {"n_atoms": n_atoms, "reps": list(reps), "midgap_primitive_eV": midgap(prim)}
    out["rss_baseline_GB"] = peak_rss_gb()
    t0 = time.perf_counter()
    sc = prim.supercell(reps)
    out["tile_s"] = time.perf_counter() - t0
    out["n_orbitals"] = sc.n_orb
    solver = choose_eig_solver(sc.n_orb)
    res, moments = large_cell_spectrum(
        sc, n_eigs=20, eig_solver=solver, kpm_resolution_eV=args.kpm_resolution,
        kpm_vectors=args.kpm_vectors,
    )  # fmt: skip
    out |= {"default_solver": solver, "large_cell": res}
    out["physics_s"] = sum(res["timings_s"].values())
    ef = res["fermi"].get("fermi_level_kpm_eV", res["fermi"]["fermi_level_eV"])
    ref_values = np.array(res["eigs"]["values_eV"])
    others = [x for x in ("superlu", "pardiso", "chebyshev", "primme") if x != solver]
    out["solvers"] = {}
    h, s = assemble_hs(sc)
    for name in others:
        limit = {"superlu": args.superlu_max_atoms, "pardiso": 10**9}.get(
            name, args.compare_max_atoms
        )
        if n_atoms > limit or (name in ("pardiso", "primme") and not _installed(name)):
            continue
        t0 = time.perf_counter()
        pairs = eigs_near(sc, ef, n=20, solver=name, vectors=False, matrices=(h, s))
        out["solvers"][name] = {
            "eigs20_s": time.perf_counter() - t0,
            "max_diff_vs_default_eV": float(np.abs(pairs.values - ref_values).max()),
            "residual_eV": pairs.residual,
            "factor_entries": pairs.factor_entries,
            "peak_rss_GB": peak_rss_gb(),
        }
    if args.compare_dense and sc.n_orb <= 5000:  # (c) errors against dense diagonalization
        t0 = time.perf_counter()
        dense = np.sort(sc.eigh((0, 0, 0)))
        out["dense_eigh_s"] = time.perf_counter() - t0
        n_occ = int(sc.n_electrons) // 2
        dense_ef = 0.5 * (dense[n_occ - 1] + dense[n_occ])
        nearest = np.sort(dense[np.argsort(np.abs(dense - ef))[:20]])
        ref = kpm.dense_moments(dense, moments.center_eV, moments.half_width_eV,
                                len(moments.moments))  # fmt: skip
        out["vs_dense"] = {
            "eigs20_max_meV": float(1e3 * np.abs(nearest - ref_values).max()),
            "kpm_fermi_error_meV": 1e3 * (ef - dense_ef),
            "refined_fermi_error_meV": 1e3 * (res["fermi"]["fermi_level_eV"] - dense_ef),
            "kpm_gap_eV": res["fermi"].get("gap_kpm_eV"),
            "dense_gap_eV": float(dense[n_occ] - dense[n_occ - 1]),
            "dos_l1": kpm.dos_l1_distance(moments, ref),
        }
    out["peak_rss_GB"] = peak_rss_gb()
    return out


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def model_worker(n_atoms: int, reps, args, preset: str = "tiny") -> dict:
    """Model inference (graph, forward, blocks, exact S) of ``preset`` on the (reps)
    supercell of the Si record's cell, in its own process."""
    from foundation.physics.kspace import BlochHamiltonian

    atoms = BlochHamiltonian.from_record(si_record(args.record)).atoms.repeat(reps)
    base = peak_rss_gb()
    out = model_inference(atoms, prim_cutoff(args), args.edge_chunk, args.threads, preset)
    out["inference_s"] = out["graph_s"] + out["model_s"] + out["blocks_s"]
    return out | {"n_atoms": len(atoms), "preset": preset, "rss_baseline_GB": base,
                  "peak_rss_GB": peak_rss_gb()}  # fmt: skip


def prim_cutoff(args) -> float:
    return float(si_record(args.record).meta.get("edge_cutoff_A", 9.0))


# --------------------------------------------------------------------------- (b) SCF vs predict
def scf_worker(n_atoms: int, args) -> dict:
    """PySCF PBE SCF of a Si supercell of the cubic 8-atom cell with the data generator's
    settings (basis, pseudopotential, cutoffs, k-mesh rule `scf_kmesh`), timed."""
    from foundation.data.dft.pyscf import run_scf, scf_kmesh

    atoms = si_cubic(n_atoms)
    kmesh = scf_kmesh(np.asarray(atoms.cell), pbc=atoms.pbc)
    t0, c0 = time.perf_counter(), cpu_seconds()
    run_scf(atoms, key=f"si{len(atoms)}")
    return {"n_atoms": len(atoms), "scf_s": time.perf_counter() - t0,
            "scf_cpu_s": cpu_seconds() - c0, "kmesh": list(kmesh)}  # fmt: skip


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads), s: on a shared machine the fair
    measure of work, where wall time also counts the waits for the other jobs."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def si_cubic(n_atoms: int):
    """Si supercell of the cubic 8-atom cell (a = 5.43 Å) with ``n_atoms`` = 8·a·b·c atoms."""
    from ase.build import bulk

    reps = {64: (2, 2, 2), 128: (2, 2, 4), 216: (3, 3, 3)}[n_atoms]
    return bulk("Si", "diamond", a=5.43, cubic=True).repeat(reps)


def predict_worker(n_atoms: int, args) -> dict:
    """What replaces the SCF: tiny-model inference + exact S on the same cell, then the
    generalized eigenproblem at as many k-points as the SCF's mesh. (The eigenproblem is
    solved for tiled DFT blocks with the same orbital count: the untrained model's H has
    no meaning, the cost is the same.)"""
    from foundation.data.dft.pyscf import scf_kmesh
    from foundation.physics.bands import mesh_kpoints
    from foundation.physics.kspace import BlochHamiltonian

    atoms = si_cubic(n_atoms)
    kmesh = scf_kmesh(np.asarray(atoms.cell), pbc=atoms.pbc)
    c0 = cpu_seconds()
    m = model_inference(atoms, prim_cutoff(args), args.edge_chunk, args.threads)
    prim = BlochHamiltonian.from_record(si_record(args.record))
    reps = {64: (4, 4, 2), 128: (4, 4, 4), 216: (6, 6, 3)}[n_atoms]
    cell = prim.supercell(reps)
    t0 = time.perf_counter()
    cell.eigenvalues(mesh_kpoints(kmesh))
    diag = time.perf_counter() - t0
    total = m["graph_s"] + m["model_s"] + m["blocks_s"] + diag
    return m | {"n_atoms": n_atoms, "kmesh": list(kmesh), "diag_s": diag, "total_s": total,
                "total_cpu_s": cpu_seconds() - c0}  # fmt: skip


# --------------------------------------------------------------------------- driver
def run_child(kind: str, arg: str, args, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, arg, "--compare-max-atoms",
           str(args.compare_max_atoms), "--superlu-max-atoms", str(args.superlu_max_atoms),
           "--edge-chunk", str(args.edge_chunk), "--threads", str(args.threads),
           "--kpm-resolution", str(args.kpm_resolution), "--kpm-vectors", str(args.kpm_vectors)]  # fmt: skip
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


def step_times(row: dict, models: dict) -> dict:
    """End-to-end seconds of one size by step: tiny inference + S (model worker), assembly,
    KPM DOS/E_F, 20 eigenpairs (default solver)."""
    t = row["large_cell"]["timings_s"]
    m = models.get(row["n_atoms"], {})
    return {"inference_and_S": m.get("inference_s"), "assemble": t.get("assemble"),
            "dos_fermi_kpm": t.get("dos_fermi_kpm"), "eigs20": t.get("eigs_near_fermi")}  # fmt: skip


def summarize(rep: dict) -> dict:
    """The headline figures (issue 17): largest size end to end, exponents, speedup."""
    ok = [r for r in rep["sizes"] if "error" not in r]
    models = {m["n_atoms"]: m for m in rep["model"] if "error" not in m}
    out: dict = {}
    full = [r for r in ok if r["n_atoms"] in models]
    if full:
        big = max(full, key=lambda r: r["n_atoms"])
        steps = step_times(big, models)
        out["n_atoms_largest"] = big["n_atoms"]
        out["total_s_largest"] = sum(v for v in steps.values() if v is not None)
        out["steps_s_largest"] = steps
        out["peak_GB_largest"] = max(big["peak_rss_GB"], models[big["n_atoms"]]["peak_rss_GB"])
        totals = [(r["n_atoms"], sum(v for v in step_times(r, models).values() if v)) for r in full]
        out["time_exponent"] = fit_exponent([a for a, _ in totals], [b for _, b in totals])
    linear = {
        name: fit_exponent([r["n_atoms"] for r in ok], [step_times(r, models)[name] for r in ok])
        for name in ("assemble", "dos_fermi_kpm", "eigs20")
    }
    linear["inference_and_S"] = fit_exponent(
        list(models), [m["inference_s"] for m in models.values()]
    )
    out["step_exponents"] = linear
    no_eigs = [(r["n_atoms"], sum(v for k, v in step_times(r, models).items() if v and k != "eigs20"))
               for r in full]  # fmt: skip
    out["time_exponent_without_eigs"] = fit_exponent(
        [a for a, _ in no_eigs], [b for _, b in no_eigs]
    )
    sp = {s["n_atoms"]: s for s in rep.get("speedup", []) if "speedup" in s}
    out["speedup_vs_pyscf_64"] = sp.get(64, {}).get("speedup")
    out["speedup_vs_pyscf_128"] = sp.get(128, {}).get("speedup")
    out["speedup_vs_pyscf_64_cpu_time"] = sp.get(64, {}).get("speedup_cpu")
    out["speedup_vs_pyscf_128_cpu_time"] = sp.get(128, {}).get("speedup_cpu")
    base = [m for m in rep.get("model_base", []) if "error" not in m]
    if base:
        out["base_inference_s"] = {m["n_atoms"]: m["inference_s"] for m in base}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_physics.json"))
    p.add_argument("--record", type=Path, default=None, help="saved Si record directory")
    p.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=None, help=f"atom counts from {sorted(SIZES)}"
    )
    p.add_argument("--compare-max-atoms", type=int, default=1100,
                   help="Chebyshev filtering and PRIMME up to this size")  # fmt: skip
    p.add_argument("--superlu-max-atoms", type=int, default=5100)
    p.add_argument("--model-max-atoms", type=int, default=10_000)
    p.add_argument(
        "--base-atoms", type=int, default=1024, help="size for the base preset's inference"
    )
    p.add_argument(
        "--kpm-resolution", type=float, default=0.1, help="eV (foundation-predict default)"
    )
    p.add_argument("--kpm-vectors", type=int, default=4)
    p.add_argument("--edge-chunk", type=int, default=10_000, help="model inference chunk")
    p.add_argument("--threads", type=int, default=2, help="torch and BLAS threads per child")
    p.add_argument("--no-speedup", action="store_true", help="skip (b), the SCF comparison")
    p.add_argument("--scf-atoms", type=int, nargs="+", default=[64, 128])
    p.add_argument("--scf-timeout", type=float, default=5400)
    p.add_argument("--size-timeout", type=float, default=3600)
    p.add_argument("--compare-dense", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        kind, arg = args.worker
        all_sizes = {**SIZES, **QUICK_SIZES, **HUGE_SIZES}
        if kind == "size":
            res = worker(int(arg), all_sizes[int(arg)], args)
        elif kind in ("model", "model_base"):
            preset = "tiny" if kind == "model" else "base"
            res = model_worker(int(arg), all_sizes[int(arg)], args, preset)
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
    every = {**SIZES, **QUICK_SIZES, **HUGE_SIZES}
    sizes = QUICK_SIZES if args.quick else {n: every[n] for n in (args.sizes or SIZES)}
    report: dict = {
        "summary": {},
        "machine": {
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "note": "shared machine: other jobs may run (loadavg per child in loadavg_after)",
        },
        "blocks": "real PySCF Si record (2 atoms, gth-szv-molopt-sr, PBE, "
        f"{rec.meta.get('edge_cutoff_A')} Å edges, {rec.n_edges} edges) tiled onto each supercell",
        "kpm": {"resolution_eV": args.kpm_resolution, "vectors": args.kpm_vectors},
        "sizes": [],
        "model": [],
        "model_base": [],
    }
    first = True
    for n in sizes:
        args.compare_dense = first
        r = run_child("size", str(n), args, args.size_timeout)
        first = False
        report["sizes"].append(r)
        print(f"size {n}: {json.dumps(r)}", flush=True)
        if n <= args.model_max_atoms:
            m = run_child("model", str(n), args, args.size_timeout)
            report["model"].append(m)
            print(f"model {n}: {json.dumps(m)}", flush=True)
    if args.base_atoms in {**SIZES, **QUICK_SIZES}:
        m = run_child("model_base", str(args.base_atoms), args, args.size_timeout)
        report["model_base"].append(m)
        print(f"model base {args.base_atoms}: {json.dumps(m)}", flush=True)
    if not args.no_speedup:  # (b)
        report["speedup"] = speedup(args)
    report["summary"] = summarize(report)
    report["loadavg_end"] = os.getloadavg()
    report["total_wall_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"wrote {args.out}")
    return 0


def speedup(args) -> list[dict]:
    """(b): PySCF SCF vs predict + diagonalization, for each of --scf-atoms. A finished SCF
    is kept in runs/bench_physics/scf<N>.json and reused by later runs."""
    rows = []
    for n in args.scf_atoms:
        saved = ROOT / "runs" / "bench_physics" / f"scf{n}.json"  # an SCF takes long: reuse
        if saved.is_file() and saved.read_text().strip():
            scf = json.loads(saved.read_text()) | {"reused": str(saved)}
        else:
            scf = run_child("scf", str(n), args, args.scf_timeout)
            if "error" not in scf:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(scf))
        if "error" in scf:
            rows.append({"n_atoms": n, "error": scf["error"]})
            print(f"SCF of {n} atoms: {scf['error']}", flush=True)
            continue
        pred = run_child("predict", str(n), args, args.size_timeout)
        total = pred.get("total_s")
        cpu = pred.get("total_cpu_s")
        rows.append(scf | {"predict": pred, "predict_total_s": total,
                           "speedup": scf["scf_s"] / total if total else None,
                           "speedup_cpu": scf["scf_cpu_s"] / cpu if cpu else None})  # fmt: skip
        print(f"speedup {n}: {json.dumps(rows[-1])}", flush=True)
    return rows


def _cached_record_path(rec) -> Path:
    cache = ROOT / "runs" / "bench_physics" / "si_record"
    if not (cache / "structure.json").is_file():
        rec.save(cache)
    return cache


def print_table(rep: dict) -> None:
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    print(f"\nBlocks: {rep['blocks']}; KPM {rep['kpm']}; {rep['machine']}")
    models = {m["n_atoms"]: m for m in rep["model"] if "error" not in m}
    print(f"{'atoms':>6} {'orbs':>6} {'infer+S s':>9} {'asm s':>6} {'KPM s':>7} {'eig20 s':>8} "
          f"{'solver':>8} {'peak GB':>7} {'E_F eV':>8} {'gap eV':>7}  other solvers (eig20 s)")  # fmt: skip
    for r in rep["sizes"]:
        if "error" in r:
            print(f"  error: {r['error']}")
            continue
        st = step_times(r, models)
        fermi = r["large_cell"]["fermi"]
        others = ", ".join(f"{k} {v['eigs20_s']:.1f}" for k, v in r["solvers"].items())
        print(f"{r['n_atoms']:>6} {r['n_orbitals']:>6} {f(st['inference_and_S']):>9} "
              f"{f(st['assemble']):>6} {f(st['dos_fermi_kpm']):>7} {f(st['eigs20']):>8} "
              f"{r['default_solver']:>8} {f(r['peak_rss_GB'], 2):>7} "
              f"{f(fermi['fermi_level_eV'], 3):>8} {f(fermi.get('gap_eV'), 3):>7}  {others}")  # fmt: skip
        if "vs_dense" in r:
            print(f"{'':>8}vs dense: {json.dumps(r['vs_dense'])}")
    for s in rep.get("speedup", []):
        if "error" in s:
            print(f"(b) {s['n_atoms']} atoms: {s['error']}")
        else:
            print(f"(b) {s['n_atoms']}-atom Si, PySCF SCF ({s['kmesh']}) {s['scf_s']:.0f} s "
                  f"({s['scf_cpu_s']:.0f} CPU s) vs predict {s['predict_total_s']:.1f} s "
                  f"({s['predict']['total_cpu_s']:.1f} CPU s): speedup {s['speedup']:.0f}× "
                  f"(CPU time {s['speedup_cpu']:.0f}×)")  # fmt: skip
    print("summary:", json.dumps(rep["summary"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
