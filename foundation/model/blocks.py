"""Orbital-pair blocks ⇄ irreps, for the universal padded basis at once.

A block between a shell of angular momentum l1 and one of l2 is a (2l1+1)×(2l2+1) matrix that
rotates as D_l1 H D_l2ᵀ; it decomposes into irreps l = |l1−l2| … l1+l2, each with parity
(−1)^(l1+l2) (the product of the two orbital parities). `BlockIrreps` holds the orthogonal
change of basis, built from e3nn's Wigner-3j, between

* a feature vector with irreps `irreps` (one copy of every (l, p) for every ordered pair of
  universal shells, grouped by irrep type so one `o3.Linear` can produce it), and
* the padded universal block (n_uni, n_uni) in package orbital order (DESIGN.md §3).

Package order equals e3nn's basis for vectors fed as (y, z, x) (`foundation.rotations`), so
e3nn's 3j symbols act on package-order blocks directly. This module is the only place in the
package that knows about Wigner-3j.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from e3nn import o3
from torch import nn

from foundation.basis import UniversalBasis
from foundation.rotations import double_precision


def pair_irreps(l1: int, l2: int) -> o3.Irreps:
    """Irreps of a (l1, l2) orbital-pair block: l = |l1−l2| … l1+l2, parity (−1)^(l1+l2)."""
    p = (-1) ** (l1 + l2)
    return o3.Irreps([(1, (l, p)) for l in range(abs(l1 - l2), l1 + l2 + 1)])


class BlockIrreps(nn.Module):
    """Orthogonal map between irreps features and padded universal blocks.

    irreps_in (of `to_blocks`) = irreps_out (of `from_blocks`) = ``self.irreps``, whose
    dimension is n_uni²; ``to_blocks(from_blocks(B)) == B`` for every (n_uni, n_uni) B.
    Rotating the features by D_irreps(Q) rotates the block by D_uni(Q) B D_uni(Q)ᵀ.
    """

    def __init__(self, universal: UniversalBasis):
        super().__init__()
        self.universal = universal
        shells = universal.shells
        offsets = universal.shell_offsets
        n = universal.n_orb
        # One (l, p) irrep per (shell a, shell b, l); remember where each lands in the block.
        pieces: list[tuple[tuple[int, int], np.ndarray]] = []  # ((l, p), (2l+1, n*n) rows)
        for a, l1 in enumerate(shells):
            for b, l2 in enumerate(shells):
                rows = np.arange(offsets[a], offsets[a] + 2 * l1 + 1)
                cols = np.arange(offsets[b], offsets[b] + 2 * l2 + 1)
                flat = (rows[:, None] * n + cols[None, :]).reshape(-1)
                for mul_ir in pair_irreps(l1, l2):
                    l = mul_ir.ir.l
                    with double_precision():
                        c = o3.wigner_3j(l1, l2, l, dtype=torch.float64).numpy()
                    c = math.sqrt(2 * l + 1) * c.reshape(-1, 2 * l + 1).T  # orthonormal rows
                    u = np.zeros((2 * l + 1, n * n))
                    u[:, flat] = c
                    pieces.append(((l, mul_ir.ir.p), u))
        # Group by irrep type (sorted like o3.Irreps.sort), keeping pair order within a type.
        order = sorted(range(len(pieces)), key=lambda k: (pieces[k][0][0], -pieces[k][0][1]))
        ir_types = [pieces[k][0] for k in order]
        self.irreps = o3.Irreps([(1, ir) for ir in ir_types]).simplify()
        matrix = np.concatenate([pieces[k][1] for k in order], axis=0)
        assert matrix.shape == (n * n, n * n)
        self.register_buffer("change_of_basis", torch.as_tensor(matrix), persistent=False)
        self.register_buffer(
            "element_mask", torch.as_tensor(universal.mask_table()), persistent=False
        )

    @property
    def n_orb(self) -> int:
        return self.universal.n_orb

    def to_blocks(self, features: torch.Tensor) -> torch.Tensor:
        """(..., irreps.dim) → (..., n_uni, n_uni) padded blocks in package order."""
        n = self.n_orb
        out = features @ self.change_of_basis.to(features.dtype)
        return out.reshape(*features.shape[:-1], n, n)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """(..., n_uni, n_uni) → (..., irreps.dim); inverse of `to_blocks`."""
        flat = blocks.reshape(*blocks.shape[:-2], self.n_orb**2)
        return flat @ self.change_of_basis.to(blocks.dtype).T

    def pair_mask(self, numbers_i: torch.Tensor, numbers_j: torch.Tensor) -> torch.Tensor:
        """(E, n_uni, n_uni) bool: real orbitals of the atoms on each side of each edge."""
        m = self.element_mask
        return m[numbers_i][:, :, None] & m[numbers_j][:, None, :]

    def extra_repr(self) -> str:
        return f"{self.universal}, irreps={self.irreps}"


__all__ = ["BlockIrreps", "pair_irreps"]
