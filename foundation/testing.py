"""Reusable checks that every model variant, convolution and head runs through (NequIP-style).

Each ``assert_*`` raises AssertionError with the measured error in the message and returns
the measured error(s), so tests can report them. Batches are dicts keyed by
`foundation.keys` (as built by `foundation.data.graph`); models map a batch to a dict of
padded blocks (E, n_uni, n_uni). Run them in float64 (``model.double()`` and float64
positions/cells) to check to 1e-8.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from foundation import keys
from foundation.rotations import random_rotation, shells_D

Model = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _relative(diff: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return diff.abs().max().item() / (scale if scale > 0 else 1.0)


def rotate_batch(batch: dict[str, torch.Tensor], q: np.ndarray) -> dict[str, torch.Tensor]:
    """Copy of ``batch`` with positions and cell rows mapped r → Q r (edges unchanged)."""
    out = dict(batch)
    qt = torch.as_tensor(q, dtype=batch[keys.POSITIONS].dtype)
    out[keys.POSITIONS] = batch[keys.POSITIONS] @ qt.T
    out[keys.CELL] = batch[keys.CELL] @ qt.T
    return out


def assert_equivariant(
    model: Model,
    batch: dict[str, torch.Tensor],
    shells: Iterable[int],
    *,
    seeds: Iterable[int] = (0, 1),
    improper: bool = True,
    rtol: float = 1e-8,
) -> dict[str, float]:
    """Rotating the structure by Q maps every block H → D(Q) H D(Q)ᵀ (universal shells).

    Checks a proper rotation per seed and, with ``improper``, its product with inversion
    (which multiplies each (l1, l2) block by (−1)^(l1+l2)). Returns the worst relative error
    per output name and rotation, e.g. {"h/proper0": 3e-15, ...}.
    """
    shells = tuple(shells)
    reference = model(batch)
    errors: dict[str, float] = {}
    for seed in seeds:
        for flip in (False, True) if improper else (False,):
            q = random_rotation(seed, improper=flip)
            rotated = model(rotate_batch(batch, q))
            d = shells_D(shells, q).to(batch[keys.POSITIONS].dtype)
            for name, blocks in reference.items():
                expected = d @ blocks @ d.T
                err = _relative(rotated[name] - expected, expected)
                errors[f"{name}/{'improper' if flip else 'proper'}{seed}"] = err
    worst = max(errors, key=errors.get)
    assert errors[worst] < rtol, f"not equivariant: {worst} relative error {errors[worst]:.3g}"
    return errors


def assert_hermitian(
    outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], atol: float = 0.0
) -> dict[str, float]:
    """Block of edge e equals the transpose of the block of its reverse edge (j, i, −R)."""
    rev = batch[keys.EDGE_REVERSE]
    errors = {
        name: (blocks - blocks[rev].transpose(-1, -2)).abs().max().item()
        for name, blocks in outputs.items()
    }
    for name, err in errors.items():
        assert err <= atol, f"{name}: not hermitian, max |H_e − H_rev(e)ᵀ| = {err:.3g}"
    return errors


def assert_masked(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
    """Every padded entry outside BLOCK_MASK is exactly zero."""
    mask = batch[keys.BLOCK_MASK]
    for name, blocks in outputs.items():
        leak = blocks[~mask].abs().max().item() if (~mask).any() else 0.0
        assert leak == 0.0, f"{name}: padded entries outside the block mask reach {leak:.3g}"


def assert_translation_invariant(
    model: Model, batch: dict[str, torch.Tensor], shift_A: Iterable[float] = (0.3, -1.1, 2.7)
) -> float:
    """Shifting all positions by a constant vector (Å) leaves every block unchanged."""
    moved = dict(batch)
    moved[keys.POSITIONS] = batch[keys.POSITIONS] + torch.as_tensor(
        list(shift_A), dtype=batch[keys.POSITIONS].dtype
    )
    a, b = model(batch), model(moved)
    err = max(_relative(b[k] - a[k], a[k]) for k in a)
    assert err < 1e-10, f"not translation invariant: relative error {err:.3g}"
    return err


def permute_batch(
    batch: dict[str, torch.Tensor], atom_perm: torch.Tensor, edge_perm: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Relabel atoms (new atom a = old atom atom_perm[a]) and reorder edges likewise.

    Only single-structure batches (no BATCH key) are supported.
    """
    if keys.BATCH in batch and int(batch[keys.BATCH].max()) > 0:
        raise ValueError("permute_batch: pass a single-structure batch.")
    n_atoms, n_edges = len(atom_perm), len(edge_perm)
    new_atom = torch.empty_like(atom_perm)
    new_atom[atom_perm] = torch.arange(n_atoms)
    new_edge = torch.empty_like(edge_perm)
    new_edge[edge_perm] = torch.arange(n_edges)
    out = {}
    for name, value in batch.items():
        if name in (keys.NUMBERS, keys.POSITIONS):
            out[name] = value[atom_perm]
        elif name == keys.EDGE_INDEX:
            out[name] = new_atom[value[:, edge_perm]]
        elif name == keys.EDGE_REVERSE:
            out[name] = new_edge[value[edge_perm]]
        elif torch.is_tensor(value) and value.shape[:1] == (n_edges,) and name != keys.N_EDGES:
            out[name] = value[edge_perm]
        else:
            out[name] = value
    return out


def assert_permutation_invariant(
    model: Model, batch: dict[str, torch.Tensor], seed: int = 0
) -> float:
    """Relabelling atoms and reordering edges permutes the outputs and changes nothing else."""
    g = torch.Generator().manual_seed(seed)
    atom_perm = torch.randperm(len(batch[keys.NUMBERS]), generator=g)
    edge_perm = torch.randperm(batch[keys.EDGE_INDEX].shape[1], generator=g)
    a = model(batch)
    b = model(permute_batch(batch, atom_perm, edge_perm))
    err = max(_relative(b[k] - a[k][edge_perm], a[k]) for k in a)
    assert err < 1e-10, f"not permutation invariant: relative error {err:.3g}"
    return err


def assert_fd_gradient(
    model: Model,
    batch: dict[str, torch.Tensor],
    *,
    outputs: Iterable[str] | None = None,
    n_coordinates: int = 6,
    eps: float = 1e-5,
    rtol: float = 1e-6,
    seed: int = 0,
) -> float:
    """Autograd d f/dτ against central finite differences, f = Σ_outputs Σ w ⊙ H (fixed random w).

    ``outputs`` defaults to every model output. Checks ``n_coordinates`` randomly chosen
    Cartesian position components and returns the worst error relative to the largest
    gradient component checked.
    """
    g = torch.Generator().manual_seed(seed)
    positions = batch[keys.POSITIONS].detach().clone()
    reference = model(batch)
    names = list(reference) if outputs is None else list(outputs)
    weights = {
        n: torch.randn(reference[n].shape, generator=g, dtype=positions.dtype) for n in names
    }

    def f(pos: torch.Tensor) -> torch.Tensor:
        out = model({**batch, keys.POSITIONS: pos})
        return sum((out[n] * weights[n]).sum() for n in names)

    pos = positions.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(pos), pos)
    flat = torch.randperm(positions.numel(), generator=g)[:n_coordinates]
    fd = []
    with torch.no_grad():
        for k in flat.tolist():
            step = torch.zeros_like(positions).view(-1)
            step[k] = eps
            step = step.view_as(positions)
            fd.append((f(positions + step) - f(positions - step)) / (2 * eps))
    fd = torch.stack(fd)
    auto = grad.view(-1)[flat]
    err = _relative(auto - fd, auto)
    assert err < rtol, f"autograd vs finite differences: relative error {err:.3g} ({auto} vs {fd})"
    return err


def assert_batch_invariant(
    model: Model, graphs: list[dict[str, torch.Tensor]], collate: Callable, rtol: float = 1e-10
) -> float:
    """Predicting graphs together in one batch equals predicting each alone."""
    together = model(collate(graphs))
    start, err = 0, 0.0
    for graph in graphs:
        alone = model(collate([graph]))
        n = graph[keys.EDGE_INDEX].shape[1]
        for name, blocks in alone.items():
            err = max(err, _relative(together[name][start : start + n] - blocks, blocks))
        start += n
    assert err < rtol, f"batching changes predictions: relative error {err:.3g}"
    return err


__all__ = [
    "assert_batch_invariant",
    "assert_equivariant",
    "assert_fd_gradient",
    "assert_hermitian",
    "assert_masked",
    "assert_permutation_invariant",
    "assert_translation_invariant",
    "permute_batch",
    "rotate_batch",
]
