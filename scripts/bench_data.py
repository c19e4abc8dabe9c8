"""Data benchmarks: shard reading throughput and PySCF generation cost.

Reader: samples/s and edges/s of the webdataset pipeline (`foundation.data.shards.
record_pipeline`: tar → samples → checksummed-free decode to `HamiltonianRecord`) driven
by a torch DataLoader with 1 and 2 workers, shards split across workers. Each setting is
run ``repeats`` times after one warm-up pass (page cache warm); the median is reported.
Wall time includes worker start-up, as a training epoch would.

    python scripts/bench_data.py reader data_shards/pbe_mini
    python scripts/bench_data.py reader --synthetic 400      # no dataset: synthetic shards

Generation: seconds per structure (SCF, then H(R)/S(R) extraction) and the band error of
the stored blocks against PySCF at off-mesh k-points, for the first variant of a few
representative prototypes of ``scripts/generate_dataset.py`` (its exact settings), run
fresh; or a summary of the timings stored in already generated records.

    OMP_NUM_THREADS=1 python scripts/bench_data.py generation
    python scripts/bench_data.py generation --records work_records/pbe_mini

``--preset main`` does the same for ``pbe_main`` (default keys: the cheapest structure of each
family) and the summary groups seconds and band error by family and by atom count;
``--set conv_tol=1e-8`` (repeatable) overrides a `compute_record` setting for an A/B run,
and then also reports max |ΔH| against the default run of the same structure.

    OMP_NUM_THREADS=1 python scripts/bench_data.py generation --preset main
    python scripts/bench_data.py generation --preset main --records data_shards/pbe_main_records

Workers: wall time of the same few cheap pbe_main structures generated with 1 worker × 1 or
2 OpenMP threads and with 2 workers × 1 thread (two workers on two cores must not be slower
than one); run it on an otherwise idle machine.

    python scripts/bench_data.py workers

Results are merged into ``bench_results/bench_data.json`` under the keys ``"reader"``,
``"generation"`` (fresh runs), ``"generation_records"`` and ``"generation_workers"`` (other
keys of that file are kept).
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


# ----------------------------------------------------------------------------- generation
REPRESENTATIVE = ["Si-diamond-00", "AlAs-zincblende-00", "PbTe-rocksalt-00", "Al-fcc2-00",
                  "AgBr-rocksalt-00", "InP-wurtzite-00"]  # fmt: skip


SIZE_BINS = ((1, 4), (5, 7), (8, 16), (17, 32))


def _family(key: str) -> str:
    """pbe_main family of a key (its first part), or ``pbe_mini`` for that set's keys."""
    from foundation.data.recipes import FAMILIES, family_of

    return family_of(key) if family_of(key) in FAMILIES else "pbe_mini"


def _generation_row(record) -> dict:
    from foundation.data.dft.pyscf import band_errors_meV

    m = record.meta
    err = band_errors_meV(record)
    return {
        "key": record.key,
        "family": _family(record.key),
        "smearing_eV": m.get("smearing_eV"),
        "atoms": record.n_atoms,
        "orbitals": int(record.n_orb_per_atom.sum()),
        "edges": record.n_edges,
        "kmesh": m["kmesh"],
        "dense_kmesh": m["dense_kmesh"],
        "fft_mesh": m["fft_mesh"],
        "scf_s": m["seconds"]["scf"],
        "hamiltonian_s": m["seconds"]["hamiltonian"],
        "total_s": m["seconds"]["scf"] + m["seconds"]["hamiltonian"],
        "cpu_s": sum(m["cpu_seconds"].values()) if "cpu_seconds" in m else None,
        "band_err_occ_meV": err["occupied"],
        "band_err_first_empty_meV": err["first_empty"],
        "s_alias_error": m["s_alias_error"],
    }


def _num(x: float | None) -> float:
    """NaN for a missing figure (printing only): a record without an empty band, no CPU time."""
    return float("nan") if x is None else x


def summarize_generation(rows: Sequence[dict]) -> dict:
    """Median/sum seconds and median/max band error (occupied, meV) by family and size bin."""

    def stats(sel: list[dict]) -> dict:
        t = [r["total_s"] for r in sel]
        cpu = [r["cpu_s"] for r in sel if r.get("cpu_s") is not None]
        e = [r["band_err_occ_meV"] for r in sel]
        f = [
            r["band_err_first_empty_meV"] for r in sel if r["band_err_first_empty_meV"] is not None
        ]
        return {
            "n": len(sel), "median_s": statistics.median(t), "sum_s": sum(t),
            "median_cpu_s": statistics.median(cpu) if cpu else None, "sum_cpu_s": sum(cpu),
            "median_band_err_occ_meV": statistics.median(e), "max_band_err_occ_meV": max(e),
            "median_band_err_first_empty_meV": statistics.median(f) if f else None,
            "max_band_err_first_empty_meV": max(f) if f else None,
        }  # fmt: skip

    by_family = {}
    for fam in dict.fromkeys(r["family"] for r in rows):
        by_family[fam] = stats([r for r in rows if r["family"] == fam])
    by_size = {}
    for lo, hi in SIZE_BINS:
        sel = [r for r in rows if lo <= r["atoms"] <= hi]
        if sel:
            by_size[f"{lo}-{hi}"] = stats(sel)
    return {"by_family": by_family, "by_atoms": by_size}


def _max_h_difference_meV(a, b) -> float | None:
    """max |H_a − H_b| (meV, absolute H) on the same edges, None if the edges differ."""
    import numpy as np

    if not np.array_equal(a.edges, b.edges):
        return None
    return float(np.abs(a.absolute_h() - b.absolute_h()).max() * 1000)


def _band_change_meV(a, b) -> float:
    """Max change of PySCF's own off-mesh bands (meta ``dft_bands``) between two runs of one
    structure, after removing their mean shift (an SCF setting may move the potential's
    average, which no property depends on)."""
    import numpy as np

    d = np.asarray(b.meta["dft_bands"]["eigenvalues_eV"]) - np.asarray(
        a.meta["dft_bands"]["eigenvalues_eV"]
    )
    return float(np.abs(d - d.mean()).max() * 1000)


def remaining_cost(rows: Sequence[dict], records_dir: Path) -> dict:
    """CPU-hours left for ``--preset main``: log CPU-s of the finished records fitted linearly
    in log `generate_dataset.main_cost` (k-points × FFT grid × orbitals), applied to every
    runnable structure without a record or a failure."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import generate_dataset as gd

    structures = dict(gd.main_structures(gd.SEED)[0])
    timed = [r for r in rows if r.get("cpu_s") and r["cpu_s"] > 5 and r["key"] in structures]
    x = np.log([gd.main_cost(structures[r["key"]]) for r in timed])
    y = np.log([r["cpu_s"] for r in timed])
    slope, icpt = np.polyfit(x, y, 1)
    failures = records_dir / "failures.json"
    failed = json.loads(failures.read_text()) if failures.is_file() else {}
    left = [k for k in structures if not (records_dir / k / "structure.json").is_file()
            and k not in failed]  # fmt: skip
    by_family: dict[str, float] = {}
    for k in left:
        cpu = float(np.exp(icpt + slope * np.log(gd.main_cost(structures[k]))))
        by_family[_family(k)] = by_family.get(_family(k), 0.0) + cpu / 3600
    return {"fit": {"exponent": float(slope), "n": len(timed),
                    "scatter_factor": float(np.exp(np.std(y - (icpt + slope * x))))},
            "structures_left": len(left), "cpu_hours_left": sum(by_family.values()),
            "cpu_hours_left_by_family": by_family}  # fmt: skip


def bench_generation(
    keys: Sequence[str] | None = None,
    records_dir: Path | None = None,
    preset: str = "mini",
    overrides: dict | None = None,
) -> dict:
    """Per-structure generation time and band error.

    Without ``records_dir``: compute the listed structures of `generate_dataset.py` afresh
    (its seed and settings for ``preset``; no files written); with ``overrides`` each is
    also run with those settings changed and max |ΔH| is reported. With ``records_dir``:
    summarise every record there from the timings stored in its meta (no PySCF run).
    """
    from foundation.data.record import HamiltonianRecord

    failed: dict[str, str] = {}
    estimate = None
    if records_dir is not None:
        rows = [
            _generation_row(HamiltonianRecord.load(d))
            for d in sorted(Path(records_dir).iterdir())
            if (d / "structure.json").is_file()
        ]
        source = f"timings stored in {records_dir}"
        if preset == "main":
            estimate = remaining_cost(rows, Path(records_dir))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import generate_dataset as gd

        from foundation.data.dft.pyscf import PER_STRUCTURE_KWARGS, compute_record
        from foundation.data.recipes import family_of

        if preset == "main":
            ordered, _ = gd.main_structures(gd.SEED)
            structures = dict(ordered)
            if keys is None:  # the cheapest structure of each family
                keys = list({family_of(k): k for k, _ in reversed(ordered)}.values())
        else:
            structures = dict(gd.build_structures(gd.SEED))
        rows = []
        for key in keys or REPRESENTATIVE:
            atoms = structures[key]
            kw = {
                "cutoff_A": gd.CUTOFF_A,
                "kspacing": gd.KSPACING,
                "alias_margin_A": gd.ALIAS_MARGIN_A,
            }
            if preset == "main":
                kw["conv_tol"] = gd.MAIN_CONV_TOL_HA
            kw |= atoms.info.get(PER_STRUCTURE_KWARGS, {})
            try:  # one structure whose SCF fails must not lose the others' timings
                record = compute_record(atoms, key=key, **kw)
                rows.append(_generation_row(record))
                if overrides:
                    other = compute_record(atoms, key=key, **(kw | overrides))
                    rows[-1]["override"] = _generation_row(other) | {
                        "settings": overrides,
                        "max_abs_dH_meV": _max_h_difference_meV(record, other),
                        "max_band_change_meV": _band_change_meV(record, other),
                    }
            except Exception as exc:  # PySCF raises several types; each is reported by key
                failed[key] = f"{type(exc).__name__}: {exc}"
                print(f"  {key}: FAILED {failed[key]}", flush=True)
                continue
            r = rows[-1]
            o = r.get("override", {})
            print(f"  {key}: {r['total_s']:.1f} s, cpu {r['cpu_s']:.1f} s"
                  + (f"; {o['settings']}: {o['total_s']:.1f} s, cpu {o['cpu_s']:.1f} s, "
                     f"max |ΔH| {o['max_abs_dH_meV']:.3f} meV, bands "
                     f"{o['max_band_change_meV']:.1f} meV" if o else ""), flush=True)  # fmt: skip
        source = f"fresh compute_record runs (scripts/generate_dataset.py --preset {preset})"
    totals = [r["total_s"] for r in rows]
    return {
        "source": source,
        "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "machine": f"{platform.node()} · {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
        "n": len(rows),
        "failed": failed,
        "median_total_s": statistics.median(totals) if totals else None,
        "sum_total_s": sum(totals),
        "summary": summarize_generation(rows) if rows else {},
        **({"remaining": estimate} if estimate else {}),
        "results": rows,
    }


def print_generation_table(result: dict) -> None:
    print(f"generation benchmark: {result['source']} (OMP_NUM_THREADS={result['omp_threads']})")
    print(
        f"  {'key':<22} {'at':>2} {'orb':>4} {'edges':>5} {'kmesh':>7} {'dense':>7} "
        f"{'scf s':>6} {'H s':>5} {'tot s':>6} {'occ meV':>8} {'empty meV':>9}"
    )
    for r in result["results"]:
        km = "x".join(map(str, r["kmesh"]))
        dm = "x".join(map(str, r["dense_kmesh"]))
        print(
            f"  {r['key']:<22} {r['atoms']:>2} {r['orbitals']:>4} {r['edges']:>5} {km:>7} {dm:>7} "
            f"{r['scf_s']:>6.1f} {r['hamiltonian_s']:>5.1f} {r['total_s']:>6.1f} "
            f"{r['band_err_occ_meV']:>8.2f} {_num(r['band_err_first_empty_meV']):>9.2f}"
        )
    if result["n"]:
        print(
            f"  median {result['median_total_s']:.1f} s/structure, total {result['sum_total_s'] / 60:.1f} min"
        )
    if "remaining" in result:
        r = result["remaining"]
        print(f"  left: {r['structures_left']} structures, ~{r['cpu_hours_left']:.1f} CPU-h "
              f"(CPU-s ∝ cost^{r['fit']['exponent']:.2f}, scatter ×{r['fit']['scatter_factor']:.1f})")  # fmt: skip
    for name, groups in result.get("summary", {}).items():
        print(
            f"  {name}: {'n':>4} {'median s':>9} {'cpu s':>7} {'sum h':>6} {'occ meV med/max':>16} {'empty meV med/max':>18}"
        )
        for g, v in groups.items():
            print(
                f"  {g:<14} {v['n']:>4} {v['median_s']:>9.1f} "
                f"{_num(v['median_cpu_s']):>7.1f} "
                f"{v['sum_s'] / 3600:>6.2f} "
                f"{v['median_band_err_occ_meV']:>7.2f}/{v['max_band_err_occ_meV']:<8.2f} "
                f"{_num(v['median_band_err_first_empty_meV']):>8.2f}/{_num(v['max_band_err_first_empty_meV']):<8.2f}"
            )
    for r in result["results"]:
        if "override" in r:
            o = r["override"]
            print(
                f"  {r['key']} with {o['settings']}: {o['total_s']:.1f} s (default {r['total_s']:.1f}), "
                f"max |ΔH| {o['max_abs_dH_meV']} meV, occ band err {o['band_err_occ_meV']:.2f} meV"
            )


WORKER_KEYS = (
    "bulk-AlP-zincblende-00", "bulk-AlAs-zincblende-00", "bulk-Sn-diamond-00",
    "bulk-PbTe-rocksalt-00", "bulk-GeTe-rocksalt-00", "bulk-AlSb-zincblende-00",
    "supercell-AlP-zincblende-rattle-00", "supercell-AlP-zincblende-alloy-00",
)  # fmt: skip
"""Cheap pbe_main structures (5-20 CPU-s each, 2-8 atoms) for `bench_workers`."""
WORKER_SETTINGS = ((1, 1), (1, 2), (2, 1))
"""(process-pool workers, OpenMP threads per worker) compared by `bench_workers`."""


def _generate_subset(keys: Sequence[str], out: str, workers: int) -> None:
    """Child process of `bench_workers`: `generate_dataset` on ``keys`` of ``--preset main``
    with the generator's own settings (its OpenMP threads come from the environment)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import generate_dataset as gd

    from foundation.data.dft.pyscf import generate_dataset

    structures = dict(gd.main_structures(gd.SEED)[0])
    generate_dataset(
        [(k, structures[k]) for k in keys], out, workers=workers, cutoff_A=gd.CUTOFF_A,
        kspacing=gd.KSPACING, alias_margin_A=gd.ALIAS_MARGIN_A, conv_tol=gd.MAIN_CONV_TOL_HA,
    )  # fmt: skip


def bench_workers(keys: Sequence[str]) -> dict:
    """Wall seconds to generate the same structures (fresh, into a temporary directory) with
    each (workers, OpenMP threads) of `WORKER_SETTINGS`, each in a fresh process so the thread
    count takes effect; structures per hour and CPU seconds of the children. Two workers on
    two cores should be at least as fast as one worker with two threads."""
    import resource
    import subprocess

    rows = []
    for workers, threads in WORKER_SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            env = os.environ | {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
                                "MKL_NUM_THREADS": str(threads)}  # fmt: skip
            code = ("import sys; sys.path.insert(0, 'scripts'); import bench_data; "
                    f"bench_data._generate_subset({list(keys)!r}, {tmp!r}, {workers})")  # fmt: skip
            cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, check=True,
                           cwd=Path(__file__).resolve().parents[1], capture_output=True)  # fmt: skip
            wall = time.perf_counter() - t0
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            done = sum((Path(tmp) / k / "structure.json").is_file() for k in keys)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        rows.append({"workers": workers, "omp_threads": threads, "structures": done,
                     "wall_s": wall, "cpu_s": cpu, "structures_per_hour": 3600 * done / wall})  # fmt: skip
        print(f"  workers {workers} threads {threads}: {wall:.1f} s wall, {cpu:.1f} s CPU, "
              f"{done}/{len(keys)} structures", flush=True)  # fmt: skip
    return {"keys": list(keys), "machine": f"{platform.node()} · {os.cpu_count()} CPUs",
            "load_average_after": os.getloadavg(), "results": rows}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reader", help="shard → record throughput with a torch DataLoader")
    p.add_argument("dataset", nargs="?", help="dataset directory (with manifest.json)")
    p.add_argument("--synthetic", type=int, help="benchmark N synthetic records instead")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    g = sub.add_parser("generation", help="PySCF seconds per structure and band error")
    g.add_argument("--keys", nargs="+", help="structures to compute (default: per preset)")
    g.add_argument("--preset", choices=("mini", "main"), default="mini")
    g.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="A/B: also run with this compute_record setting (float)")  # fmt: skip
    g.add_argument("--records", type=Path, help="summarise stored records instead of computing")
    g.add_argument("--json", type=Path, default=DEFAULT_JSON)
    w = sub.add_parser("workers", help="generation wall time: 1 vs 2 workers, 1 vs 2 threads")
    w.add_argument("--keys", nargs="+", default=list(WORKER_KEYS))
    w.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.command == "workers":
        merge_json(args.json, "generation_workers", bench_workers(args.keys))
        print(f"wrote {args.json}")
    if args.command == "generation":
        overrides = {k: float(v) for k, v in (item.split("=", 1) for item in args.set)}
        result = bench_generation(args.keys, args.records, args.preset, overrides)
        print_generation_table(result)
        name = "generation_records" if args.records else "generation"
        merge_json(args.json, name if args.preset == "mini" else f"{name}_main", result)
        print(f"wrote {args.json}")
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
