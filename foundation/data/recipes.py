"""Structure recipes for the broad pretraining set ``pbe_main``: one seeded function per family.

Families (the first part of every key, ``<family>-<name>-<variant:02d>``):

* ``bulk``        prototype cells of 2–6 atoms — elemental fcc/bcc/hcp/diamond (2-atom cells,
                  so every element has off-site blocks inside the cell), binary rocksalt,
                  zincblende, wurtzite, CsCl, fluorite, rutile and cubic perovskite ABO3/ABX3;
* ``supercell``   8–32-atom supercells of the bulk prototypes with random substitutional
                  alloying, a vacancy, an interstitial, or only a thermal rattle;
* ``slab``        surfaces (pbc false along z, ≥ `MIN_VACUUM_A` of vacuum between images);
* ``sheet``       2D materials (graphene, h-BN, MX2 2H/1T), some as 2×2 supercells with a
                  substitution or a vacancy; pbc false along z like slabs;
* ``molecular``   molecular crystals (small molecules on a simple lattice, 3-D periodic).

Every structure gets a random symmetric strain (each component uniform in ±``strain``,
in-plane only for slabs and sheets) and Gaussian displacements (σ uniform in ``rattle_A``).
Each draws from its own generator seeded by (seed, sha256 of its key), so adding a structure
never changes another and the whole list is reproducible from the seed. The compounds are
chosen non-magnetic in PBE (closed-shell restricted KS is all the generator does);
structures that may be metallic (metals, defects, alloys, surfaces, odd electron counts) get
Fermi smearing through ``atoms.info[PER_STRUCTURE_KWARGS]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.build import bulk, graphene, mx2, surface
from ase.data import atomic_numbers, covalent_radii
from ase.spacegroup import crystal

from foundation.data.dft.pyscf import PER_STRUCTURE_KWARGS

MIN_VACUUM_A = 10.0
"""Smallest vacuum gap (Å) between periodic images of a slab or sheet along z."""
FAMILIES = ("bulk", "supercell", "slab", "sheet", "molecular")


@dataclass(frozen=True)
class Bulk:
    """A bulk prototype: ``formula`` in the kind's site order, lattice a (and c) in Å."""

    formula: str
    kind: str
    a: float
    c: float | None = None
    metal: bool = False
    u: float | None = None  # internal coordinate (rutile O at (u, u, 0))


# Experimental lattice constants (Å). A few are hypothetical or high-pressure polymorphs (fcc
# Bi; bcc Bi is Bi-V), kept for chemical coverage, not thermodynamics.
BULK: tuple[Bulk, ...] = (
    # elemental metals and semiconductors
    *(Bulk(s, "fcc", a, metal=True) for s, a in [
        ("Al", 4.046), ("Cu", 3.615), ("Ag", 4.086), ("Au", 4.078), ("Pd", 3.891),
        ("Pt", 3.924), ("Pb", 4.950), ("Ca", 5.588), ("Sr", 6.084), ("Bi", 5.00)]),
    *(Bulk(s, "bcc", a, metal=True) for s, a in [
        ("Li", 3.510), ("Na", 4.225), ("K", 5.225), ("V", 3.030), ("Nb", 3.301),
        ("Mo", 3.147), ("Ta", 3.303), ("W", 3.165), ("Ba", 5.028), ("Cs", 6.141),
        ("Bi", 3.800)]),
    *(Bulk(s, "hcp", a, c, metal=True) for s, a, c in [
        ("Be", 2.286, 3.584), ("Mg", 3.209, 5.211), ("Ti", 2.951, 4.686), ("Zr", 3.232, 5.147),
        ("Zn", 2.665, 4.947), ("Cd", 2.979, 5.619), ("Sc", 3.309, 5.273), ("Y", 3.647, 5.731),
        ("Hf", 3.195, 5.051), ("Tl", 3.457, 5.525)]),
    Bulk("C", "diamond", 3.567), Bulk("Si", "diamond", 5.431),
    Bulk("Ge", "diamond", 5.658, metal=True), Bulk("Sn", "diamond", 6.489, metal=True),
    # binary compounds
    *(Bulk(f, "rocksalt", a, metal=m) for f, a, m in [
        ("LiF", 4.027, False), ("LiCl", 5.130, False), ("LiH", 4.083, False),
        ("NaF", 4.634, False), ("NaCl", 5.640, False), ("NaH", 4.880, False),
        ("KCl", 6.293, False), ("KBr", 6.600, False), ("KI", 7.066, False),
        ("MgO", 4.212, False), ("MgS", 5.203, False), ("CaO", 4.811, False),
        ("CaS", 5.689, False), ("SrO", 5.160, False), ("BaO", 5.523, False),
        ("ScN", 4.501, False), ("YN", 4.877, False), ("CdO", 4.695, False),
        ("TiC", 4.328, True), ("TiN", 4.242, True), ("ZrC", 4.698, True), ("ZrN", 4.578, True),
        ("NbC", 4.470, True), ("HfC", 4.638, True), ("TaC", 4.456, True),
        ("AgCl", 5.550, False), ("PbS", 5.936, True), ("SnTe", 6.320, True),
        ("PbTe", 6.462, True), ("GeTe", 6.010, True), ("LiBr", 5.501, False),
        ("NaBr", 5.973, False), ("NaI", 6.473, False), ("KF", 5.347, False),
        ("MgSe", 5.460, False), ("CaSe", 5.916, False), ("SrS", 6.020, False),
        ("BaS", 6.389, False), ("BaSe", 6.600, False), ("SrSe", 6.243, False)]),
    *(Bulk(f, "zincblende", a, metal=m) for f, a, m in [
        ("BN", 3.615, False), ("BP", 4.538, False), ("SiC", 4.360, False),
        ("AlP", 5.463, False), ("AlAs", 5.661, False), ("AlSb", 6.136, False),
        ("GaP", 5.451, False), ("GaAs", 5.653, False), ("GaSb", 6.096, True),
        ("InP", 5.869, False), ("InAs", 6.058, True), ("InSb", 6.479, True),
        ("ZnS", 5.409, False), ("ZnSe", 5.668, False), ("ZnTe", 6.101, False),
        ("CdTe", 6.481, False), ("CuCl", 5.420, False), ("CuBr", 5.690, False),
        ("CuI", 6.054, False), ("AgI", 6.499, False), ("BeS", 4.865, False)]),
    *(Bulk(f, "wurtzite", a, c) for f, a, c in [
        ("GaN", 3.189, 5.185), ("AlN", 3.112, 4.982), ("ZnO", 3.250, 5.207),
        ("InN", 3.545, 5.703), ("CdS", 4.137, 6.716), ("BeO", 2.698, 4.380)]),
    *(Bulk(f, "cesiumchloride", a, metal=m) for f, a, m in [
        ("CsCl", 4.123, False), ("CsBr", 4.296, False), ("CsI", 4.567, False),
        ("TlCl", 3.842, False), ("TlBr", 3.986, False), ("CuZn", 2.951, True),
        ("AgMg", 3.280, True), ("AuCd", 3.320, True)]),
    *(Bulk(f, "fluorite", a, metal=m) for f, a, m in [
        ("CaF2", 5.463, False), ("SrF2", 5.800, False), ("BaF2", 6.200, False),
        ("CdF2", 5.388, False), ("PbF2", 5.940, False), ("ZrO2", 5.070, False),
        ("HfO2", 5.080, False), ("Mg2Si", 6.351, False), ("Li2O", 4.611, False),
        ("Na2O", 5.550, False), ("K2O", 6.436, False), ("Li2S", 5.708, False),
        ("Na2S", 6.540, False), ("PtAl2", 5.910, True)]),
    *(Bulk(f, "rutile", a, c, u=u) for f, a, c, u in [
        ("TiO2", 4.594, 2.959, 0.305), ("SnO2", 4.737, 3.186, 0.307),
        ("GeO2", 4.395, 2.859, 0.307), ("SiO2", 4.180, 2.666, 0.306),
        ("MgF2", 4.621, 3.052, 0.303), ("ZnF2", 4.704, 3.134, 0.303),
        ("PbO2", 4.959, 3.387, 0.307)]),
    *(Bulk(f, "perovskite", a) for f, a in [
        ("SrTiO3", 3.905), ("BaTiO3", 4.000), ("CaTiO3", 3.840), ("PbTiO3", 3.970),
        ("KNbO3", 4.016), ("NaNbO3", 3.950), ("KTaO3", 3.989), ("BaZrO3", 4.193),
        ("SrZrO3", 4.101), ("BaHfO3", 4.171), ("KMgF3", 3.989), ("CsPbBr3", 5.874),
        ("CsPbI3", 6.289), ("CsSnI3", 6.219)]),
)  # fmt: skip

ALLOY_PARTNERS = {
    "Si": "Ge", "Ge": "Si", "Sn": "Pb", "Al": "Ga", "Ga": "In", "In": "Ga", "P": "As",
    "As": "Sb", "Sb": "Bi", "S": "Se", "Se": "Te", "Te": "Se", "O": "S", "N": "P", "C": "Si",
    "F": "Cl", "Cl": "Br", "Br": "I", "I": "Br", "Li": "Na", "Na": "K", "K": "Na", "Cs": "K",
    "Mg": "Zn", "Ca": "Sr", "Sr": "Ba", "Ba": "Sr", "Zn": "Cd", "Cd": "Zn", "Be": "Mg",
    "Ti": "Zr", "Zr": "Hf", "Hf": "Ti", "Nb": "Ta", "Ta": "Nb", "Mo": "W", "W": "Mo",
    "Cu": "Ag", "Ag": "Au", "Au": "Ag", "Pd": "Pt", "Pt": "Pd", "Sc": "Y", "Y": "Sc",
    "V": "Nb", "Pb": "Sn", "Tl": "In", "Bi": "Sb", "H": "Li", "B": "Al",
}  # fmt: skip
"""Isovalent (or nearly) substitution partner of each element, for alloyed supercells."""

# (name, repeats of the conventional cell, kinds of defect) of supercell parents: 8–12 atoms
# before the defect. Record size grows with atoms × neighbours within 9 Å × orbitals², so the
# d-metal parents (9 orbitals per atom) get one defect kind and the set stays < 150 MB.
SUPERCELL_PARENTS: tuple[tuple[str, tuple[int, int, int], int], ...] = (
    ("Si-diamond", (1, 1, 1), 2), ("Ge-diamond", (1, 1, 1), 2), ("C-diamond", (1, 1, 1), 2),
    ("Al-fcc", (2, 1, 1), 2), ("Cu-fcc", (2, 1, 1), 1), ("Ag-fcc", (2, 1, 1), 1), ("Pd-fcc", (2, 1, 1), 1),
    ("Pt-fcc", (2, 1, 1), 1), ("Au-fcc", (2, 1, 1), 1), ("Li-bcc", (2, 2, 1), 2), ("Mo-bcc", (2, 2, 1), 1),
    ("W-bcc", (2, 2, 1), 1), ("Nb-bcc", (2, 2, 1), 1), ("Mg-hcp", (2, 2, 1), 2), ("Ti-hcp", (2, 2, 1), 1),
    ("Zr-hcp", (2, 2, 1), 1), ("Zn-hcp", (2, 2, 1), 1),
    ("GaAs-zincblende", (1, 1, 1), 2), ("InP-zincblende", (1, 1, 1), 2), ("AlP-zincblende", (1, 1, 1), 2),
    ("ZnS-zincblende", (1, 1, 1), 2), ("CdTe-zincblende", (1, 1, 1), 2), ("SiC-zincblende", (1, 1, 1), 2),
    ("BN-zincblende", (1, 1, 1), 2), ("CuI-zincblende", (1, 1, 1), 2),
    ("NaCl-rocksalt", (1, 1, 1), 2), ("MgO-rocksalt", (1, 1, 1), 2), ("LiF-rocksalt", (1, 1, 1), 2),
    ("KCl-rocksalt", (1, 1, 1), 2), ("PbTe-rocksalt", (1, 1, 1), 2), ("TiN-rocksalt", (1, 1, 1), 2),
    ("CaO-rocksalt", (1, 1, 1), 2), ("AgCl-rocksalt", (1, 1, 1), 2),
    ("GaN-wurtzite", (2, 1, 1), 2), ("ZnO-wurtzite", (2, 1, 1), 2), ("AlN-wurtzite", (2, 1, 1), 2),
    ("CaF2-fluorite", (1, 1, 1), 2), ("ZrO2-fluorite", (1, 1, 1), 2), ("Li2O-fluorite", (1, 1, 1), 2),
    ("TiO2-rutile", (1, 1, 2), 2), ("SnO2-rutile", (1, 1, 2), 2), ("MgF2-rutile", (1, 1, 2), 2),
    ("SrTiO3-perovskite", (2, 1, 1), 2), ("BaTiO3-perovskite", (2, 1, 1), 2),
    ("KNbO3-perovskite", (2, 1, 1), 2), ("CsPbBr3-perovskite", (2, 1, 1), 2),
    ("CsCl-cesiumchloride", (2, 2, 1), 2), ("CuZn-cesiumchloride", (2, 2, 1), 2),
    ("AlAs-zincblende", (1, 1, 1), 2), ("BP-zincblende", (1, 1, 1), 2),
    ("AlSb-zincblende", (1, 1, 1), 2),
    ("LiCl-rocksalt", (1, 1, 1), 2), ("MgS-rocksalt", (1, 1, 1), 2),
    ("NaF-rocksalt", (1, 1, 1), 2), ("Li2S-fluorite", (1, 1, 1), 2),
    ("Mg2Si-fluorite", (1, 1, 1), 2), ("SiO2-rutile", (1, 1, 2), 2),
    ("KMgF3-perovskite", (2, 1, 1), 2), ("BeO-wurtzite", (2, 1, 1), 2),
)  # fmt: skip
DEFECTS = ("alloy", "vacancy", "interstitial", "rattle")

# (name, builder kind, symbols, a (Å), metal): slabs from bulk (hkl, layers) or elemental builders
SLABS: tuple[tuple[str, tuple[int, int, int], int], ...] = (
    ("Al-fcc", (1, 1, 1), 3), ("Cu-fcc", (1, 1, 1), 3), ("Ag-fcc", (1, 1, 1), 3),
    ("Au-fcc", (1, 1, 1), 3), ("Pd-fcc", (1, 1, 1), 3), ("Pt-fcc", (1, 1, 1), 3),
    ("Cu-fcc", (1, 0, 0), 3), ("Al-fcc", (1, 0, 0), 3), ("Pb-fcc", (1, 1, 1), 3),
    ("Mo-bcc", (1, 1, 0), 4), ("W-bcc", (1, 1, 0), 4), ("Nb-bcc", (1, 1, 0), 4),
    ("Li-bcc", (1, 0, 0), 5), ("Na-bcc", (1, 1, 0), 4),
    ("Mg-hcp", (0, 0, 1), 4), ("Ti-hcp", (0, 0, 1), 4), ("Zn-hcp", (0, 0, 1), 4),
    ("Zr-hcp", (0, 0, 1), 4),
    ("Si-diamond", (1, 1, 1), 4), ("Ge-diamond", (1, 1, 1), 4), ("C-diamond", (1, 1, 1), 3),
    ("MgO-rocksalt", (1, 0, 0), 3), ("NaCl-rocksalt", (1, 0, 0), 3),
    ("LiF-rocksalt", (1, 0, 0), 3), ("PbS-rocksalt", (1, 0, 0), 3),
    ("KCl-rocksalt", (1, 0, 0), 3), ("CaO-rocksalt", (1, 0, 0), 3),
    ("GaAs-zincblende", (1, 1, 0), 3),
    ("ZnS-zincblende", (1, 1, 0), 3), ("InP-zincblende", (1, 1, 0), 3),
    ("TiO2-rutile", (1, 1, 0), 2), ("SrTiO3-perovskite", (1, 0, 0), 3),
    ("ZnO-wurtzite", (1, 0, 0), 2), ("GaN-wurtzite", (1, 0, 0), 2),
)  # fmt: skip
"""(bulk name, Miller indices of the conventional cell, layers of it)."""

# (name, formula, kind, a (Å), thickness (Å), metal)
SHEETS: tuple[tuple[str, str, str, float, float, bool], ...] = (
    ("graphene", "C2", "graphene", 2.46, 0.0, True),
    ("hBN", "BN", "graphene", 2.50, 0.0, False),
    ("MoS2", "MoS2", "2H", 3.16, 3.17, False), ("WS2", "WS2", "2H", 3.15, 3.14, False),
    ("MoSe2", "MoSe2", "2H", 3.29, 3.34, False), ("WSe2", "WSe2", "2H", 3.28, 3.36, False),
    ("MoTe2", "MoTe2", "2H", 3.52, 3.60, False), ("ZrS2", "ZrS2", "1T", 3.66, 2.90, False),
    ("HfS2", "HfS2", "1T", 3.63, 2.90, False), ("SnS2", "SnS2", "1T", 3.65, 2.95, False),
    ("PtSe2", "PtSe2", "1T", 3.73, 2.53, False), ("TiS2", "TiS2", "1T", 3.41, 2.85, True),
)  # fmt: skip

# (name, [(molecule formula, position (frac))], cell lengths (Å)): orthorhombic molecular crystals
MOLECULAR: tuple[tuple[str, tuple[str, ...], tuple[float, float, float]], ...] = (
    ("H2O", ("H2O", "H2O"), (4.6, 4.6, 7.2)), ("NH3", ("NH3", "NH3"), (5.0, 5.0, 7.0)),
    ("CH4", ("CH4",), (4.2, 4.2, 4.2)), ("CO2", ("CO2", "CO2"), (5.6, 5.6, 5.6)),
    ("N2", ("N2", "N2"), (4.0, 4.0, 5.7)), ("HF", ("HF", "HF"), (3.5, 4.4, 5.4)),
    ("Cl2", ("Cl2", "Cl2"), (4.5, 6.2, 8.2)), ("PH3", ("PH3", "PH3"), (5.2, 5.2, 7.4)),
    ("C2H2", ("C2H2", "C2H2"), (4.9, 5.2, 6.0)), ("HCl", ("HCl", "HCl"), (4.3, 4.3, 6.2)),
    ("SiH4", ("SiH4",), (4.9, 4.9, 4.9)), ("H2S", ("SH2", "SH2"), (4.6, 4.6, 7.4)),
)  # fmt: skip


# ----------------------------------------------------------------------------- helpers
def _has_d_shell(formula: str, basis: str = "gth-szv-molopt-sr") -> bool:
    """Whether an element of ``formula`` has a d shell in ``basis``."""
    from pyscf.gto.basis import load

    return any(shell[0] == 2 for el in _split_formula(formula) for shell in load(basis, el))


def rng_for(seed: int, key: str) -> np.random.Generator:
    """The generator of one structure: seeded by (seed, first 8 bytes of sha256(key))."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def bulk_by_name(name: str) -> Bulk:
    """The `BULK` prototype ``<formula>-<kind>``."""
    for b in BULK:
        if f"{b.formula}-{b.kind}" == name:
            return b
    raise KeyError(f"no bulk prototype {name!r}; names are <formula>-<kind> of BULK.")


def _split_formula(formula: str) -> list[str]:
    """Element symbols of a formula in order of appearance, with multiplicity dropped."""
    import re

    return re.findall(r"[A-Z][a-z]?", formula)


def prototype_cell(p: Bulk, conventional: bool = False) -> Atoms:
    """The unperturbed cell (Å): 2-atom cells for elemental fcc/bcc; the conventional cubic
    (or orthorhombic) cell with ``conventional``."""
    el = _split_formula(p.formula)
    if p.kind == "bcc" or (p.kind == "fcc" and conventional):
        return bulk(p.formula, p.kind, a=p.a, cubic=True)
    if p.kind == "fcc":
        return bulk(p.formula, "fcc", a=p.a) * (1, 1, 2)
    if p.kind == "hcp":
        return bulk(p.formula, "hcp", a=p.a, c=p.c)
    if p.kind == "wurtzite":
        return bulk(p.formula, "wurtzite", a=p.a, c=p.c)
    if p.kind == "rutile":
        return crystal(el, basis=[(0, 0, 0), (p.u, p.u, 0)], spacegroup=136,
                       cellpar=[p.a, p.a, p.c, 90, 90, 90])  # fmt: skip
    if p.kind == "perovskite":
        frac = [(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)]
        return Atoms([el[0], el[1]] + [el[2]] * 3, scaled_positions=frac,
                     cell=np.eye(3) * p.a, pbc=True)  # fmt: skip
    if p.kind == "cesiumchloride":
        return bulk(p.formula, "cesiumchloride", a=p.a)
    return bulk(p.formula, p.kind, a=p.a, cubic=conventional)


def valence_electrons(atoms: Atoms, pseudo: str = "gth-pbe") -> int:
    """Valence electrons of the GTH pseudopotentials (what the SCF occupies)."""
    from pyscf.pbc.gto.pseudo import load

    return int(sum(sum(load(pseudo, s)[0]) for s in atoms.get_chemical_symbols()))


def orbital_count(atoms: Atoms, basis: str = "gth-szv-molopt-sr") -> int:
    """Atomic orbitals of the structure in ``basis`` (for cost estimates)."""
    from pyscf.gto.basis import load

    def n_orb(symbol: str) -> int:
        return sum((2 * shell[0] + 1) * (len(shell[1]) - 1) for shell in load(basis, symbol))

    counts = {s: n_orb(s) for s in set(atoms.get_chemical_symbols())}
    return sum(counts[s] for s in atoms.get_chemical_symbols())


def min_distance(atoms: Atoms, cutoff_A: float = 3.0) -> tuple[float, int, int]:
    """(shortest interatomic distance (Å) with periodic images, atom i, atom j); (inf, −1, −1)
    if none is shorter than ``cutoff_A`` (3 Å: above every `check_geometry` limit)."""
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, cutoff_A)
    if len(d) == 0:
        return float("inf"), -1, -1
    k = int(np.argmin(d))
    return float(d[k]), int(i[k]), int(j[k])


def vacuum_gap(atoms: Atoms) -> float:
    """Empty space (Å) along z between the top of the structure and the bottom of its image
    (cell z assumed perpendicular to the plane, as for every slab and sheet here)."""
    z = atoms.positions[:, 2]
    return float(atoms.cell[2, 2] - (z.max() - z.min()))


def _perturb(atoms: Atoms, rng: np.random.Generator, strain: float, rattle_A: tuple[float, float],
             planar: bool) -> float:  # fmt: skip
    """Random symmetric strain (in-plane only if ``planar``) and Gaussian rattle; returns σ."""
    eps = rng.uniform(-strain, strain, (3, 3))
    eps = (eps + eps.T) / 2
    if planar:
        eps[2, :] = eps[:, 2] = 0.0
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    sigma = float(rng.uniform(*rattle_A))
    atoms.positions = atoms.positions + rng.normal(0.0, sigma, atoms.positions.shape)
    atoms.wrap()
    return sigma


def _perturb_checked(key: str, atoms: Atoms, rng: np.random.Generator, strain: float,
                     rattle_A: tuple[float, float], planar: bool,
                     tries: int = 50) -> tuple[Atoms, float]:  # fmt: skip
    """`_perturb` a copy until `check_geometry` passes (next draws of the same generator, so
    still deterministic); (perturbed atoms, σ). ValueError from the last try if none passes."""
    for attempt in range(tries):
        trial = atoms.copy()
        sigma = _perturb(trial, rng, strain, rattle_A, planar)
        try:
            check_geometry(key, trial)
            return trial, sigma
        except ValueError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _interstitial_species(p: Bulk, symbols: np.ndarray) -> str:
    """H in metals (hydrogen in interstitial sites, non-magnetic), else the species of the
    cell with the smallest covalent radius."""
    if p.metal and len(set(symbols)) == 1:
        return "H"
    return min(sorted(set(symbols)), key=lambda s: covalent_radii[atomic_numbers[s]])


def _finish(atoms: Atoms, family: str, metal: bool, sigma: float, smearing_eV: float) -> Atoms:
    """Tag the structure: family, rattle σ, and smearing where it may be metallic."""
    atoms.info["family"] = family
    atoms.info["rattle_sigma_A"] = sigma
    if metal or valence_electrons(atoms) % 2:
        atoms.info[PER_STRUCTURE_KWARGS] = {"smearing_eV": smearing_eV}
    return atoms


# ----------------------------------------------------------------------------- families
def bulk_structures(seed: int, variants: int = 3, *, strain: float = 0.04,
                    rattle_A: tuple[float, float] = (0.02, 0.10),
                    smearing_eV: float = 0.1) -> list[tuple[str, Atoms]]:  # fmt: skip
    """``variants`` strained and rattled copies of every `BULK` prototype (one fewer for a
    prototype with a d-shell element: its records are ~3× larger, see `SUPERCELL_PARENTS`)."""
    out = []
    for p in BULK:
        for v in range(variants - int(_has_d_shell(p.formula))):
            key = f"bulk-{p.formula}-{p.kind}-{v:02d}"
            atoms, sigma = _perturb_checked(key, prototype_cell(p), rng_for(seed, key), strain,
                                            rattle_A, planar=False)  # fmt: skip
            out.append((key, _finish(atoms, "bulk", p.metal, sigma, smearing_eV)))
    return out


def _interstitial_site(atoms: Atoms, rng: np.random.Generator, samples: int = 4000) -> np.ndarray:
    """The point of the cell farthest from every atom (best of random samples), Cartesian Å."""
    frac = rng.random((samples, 3))
    pts = frac @ atoms.cell.array
    shifts = np.array(np.meshgrid(*[[-1, 0, 1]] * 3)).reshape(3, -1).T @ atoms.cell.array
    d = np.linalg.norm(pts[:, None, None] - atoms.positions[None, :, None] - shifts[None, None],
                       axis=-1).min(axis=(1, 2))  # fmt: skip
    return pts[int(np.argmax(d))]


def supercell_structures(seed: int, variants: int = 1, *, strain: float = 0.04,
                         rattle_A: tuple[float, float] = (0.03, 0.15),
                         smearing_eV: float = 0.1) -> list[tuple[str, Atoms]]:  # fmt: skip
    """Supercells of `SUPERCELL_PARENTS` (7–13 atoms), parent n with its number k of kinds
    of `DEFECTS` in turn (DEFECTS[n], …, DEFECTS[n + k − 1]): ``alloy`` (25–50 % of one species
    replaced by its `ALLOY_PARTNERS` element), ``vacancy`` (one atom removed),
    ``interstitial`` (H in an elemental metal, else the smallest species of the cell, at the
    emptiest point), ``rattle`` (a thermal snapshot with the larger σ only). Defects get
    smearing."""
    out = []
    for n, (name, reps, kinds) in enumerate(SUPERCELL_PARENTS):
        p = bulk_by_name(name)
        for defect in [DEFECTS[(n + d) % len(DEFECTS)] for d in range(kinds)]:
            for v in range(variants):
                key = f"supercell-{p.formula}-{p.kind}-{defect}-{v:02d}"
                rng = rng_for(seed, key)
                atoms = prototype_cell(p, conventional=True) * reps
                symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
                if defect == "alloy":
                    host = str(rng.choice(sorted(set(symbols))))
                    sites = np.flatnonzero(symbols == host)
                    n_sub = max(1, int(round(rng.uniform(0.25, 0.5) * len(sites))))
                    symbols[rng.choice(sites, n_sub, replace=False)] = ALLOY_PARTNERS[host]
                    atoms.set_chemical_symbols(symbols.tolist())
                elif defect == "vacancy":
                    del atoms[int(rng.integers(len(atoms)))]
                elif defect == "interstitial":
                    atoms.append(_interstitial_species(p, symbols))
                    atoms.positions[-1] = _interstitial_site(atoms[:-1], rng)
                atoms, sigma = _perturb_checked(key, atoms, rng, strain, rattle_A, planar=False)
                metal = p.metal or defect != "rattle"
                out.append((key, _finish(atoms, "supercell", metal, sigma, smearing_eV)))
    return out


def _center_vacuum(atoms: Atoms, vacuum_A: float) -> Atoms:
    """Cell z = thickness + vacuum (z axis normal to the plane), pbc (T, T, F)."""
    atoms.pbc = (True, True, False)
    atoms.center(vacuum=vacuum_A / 2, axis=2)
    return atoms


def slab_structures(seed: int, variants: int = 1, *, strain: float = 0.04,
                    rattle_A: tuple[float, float] = (0.02, 0.10), vacuum_A: float = 12.0,
                    smearing_eV: float = 0.1) -> list[tuple[str, Atoms]]:  # fmt: skip
    """Slabs of `SLABS` (conventional cell cut along hkl, ``vacuum_A`` ≥ `MIN_VACUUM_A`
    between images, in-plane strain, rattle). Surfaces may be metallic: all get smearing."""
    if vacuum_A < MIN_VACUUM_A:
        raise ValueError(f"vacuum_A={vacuum_A} < MIN_VACUUM_A={MIN_VACUUM_A}.")
    out = []
    for name, hkl, layers in SLABS:
        p = bulk_by_name(name)
        conv = prototype_cell(p, conventional=p.kind not in ("hcp", "wurtzite"))
        for v in range(variants):
            key = f"slab-{p.formula}-{p.kind}-{''.join(map(str, hkl))}-{v:02d}"
            atoms = surface(conv, hkl, layers, vacuum=vacuum_A / 2, periodic=False)
            atoms, sigma = _perturb_checked(key, _orthogonal_z(atoms), rng_for(seed, key),
                                            strain, rattle_A, planar=True)  # fmt: skip
            atoms = _center_vacuum(atoms, vacuum_A)
            out.append((key, _finish(atoms, "slab", True, sigma, smearing_eV)))
    return out


def _orthogonal_z(atoms: Atoms) -> Atoms:
    """Put the surface normal along z with the in-plane vectors in the xy plane
    (ase.build.surface already does this; the z vector is made normal to them)."""
    cell = atoms.cell.array.copy()
    normal = np.cross(cell[0], cell[1])
    normal /= np.linalg.norm(normal)
    cell[2] = normal * abs(cell[2] @ normal)
    atoms.set_cell(cell, scale_atoms=False)
    return atoms


def _sheet_cell(formula: str, kind: str, a: float, thickness: float, vacuum_A: float) -> Atoms:
    """Primitive cell of a `SHEETS` entry (ase.build.graphene or mx2), vacuum along z."""
    if kind == "graphene":
        return graphene(formula, a=a, vacuum=vacuum_A / 2)
    return mx2(formula, kind, a=a, thickness=thickness, vacuum=vacuum_A / 2)


def sheet_structures(seed: int, variants: int = 3, *, strain: float = 0.04,
                     rattle_A: tuple[float, float] = (0.02, 0.10), vacuum_A: float = 12.0,
                     smearing_eV: float = 0.1) -> list[tuple[str, Atoms]]:  # fmt: skip
    """`SHEETS` as primitive cells (``variants`` each) and as 2×2 (graphene-like: 3×3)
    supercells with one substitution (`ALLOY_PARTNERS`, two draws) and with one vacancy."""
    out = []
    for name, formula, kind, a, thickness, metal in SHEETS:
        cell = _sheet_cell(formula, kind, a, thickness, vacuum_A)
        for v in range(variants):
            key = f"sheet-{name}-{kind}-{v:02d}"
            atoms, sigma = _perturb_checked(key, cell.copy(), rng_for(seed, key), strain, rattle_A,
                                            planar=True)  # fmt: skip
            out.append((key, _finish(_center_vacuum(atoms, vacuum_A), "sheet", metal, sigma,
                                     smearing_eV)))  # fmt: skip
        reps = (3, 3, 1) if kind == "graphene" else (2, 2, 1)
        for defect, v in (("alloy", 0), ("alloy", 1), ("vacancy", 0)):
            key = f"sheet-{name}-{kind}-{defect}-{v:02d}"
            rng = rng_for(seed, key)
            atoms = cell.copy() * reps
            i = int(rng.integers(len(atoms)))
            if defect == "alloy":
                atoms[i].symbol = ALLOY_PARTNERS[atoms[i].symbol]
            else:
                del atoms[i]
            atoms, sigma = _perturb_checked(key, atoms, rng, strain, rattle_A, planar=True)
            out.append((key, _finish(_center_vacuum(atoms, vacuum_A), "sheet", True, sigma,
                                     smearing_eV)))  # fmt: skip
    return out


def molecular_structures(seed: int, variants: int = 3, *, strain: float = 0.04,
                         rattle_A: tuple[float, float] = (0.02, 0.06),
                         smearing_eV: float = 0.1) -> list[tuple[str, Atoms]]:  # fmt: skip
    """`MOLECULAR` crystals: molecules (ase.build.molecule geometry, randomly oriented) at
    the corner and, for two, the body centre of an orthorhombic cell."""
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    out = []
    for name, mols, lengths in MOLECULAR:
        for v in range(variants):
            key = f"molecular-{name}-{v:02d}"
            rng = rng_for(seed, key)
            atoms = Atoms(cell=np.diag(lengths), pbc=True)
            for m, centre in zip(mols, [(0.25, 0.25, 0.25), (0.75, 0.75, 0.75)], strict=False):
                mol = molecule(m)
                rot = Rotation.random(random_state=int(rng.integers(2**31)))
                mol.positions = rot.apply(mol.positions - mol.positions.mean(axis=0))
                mol.positions += np.asarray(centre) @ atoms.cell.array
                atoms += mol
            atoms, sigma = _perturb_checked(key, atoms, rng, strain, rattle_A, planar=False)
            out.append((key, _finish(atoms, "molecular", False, sigma, smearing_eV)))
    return out


RECIPES: dict[str, Callable[[int], list[tuple[str, Atoms]]]] = {
    "bulk": bulk_structures,
    "supercell": supercell_structures,
    "slab": slab_structures,
    "sheet": sheet_structures,
    "molecular": molecular_structures,
}


def family_of(key: str) -> str:
    """The family of a structure key (its first ``-`` part)."""
    return key.split("-", 1)[0]


def main_structures(seed: int, families: Iterable[str] = FAMILIES) -> list[tuple[str, Atoms]]:
    """Every structure of every family, in recipe order (see `generation_order`)."""
    return [s for fam in families for s in RECIPES[fam](seed)]


def check_geometry(key: str, atoms: Atoms, min_ratio: float = 0.6) -> None:
    """ValueError naming the structure and the atoms if two atoms are closer than
    ``min_ratio`` × the sum of their covalent radii, or a slab/sheet has < `MIN_VACUUM_A`."""
    d, i, j = min_distance(atoms)
    if i >= 0:
        zi, zj = atomic_numbers[atoms[i].symbol], atomic_numbers[atoms[j].symbol]
        limit = min_ratio * (covalent_radii[zi] + covalent_radii[zj])
        if d < limit:
            raise ValueError(
                f"{key}: atoms {i} ({atoms[i].symbol}) and {j} ({atoms[j].symbol}) are "
                f"{d:.2f} Å apart (< {limit:.2f} Å); lower the rattle or strain."
            )
    if not atoms.pbc[2] and vacuum_gap(atoms) < MIN_VACUUM_A:
        raise ValueError(f"{key}: vacuum {vacuum_gap(atoms):.2f} Å < {MIN_VACUUM_A} Å.")


__all__ = [
    "BULK", "FAMILIES", "MIN_VACUUM_A", "RECIPES", "Bulk", "bulk_structures", "check_geometry",
    "family_of", "main_structures", "min_distance", "molecular_structures", "orbital_count", "prototype_cell",
    "rng_for", "sheet_structures", "slab_structures", "supercell_structures", "vacuum_gap",
    "valence_electrons",
]  # fmt: skip
