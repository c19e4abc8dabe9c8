"""Training figures (matplotlib Agg): predicted vs DFT bands of one structure, H parity plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foundation import keys
from foundation.data.graph import blocks_from_padded
from foundation.data.record import HamiltonianRecord


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def predicted_record(record: HamiltonianRecord, pred: dict, universal) -> HamiltonianRecord:
    """``record`` with its H (and S, when predicted) replaced by the model's blocks."""

    def flat(name: str) -> np.ndarray:
        blocks = blocks_from_padded(pred[name], record.numbers, record.edges, universal)
        return np.concatenate([b.reshape(-1) for b in blocks]).astype(np.float32)

    return HamiltonianRecord(
        key=record.key,
        numbers=record.numbers,
        positions=record.positions,
        cell=record.cell,
        pbc=record.pbc,
        basis=record.basis,
        edges=record.edges,
        h=flat(keys.H),
        s=flat(keys.S) if keys.S in pred else record.s,
        meta=dict(record.meta),
    )


def band_figure(
    record: HamiltonianRecord, predicted: HamiltonianRecord, path: str | Path, title: str = ""
) -> Path:
    """Eigenvalues at the record's ``meta['dft_bands']`` k-points (or Γ and the zone corner):
    DFT eigenvalues (markers, when stored), bands of the target H (grey) and of the model
    (blue). Energies in eV relative to the DFT energy zero."""
    from foundation.physics.kspace import BlochHamiltonian

    plt = _pyplot()
    dft = record.meta.get("dft_bands") or {}
    kpts = np.asarray(
        dft.get("kpts_frac", [[0, 0, 0], [0.5, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0.5]]), float
    )
    from foundation.physics.kspace import OverlapError

    target = BlochHamiltonian.from_record(record).eigenvalues(kpts)
    note = ""
    try:
        model = BlochHamiltonian.from_record(predicted).eigenvalues(kpts)
    except OverlapError:  # predicted S not yet positive definite: bands of predicted H, DFT S
        predicted = HamiltonianRecord(**{**predicted.__dict__, "s": record.s})
        model = BlochHamiltonian.from_record(predicted).eigenvalues(kpts)
        note = " (model H with DFT S)"
    x = np.arange(len(kpts))
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(x, target, color="0.6", lw=1.0)
    ax.plot(x, model, color="C0", lw=1.0, ls="--")
    if "eigenvalues_eV" in dft:
        ev = np.asarray(dft["eigenvalues_eV"], float)
        ax.plot(np.repeat(x, ev.shape[1]), ev.reshape(-1), "k.", ms=3, label="DFT (PySCF)")
    ax.plot([], [], color="0.6", label="target H")
    ax.plot([], [], color="C0", ls="--", label="model")
    ax.set_xticks(x, [" ".join(f"{v:g}" for v in k) for k in kpts], rotation=45, fontsize=7)
    ax.set_ylabel("energy (eV)")
    err = 1e3 * float(np.mean(np.abs(model - target)))
    ax.set_title(f"{title or record.key}: band MAE {err:.1f} meV{note}", fontsize=9)
    ax.legend(fontsize=7)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def parity_figure(
    pred: np.ndarray, target: np.ndarray, path: str | Path, title: str = "", max_points: int = 20000
) -> Path:
    """Predicted vs target matrix entries (eV), subsampled to ``max_points``."""
    plt = _pyplot()
    pred, target = np.asarray(pred).reshape(-1), np.asarray(target).reshape(-1)
    if len(pred) > max_points:
        idx = np.random.default_rng(0).choice(len(pred), max_points, replace=False)
        pred, target = pred[idx], target[idx]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(target, pred, ".", ms=1.5, alpha=0.5)
    lo, hi = float(min(target.min(), pred.min())), float(max(target.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.6)
    ax.set_xlabel("DFT H entry (eV)")
    ax.set_ylabel("model H entry (eV)")
    mae = 1e3 * float(np.mean(np.abs(pred - target))) if len(pred) else float("nan")
    ax.set_title(f"{title} MAE {mae:.1f} meV".strip(), fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
