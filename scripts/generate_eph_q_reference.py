"""DFT reference for electron–phonon couplings at q ≠ 0: PySCF finite differences in supercells.

Per case (a primitive cell and a diagonal supercell of it, `foundation.physics.supercells`):

* dH(R)/du_κα and dS(R)/du_κα of the supercell for the 3N Cartesian displacements of the
  *home-cell* atoms κ only (central differences at ±δ, `hamiltonian_derivatives`: 6N + 1
  SCF runs of the supercell). By lattice translation these give the derivative along any
  phonon pattern commensurate with the supercell (`foundation.physics.eph_q`), so one set
  serves every q of the supercell's grid and every mode;
* for cases with ``phonons``: phonopy force constants of the same supercell from PySCF
  analytic forces (`gamma_phonopy` with the supercell matrix), saved as phonopy_params YAML.

Cases: ideal Si diamond 2×2×2 (16 atoms; q on its grid: Γ, L, X), a perturbed Si cell the
e-ph fine-tune never saw (seed 11, 2×2×2), ideal Si 1×2×4 (16 atoms; q = (0, ½, ¼) is a
general point), ideal AlP 2×2×2 (polar). DFT settings of ``scripts/generate_eph_dataset.py``.

    OMP_NUM_THREADS=1 nice -n 10 python scripts/generate_eph_q_reference.py [--only KEY]
    python scripts/generate_eph_q_reference.py --pack-only

Raw results go to ``work_records/eph_q/<key>/`` (resumable); ``--pack`` writes the compact
reference (`foundation.physics.eph_q_validation.save_reference`: home-cell rows only,
float32 derivatives, npz + json) to ``data_shards/eph_mini/q_reference/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's own package first
from foundation.data.dft.phonons import gamma_phonopy, pyscf_forces  # noqa: E402
from foundation.data.dft.pyscf import hamiltonian_derivatives  # noqa: E402
from foundation.data.structures import perturbed_structures, prototype_cell  # noqa: E402
from foundation.physics.eph import cartesian_displacements  # noqa: E402
from foundation.physics.supercells import build_supercell  # noqa: E402

DFT_SETTINGS = {"cutoff_A": 9.0, "kspacing": 0.7, "alias_margin_A": 8.0, "conv_tol": 1e-10}
DELTA_A = 0.01
HELD_OUT_SEED = 11
"""Seed of the held-out perturbed Si cell (eph_mini's Si-diamond-00 was drawn with seed 2)."""


def primitive_cells() -> dict[str, Atoms]:
    held = perturbed_structures(
        [("Si", "diamond", 5.431, None, False, 1)], HELD_OUT_SEED, strain=0.02,
        rattle_A=(0.02, 0.04),
    )[0][1]  # fmt: skip
    return {
        "Si-diamond-ideal": prototype_cell("Si", "diamond", 5.431, None),
        "Si-diamond-heldout": held,
        "AlP-zincblende-ideal": prototype_cell("AlP", "zincblende", 5.463, None),
    }


CASES = [  # (key, primitive, supercell, phonons?, q of the reference, modes of)
    ("Si-ideal-222", "Si-diamond-ideal", (2, 2, 2), True, [[0, 0.5, 0.5], [0.5, 0, 0]], "Si-ideal-222"),
    ("Si-heldout-222", "Si-diamond-heldout", (2, 2, 2), False, [[0, 0.5, 0.5], [0.5, 0.5, 0.5]], "Si-ideal-222"),
    ("Si-ideal-124", "Si-diamond-ideal", (1, 2, 4), False, [[0, 0.5, 0.25], [0, 0, 0.25]], "Si-ideal-222"),
    ("AlP-ideal-222", "AlP-zincblende-ideal", (2, 2, 2), True, [[0, 0.5, 0.5], [0.5, 0, 0]], "AlP-ideal-222"),
]  # fmt: skip
"""q (fractional, primitive reciprocal basis): (0, ½, ½) is X and (½, 0, 0), (½, ½, ½) are L
points of the fcc zone (zone boundary); in the rattled held-out cell no symmetry is left;
(0, ½, ¼) of the 1×2×4 supercell is a general point. Modes: the phonons of the named case
(the held-out and 1×2×4 cells use the ideal Si force constants: patterns, the same on
both sides of the comparison)."""


def compute_case(key: str, primitive: Atoms, reps: tuple, phonons: bool, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    supercell = build_supercell(primitive, reps)
    seconds = {}
    if not (out / "structure.json").is_file():
        t0 = time.perf_counter()
        patterns = cartesian_displacements(len(supercell), range(len(primitive)))
        d = hamiltonian_derivatives(supercell, patterns, key=key, delta_A=DELTA_A, **DFT_SETTINGS)
        seconds["derivatives"] = time.perf_counter() - t0
        seconds["scf_runs"] = 1 + 2 * len(patterns)
        np.save(out / "dh_abs.npy", d.dh)
        np.save(out / "ds.npy", d.ds)
        d.reference.save(out)
    if phonons and not (out / "phonopy_params.yaml").is_file():
        from foundation.data.record import HamiltonianRecord

        kmesh = tuple(HamiltonianRecord.load(out).meta["kmesh"])
        t0 = time.perf_counter()
        scf = {"kmesh": kmesh, "conv_tol": DFT_SETTINGS["conv_tol"]}
        phonon = gamma_phonopy(
            primitive, lambda a: pyscf_forces(a, key=key, **scf)[0], delta_A=DELTA_A,
            supercell_matrix=np.diag(reps),
        )  # fmt: skip
        seconds["phonons"] = time.perf_counter() - t0
        seconds["phonon_runs"] = len(phonon.supercells_with_displacements)
        phonon.save(out / "phonopy_params.yaml", settings={"force_constants": True})
    info = out / "info.json"
    old = json.loads(info.read_text()) if info.is_file() else {}
    info.write_text(json.dumps(old | {
        "key": key, "reps": list(reps), "delta_A": DELTA_A, "settings": DFT_SETTINGS,
        "primitive": {"numbers": primitive.numbers.tolist(),
                      "positions": primitive.positions.tolist(),
                      "cell": np.asarray(primitive.cell).tolist()},
        "seconds": old.get("seconds", {}) | seconds,
    }, indent=1))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records-dir", type=Path, default=Path("work_records") / "eph_q")
    ap.add_argument("--out", type=Path, default=Path("data_shards") / "eph_mini" / "q_reference")
    ap.add_argument("--only", nargs="*", help="case keys to compute (default all)")
    ap.add_argument("--pack-only", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cells = primitive_cells()
    if not args.pack_only:
        for key, prim, reps, phonons, _, _ in CASES:
            if args.only and key not in args.only:
                continue
            t0 = time.perf_counter()
            compute_case(key, cells[prim], reps, phonons, args.records_dir / key)
            logging.info("%s: %.0f s", key, time.perf_counter() - t0)
    from foundation.physics.eph_q_validation import save_reference

    for key, prim, _, _, qpoints, modes in CASES:
        folder = args.records_dir / key
        if not (folder / "info.json").is_file():
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        if (folder / "phonopy_params.yaml").is_file():
            shutil.copyfile(folder / "phonopy_params.yaml", args.out / f"{key}.phonopy.yaml")
        meta = save_reference(
            folder, cells[prim], args.out / key, np.array(qpoints), f"{modes}.phonopy.yaml"
        )
        logging.info("%s: packed (∂S exact vs FD %.1e)", key, meta["ds_exact_vs_fd_relative"])


if __name__ == "__main__":
    main()
