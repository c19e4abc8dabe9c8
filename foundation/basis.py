"""Orbital basis registry: which shells (angular momenta l) each element carries.

Why a registry: one universal model serves every element it was trained on, so every
structure's orbitals must map into one *universal padded basis* with a mask per element.

Conventions (see DESIGN.md §3):

* An element's shells are kept in registry order (for PySCF bases: PySCF's own AO order,
  one shell per contraction).
* Inside a shell the package order is the standard real spherical harmonics
  m = -l … l with z as polar axis and no Condon–Shortley phase
  (p: y, z, x; d: xy, yz, 3z²-r², xz, x²-y²).
* The universal basis holds, for each l, the maximum number of shells of that l over all
  registered elements, ordered by l and then by shell index. An element's k-th shell of
  angular momentum l occupies the k-th universal slot of that l.
* Each data source orders (and signs) the m components in its own way; `SOURCE_CONVENTIONS`
  holds one table per source, and `to_package_order` / `from_package_order` convert blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

L_LETTERS = "spdfgh"


def _symbol(element: str | int) -> str:
    if isinstance(element, (int, np.integer)):
        if not 0 < int(element) < len(chemical_symbols):
            raise ValueError(f"Unknown atomic number {element}.")
        return chemical_symbols[int(element)]
    if element not in atomic_numbers:
        raise ValueError(f"Unknown element symbol {element!r}.")
    return element


def parse_shell_spec(spec: str) -> tuple[int, ...]:
    """Parse a compact shell spec such as ``"2s2p1d"`` into shell angular momenta.

    ``"2s2p1d"`` → (0, 0, 1, 1, 2): shells are ordered by l, then by count.
    """
    tokens = re.findall(r"(\d*)([spdfgh])", spec.strip().lower())
    if not tokens or "".join(n + letter for n, letter in tokens) != spec.strip().lower():
        raise ValueError(
            f"Cannot parse shell spec {spec!r}: expected counts and letters such as '2s2p1d'."
        )
    shells: list[int] = []
    for count, letter in tokens:
        shells += [L_LETTERS.index(letter)] * (int(count) if count else 1)
    return tuple(shells)


def shell_spec(shells: Iterable[int]) -> str:
    """Inverse of :func:`parse_shell_spec` for l-sorted shells (e.g. (0, 0, 1) → '2s1p')."""
    shells = tuple(shells)
    return "".join(f"{shells.count(l)}{L_LETTERS[l]}" for l in sorted(set(shells)))


@dataclass(frozen=True)
class BasisSet:
    """Element → shells registry for one named basis (e.g. ``gth-szv-molopt-sr``).

    ``shells[symbol]`` is the tuple of angular momenta of that element's shells in
    registry order. Serialises to and from plain JSON (`to_dict` / `from_dict`).
    """

    name: str
    shells: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        clean = {}
        for el, ls in self.shells.items():
            sym = _symbol(el)
            ls = tuple(int(l) for l in ls)
            if not ls or min(ls) < 0 or max(ls) >= len(L_LETTERS):
                raise ValueError(f"Basis {self.name!r}: element {sym} has invalid shells {ls}.")
            clean[sym] = ls
        object.__setattr__(
            self, "shells", dict(sorted(clean.items(), key=lambda kv: atomic_numbers[kv[0]]))
        )

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_spec(cls, spec: Mapping[str, str], name: str = "custom") -> BasisSet:
        """From a compact spec such as ``{"Si": "2s2p1d", "O": "1s1p"}``."""
        return cls(name=name, shells={el: parse_shell_spec(s) for el, s in spec.items()})

    @classmethod
    def from_pyscf(cls, name: str, elements: Iterable[str | int]) -> BasisSet:
        """Shells of a PySCF basis (e.g. ``gth-szv``) for the given elements, in PySCF AO order.

        A contracted PySCF shell with ``nctr`` contractions counts as ``nctr`` shells.
        """
        from pyscf import gto

        shells = {}
        for el in elements:
            sym = _symbol(el)
            try:
                bas = gto.basis.load(name, sym)
            except Exception as exc:  # PySCF raises several types for a missing basis
                raise ValueError(
                    f"PySCF basis {name!r} has no entry for element {sym}: {exc}. "
                    "Choose a basis that covers every element of the dataset."
                ) from exc
            mol = gto.Mole(atom=f"{sym} 0 0 0", basis={sym: bas}, spin=None)
            mol.spin = mol.nelectron % 2
            mol.build(verbose=0)
            ls: list[int] = []
            for ib in range(mol.nbas):
                ls += [int(mol.bas_angular(ib))] * int(mol.bas_nctr(ib))
            shells[sym] = tuple(ls)
        return cls(name=name, shells=shells)

    def to_dict(self) -> dict:
        return {"name": self.name, "shells": {el: list(ls) for el, ls in self.shells.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> BasisSet:
        return cls(name=str(d["name"]), shells={el: tuple(ls) for el, ls in d["shells"].items()})

    # ----------------------------------------------------------------- queries
    @property
    def elements(self) -> list[str]:
        return list(self.shells)

    @property
    def atomic_numbers(self) -> list[int]:
        return [atomic_numbers[el] for el in self.shells]

    def shells_of(self, element: str | int) -> tuple[int, ...]:
        sym = _symbol(element)
        if sym not in self.shells:
            raise KeyError(
                f"Element {sym} is not in basis {self.name!r} (it knows {', '.join(self.shells)})."
            )
        return self.shells[sym]

    def n_orb(self, element: str | int) -> int:
        return sum(2 * l + 1 for l in self.shells_of(element))

    def n_orb_array(self, numbers: Iterable[int]) -> np.ndarray:
        """Orbital count of each atom (atomic numbers in, int64 array out)."""
        return np.array([self.n_orb(int(z)) for z in numbers], dtype=np.int64)

    def subset(self, elements: Iterable[str | int]) -> BasisSet:
        return BasisSet(self.name, {(s := _symbol(e)): self.shells_of(s) for e in elements})

    def merged(self, other: BasisSet) -> BasisSet:
        """Union of two registries; an element present in both must have the same shells."""
        shells = dict(self.shells)
        for el, ls in other.shells.items():
            if el in shells and shells[el] != ls:
                raise ValueError(
                    f"Element {el} has shells {shell_spec(shells[el])} in basis {self.name!r} "
                    f"but {shell_spec(ls)} in {other.name!r}; one model needs one basis per element."
                )
            shells[el] = ls
        name = self.name if self.name == other.name else f"{self.name}+{other.name}"
        return BasisSet(name, shells)

    @cached_property
    def universal(self) -> UniversalBasis:
        return UniversalBasis(self)


class UniversalBasis:
    """The padded basis shared by all elements of a registry, with per-element index maps.

    ``shells`` lists the universal shells (l-sorted); ``orbital_index(Z)`` gives, for each
    orbital of element Z in registry order, its position in the universal basis; ``mask(Z)``
    is the boolean occupancy of the universal basis for element Z.
    """

    def __init__(self, basis: BasisSet):
        self.basis = basis
        max_count: dict[int, int] = {}
        for ls in basis.shells.values():
            for l in set(ls):
                max_count[l] = max(max_count.get(l, 0), ls.count(l))
        self.shells: tuple[int, ...] = tuple(
            l for l in sorted(max_count) for _ in range(max_count[l])
        )
        self.shell_offsets = np.concatenate([[0], np.cumsum([2 * l + 1 for l in self.shells])])
        self.n_orb = int(self.shell_offsets[-1])
        self._index: dict[int, np.ndarray] = {}
        for el, ls in basis.shells.items():
            seen: dict[int, int] = {}
            idx: list[int] = []
            for l in ls:
                k = seen.get(l, 0)
                seen[l] = k + 1
                u = self._universal_shell(l, k)
                idx += range(self.shell_offsets[u], self.shell_offsets[u] + 2 * l + 1)
            self._index[atomic_numbers[el]] = np.asarray(idx, dtype=np.int64)

    def _universal_shell(self, l: int, k: int) -> int:
        return [i for i, lu in enumerate(self.shells) if lu == l][k]

    def orbital_index(self, z: int) -> np.ndarray:
        if int(z) not in self._index:
            raise KeyError(
                f"Element {_symbol(int(z))} is not in basis {self.basis.name!r} "
                f"(it knows {', '.join(self.basis.elements)})."
            )
        return self._index[int(z)]

    def mask(self, z: int) -> np.ndarray:
        m = np.zeros(self.n_orb, dtype=bool)
        m[self.orbital_index(z)] = True
        return m

    def mask_table(self, max_z: int = 119) -> np.ndarray:
        """(max_z, n_orb) boolean table: row Z is element Z's mask (all False if unknown)."""
        table = np.zeros((max_z, self.n_orb), dtype=bool)
        for z, idx in self._index.items():
            table[z, idx] = True
        return table

    def __repr__(self) -> str:
        return f"UniversalBasis({shell_spec(self.shells)}, n_orb={self.n_orb})"


# --------------------------------------------------------------------------- conventions
@dataclass(frozen=True)
class OrbitalConvention:
    """How one data source orders and signs the m components of each l.

    ``perm[l][k]`` is the index, in the *source* order, of the package's k-th component
    (package order: m = -l … l); ``sign[l][k]`` multiplies it. So for a source vector v,
    the package vector is ``sign[l] * v[perm[l]]``.
    """

    name: str
    perm: Mapping[int, tuple[int, ...]]
    sign: Mapping[int, tuple[int, ...]]
    reference: str

    def shell_matrix(self, l: int) -> np.ndarray:
        """U with package_vector = U @ source_vector for one shell of angular momentum l."""
        n = 2 * l + 1
        perm = self.perm.get(l, tuple(range(n)))
        sign = self.sign.get(l, (1,) * n)
        u = np.zeros((n, n))
        u[np.arange(n), perm] = sign
        return u

    def transform(self, shells: Iterable[int]) -> np.ndarray:
        """Block-diagonal U (package ← source) for an element with the given shells."""
        mats = [self.shell_matrix(l) for l in shells]
        n = sum(m.shape[0] for m in mats)
        u = np.zeros((n, n))
        o = 0
        for m in mats:
            u[o : o + m.shape[0], o : o + m.shape[0]] = m
            o += m.shape[0]
        return u


SOURCE_CONVENTIONS: dict[str, OrbitalConvention] = {
    # PySCF/libcint real spherical GTOs: p is special-cased as (x, y, z); l ≥ 2 are already
    # m = -l … l (as DeePTB's PYSCF_orbital_number_m: p = m 1, -1, 0; d = -2 … 2).
    # Checked in tests/test_pyscf_generator.py by the rotated-copy test.
    "pyscf": OrbitalConvention(
        name="pyscf",
        perm={1: (1, 2, 0)},
        sign={},
        reference="libcint real solid harmonics (PySCF docs: 'AO ordering'); p = px, py, pz",
    ),
    # OpenMX orders p as (x, y, z), d as (3z²-r², x²-y², xy, xz, yz) and f as
    # (z³, xz², yz², z(x²-y²), xyz, x(x²-3y²), y(3x²-y²)). Verified: identical to DeepH-pack's
    # Us_openmx2wiki (deeph/rotate.py) and DeePTB's OPENMX2DeePTB (dptb/utils/constants.py).
    "openmx": OrbitalConvention(
        name="openmx",
        perm={1: (1, 2, 0), 2: (2, 4, 0, 3, 1), 3: (6, 4, 2, 0, 1, 3, 5)},
        sign={},
        reference="OpenMX manual, orbital order of the Hamiltonian output; DeepH-pack rotate.py",
    ),
    # ABACUS orders each l as m = 0, +1, -1, +2, -2, … and carries the Condon–Shortley phase
    # (-1)^m. Verified: DeePTB's ABACUS2DeePTB (dptb/utils/constants.py) is exactly these
    # permutations with rows (-1)^m negated, and DeepH-pack's Us_abacus2deeph
    # (deeph/preprocess/abacus_get_data.py) composed with Us_openmx2wiki gives the same table.
    "abacus": OrbitalConvention(
        name="abacus",
        perm={1: (2, 0, 1), 2: (4, 2, 0, 1, 3), 3: (6, 4, 2, 0, 1, 3, 5)},
        sign={1: (-1, 1, -1), 2: (1, -1, 1, -1, 1), 3: (-1, 1, -1, 1, -1, 1, -1)},
        reference="ABACUS numerical-orbital order m = 0, 1, -1, 2, -2, … with (-1)^m; "
        "DeePTB dptb/utils/constants.py ABACUS2DeePTB",
    ),
    # DeePTB's own block order (what its preprocessed hamiltonians.h5 / overlaps.h5 hold after
    # dptb/data/interfaces/abacus.py applied ABACUS2DeePTB): m = -l … l, no (-1)^m phase,
    # p = (py, pz, px), d = (dxy, dyz, dz2, dxz, dx2-y2) (DeePTB_orbital_number_m,
    # Orbital_Order_SK in dptb/utils/constants.py) — the package order.
    "deeptb": OrbitalConvention(
        name="deeptb",
        perm={},
        sign={},
        reference="DeePTB dptb/utils/constants.py DeePTB_orbital_number_m (m = -l … l)",
    ),
    "package": OrbitalConvention(
        name="package", perm={}, sign={}, reference="this package (DESIGN.md §3)"
    ),
}


def convention(name: str) -> OrbitalConvention:
    if name not in SOURCE_CONVENTIONS:
        raise KeyError(
            f"Unknown orbital convention {name!r}; known: {', '.join(SOURCE_CONVENTIONS)}."
        )
    return SOURCE_CONVENTIONS[name]


__all__ = [
    "BasisSet",
    "UniversalBasis",
    "OrbitalConvention",
    "SOURCE_CONVENTIONS",
    "convention",
    "parse_shell_spec",
    "shell_spec",
]
