"""Band paths, band structures, DOS, Fermi level and gap, and their plots.

Conventions:

* **k-paths** come from seekpath's explicit path (HPKOT recipe). seekpath defines the
  path for its *standardised primitive* cell, which may be rotated and a different cell
  than the one given. We take its Cartesian k-points, rotate them back into the input
  frame (seekpath's ``rotation_matrix`` R: r_std = R r_input, so k_input = Rᵀ k_std) and
  express them in the **input cell's** reciprocal basis, k_frac = k_cart · Aᵀ / 2π. The
  Hamiltonian is never re-expressed in seekpath's cell. For a non-primitive input cell
  (conventional cell, supercell) the path is the primitive Brillouin zone's and the bands
  come out folded.
* **Occupations** are spin-degenerate: 2 electrons per band, ``n_electrons`` valence
  electrons (``meta["n_electrons"]``).
* **Insulators** (even electron count and CBM > VBM on the sampled k-points):
  Fermi level = **midgap**, (VBM + CBM) / 2; gap = CBM − VBM (indirect if the band
  edges sit at different k). **Metals** (odd count, or bands overlapping): Fermi level from
  bisection of Σ_k w_k Σ_n 2·½erfc((ε_nk − μ)/σ) = n_electrons (Gaussian smearing σ, eV);
  gap = 0.
* **DOS**: Gaussian smearing (eV), states / eV / cell including the spin factor 2.
* Energies in eV; plots show ε − E_F.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import erfc

from foundation.physics.kspace import BlochHamiltonian

SPIN_DEGENERACY = 2.0
INSULATOR_MIN_GAP_EV = 1e-3
"""Band-edge separation (eV) below which an even-electron system counts as a metal."""


# --------------------------------------------------------------------------- k-points
@dataclass
class KPath:
    """A band path: fractional k in the input cell's reciprocal basis, plot coordinate x
    (Cartesian path length, 1/Å with the 2π), labelled ticks and break indices (a break at
    n means points n−1 and n are not joined)."""

    kpts: np.ndarray
    x: np.ndarray
    ticks: list[tuple[float, str]]
    breaks: list[int] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "kpts_frac": self.kpts.tolist(),
            "x": self.x.tolist(),
            "ticks": [[float(x), s] for x, s in self.ticks],
            "breaks": self.breaks,
            "note": self.note,
        }


def _pretty(label: str) -> str:
    return {"GAMMA": "Γ", "G": "Γ"}.get(label, label.replace("_", ""))


def reciprocal(cell: np.ndarray) -> np.ndarray:
    """Reciprocal vectors as rows, with the 2π (1/Å)."""
    return 2.0 * np.pi * np.linalg.inv(np.asarray(cell, float)).T


def kpath(
    atoms,
    reference_distance: float = 0.025,
    symprec: float = 1e-3,
) -> KPath:
    """High-symmetry band path for any cell (`ase.Atoms`), in the input cell's fractional k.

    3-D periodic: seekpath (HPKOT) path, rotated back from seekpath's standardised cell
    into the input frame (module docstring). 1-D/2-D periodic: Γ–X(–M–Γ) along the periodic
    axes. 0-D: Γ only. ``reference_distance`` is the k spacing in 1/Å (2π included).
    """
    cell = np.asarray(atoms.cell.array, float)
    pbc = np.asarray(atoms.pbc, bool)
    if pbc.all():
        import seekpath

        res = seekpath.get_explicit_k_path(
            (cell, atoms.get_scaled_positions(wrap=True), atoms.numbers),
            reference_distance=reference_distance,
            symprec=symprec,
        )
        rot = np.asarray(res["rotation_matrix"], float)
        kcart = np.asarray(res["explicit_kpoints_abs"], float) @ rot  # k_input = Rᵀ k_std
        labels = list(res["explicit_kpoints_labels"])
        # seekpath: segment i ending (exclusive) where segment i+1 starts is a jump.
        segs = res["explicit_segments"]
        breaks = [b for (_, e), (b, _) in zip(segs[:-1], segs[1:], strict=True) if b == e]
        steps = np.linalg.norm(np.diff(kcart, axis=0), axis=1)
        steps[[b - 1 for b in breaks]] = 0.0
        x = np.concatenate([[0.0], np.cumsum(steps)])
        folded = abs(abs(res["volume_original_wrt_prim"]) - 1.0) > 1e-6
        return KPath(
            kpts=kcart @ cell.T / (2.0 * np.pi),
            x=x,
            ticks=_ticks(x, labels),
            breaks=breaks,
            note=(
                f"seekpath HPKOT path of the {res['bravais_lattice_extended']} primitive cell "
                f"(space group {res['spacegroup_international']}), rotated into the input frame "
                "and expressed in the input cell's reciprocal basis"
                + ("; the input cell is not primitive, so bands are folded" if folded else "")
            ),
        )
    if not pbc.any():
        return KPath(kpts=np.zeros((1, 3)), x=np.zeros(1), ticks=[(0.0, "Γ")], note="0-D: Γ only")
    axes = np.flatnonzero(pbc)
    corners = [np.zeros(3)]
    names = ["Γ"]
    for n, ax in enumerate(axes[:2]):
        corner = corners[-1].copy() if n else np.zeros(3)
        corner[ax] = 0.5
        corners.append(corner)
        names.append("XM"[n])
    if len(axes) >= 2:
        corners.append(np.zeros(3))
        names.append("Γ")
    b = reciprocal(cell)
    kpts, labels = [], []
    for c in range(len(corners) - 1):
        k0, k1 = corners[c], corners[c + 1]
        n = max(2, int(np.ceil(np.linalg.norm((k1 - k0) @ b) / reference_distance)))
        for t in range(n):
            kpts.append(k0 + (k1 - k0) * t / n)
            labels.append(names[c] if t == 0 else "")
    kpts.append(corners[-1])
    labels.append(names[-1])
    kpts = np.asarray(kpts)
    kcart = kpts @ b
    x = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(kcart, axis=0), axis=1))])
    return KPath(
        kpts=kpts,
        x=x,
        ticks=_ticks(x, labels),
        note=f"{len(axes)}-D periodic: straight path along the periodic axes",
    )


def _ticks(x: np.ndarray, labels: Sequence[str]) -> list[tuple[float, str]]:
    ticks: list[tuple[float, str]] = []
    for n, lab in enumerate(labels):
        if not lab:
            continue
        lab = _pretty(lab)
        if ticks and abs(ticks[-1][0] - x[n]) < 1e-9:
            if ticks[-1][1] != lab:
                ticks[-1] = (ticks[-1][0], f"{ticks[-1][1]}|{lab}")
        else:
            ticks.append((float(x[n]), lab))
    return ticks


def kmesh(cell: np.ndarray, pbc: Sequence[bool], spacing: float = 0.2) -> tuple[int, int, int]:
    """Mesh size with at most ``spacing`` (1/Å, 2π included) between k-points; 1 along
    non-periodic axes."""
    b = np.linalg.norm(reciprocal(cell), axis=1)
    return tuple(
        int(max(1, np.ceil(bi / spacing))) if p else 1 for bi, p in zip(b, pbc, strict=True)
    )


def mesh_kpoints(size: Sequence[int]) -> np.ndarray:
    """Γ-centred uniform mesh, fractional (nk, 3), equal weights."""
    grids = [np.arange(n) / n for n in size]
    return np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, 3)


# --------------------------------------------------------------------------- occupations
@dataclass
class FermiLevel:
    """Fermi level and gap (eV). ``convention`` says how E_F was placed."""

    fermi_level_eV: float
    gap_eV: float
    is_metal: bool
    n_electrons: float
    vbm_eV: float | None = None
    cbm_eV: float | None = None
    direct_gap_eV: float | None = None
    convention: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _weights(nk: int, weights: np.ndarray | None) -> np.ndarray:
    w = np.full(nk, 1.0 / nk) if weights is None else np.asarray(weights, float)
    return w / w.sum()


def electron_count(
    eigs: np.ndarray, mu: float, weights: np.ndarray | None = None, smearing_eV: float = 0.1
) -> float:
    """Σ_k w_k Σ_n 2 · ½ erfc((ε_nk − μ)/σ): electrons per cell at chemical potential μ."""
    w = _weights(len(eigs), weights)
    return float(SPIN_DEGENERACY * np.sum(w[:, None] * 0.5 * erfc((eigs - mu) / smearing_eV)))


def fermi_level(
    eigs: np.ndarray,
    n_electrons: float,
    weights: np.ndarray | None = None,
    smearing_eV: float = 0.1,
    band_edges_from: Sequence[np.ndarray] = (),
) -> FermiLevel:
    """Fermi level and gap from eigenvalues (nk, nb) on a k-mesh with ``weights``.

    ``band_edges_from``: more eigenvalue sets (e.g. a band path) whose extrema refine the
    VBM/CBM of an insulator; they do not enter the metal's electron count.
    """
    eigs = np.atleast_2d(np.asarray(eigs, float))
    nb = eigs.shape[1]
    if n_electrons > SPIN_DEGENERACY * nb:
        raise ValueError(
            f"{n_electrons:g} electrons need {int(np.ceil(n_electrons / 2))} bands but the "
            f"basis gives only {nb}; wrong n_electrons (valence count of the pseudopotential?)."
        )
    n_occ = n_electrons / SPIN_DEGENERACY
    sets = [eigs, *[np.atleast_2d(np.asarray(e, float)) for e in band_edges_from]]
    if float(n_occ).is_integer() and 0 < n_occ < nb:
        n = int(n_occ)
        vbm = max(float(e[:, n - 1].max()) for e in sets)
        cbm = min(float(e[:, n].min()) for e in sets)
        if cbm - vbm > INSULATOR_MIN_GAP_EV:
            direct = min(float(np.min(e[:, n] - e[:, n - 1])) for e in sets)
            return FermiLevel(
                fermi_level_eV=0.5 * (vbm + cbm),
                gap_eV=cbm - vbm,
                is_metal=False,
                n_electrons=n_electrons,
                vbm_eV=vbm,
                cbm_eV=cbm,
                direct_gap_eV=direct,
                convention="insulator: E_F = midgap (VBM + CBM)/2",
            )
    if n_occ == nb:  # every band filled: the top of the spectrum
        top = max(float(e.max()) for e in sets)
        return FermiLevel(top, 0.0, False, n_electrons, top, None, None, "all bands filled")
    lo, hi = float(eigs.min()) - 10 * smearing_eV, float(eigs.max()) + 10 * smearing_eV
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if electron_count(eigs, mid, weights, smearing_eV) < n_electrons:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9:
            break
    return FermiLevel(
        fermi_level_eV=0.5 * (lo + hi),
        gap_eV=0.0,
        is_metal=True,
        n_electrons=n_electrons,
        convention=f"metal: bisection of Gaussian-smeared occupations, σ = {smearing_eV:g} eV",
    )


def dos(
    eigs: np.ndarray,
    energies: np.ndarray,
    weights: np.ndarray | None = None,
    smearing_eV: float = 0.1,
) -> np.ndarray:
    """Gaussian-smeared DOS (states / eV / cell, spin factor 2 included) on ``energies``."""
    eigs = np.atleast_2d(np.asarray(eigs, float))
    w = _weights(len(eigs), weights)
    e_flat = eigs.reshape(-1)
    w_flat = np.repeat(w, eigs.shape[1])
    energies = np.asarray(energies, float)
    out = np.zeros_like(energies)
    norm = SPIN_DEGENERACY / (smearing_eV * np.sqrt(2.0 * np.pi))
    chunk = max(1, 2_000_000 // max(1, len(energies)))
    for s in range(0, len(e_flat), chunk):
        x = (energies[None, :] - e_flat[s : s + chunk, None]) / smearing_eV
        out += norm * (w_flat[s : s + chunk, None] * np.exp(-0.5 * x * x)).sum(0)
    return out


# --------------------------------------------------------------------------- workflows
@dataclass
class ElectronicStructure:
    """Bands along a path, DOS on a mesh, Fermi level/gap; JSON- and plot-ready (eV)."""

    path: KPath
    bands: np.ndarray
    mesh: tuple[int, int, int]
    dos_energies: np.ndarray
    dos: np.ndarray
    fermi: FermiLevel
    smearing_eV: float
    key: str = ""

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "units": {"energy": "eV", "k": "fractional (input cell reciprocal basis)"},
            "path": self.path.to_dict(),
            "bands_eV": self.bands.tolist(),
            "kmesh": list(self.mesh),
            "dos": {
                "energies_eV": self.dos_energies.tolist(),
                "states_per_eV_per_cell": self.dos.tolist(),
                "smearing_eV": self.smearing_eV,
            },
            "fermi": self.fermi.to_dict(),
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


def electronic_structure(
    ham: BlochHamiltonian,
    *,
    path: KPath | None = None,
    mesh: Sequence[int] | None = None,
    mesh_spacing: float = 0.2,
    smearing_eV: float = 0.1,
    n_electrons: float | None = None,
    dos_points: int = 1200,
    progress: bool = False,
) -> ElectronicStructure:
    """Bands on ``path`` (default: `kpath` of the structure), Fermi level/gap and DOS on a
    Γ-centred mesh (default spacing ``mesh_spacing`` 1/Å), all from one Hamiltonian."""
    n_el = ham.n_electrons if n_electrons is None else float(n_electrons)
    if n_el is None:
        raise ValueError(
            f"{ham.key or 'structure'}: the electron count is unknown (meta['n_electrons']); "
            "pass n_electrons (valence electrons of the pseudopotential)."
        )
    path = kpath(ham.atoms) if path is None else path
    mesh = tuple(mesh) if mesh is not None else kmesh(ham.cell, ham.pbc, mesh_spacing)
    mesh_eigs = ham.eigenvalues(mesh_kpoints(mesh), progress=progress)
    bands = ham.eigenvalues(path.kpts, progress=progress)
    fermi = fermi_level(mesh_eigs, n_el, smearing_eV=smearing_eV, band_edges_from=[bands])
    lo, hi = float(mesh_eigs.min()) - 5 * smearing_eV, float(mesh_eigs.max()) + 5 * smearing_eV
    energies = np.linspace(lo, hi, dos_points)
    return ElectronicStructure(
        path=path,
        bands=bands,
        mesh=mesh,
        dos_energies=energies,
        dos=dos(mesh_eigs, energies, smearing_eV=smearing_eV),
        fermi=fermi,
        smearing_eV=smearing_eV,
        key=ham.key,
    )


def band_gap(
    ham: BlochHamiltonian,
    *,
    mesh: Sequence[int] | None = None,
    mesh_spacing: float = 0.2,
    kpts: np.ndarray | None = None,
    n_electrons: float | None = None,
) -> float:
    """Band gap (eV): CBM − VBM over a Γ-centred mesh and the extra fractional k-points
    ``kpts`` (e.g. a record's ``meta["dft_bands"]["kpts_frac"]``), 0 for a metal (odd
    electron count or overlapping bands; `fermi_level`).

    ``mesh`` defaults to `kmesh` at ``mesh_spacing`` (1/Å, 2π included); ``n_electrons`` to
    the Hamiltonian's. The gap does not depend on the energy zero, so blocks of H − μS do.
    """
    n_el = ham.n_electrons if n_electrons is None else float(n_electrons)
    if n_el is None:
        raise ValueError(
            f"{ham.key or 'structure'}: the electron count is unknown (meta['n_electrons']); "
            "pass n_electrons (valence electrons of the pseudopotential)."
        )
    mesh = tuple(mesh) if mesh is not None else kmesh(ham.cell, ham.pbc, mesh_spacing)
    extra = [] if kpts is None or len(kpts) == 0 else [ham.eigenvalues(np.asarray(kpts))]
    return fermi_level(ham.eigenvalues(mesh_kpoints(mesh)), n_el, band_edges_from=extra).gap_eV


def band_errors(
    pred: np.ndarray,
    ref: np.ndarray,
    pred_fermi: float,
    ref_fermi: float,
    window_eV: float = 3.0,
) -> dict:
    """Band-energy errors (meV) of ``pred`` against ``ref`` on the same k-points, each set
    measured from its own Fermi level (predicted H carries no absolute energy zero).

    ``all``: every band both have; ``window``: entries whose reference energy lies within
    ±window_eV of the reference Fermi level.
    """
    nb = min(pred.shape[1], ref.shape[1])
    d = (pred[:, :nb] - pred_fermi) - (ref[:, :nb] - ref_fermi)
    win = np.abs(ref[:, :nb] - ref_fermi) <= window_eV
    out = {
        "alignment": "each set relative to its own Fermi level",
        "all_mae_meV": float(1e3 * np.mean(np.abs(d))),
        "all_max_meV": float(1e3 * np.max(np.abs(d))),
        "window_eV": window_eV,
    }
    if win.any():
        out["window_mae_meV"] = float(1e3 * np.mean(np.abs(d[win])))
        out["window_max_meV"] = float(1e3 * np.max(np.abs(d[win])))
    return out


# --------------------------------------------------------------------------- plots
def plot_bands(
    es: ElectronicStructure,
    out: str | Path,
    *,
    reference: ElectronicStructure | None = None,
    reference_label: str = "DFT",
    label: str = "model",
    window_eV: tuple[float, float] = (-12.0, 8.0),
    title: str | None = None,
) -> Path:
    """Band structure (ε − E_F) with DOS panel; optional reference overlay (dashed). PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axd) = plt.subplots(
        1, 2, figsize=(8, 5), sharey=True, gridspec_kw={"width_ratios": [3, 1], "wspace": 0.05}
    )
    segments = np.split(np.arange(len(es.path.x)), es.path.breaks)
    curves = [(es, dict(color="C0", lw=1.3), label)]
    if reference is not None:
        curves.insert(0, (reference, dict(color="k", ls="--", lw=1.0), reference_label))
    for data, style, name in curves:
        for n, seg in enumerate(segments):
            lines = ax.plot(es.path.x[seg], data.bands[seg] - data.fermi.fermi_level_eV, **style)
            if n == 0:
                lines[0].set_label(name)
    if reference is not None:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks([t for t, _ in es.path.ticks], [s for _, s in es.path.ticks])
    for t, _ in es.path.ticks:
        ax.axvline(t, color="0.7", lw=0.6)
    ax.axhline(0.0, color="C3", lw=0.7, ls=":")
    ax.set_xlim(es.path.x[0], es.path.x[-1])
    ax.set_ylim(*window_eV)
    ax.set_ylabel("E − E$_F$ (eV)")
    gap = es.fermi.gap_eV
    ax.set_title(
        title
        or f"{es.key}  {'metal' if es.fermi.is_metal else f'gap {gap:.3f} eV'}  "
        f"E$_F$ = {es.fermi.fermi_level_eV:.3f} eV"
    )
    if reference is not None:
        axd.plot(
            reference.dos, reference.dos_energies - reference.fermi.fermi_level_eV, "k--", lw=1
        )
    axd.plot(es.dos, es.dos_energies - es.fermi.fermi_level_eV, color="C0", lw=1.2)
    axd.axhline(0.0, color="C3", lw=0.7, ls=":")
    axd.set_xlabel("DOS (1/eV/cell)")
    axd.set_xlim(left=0)
    out = Path(out)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_dos(
    es: ElectronicStructure, out: str | Path, reference: ElectronicStructure | None = None
) -> Path:
    """DOS (ε − E_F) alone, optional reference overlay. PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if reference is not None:
        ax.plot(
            reference.dos_energies - reference.fermi.fermi_level_eV,
            reference.dos,
            "k--",
            lw=1,
            label="reference",
        )
    ax.plot(es.dos_energies - es.fermi.fermi_level_eV, es.dos, color="C0", lw=1.2, label="model")
    ax.axvline(0.0, color="C3", lw=0.7, ls=":")
    ax.set_xlabel("E − E$_F$ (eV)")
    ax.set_ylabel(f"DOS (states/eV/cell, σ = {es.smearing_eV:g} eV)")
    if reference is not None:
        ax.legend()
    out = Path(out)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out
