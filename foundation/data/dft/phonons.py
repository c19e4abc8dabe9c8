"""Γ-point force constants of small cells: PySCF forces at phonopy's displacements.

`pyscf_forces` runs the SCF of `foundation.data.dft.pyscf.run_scf` and PySCF's analytic
nuclear gradient (``pyscf.pbc.grad``, which handles the GTH pseudopotentials; checked
against central differences of the energy: 3e-5 relative on a displaced Si2 cell). The
gradient code needs the plain k-point SCF object, so the symmetry-adapted one is converted
with ``to_khf()`` (same density, same energy).

`gamma_phonopy` builds a phonopy object whose supercell is the cell itself (1×1×1): its
force constants are the sums over periodic images that the Γ-point dynamical matrix needs,
so Γ frequencies are exact (up to the finite-difference step) but no other q is. phonopy
picks the symmetry-distinct ± displacements of size ``delta_A``, the forces come from PySCF,
and phonopy's symmetrisation imposes the acoustic sum rule (the FFT grid breaks translation
invariance slightly: the raw forces of a displaced cell do not sum to zero exactly).

Units: Å, eV, eV/Å, THz.
"""

from __future__ import annotations

from collections.abc import Callable

import ase
import numpy as np


def pyscf_forces(
    atoms: ase.Atoms, *, key: str = "forces", **scf_kwargs
) -> tuple[np.ndarray, float]:
    """(forces (N, 3) eV/Å, total energy eV) of ``atoms`` (positions as given, atom order
    kept) from a PySCF KRKS SCF (`run_scf` keyword arguments) and its analytic gradient."""
    from pyscf.data import nist

    from foundation.data.dft.pyscf import run_scf

    scf = run_scf(atoms, key=key, **scf_kwargs)
    mf = scf.mf.to_khf() if hasattr(scf.mf, "to_khf") else scf.mf
    gradient = np.asarray(mf.nuc_grad_method().kernel())  # Hartree/Bohr
    forces = -gradient * nist.HARTREE2EV / nist.BOHR
    return forces, float(scf.mf.e_tot) * nist.HARTREE2EV


def gamma_phonopy(
    atoms: ase.Atoms,
    forces: Callable[[ase.Atoms], np.ndarray],
    *,
    delta_A: float = 0.01,
    symprec: float = 1e-5,
    supercell_matrix: np.ndarray | None = None,
):
    """phonopy object (1×1×1 supercell unless ``supercell_matrix`` says otherwise, force
    constants produced and symmetrised) of ``atoms``; ``forces(displaced supercell) ->
    (N_sc, 3) eV/Å`` is called once per ±``delta_A`` displacement phonopy needs (2 for Si
    diamond, 4 for zincblende, 12 without symmetry in a 1×1×1 cell). A supercell's force
    constants give phonons at any q (`foundation.physics.phonons.PhononModel`).
    Save it with ``phonon.save(path, settings={"force_constants": True})``."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(
        numbers=atoms.numbers, cell=np.asarray(atoms.cell), positions=atoms.positions
    )
    phonon = Phonopy(
        unit,
        supercell_matrix=np.eye(3, dtype=int) if supercell_matrix is None else supercell_matrix,
        primitive_matrix="P",
        symprec=symprec,
    )
    phonon.generate_displacements(distance=delta_A, is_plusminus=True)
    sets = []
    for cell in phonon.supercells_with_displacements:
        moved = ase.Atoms(numbers=cell.numbers, cell=cell.cell, positions=cell.positions, pbc=True)
        sets.append(np.asarray(forces(moved), dtype=np.float64).reshape(len(moved), 3))
    phonon.forces = np.array(sets)
    phonon.produce_force_constants()
    phonon.symmetrize_force_constants()
    return phonon


__all__ = ["gamma_phonopy", "pyscf_forces"]
