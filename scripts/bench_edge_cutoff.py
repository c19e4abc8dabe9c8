"""Band reconstruction error of the stored blocks against the edge cutoff, one SCF per structure.

Why: the stored H(R), S(R) keep only atom pairs closer than the edge cutoff (9 Å in pbe_mini
and pbe_main). Whether that is enough depends on how far the basis functions reach: for the
s-block elements of gth-szv-molopt-sr it is not (README "Known limit of the 9 Å cutoff").
For each ``--preset main`` structure named, this runs its SCF once with the generator's
settings and extracts records at several edge cutoffs from that same density, reporting per
cutoff the max band error (occupied, first empty; meV, at PySCF's off-mesh k-points), the
edge count (the model's cost grows with it) and the smallest eigenvalue of the truncated S
(a negative one makes the record invalid).

    OMP_NUM_THREADS=1 python scripts/bench_edge_cutoff.py bulk-LiF-rocksalt-00 --cutoffs 9 12 15

Results are merged per structure into ``bench_results/edge_cutoff.json`` (resumable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from foundation.data.dft.pyscf import (  # noqa: E402
    PER_STRUCTURE_KWARGS,
    OverlapNotPositiveDefinite,
    record_from_scf,
    run_scf,
)

DEFAULT_JSON = ROOT / "bench_results/edge_cutoff.json"


def scan_structure(key: str, cutoffs: list[float]) -> dict:
    """One SCF of ``key`` (generator settings), then a record per edge cutoff."""
    import generate_dataset as gd

    atoms = dict(gd.main_structures(gd.SEED)[0])[key]
    kw = dict(atoms.info.get(PER_STRUCTURE_KWARGS, {}))
    t0 = time.process_time()
    scf = run_scf(atoms, key=key, kspacing=gd.KSPACING, conv_tol=gd.MAIN_CONV_TOL_HA, **kw)
    rows = []
    for cutoff in cutoffs:
        c0 = time.process_time()
        try:
            rec = record_from_scf(scf, cutoff_A=cutoff, alias_margin_A=gd.ALIAS_MARGIN_A)
            row = {"band_error_meV": rec.meta["band_error_meV"], "edges": rec.n_edges,
                   "s_min_eig": rec.meta["s_min_eig"]}  # fmt: skip
        except OverlapNotPositiveDefinite as exc:
            row = {"error": str(exc)}
        rows.append({"cutoff_A": cutoff, "cpu_s": time.process_time() - c0, **row})
        print(f"{key} {cutoff:5.1f} Å  {row}", flush=True)
    return {"scf_cpu_s": scf.cpu_seconds, "total_cpu_s": time.process_time() - t0,
            "kmesh": list(scf.kmesh), "cutoffs": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("keys", nargs="+", help="pbe_main structure keys")
    ap.add_argument("--cutoffs", type=float, nargs="+", default=[9.0, 12.0, 15.0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    for key in args.keys:
        result = scan_structure(key, args.cutoffs)
        data = json.loads(args.json.read_text()) if args.json.is_file() else {}
        data[key] = result
        tmp = args.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(args.json)  # atomic, merged after each structure
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
