"""Phonon-limited carrier linewidths: the imaginary part of the Fan–Migdal self-energy.

For a state n k (lowest order in the coupling, harmonic phonons, Gaussian δ of width σ):

    Im Σ_nk = π/N_q Σ_qνm |g_mnν(k, q)|² [ (n_qν + f_m,k+q) δ(ε_nk − ε_m,k+q + ħω_qν)
                                          + (n_qν + 1 − f_m,k+q) δ(ε_nk − ε_m,k+q − ħω_qν) ],

absorption and emission of a phonon (Giustino, Rev. Mod. Phys. 89, 015003 (2017), eq. 146).
n: Bose–Einstein at T; f: Fermi–Dirac at T with the chemical potential at midgap (intrinsic
semiconductor); the q sum runs over a Γ-centred N×N×N mesh. The linewidth (full width) is
2 Im Σ and the scattering rate 2 Im Σ / ħ. g comes from `foundation.physics.eph_q` (model
H, ∂H; exact S, ∂S), so an N×N×N q mesh needs the derivative kernel of the N×N×N supercell.
Degenerate states n (e.g. the valence-band top of Si) share their Im Σ: it is averaged over
the level; the sums over m and ν make it gauge invariant otherwise.

Units: eV, K, THz (phonon frequencies), meV in reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import units

THZ_TO_EV = 1e12 * 2.0 * np.pi * units._hbar / units._e
"""ħω in eV of a frequency ν = 1 THz (ω = 2πν)."""


def bose(energy_eV: np.ndarray, temperature_K: float) -> np.ndarray:
    """Bose–Einstein occupation (0 where energy ≤ 0: those modes carry no amplitude)."""
    e = np.asarray(energy_eV, dtype=np.float64)
    x = np.where(e > 0, e, 1.0) / (units.kB * temperature_K)
    return np.where(e > 0, 1.0 / np.expm1(x), 0.0)


def fermi(energy_eV: np.ndarray, mu_eV: float, temperature_K: float) -> np.ndarray:
    """Fermi–Dirac occupation."""
    x = (np.asarray(energy_eV, dtype=np.float64) - mu_eV) / (units.kB * temperature_K)
    return 0.5 * (1.0 - np.tanh(0.5 * x))


def gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * (x / sigma) ** 2) / (sigma * np.sqrt(2.0 * np.pi))


def imaginary_self_energy(
    eps_k: np.ndarray,
    eps_kq: np.ndarray,
    frequencies_THz: np.ndarray,
    g2: np.ndarray,
    *,
    temperature_K: float,
    mu_eV: float,
    sigma_eV: float,
) -> np.ndarray:
    """(K, B) Im Σ_nk in eV (module formula) from ``eps_k`` (K, B), ``eps_kq`` (Q, K, B),
    ``frequencies_THz`` (Q, M) and ``g2`` (Q, K, M, B, B) = |g_mnν(k, q)|² in eV² (m at k+q
    first, n at k second), the q mesh being all Q points (weights 1/Q)."""
    omega = np.asarray(frequencies_THz) * THZ_TO_EV  # (Q, M)
    n_ph = bose(omega, temperature_K)[:, None, :, None, None]
    f = fermi(eps_kq, mu_eV, temperature_K)[:, :, None, :, None]  # (Q, K, 1, m, 1)
    w = omega[:, None, :, None, None]
    de = eps_k[None, :, None, None, :] - eps_kq[:, :, None, :, None]  # ε_nk − ε_mk+q
    rate = (n_ph + f) * gaussian(de + w, sigma_eV) + (n_ph + 1.0 - f) * gaussian(de - w, sigma_eV)
    rate = np.where(w > 0, rate, 0.0)
    return np.pi * np.einsum("qkmab,qkmab->kb", g2, rate) / len(omega)


def gamma_mesh(n: int) -> np.ndarray:
    """(n³, 3) Γ-centred fractional mesh."""
    grid = np.arange(n) / n
    return np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)


@dataclass
class EdgeStates:
    """Band-edge states: valence maximum (k, band) and conduction minimum (k, band), eV."""

    vbm_k: np.ndarray
    vbm_band: int
    vbm_eV: float
    cbm_k: np.ndarray
    cbm_band: int
    cbm_eV: float


def find_band_edges(eigen, n_valence: int, n_search: int = 12) -> EdgeStates:
    """VBM and CBM of an insulator with ``n_valence`` filled bands: the extrema on a Γ-centred
    ``n_search``³ mesh refined by a local search (Nelder–Mead in fractional k).
    ``eigen(kpoints (K, 3)) -> (K, B)`` eigenvalues."""
    from scipy.optimize import minimize

    mesh = gamma_mesh(n_search)
    eps = eigen(mesh)
    edges = []
    for band, sign in ((n_valence - 1, -1.0), (n_valence, 1.0)):
        start = mesh[int(np.argmin(sign * eps[:, band]))]
        best = minimize(
            lambda k, b=band, s=sign: s * eigen(k[None])[0, b], start, method="Nelder-Mead",
            options={"xatol": 1e-5, "fatol": 1e-7},
        )  # fmt: skip
        edges.append((best.x, band, float(eigen(best.x[None])[0, band])))
    (vk, vb, ve), (ck, cb, ce) = edges
    return EdgeStates(vk, vb, ve, ck, cb, ce)


def band_edge_linewidths(
    model,
    primitive,
    phonons,
    mesh: int,
    *,
    temperature_K: float = 300.0,
    sigmas_eV: tuple[float, ...] = (0.01, 0.02, 0.04),
    head: str = "h",
    chunk_size: int | None = 1,
) -> dict:
    """Im Σ (meV) of the hole at the VBM and the electron at the CBM of ``primitive`` with
    ``model`` couplings on a Γ-centred ``mesh``³ q mesh and the modes of ``phonons``
    (`PhononModel`) for each Gaussian width in ``sigmas_eV`` (one set of couplings); band
    edges located on the model's bands (`find_band_edges`). Returns a JSON-ready dict with
    the edges, Im Σ and the linewidth 2 Im Σ per width (keys: width in meV), timings."""
    import time

    from foundation.physics.eph import level_average
    from foundation.physics.eph_q import model_kernels
    from foundation.physics.predict import valence_electrons

    t0 = time.perf_counter()
    kernels = model_kernels(model, primitive, (mesh,) * 3, head=head, chunk_size=chunk_size)
    t1 = time.perf_counter()
    n_valence = int(round(valence_electrons(primitive.numbers))) // 2
    edges = find_band_edges(kernels.eigenvalues, n_valence)
    qpoints = gamma_mesh(mesh)
    modes = phonons.modes(qpoints)
    kpoints = np.array([edges.vbm_k, edges.cbm_k])
    c = kernels.couplings(kpoints, qpoints, modes.zero_point_patterns(), modes.frequencies_THz)
    t2 = time.perf_counter()
    mu = 0.5 * (edges.vbm_eV + edges.cbm_eV)
    g2 = np.abs(c.g_eV) ** 2
    im_sigma = {}
    for sigma in sigmas_eV:
        im = imaginary_self_energy(
            c.eps_k, c.eps_kq, c.frequencies_THz, g2, temperature_K=temperature_K, mu_eV=mu,
            sigma_eV=sigma,
        )  # fmt: skip
        im = np.array([level_average(c.eps_k[i], 1e-4) @ im[i] for i in range(len(kpoints))])
        im_sigma[f"{1e3 * sigma:g}"] = {
            "hole_vbm": float(1e3 * im[0, edges.vbm_band]),
            "electron_cbm": float(1e3 * im[1, edges.cbm_band]),
        }
    return {
        "mesh_q": mesh,
        "n_q": len(qpoints),
        "supercell_atoms": len(primitive) * mesh**3,
        "temperature_K": temperature_K,
        "vbm": {"k_frac": edges.vbm_k.tolist(), "band": edges.vbm_band, "eV": edges.vbm_eV},
        "cbm": {"k_frac": edges.cbm_k.tolist(), "band": edges.cbm_band, "eV": edges.cbm_eV},
        "gap_eV": edges.cbm_eV - edges.vbm_eV,
        "im_sigma_meV_by_width_meV": im_sigma,
        "linewidth_is": "2 Im Sigma",
        "seconds": {"kernels": t1 - t0, "couplings": t2 - t1},
    }


__all__ = [
    "EdgeStates",
    "THZ_TO_EV",
    "band_edge_linewidths",
    "bose",
    "fermi",
    "find_band_edges",
    "gamma_mesh",
    "imaginary_self_energy",
]
