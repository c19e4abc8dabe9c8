"""Phonon-limited linewidths (`foundation.physics.eph_linewidth`) and ``foundation-eph``.

The Im Σ formula is checked on synthetic states where the answer is known: a carrier whose
final states all lie above it can only absorb a phonon (Im Σ ∝ n_B, → 0 as T → 0), one with
all final states below it can only emit (∝ n_B + 1); electrons and holes are mirror images
(ε → −ε, μ → −μ, f → 1 − f); the Gaussian δ integrates to one. The CLI runs the shipped e-ph
model on Si with a spring-model phonon file (q mesh 1) and refuses bad input with status 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk

from foundation.physics.eph_cli import main
from foundation.physics.eph_linewidth import (
    THZ_TO_EV,
    bose,
    gaussian,
    imaginary_self_energy,
)

OMEGA_EV = 0.05
SIGMA_EV = 0.005


def _single(eps_final: float, temperature_K: float, mu_eV: float = -1.0) -> float:
    """Im Σ (eV) of one state at ε = 0 coupled (|g|² = 1e-3 eV²) to one final state."""
    return float(
        imaginary_self_energy(
            np.zeros((1, 1)), np.full((1, 1, 1), eps_final), np.array([[OMEGA_EV / THZ_TO_EV]]),
            np.full((1, 1, 1, 1, 1), 1e-3), temperature_K=temperature_K, mu_eV=mu_eV,
            sigma_eV=SIGMA_EV,
        )[0, 0]
    )  # fmt: skip


def test_absorption_and_emission_weights():
    """Final state ω above an electron (μ far below: f = 0): absorption only, ∝ n_B(ω), gone
    at low T; final state ω below: emission ∝ n_B + 1, finite at low T."""
    above = [_single(OMEGA_EV, t) for t in (300.0, 150.0, 5.0)]
    n300, n150 = bose(OMEGA_EV, 300.0), bose(OMEGA_EV, 150.0)
    np.testing.assert_allclose(above[0] / above[1], n300 / n150, rtol=1e-6)
    assert above[2] < 1e-12 and above[0] > 1e-4
    below = [_single(-OMEGA_EV, t) for t in (300.0, 5.0)]
    np.testing.assert_allclose(below[0] / below[1], n300 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(below[1], np.pi * 1e-3 * gaussian(0.0, SIGMA_EV), rtol=1e-6)


def test_electron_hole_mirror():
    """Mirroring energies and μ (f → 1 − f) leaves Im Σ unchanged: a hole at the VBM scatters
    like an electron at the CBM of the mirrored bands."""
    rng = np.random.default_rng(0)
    eps_k = rng.normal(size=(2, 3)) * 0.1
    eps_kq = rng.normal(size=(4, 2, 3)) * 0.1
    freqs = rng.uniform(2.0, 15.0, size=(4, 2))
    g2 = rng.uniform(size=(4, 2, 2, 3, 3)) * 1e-3
    kw = {"temperature_K": 300.0, "sigma_eV": 0.02}
    a = imaginary_self_energy(eps_k, eps_kq, freqs, g2, mu_eV=0.03, **kw)
    b = imaginary_self_energy(-eps_k, -eps_kq, freqs, g2, mu_eV=-0.03, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-10)
    assert np.all(a > 0)


def test_gaussian_is_normalised():
    x = np.linspace(-0.2, 0.2, 4001)
    assert abs(np.trapezoid(gaussian(x, 0.01), x) - 1.0) < 1e-9


@pytest.fixture(scope="module")
def si_files(tmp_path_factory):
    """(Si structure file, spring-model phonopy YAML of it)."""
    from test_eph_q import A_SI, spring_phonopy

    out = tmp_path_factory.mktemp("si")
    si = bulk("Si", "diamond", a=A_SI)
    si.write(out / "Si.json")
    spring_phonopy(si, (2, 2, 2)).save(out / "phonons.yaml", settings={"force_constants": True})
    return out / "Si.json", out / "phonons.yaml"


def test_cli_linewidth(si_files, tmp_path):
    """foundation-eph linewidth writes JSON + PNG with finite non-negative Im Σ; at mesh 1
    (q = Γ only) the band-edge states couple only through optical modes."""
    from train_support import REPO

    structure, phonons = si_files
    out = tmp_path / "lw"
    code = main([
        "linewidth", "--model", str(REPO / "pretrained" / "tiny_pbe_eph_mini.pt"),
        "--structure", str(structure), "--phonons", str(phonons), "--mesh", "1",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "linewidth.json").read_text())
    r = summary["results"][0]
    assert r["gap_eV"] > 0.5 and r["n_q"] == 1
    values = [v for w in r["im_sigma_meV_by_width_meV"].values() for v in w.values()]
    assert all(np.isfinite(values)) and min(values) >= 0 and max(values) > 0
    assert (out / "linewidth.png").stat().st_size > 1000


def test_cli_refuses_bad_input(si_files, tmp_path, capsys):
    structure, phonons = si_files
    assert main(["linewidth", "--model", "missing.pt", "--structure", str(structure),
                 "--phonons", str(phonons), "--out", str(tmp_path)]) == 2  # fmt: skip
    assert "missing.pt: no such checkpoint" in capsys.readouterr().err
    other = bulk("Si", "diamond", a=5.6)
    other.write(tmp_path / "other.json")
    assert main(["linewidth", "--model", "missing.pt", "--structure", str(tmp_path / "other.json"),
                 "--phonons", str(phonons), "--out", str(tmp_path)]) == 2  # fmt: skip
    assert "different cell" in capsys.readouterr().err
