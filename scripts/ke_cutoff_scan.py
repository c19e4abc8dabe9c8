"""Plane-wave (FFT grid) cutoff per element for gth-szv-molopt-sr / GTH-PBE, by band convergence.

Why: an element missing from `foundation.data.dft.pyscf.KE_CUTOFF_HA` falls back to PySCF's
precision-derived grid, which is often 10–50× larger than needed (DESIGN.md §3). For each
element: a one-atom fcc cell (nearest-neighbour distance 2 × covalent radius, at least 2 Å),
PBE with Fermi smearing 0.1 eV on a 2×2×2 mesh, at a reference cutoff and then at candidate
cutoffs (bisection); the chosen cutoff is the lowest candidate whose eigenvalues (every band
up to two above the highest (half-)filled one, at 2 off-mesh k-points, absolute) move by at
most ``tol_meV`` against the reference. The hardness of a GTH pseudopotential is a property
of the atom, so the one-atom cell is a fair (and cheap) probe.

    OMP_NUM_THREADS=1 python scripts/ke_cutoff_scan.py H Li O F Ti     # → bench_results/ke_cutoff.json
    python scripts/ke_cutoff_scan.py Na --rescan --candidates 120 160 200 --reference 260

Each element's result is merged into the JSON as soon as it is known (resumable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from foundation.data.dft.pyscf import atomic_guess, build_cell, hartree_ev  # noqa: E402

CANDIDATES_HA = (20, 30, 40, 50, 60, 80, 100, 120)
REFERENCE_HA = 160
BAND_KPTS = np.array([[0.13, 0.29, 0.41], [0.37, 0.11, -0.23]])


def bands_at(symbol: str, ke_Ha: float) -> tuple[np.ndarray, int, list[int], float]:
    """(eigenvalues eV at BAND_KPTS, valence electrons, FFT mesh, seconds)."""
    from ase.build import bulk
    from ase.data import atomic_numbers, covalent_radii
    from pyscf.pbc import dft

    t0 = time.perf_counter()
    d = max(2.0, 2 * covalent_radii[atomic_numbers[symbol]])
    atoms = bulk(symbol, "fcc", a=d * np.sqrt(2))
    cell = build_cell(atoms, ke_cutoff_Ha=ke_Ha)
    ha = hartree_ev()
    kpts = cell.make_kpts((2, 2, 2))
    mf = dft.KRKS(cell, kpts).smearing(sigma=0.1 / ha, method="fermi")
    mf.xc = "PBE"
    mf.conv_tol = 1e-9
    guess = atomic_guess(mf)
    mf.kernel(mf.get_init_guess(key="1e") if guess is None else guess)
    eigs, _ = mf.get_bands(cell.get_abs_kpts(BAND_KPTS))
    mesh = [int(m) for m in cell.mesh]
    return np.array(eigs) * ha, int(cell.nelectron), mesh, time.perf_counter() - t0


def scan(
    symbol: str,
    tol_meV: float,
    candidates: tuple[float, ...] = CANDIDATES_HA,
    reference: float = REFERENCE_HA,
) -> dict:
    """Reference run, then bisection over ``candidates`` for the lowest one within
    ``tol_meV`` (band change falls monotonically with the cutoff), ~3 runs instead of 8."""
    ref, n_electrons, ref_mesh, ref_s = bands_at(symbol, reference)
    n_bands = min(ref.shape[1], (n_electrons + 1) // 2 + 2)  # half-filled band + 2 above
    rows = []
    lo, hi = 0, len(candidates)  # answer index in [lo, hi]; hi = none passes
    while lo < hi:
        mid = (lo + hi) // 2
        ke = candidates[mid]
        eig, _, mesh, s = bands_at(symbol, ke)
        err = float(np.max(np.abs(eig[:, :n_bands] - ref[:, :n_bands]))) * 1000
        rows.append({"ke_Ha": ke, "max_band_change_meV": err, "fft_mesh": mesh, "seconds": s})
        print(f"{symbol:>2} {ke:>4} Ha  {err:9.2f} meV  mesh {mesh}  {s:6.1f} s", flush=True)
        if err <= tol_meV:
            hi = mid
        else:
            lo = mid + 1
    return {
        "chosen_ke_Ha": candidates[lo] if lo < len(candidates) else None,
        "reference_Ha": reference,
        "reference_mesh": ref_mesh,
        "reference_s": ref_s,
        "bands_compared": n_bands,
        "scan": sorted(rows, key=lambda r: r["ke_Ha"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("elements", nargs="+")
    ap.add_argument("--tol-meV", type=float, default=3.0)
    ap.add_argument("--candidates", type=float, nargs="+", default=list(CANDIDATES_HA),
                    help="cutoffs (Ha) to bisect, ascending")  # fmt: skip
    ap.add_argument("--reference", type=float, default=REFERENCE_HA, help="reference cutoff (Ha)")
    ap.add_argument("--rescan", action="store_true", help="scan elements already in the JSON")
    ap.add_argument("--json", type=Path, default=Path("bench_results/ke_cutoff.json"))
    args = ap.parse_args(argv)
    for symbol in args.elements:
        data = json.loads(args.json.read_text()) if args.json.is_file() else {}
        if symbol in data.get("elements", {}) and not args.rescan:
            continue
        result = scan(symbol, args.tol_meV, tuple(args.candidates), args.reference)
        data = json.loads(args.json.read_text()) if args.json.is_file() else {}
        data.setdefault("method", __doc__.split("\n\n")[1].replace("\n", " "))
        data["tol_meV"] = args.tol_meV
        data.setdefault("elements", {})[symbol] = result
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
