"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import SHIPPED


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
