"""Build the shipped electron–phonon dataset ``eph_mini``: H, S, dH/du, dS/du and Γ phonons.

Structures (2-atom primitive cells, insulators in PBE): Si diamond and AlP zincblende at
their experimental lattice constants (no strain, no rattle: atoms at symmetric positions,
forces zero), and one perturbed variant of each (`foundation.data.structures`, seed 2,
strain ±2 %, rattle σ 0.02–0.04 Å: no symmetry left).

Per structure (PySCF, PBE, GTH-PBE, gth-szv-molopt-sr, SCF k-spacing 0.7 Å⁻¹, 9 Å edges,
alias margin 8 Å: the settings of pbe_mini):

* ``h``, ``s``: the reference record (`compute_record`).
* ``dh``, ``ds`` (3N, total): dH/du_κα and dS/du_κα for all 3N Cartesian displacements by
  central differences at ±δ (`hamiltonian_derivatives`: 6N + 1 SCF runs on the reference
  edges), δ = 0.01 Å by default. Why 0.01 Å: the truncation error of a central difference
  is ~δ²/6 of the third derivative (blocks vary on the ~1 Å scale of a bond: ~2e-5
  relative), while the noise is the SCF residual and the float32 rounding of the displaced
  blocks divided by 2δ (~1e-6 eV / 0.02 Å ≈ 5e-5 eV/Å at δ = 0.01 Å), and δ is of the order
  of the zero-point amplitudes the couplings are used at (0.01–0.03 Å). The SCF converges
  to 1e-10 Ha (pbe_mini: 1e-9) to keep that noise down. ``dh`` is the derivative of the
  stored target H − μS (`foundation.data.record.shifted_derivative`); dμ/du goes to
  ``meta["eph"]["dmu_du_eV_per_A"]`` so that the absolute dH = dh + μ ds + dμ S.
* Γ phonons: phonopy with the cell as its own supercell and the forces of PySCF's analytic
  gradient at phonopy's ±δ displacements (`foundation.data.dft.phonons`), force constants
  symmetrised (acoustic sum rule) and saved as ``phonons/<key>.yaml`` (phonopy_params
  format with force constants; text, no pickle). Γ only: the cells are primitive.
  AlP is polar: the LO–TO splitting (Born charges) is not included.

    OMP_NUM_THREADS=1 python scripts/generate_eph_dataset.py        # records, phonons, shards
    python scripts/generate_eph_dataset.py --list
    python scripts/generate_eph_dataset.py --pack-only

Records go to ``work_records/eph_mini/<key>/`` (gitignored, resumable), the dataset to
``data_shards/eph_mini/`` (all records in the train split: a fitting and demo set; the
configs use the train split for validation too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's own package first
from foundation import keys  # noqa: E402
from foundation.data.dft.phonons import gamma_phonopy, pyscf_forces  # noqa: E402
from foundation.data.dft.pyscf import (  # noqa: E402
    DEFAULT_BASIS,
    DEFAULT_PSEUDO,
    KE_CUTOFF_HA,
    hamiltonian_derivatives,
)
from foundation.data.record import HamiltonianRecord, shifted_derivative  # noqa: E402
from foundation.data.structures import perturbed_structures, prototype_cell  # noqa: E402
from foundation.physics.eph import cartesian_displacements  # noqa: E402
from foundation.physics.phonons import load_gamma_phonons  # noqa: E402

NAME = "eph_mini"
SEED = 2
CUTOFF_A = 9.0
KSPACING = 0.7
ALIAS_MARGIN_A = 8.0
DELTA_A = 0.01
CONV_TOL_HA = 1e-10
STRAIN = 0.02
RATTLE_A = (0.02, 0.04)
PROTOTYPES = [
    ("Si", "diamond", 5.431, None, False, 1),
    ("AlP", "zincblende", 5.463, None, False, 1),
]
PHONON_DIR = "phonons"


def build_structures(seed: int = SEED) -> list[tuple[str, Atoms]]:
    """Ideal cells (key ``<formula>-<kind>-ideal``) then the perturbed variants (``-00``)."""
    ideal = [
        (f"{formula}-{kind}-ideal", prototype_cell(formula, kind, a, c))
        for formula, kind, a, c, _, _ in PROTOTYPES
    ]
    return ideal + perturbed_structures(PROTOTYPES, seed, strain=STRAIN, rattle_A=RATTLE_A)


DFT_SETTINGS = {
    "cutoff_A": CUTOFF_A,
    "kspacing": KSPACING,
    "alias_margin_A": ALIAS_MARGIN_A,
    "conv_tol": CONV_TOL_HA,
}
"""`compute_record` keyword arguments of every run (reference and displaced)."""


def compute_one(key: str, atoms: Atoms, records_dir: Path, delta_A: float) -> HamiltonianRecord:
    """Record with ``dh``/``ds`` extras and its phonopy file, saved under ``records_dir/key``."""
    t0 = time.perf_counter()
    patterns = cartesian_displacements(len(atoms))
    d = hamiltonian_derivatives(atoms, patterns, key=key, delta_A=delta_A, **DFT_SETTINGS)
    record = d.reference
    dh, dmu = shifted_derivative(record.absolute_h(), record.s, d.dh, d.ds)
    record.extras[keys.DH] = dh.astype(np.float32)
    record.extras[keys.DS] = d.ds.astype(np.float32)
    t_blocks = time.perf_counter() - t0

    # Γ phonons of exactly the record's cell (run_scf wrapped the atoms into it).
    cell = Atoms(numbers=record.numbers, positions=record.positions, cell=record.cell, pbc=True)
    scf = {"kmesh": tuple(record.meta["kmesh"]), "conv_tol": CONV_TOL_HA}
    t1 = time.perf_counter()
    phonon = gamma_phonopy(cell, lambda a: pyscf_forces(a, key=key, **scf)[0], delta_A=delta_A)
    t_phonons = time.perf_counter() - t1
    out = records_dir / key
    tmp_yaml = records_dir / f"{key}.phonopy_params.yaml"
    phonon.save(tmp_yaml, settings={"force_constants": True})
    modes = load_gamma_phonons(tmp_yaml, structure=cell)
    record.meta["eph"] = {
        "delta_A": delta_A,
        "method": "central differences of PySCF records at ±delta_A along each Cartesian "
        "displacement, on the reference edges",
        "dmu_du_eV_per_A": dmu.tolist(),
        "max_abs_dh_eV_per_A": float(np.abs(dh).max()),
        "max_abs_ds_per_A": float(np.abs(d.ds).max()),
        "gamma_frequencies_THz": modes.frequencies_THz.tolist(),
        "phonon_displacements": len(phonon.supercells_with_displacements),
        "seconds": {"blocks": t_blocks, "phonons": t_phonons},
    }
    record.validate()
    record.save(out)
    shutil.move(tmp_yaml, out / "phonopy_params.yaml")
    return record


def sum_rule(record: HamiltonianRecord) -> dict[str, float]:
    """max_α |Σ_κ dX/du_κα| / max |dX/du| for X = h, s: moving every atom together changes
    no block, so this is ~0 up to the finite-difference noise (S: exact; H: the FFT grid
    breaks translation invariance slightly)."""
    out = {}
    for name in (keys.DH, keys.DS):
        rows = record.target_rows(name).astype(np.float64)
        total = rows.reshape(record.n_atoms, 3, -1).sum(axis=0)
        out[name] = float(np.abs(total).max() / np.abs(rows).max())
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pack(structures: list[tuple[str, Atoms]], records_dir: Path, out_dir: Path) -> dict:
    """Shards (every record in train) + ``phonons/<key>.yaml`` + manifest."""
    from foundation.data.shards import write_shards

    present = [k for k, _ in structures if (records_dir / k / "structure.json").is_file()]
    if len(present) < len(structures):
        missing = sorted({k for k, _ in structures} - set(present))
        logging.warning("%d structures have no record and are left out: %s", len(missing), missing)
    records = [HamiltonianRecord.load(records_dir / k) for k in present]
    for r in records:
        r.meta["eph"]["acoustic_sum_rule"] = sum_rule(r)
    (out_dir / PHONON_DIR).mkdir(parents=True, exist_ok=True)
    phonons = {}
    for k in present:
        target = out_dir / PHONON_DIR / f"{k}.yaml"
        shutil.copyfile(records_dir / k / "phonopy_params.yaml", target)
        phonons[k] = {"file": f"{PHONON_DIR}/{k}.yaml", "sha256": _sha256(target)}
    eph = {r.key: r.meta["eph"] for r in records}
    extra = {
        "generation": {
            "script": "scripts/generate_eph_dataset.py",
            "seed": SEED,
            "code": "pyscf (pbc KRKS) via foundation.data.dft.pyscf.hamiltonian_derivatives; "
            "phonopy (1x1x1 supercell) with PySCF analytic forces",
            "functional": "PBE",
            "basis": DEFAULT_BASIS,
            "pseudo": DEFAULT_PSEUDO,
            "kspacing_inv_A": KSPACING,
            "alias_margin_A": ALIAS_MARGIN_A,
            "conv_tol_Ha": CONV_TOL_HA,
            "ke_cutoff_Ha": {el: KE_CUTOFF_HA[el] for el in ("Al", "P", "Si")},
            "strain_max": STRAIN,
            "rattle_sigma_A": list(RATTLE_A),
            "prototypes": [list(p) for p in PROTOTYPES],
        },
        "eph": {
            "targets": {
                keys.DH: "d(H - mu S)/du_{kappa alpha}, eV/Angstrom",
                keys.DS: "dS/du_{kappa alpha}, 1/Angstrom",
            },
            "layout": "(3N, total) per record: row 3*kappa + alpha (atom-major, x y z) is a flat "
            "block array in the record's edge order; padded to (3N*E, n_uni, n_uni) in graphs "
            "(foundation.data.graph.record_to_graph)",
            "delta_A": sorted({v["delta_A"] for v in eph.values()}),
            "periodic_images": "moving atom kappa moves all its periodic images (lattice fixed)",
            "phonons": phonons,
            "phonon_note": "Gamma only (primitive cell as its own supercell), acoustic sum rule "
            "imposed by phonopy; no LO-TO (non-analytic) correction for polar AlP",
            "per_structure": eph,
        },
    }
    return write_shards(
        records, out_dir, name=NAME, samples_per_shard=8, seed=SEED, val_fraction=0.0,
        test_fraction=0.0, extra_manifest=extra,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delta", type=float, default=DELTA_A, help="displacement step δ, Å")
    ap.add_argument("--records-dir", type=Path, default=Path("work_records") / NAME)
    ap.add_argument("--out", type=Path, default=Path("data_shards") / NAME)
    ap.add_argument("--list", action="store_true", help="print the structures and exit")
    ap.add_argument("--pack-only", action="store_true", help="shard existing records only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    structures = build_structures()
    if args.list:
        for key, atoms in structures:
            print(key, atoms.get_chemical_formula(), np.round(atoms.positions, 4).tolist())
        return
    if not args.pack_only:
        args.records_dir.mkdir(parents=True, exist_ok=True)
        for key, atoms in structures:
            if (args.records_dir / key / "phonopy_params.yaml").is_file():
                logging.info("%s: done before, skipped", key)
                continue
            t0 = time.perf_counter()
            record = compute_one(key, atoms, args.records_dir, args.delta)
            e = record.meta["eph"]
            logging.info(
                "%s: %.0f s (blocks %.0f s, phonons %.0f s); max |dh| %.2f eV/Å, |ds| %.3f 1/Å; "
                "Γ frequencies %s THz",
                key, time.perf_counter() - t0, e["seconds"]["blocks"], e["seconds"]["phonons"],
                e["max_abs_dh_eV_per_A"], e["max_abs_ds_per_A"],
                np.round(e["gamma_frequencies_THz"], 2).tolist(),
            )  # fmt: skip
    manifest = pack(structures, args.records_dir, args.out)
    print(json.dumps({s: v["n_samples"] for s, v in manifest["splits"].items()}))


if __name__ == "__main__":
    main()
