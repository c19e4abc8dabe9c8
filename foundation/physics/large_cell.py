"""The large-cell path of `foundation-predict` and `scripts/bench_physics.py`: H, S (sparse,
Γ) → DOS, integrated DOS, Fermi level and gap by the kernel polynomial method → eigenpairs
near E_F, with the time and peak memory of each step.

Why this order: the KPM DOS and E_F cost ∝ N_orb (no factorization: `foundation.physics.kpm`),
so they run at any size that fits in memory; the eigenpairs near E_F then need one shift-invert
factorization (or a filtered subspace iteration) at the energy KPM found, instead of a
bisection with one factorization per step (`sparse.fermi_level_sparse`, still selectable:
``fermi="bisection"``, exact at Γ for cells where a few LUs are affordable).
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

from foundation.physics import kpm
from foundation.physics import sparse as SP
from foundation.physics.kspace import BlochHamiltonian


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (GB; Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def large_cell_spectrum(
    ham: BlochHamiltonian,
    *,
    n_eigs: int = 20,
    eig_solver: str = "auto",
    fermi: str = "kpm",
    sigma: float | None = None,
    kpm_resolution_eV: float = 0.1,
    kpm_vectors: int = 4,
    kpm_rtol: float = 1e-5,
    progress: bool = False,
) -> tuple[dict, kpm.KPMResult | None]:
    """Γ-point DOS/E_F/gap and ``n_eigs`` eigenpairs near E_F of a large cell (energies in eV).

    ``fermi``: "kpm" (DOS and E_F by KPM with ``kpm_vectors`` random vectors and enough
    moments for ``kpm_resolution_eV``; the eigenpairs then give the band edges next to it) or
    "bisection" (inertia bisection with sparse LUs, `sparse.fermi_level_sparse`; no DOS).
    For an insulator the eigenpairs around the KPM gap then give the exact Γ band edges, and
    E_F becomes their midpoint (the KPM values stay as ``fermi_level_kpm_eV``, ``gap_kpm_eV``).
    ``sigma`` (eV) skips the Fermi step and looks for eigenpairs there. Returns (summary,
    KPM result or None); the summary holds timings (s) and peak memory (GB) per step.
    """
    timings: dict[str, float] = {}
    memory: dict[str, float] = {}

    def mark(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        memory[name] = peak_rss_gb()

    t0 = time.perf_counter()
    h, s = SP.assemble_hs(ham)
    mark("assemble", t0)
    out: dict = {"n_orbitals": int(h.shape[0]), "nnz": int(h.nnz)}
    result = None
    t0 = time.perf_counter()
    if sigma is not None:
        out["fermi"] = {"fermi_level_eV": float(sigma), "convention": "given sigma"}
    elif fermi == "bisection":
        out["fermi"] = SP.fermi_level_sparse(ham, matrices=(h, s))
        mark("fermi_bisection", t0)
    elif fermi == "kpm":
        if ham.n_electrons is None:
            raise ValueError(f"{ham.key}: electron count unknown; pass n_electrons.")
        solve_s = kpm.OverlapSolver(s, rtol=kpm_rtol, source=ham.key)
        lo, hi = kpm.spectral_bounds(h, solve_s)
        n_moments = max(50, math.ceil(math.pi * 0.5 * (hi - lo) / kpm_resolution_eV))
        result = kpm.kpm_moments(h, s, n_moments, kpm_vectors, bounds=(lo, hi), rtol=kpm_rtol,
                                 source=ham.key, progress=progress)  # fmt: skip
        f = kpm.fermi_level_kpm(result, ham.n_electrons)
        out["fermi"] = f.to_dict() | {"convention": "Γ only; KPM: E_F = middle of the gap "
                                      "found in the DOS (insulator) or where the integrated DOS "
                                      "reaches N_el/2 (metal)"}  # fmt: skip
        out["kpm"] = {"n_moments": n_moments, "n_vectors": kpm_vectors, "cg_rtol": kpm_rtol,
                      "bounds_eV": [lo, hi], "s_cg_steps": result.s_iterations + solve_s.iterations,
                      "resolution_eV": result.resolution_eV}  # fmt: skip
        mark("dos_fermi_kpm", t0)
    else:
        raise ValueError(f"unknown Fermi-level method {fermi!r}: kpm or bisection")
    t0 = time.perf_counter()
    if n_eigs > 0:
        ef = out["fermi"]["fermi_level_eV"]
        pairs = SP.eigs_near(ham, ef, n=n_eigs, vectors=False, solver=eig_solver, matrices=(h, s))
        w = pairs.values
        out["eigs"] = {"solver": pairs.solver, "values_eV": w.tolist(),
                       "residual_eV": pairs.residual, "factor_entries": pairs.factor_entries}  # fmt: skip
        below, above = w[w < ef], w[w > ef]
        if len(below) and len(above):
            vbm, cbm = float(below.max()), float(above.min())
            out["eigs"] |= {"highest_below_eV": vbm, "lowest_above_eV": cbm, "gap_eV": cbm - vbm}
            if out["fermi"].get("insulator"):
                # the KPM gap lies inside the true one, shifted by the kernel's uneven band-edge
                # tails; the exact levels around it give the midgap E_F and the gap
                out["fermi"] |= {"fermi_level_kpm_eV": ef, "fermi_level_eV": 0.5 * (vbm + cbm),
                                 "gap_kpm_eV": out["fermi"]["gap_eV"], "gap_eV": cbm - vbm,
                                 "vbm_eV": vbm, "cbm_eV": cbm}  # fmt: skip
        mark("eigs_near_fermi", t0)
    out["timings_s"] = timings
    out["peak_rss_GB"] = memory
    return out, result


def write_kpm_dos(result: kpm.KPMResult, fermi: dict, out_dir: Path, title: str = "") -> None:
    """dos_kpm.json (energies, DOS per eV and spin, integrated DOS) and dos_kpm.png."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = result.energy_grid(2001)
    rho, n = result.dos(e), result.idos(e)
    payload = {"energies_eV": e.tolist(), "dos_per_eV_per_spin": rho.tolist(),
               "idos_per_spin": n.tolist(), "fermi": fermi,
               "resolution_eV": result.resolution_eV}  # fmt: skip
    (out_dir / "dos_kpm.json").write_text(json.dumps(payload))
    ef = fermi["fermi_level_eV"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(e - ef, 2 * rho, lw=1)
    if fermi.get("insulator"):
        ax.axvspan(fermi["gap_lo_eV"] - ef, fermi["gap_hi_eV"] - ef, color="0.9", label="gap")
        ax.legend()
    ax.axvline(0.0, color="k", lw=0.6, ls="--")
    ax.set_xlabel("E − E_F (eV)")
    ax.set_ylabel("DOS (states/eV, both spins)")
    ax.set_title(title or f"KPM DOS, resolution {result.resolution_eV * 1e3:.0f} meV")
    fig.tight_layout()
    fig.savefig(out_dir / "dos_kpm.png", dpi=120)
    plt.close(fig)


__all__ = ["large_cell_spectrum", "peak_rss_gb", "write_kpm_dos"]
