"""Model |g_mnν(k, q ≠ 0)| against PySCF frozen phonons (`foundation.physics.eph_q_validation`).

The references in ``data_shards/eph_mini/q_reference`` (``scripts/generate_eph_q_reference.py``)
hold DFT H, S and ⟨i0|∂_qν H|jR⟩, ⟨i0|∂_qν S|jR⟩ from central differences of small commensurate
supercells displaced along complex phonon patterns. Two checks per reference:

* the DFT ∂S (finite differences of PySCF's overlap in the displaced supercell) equals the
  exact ∂S of the phase-summed kernel (`eph_q.exact_overlap_kernel`): the supercell patterns,
  phases and home-cell mapping of the frozen-phonon route agree with the kernel route;
* the shipped e-ph model's gauge-invariant |g| (model H and ∂H by autograd in the same
  supercell, exact S) is within a bound of the DFT |g| over Γ and three generic k, all bands
  and the reference's modes (measured errors: README, ``scripts/bench_eph.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from train_support import REPO

from foundation.basis import BasisSet
from foundation.physics.eph_q_validation import (
    _exact_ds,
    coupling_errors,
    dft_couplings,
    load_reference,
)

ROOT = REPO / "data_shards" / "eph_mini" / "q_reference"
CASES = sorted(p.stem for p in ROOT.glob("*.json"))
BOUND = {
    "Si-L": (1.0, 0.65),
    "Si-heldout-L": (0.7, 0.5),
    "Si-third": (0.6, 0.52),
    "Si-X": (0.75, 0.5),
    "AlP-L": (1.0, 0.6),
}
"""(all bands, valence block) bounds on the relative |g| error of the shipped e-ph model.
Measured (2026-12-03): Si-L 0.930 / 0.596 (conduction 1.316), Si-heldout-L 0.623 / 0.423
(0.948), Si-third (q = (⅓, 0, 0), complex phases) 0.536 / 0.464 (0.925), Si-X 0.662 / 0.451
(1.073), AlP-L (polar; no LO–TO term) 0.907 / 0.533 (1.512). These are poor: the model was fitted on Γ-point dh of 2-atom cells (the
sum over all periodic images of each atom's derivative), which does not constrain how that
sum splits over the images, and that split is what q ≠ 0 measures (its ∂_q H blocks at L are
75 % off; tiny_pbe_mini 83 %, small_pbe_mini 56 %). The bounds guard against regressions,
they do not certify accuracy."""


@pytest.fixture(scope="module")
def model():
    from foundation.physics.predict import load_model

    return load_model(REPO / "pretrained" / "tiny_pbe_eph_mini.pt")


def test_references_are_shipped():
    assert set(BOUND) <= set(CASES)


@pytest.mark.parametrize("key", CASES)
def test_dft_overlap_derivative_matches_exact_kernel(key):
    ref = load_reference(ROOT / key)
    basis = BasisSet.from_dict(ref.meta["basis"])
    exact = _exact_ds(
        basis, ref.primitive, ref.reps, ref.layout, ref.qpoint[None], ref.patterns[None]
    )
    err = np.linalg.norm(exact[0] - ref.ds_q) / np.linalg.norm(exact[0])
    print(f"{key}: ∂S exact vs PySCF FD {err:.1e}")
    assert err < 1e-4
    g = dft_couplings(ref).gauge_abs()
    assert np.isfinite(g).all() and g.max() > 1e-3  # couplings of tens of meV


@pytest.mark.parametrize("key", sorted(BOUND))
def test_model_couplings_within_bound(model, key):
    ref = load_reference(ROOT / key)
    errors = coupling_errors(model, ref)
    print(key, {k: round(v, 3) for k, v in errors.items()})
    assert errors["all"] < BOUND[key][0]
    assert errors["valence"] < BOUND[key][1]
