"""``foundation-eph``: electron–phonon observables from a trained model.

    foundation-eph linewidth --model pretrained/tiny_pbe_eph_mini.pt --structure Si.cif \\
        --phonons phonopy_params.yaml --mesh 2 4 6 --out eph_out/

``linewidth``: phonon-limited Im Σ of the hole at the valence-band maximum and the electron
at the conduction-band minimum (`foundation.physics.eph_linewidth`) for each q mesh N
(N×N×N, each needing the model's derivatives in an N×N×N supercell), written as
``linewidth.json`` (per mesh: band edges, Im Σ, linewidth 2 Im Σ, timings) and
``linewidth.png`` (Im Σ against N: the mesh convergence). Phonons: a phonopy YAML with force
constants, or a FORCE_CONSTANTS file with ``--supercell`` (its repetitions).

Bad input (missing files, unknown elements, phonons of another cell) stops with exit status 2
and a message naming the file and the fix. Units: K, meV (σ, Im Σ).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="foundation-eph", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    lw = sub.add_parser("linewidth", help="band-edge Im Σ with its q-mesh convergence")
    lw.add_argument("--model", required=True, help="checkpoint (.pt) of a trained model")
    lw.add_argument("--structure", required=True, help="primitive cell, any ASE format")
    lw.add_argument("--phonons", required=True, help="phonopy YAML or FORCE_CONSTANTS")
    lw.add_argument(
        "--supercell", type=int, nargs=3, default=None, help="repetitions of a FORCE_CONSTANTS file"
    )
    lw.add_argument("--mesh", type=int, nargs="+", default=[2, 4], help="q meshes N (N×N×N)")
    lw.add_argument("--temperature", type=float, default=300.0, help="K")
    lw.add_argument(
        "--sigma",
        type=float,
        nargs="+",
        default=[10.0, 20.0, 40.0],
        help="Gaussian widths of δ, meV",
    )
    lw.add_argument("--head", default="h", help="Hamiltonian head of the model")
    lw.add_argument("--out", type=Path, default=Path("eph_out"))
    return ap


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mesh = [r["mesh_q"] for r in results]
    widths = list(results[0]["im_sigma_meV_by_width_meV"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, (key, label) in zip(
        axes, (("hole_vbm", "hole (VBM)"), ("electron_cbm", "electron (CBM)")), strict=True
    ):
        for w in widths:
            values = [r["im_sigma_meV_by_width_meV"][w][key] for r in results]
            ax.plot(mesh, values, "o-", label=f"σ = {w} meV")
        ax.set_xlabel("q mesh N (N×N×N)")
        ax.set_title(f"{label}, {results[0]['temperature_K']:.0f} K", fontsize=9)
        ax.set_yscale("log")
    axes[0].set_ylabel("Im Σ (meV)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def linewidth(args: argparse.Namespace) -> dict:
    """The ``linewidth`` command; returns the JSON summary."""
    from foundation.physics.eph_linewidth import band_edge_linewidths
    from foundation.physics.phonons import load_phonon_model
    from foundation.physics.predict import load_model, read_structure

    if any(n < 1 for n in args.mesh) or args.temperature <= 0 or min(args.sigma) <= 0:
        raise ValueError("--mesh values, --temperature and --sigma must be positive.")
    atoms = read_structure(args.structure)
    if not atoms.pbc.all():
        raise ValueError(f"{args.structure}: linewidths need a 3-D periodic crystal.")
    matrix = None if args.supercell is None else np.diag(args.supercell)
    phonons = load_phonon_model(args.phonons, atoms, matrix)
    model = load_model(args.model)
    results = []
    for n in sorted(set(args.mesh)):
        t0 = time.perf_counter()
        r = band_edge_linewidths(
            model, atoms, phonons, n, temperature_K=args.temperature,
            sigmas_eV=tuple(1e-3 * s for s in args.sigma), head=args.head,
        )  # fmt: skip
        results.append(r)
        shown = ", ".join(
            f"σ {w} meV: hole {v['hole_vbm']:.2f}, electron {v['electron_cbm']:.2f}"
            for w, v in r["im_sigma_meV_by_width_meV"].items()
        )
        print(f"q mesh {n}³ ({time.perf_counter() - t0:.0f} s): Im Σ (meV) {shown}", flush=True)
        summary = _write(args, results)  # after every mesh: a long run keeps what it has
    return summary


def _write(args: argparse.Namespace, results: list[dict]) -> dict:
    """linewidth.json and linewidth.png of the meshes done so far (atomic replace)."""
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": str(args.model),
        "structure": str(args.structure),
        "phonons": str(args.phonons),
        "definition": "Im Sigma_nk = pi/N_q sum |g|^2 [(n+f) d(e-e'+w) + (n+1-f) d(e-e'-w)], "
        "Gaussian delta; linewidth = 2 Im Sigma; mu at midgap",
        "results": results,
    }
    tmp = args.out / "linewidth.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(args.out / "linewidth.json")
    _plot(results, args.out / "linewidth.png")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from foundation.physics.phonons import PhononError
    from foundation.physics.predict import PredictError

    try:
        linewidth(args)
    except (PhononError, PredictError, ValueError, FileNotFoundError) as exc:
        print(f"foundation-eph: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
