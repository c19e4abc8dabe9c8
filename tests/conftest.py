"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ase.build import bulk
from train_support import SHIPPED

from foundation.data.record import HamiltonianRecord
from foundation.physics.kspace import BlochHamiltonian


@pytest.fixture(scope="session", autouse=True)
def _overlap_cache(tmp_path_factory):
    """Overlap tables (foundation.physics.overlap) are cached in a per-session folder, not in
    the user's ~/.cache, so a test never reads a table an older code version wrote."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FOUNDATION_CACHE_DIR", str(tmp_path_factory.mktemp("foundation-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """foundation-train's num_threads is process-global: give later tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data() -> Path:
    """The shipped PySCF PBE shards (real H, S of 16 elements)."""
    return SHIPPED


@pytest.fixture(scope="session")
def si_record() -> HamiltonianRecord:
    """The 2-atom Si record of the shipped shards (with its DFT bands), or one computed now."""
    if (SHIPPED / "manifest.json").is_file():
        from foundation.data.shards import iter_records

        for rec in iter_records(SHIPPED):
            syms = sorted(set(rec.numbers.tolist()))
            if syms == [14] and "dft_bands" in rec.meta:
                return rec
    from foundation.data.dft import pyscf as gen

    scf = gen.run_scf(bulk("Si", "diamond", a=5.43), key="si2", kmesh=(3, 3, 3), ke_cutoff_Ha=18)
    return gen.record_from_scf(scf)


@pytest.fixture(scope="session")
def si(si_record) -> BlochHamiltonian:
    """Bloch sums of `si_record` (eV, PySCF energy scale)."""
    return BlochHamiltonian.from_record(si_record)
