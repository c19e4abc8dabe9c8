"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import SHIPPED


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
