"""Band validation on stored records: exact DFT blocks score zero, a uniform shift of H by
c·S scores zero (each band set is aligned to its own Fermi level), a perturbation does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from foundation.data.shards import load_records
from foundation.physics.band_validation import record_band_errors, summarize

SHARDS = Path(__file__).resolve().parents[1] / "data_shards" / "pbe_mini"


@pytest.fixture(scope="module")
def record():
    if not (SHARDS / "manifest.json").is_file():
        pytest.skip("data_shards/pbe_mini is not there")
    return next(r for r in load_records(SHARDS, "val") if len(r.numbers) >= 2)


def test_dft_blocks_score_zero_and_shifts_do_not_count(record):
    exact = record_band_errors(record, record.h, mesh_spacing=0.5)
    assert exact["window_mae_meV"] < 1e-6 and exact["gap_pred_eV"] == pytest.approx(
        exact["gap_dft_eV"]
    )
    shifted = record_band_errors(record, record.h + 0.3 * record.s, mesh_spacing=0.5)
    assert shifted["window_mae_meV"] < 1e-3  # meV; Fermi-level bisection tolerance


def test_perturbed_blocks_move_bands_and_summary_counts_them(record):
    noise = np.random.default_rng(0).normal(scale=0.02, size=record.h.shape)
    errors = record_band_errors(record, record.h + noise, mesh_spacing=0.5)
    assert errors["window_mae_meV"] > 1.0
    table = summarize([{"group": "seen"} | errors], ["seen", "unseen_composition"])
    assert list(table) == ["seen"] and table["seen"]["structures"] == 1
