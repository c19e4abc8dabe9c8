"""Reproducible sets of small perturbed crystals for the shipped PySCF datasets.

A dataset is a list of *prototypes* — (formula, kind, a (Å), c (Å) or None, metallic,
variants) — and each variant is the prototype with a random symmetric strain (every
component uniform in ±``strain``) and Gaussian atomic displacements (σ uniform in
``rattle_A`` per structure). Each structure draws from its own generator seeded by (seed,
sha256 of its key), so a structure does not change when variants or prototypes are added
elsewhere, and the whole list is reproducible exactly from the seed.

Kinds: ``diamond``, ``zincblende``, ``rocksalt``, ``wurtzite`` (ASE's ``bulk``) and
``fcc2`` (the fcc primitive cell doubled along a₃: 2 atoms, so elemental metals get
off-site blocks inside the cell).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.build import bulk

from foundation.data.dft.pyscf import PER_STRUCTURE_KWARGS

Prototype = tuple[str, str, float, "float | None", bool, int]
"""(formula, kind, lattice a (Å), c (Å) or None, metallic in PBE, number of variants)."""


def prototype_cell(formula: str, kind: str, a: float, c: float | None) -> Atoms:
    """The unperturbed cell of a prototype (Å)."""
    if kind == "fcc2":
        return bulk(formula, "fcc", a=a) * (1, 1, 2)
    if kind == "wurtzite":
        return bulk(formula, "wurtzite", a=a, c=c)
    return bulk(formula, kind, a=a)


def perturbed_structures(
    prototypes: Sequence[Prototype],
    seed: int,
    *,
    strain: float = 0.03,
    rattle_A: tuple[float, float] = (0.05, 0.10),
    smearing_eV: float = 0.1,
) -> list[tuple[str, Atoms]]:
    """All (key, atoms), key ``<formula>-<kind>-<variant:02d>``, deterministic in ``seed``.

    Metallic prototypes get ``atoms.info[PER_STRUCTURE_KWARGS] = {"smearing_eV": ...}``
    (Fermi smearing for the SCF). Ordered variant-major (variant 0 of every prototype
    first), so the first records of a generation run time every kind.
    """
    drawn: dict[tuple[int, int], tuple[str, Atoms]] = {}
    for p, (formula, kind, a, c, metal, n_var) in enumerate(prototypes):
        for v in range(n_var):
            key = f"{formula}-{kind}-{v:02d}"
            digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
            rng = np.random.default_rng([seed, digest])
            atoms = prototype_cell(formula, kind, a, c)
            eps = rng.uniform(-strain, strain, (3, 3))
            atoms.set_cell(atoms.cell.array @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
            sigma = rng.uniform(*rattle_A)
            atoms.positions = atoms.positions + rng.normal(0.0, sigma, atoms.positions.shape)
            atoms.wrap()
            if metal:
                atoms.info[PER_STRUCTURE_KWARGS] = {"smearing_eV": smearing_eV}
            atoms.info["rattle_sigma_A"] = float(sigma)
            drawn[(v, p)] = (key, atoms)
    return [drawn[k] for k in sorted(drawn)]


__all__ = ["Prototype", "perturbed_structures", "prototype_cell"]
