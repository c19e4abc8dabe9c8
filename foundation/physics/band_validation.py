"""Bands of a model against DFT on stored records: what a foundation model is judged by.

For each record the model predicts H on the record's own edges; bands of the predicted H and
of the DFT H, both with the record's DFT overlap S (so only the Hamiltonian is judged), are
computed on the seekpath band path, each aligned to its own Fermi level from a Γ-centred mesh
(electron count of the record), and compared within ±``window_eV`` of the DFT Fermi level
(`bands.band_errors`). Gaps and the metal/insulator call come from the same mesh plus the
path. Shared by `scripts/bench_bands.py` and the fine-tuning benchmark.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from foundation import keys
from foundation.data.graph import collate_graphs, record_to_graph
from foundation.data.record import HamiltonianRecord
from foundation.physics.bands import band_errors, fermi_level, kmesh, kpath, mesh_kpoints
from foundation.physics.kspace import BlochHamiltonian
from foundation.physics.predict import padded_to_flat


def with_h(
    record: HamiltonianRecord, h: np.ndarray, s: np.ndarray | None = None
) -> HamiltonianRecord:
    """The record with predicted H blocks ``h`` (flat, eV, energy zero 0), no extras, and
    predicted S blocks ``s`` when given (else the record's DFT S)."""
    meta = record.meta | {keys.ENERGY_ZERO: 0.0}
    s = record.s if s is None else np.asarray(s, dtype=np.float64)
    return dataclasses.replace(record, h=np.asarray(h, dtype=np.float64), s=s, extras={}, meta=meta)


@torch.no_grad()
def model_blocks(model, record: HamiltonianRecord, head: str = keys.H) -> np.ndarray:
    """Flat blocks (eV) of ``head`` on the record's own edges."""
    batch = collate_graphs([record_to_graph(record, model.universal, targets=())])
    padded = model(batch)[head].double().numpy()
    return padded_to_flat(padded, record.numbers, record.edges, model.universal)


def _spectrum(ham: BlochHamiltonian, path: np.ndarray, mesh: Sequence[int]):
    on_path = ham.eigenvalues(path)
    fermi = fermi_level(
        ham.eigenvalues(mesh_kpoints(mesh)), ham.n_electrons, band_edges_from=[on_path]
    )
    return on_path, fermi


def record_band_errors(
    record: HamiltonianRecord,
    predicted_h: np.ndarray,
    *,
    window_eV: float = 3.0,
    mesh_spacing: float = 0.3,
    predicted_s: np.ndarray | None = None,
) -> dict:
    """Band errors (meV) within ±window_eV of E_F, gaps (eV) and metal flags of the predicted H
    (flat blocks on the record's edges, any energy zero) against the record's DFT H, both with
    the record's DFT S (exact), or the prediction with ``predicted_s`` (a learned S head)."""
    dft = BlochHamiltonian.from_record(record)
    path = kpath(dft.atoms).kpts
    mesh = kmesh(record.cell, record.pbc, mesh_spacing)
    ref, ref_fermi = _spectrum(dft, path, mesh)
    pred, pred_fermi = _spectrum(
        BlochHamiltonian.from_record(with_h(record, predicted_h, predicted_s)), path, mesh
    )
    errors = band_errors(pred, ref, pred_fermi.fermi_level_eV, ref_fermi.fermi_level_eV, window_eV)
    return errors | {
        "n_kpoints": len(path),
        "mesh": list(mesh),
        "gap_dft_eV": ref_fermi.gap_eV,
        "gap_pred_eV": pred_fermi.gap_eV,
        "metal_dft": ref_fermi.is_metal,
        "metal_pred": pred_fermi.is_metal,
    }


def summarize(rows: Sequence[dict], groups: Sequence[str]) -> dict:
    """Per group: mean window band MAE (meV), gap MAE (eV), and the metal/insulator confusion
    (``insulator_as_metal`` counts DFT insulators the model calls metallic)."""
    out = {}
    for group in groups:
        members = [r for r in rows if r["group"] == group]
        if not members:
            continue
        windowed = [r["window_mae_meV"] for r in members if "window_mae_meV" in r]
        out[group] = {
            "structures": len(members),
            "band_window_mae_meV": float(np.mean(windowed)) if windowed else None,
            "band_window_max_meV": float(np.max([r["window_max_meV"] for r in members])),
            "gap_mae_eV": float(
                np.mean([abs(r["gap_pred_eV"] - r["gap_dft_eV"]) for r in members])
            ),
            "insulators": sum(not r["metal_dft"] for r in members),
            "insulator_as_metal": sum((not r["metal_dft"]) and r["metal_pred"] for r in members),
            "metal_as_insulator": sum(r["metal_dft"] and not r["metal_pred"] for r in members),
        }
    return out


__all__ = ["model_blocks", "record_band_errors", "summarize", "with_h"]
