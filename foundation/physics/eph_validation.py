"""Model electron–phonon couplings against DFT finite differences on the shipped cases.

A *case* is one cell of an e-ph dataset (``data_shards/eph_mini``): its record (DFT ``h``,
``s`` and the finite-difference derivatives ``dh``, ``ds``), its Γ phonons (the phonopy file
the manifest names) and the electron k-points Γ plus the record's three generic band
k-points. For the optical Γ modes, g_mn(k, q = 0) from DFT (`eph.record_couplings`) is the
reference, and three model quantities are compared with it as the relative Frobenius error of
the gauge-invariant |g| (degenerate states averaged, `eph.Couplings.degenerate_abs`) over
all bands:

* **vertex** — DFT bands and exact ∂_ν S (the stored ``ds``) with the model's ∂_ν H
  (autograd of the H head on the record's edges): the quantity fine-tuning on ``dh`` trains;
* **model** — everything from the model (its H and S heads for the bands, ∂_ν H and ∂_ν S
  by autograd on its own edges): what ``foundation-predict --eph`` computes;
* **model_exact_s** — the model's H and ∂_ν H with the exact overlap S and ∂_ν S of the basis
  (two-center tables, `foundation.physics.overlap`): what ``foundation-predict --eph``
  computes by default (``--overlap exact``).

Measured on the shipped tiny models: the S head is the weak part (relative S error
~10 %, its position derivative ~50 %), and the generalized eigenproblem amplifies S errors
into band errors of ~1 eV, so **model** is far worse than **model_exact_s**; hence the
exact overlap is the default of ``foundation-predict``.

Used by ``tests/test_eph_shipped.py`` and ``scripts/bench_finetune.py``, so the test and the
benchmark report the same numbers. Units: Å, eV (g), THz (phonons).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from foundation import keys
from foundation.data.record import HamiltonianRecord
from foundation.physics.phonons import GammaPhonons


@dataclass
class EphCase:
    """One cell of an e-ph dataset: record, structure, Γ phonons and k-points (fractional)."""

    record: HamiltonianRecord
    atoms: Atoms
    phonons: GammaPhonons
    kpoints_frac: np.ndarray


def load_cases(root: str | Path, split: str = "train") -> list[EphCase]:
    """Every record of ``split`` of the e-ph dataset at ``root`` with the phonopy file that
    its manifest (``eph.phonons``) assigns to it."""
    from foundation.data.shards import load_records
    from foundation.physics.phonons import load_gamma_phonons

    root = Path(root)
    phonon_files = json.loads((root / "manifest.json").read_text())["eph"]["phonons"]
    cases = []
    for record in load_records(root, split):
        if record.key not in phonon_files:
            raise KeyError(
                f"{root}/manifest.json: no phonon file for structure {record.key!r} under "
                "eph.phonons; regenerate the dataset with scripts/generate_eph_dataset.py."
            )
        atoms = Atoms(
            numbers=record.numbers, positions=record.positions, cell=record.cell, pbc=True
        )
        phonons = load_gamma_phonons(root / phonon_files[record.key]["file"], atoms)
        kpoints = np.concatenate([np.zeros((1, 3)), record.meta["dft_bands"]["kpts_frac"]])
        cases.append(EphCase(record, atoms, phonons, kpoints))
    return cases


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def coupling_errors(model, case: EphCase, head: str = keys.H) -> dict[str, float]:
    """{"vertex": …, "model": …, "model_exact_s": …}: relative |g| errors of ``model`` (its ``head`` as H) on
    ``case`` against the DFT finite differences (module notes)."""
    from foundation.data.graph import record_to_graph
    from foundation.physics.eph import (
        directional_derivative,
        flat_blocks,
        mode_couplings,
        model_hamiltonian_derivative,
        record_couplings,
    )
    from foundation.physics.kspace import BlochHamiltonian
    from foundation.physics.predict import predict_eph, predict_record, table_overlap

    record = case.record
    u = case.phonons.zero_point_patterns()
    dft = record_couplings(record, u, case.kpoints_frac).degenerate_abs()
    graph = record_to_graph(record, model.universal, targets=())
    dh = model_hamiltonian_derivative(model, graph, u, heads=[head])[head]
    dh = flat_blocks(dh, record.numbers, record.edges, model.universal)
    ds = np.array([directional_derivative(record.target_rows(keys.DS), x) for x in u])
    bloch = BlochHamiltonian(record.numbers, record.basis, record.edges, record.h, record.s)
    vertex = mode_couplings(bloch, dh, ds, case.kpoints_frac).degenerate_abs()
    errors = {"vertex": _relative(vertex, dft)}
    predicted, _ = predict_record(
        model, case.atoms, key=record.key, target=head, overlap="model", progress=False
    )
    exact_s = table_overlap(model, case.atoms, predicted.edges)  # same H, exact S
    for name, overlap, rec in (
        ("model", "model", predicted),
        ("model_exact_s", "exact", dataclasses.replace(predicted, s=exact_s)),
    ):
        full, _ = predict_eph(
            model, rec, case.phonons, case.kpoints_frac, head=head, overlap=overlap
        )
        errors[name] = _relative(full.degenerate_abs(), dft)
    return errors


__all__ = ["EphCase", "coupling_errors", "load_cases"]
