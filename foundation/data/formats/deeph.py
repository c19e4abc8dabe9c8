"""DeepH legacy folders (DeepH-pack ``preprocess`` output) ⇄ `HamiltonianRecord`.

Format facts, checked against mzjb/DeepH-pack (deeph/preprocess/openmx_get_data.jl,
deeph/preprocess/abacus_get_data.py, deeph/data.py, deeph/rotate.py):

* ``element.dat``: one atomic number per line.
* ``lat.dat``: 3×3 text matrix in Å whose **columns** are the lattice vectors (Julia
  ``writedlm(lat)`` with ``e_ij = lat * R + ...``; Python writers save ``lattice.T``; DeepH
  reads ``np.loadtxt('lat.dat').T``). ``rlat.dat`` = 2π·inv(lat)ᵀ, columns = reciprocal
  vectors (written for compatibility, ignored on reading).
* ``site_positions.dat``: 3×N Cartesian positions in Å, **columns** = atoms.
* ``orbital_types.dat``: one line per atom, the angular momentum l of each shell in the
  order the orbitals are stored (e.g. ``0 0 1 1 2``).
* ``info.json``: ``isspinful`` (only false is supported), ``fermi_level`` (eV), and from
  the ABACUS path ``nsites``, ``norbits``, ``isorthogonal``. Our writer adds a
  ``"foundation"`` entry (record key + meta) that DeepH ignores.
* ``hamiltonians.h5`` / ``overlaps.h5``: one dataset per block, named
  ``"[Rx, Ry, Rz, i, j]"`` with **1-based** atom indices, shape (n_orb(i), n_orb(j)) as
  read by h5py; H in **eV** (OpenMX Hartree × 27.2113845, ABACUS Rydberg × 13.605698),
  S dimensionless. Both directions are stored.
* Orbital order: OpenMX's — p (x, y, z); d (3z²−r², x²−y², xy, xz, yz);
  f (z³, xz², yz², z(x²−y²), xyz, x(x²−3y²), y(3x²−y²)); no extra signs. DeepH-pack's
  ``Us_openmx2wiki`` (rotate.py) maps it to the package order with the permutations held
  in ``convention("openmx")``; ABACUS data are converted to this OpenMX order by
  abacus_get_data.py before they reach the folder.

Records are converted to the package order on reading and back on writing; H is written
with the DFT energy zero restored (H − μS + μS) and read back with μ recomputed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from foundation.basis import BasisSet, convention
from foundation.data.formats.common import (
    FOUNDATION_INFO_KEY,
    BlockKey,
    FormatError,
    atomic_folder,
    atomic_numbers_checked,
    basis_from_atom_shells,
    blocks_from_record,
    load_json,
    load_text,
    read_h5_blocks,
    read_h_and_s,
    rebase_blocks,
    record_from_blocks,
    record_meta_for_info,
    require_file,
    sanitize_key,
    text_lines,
    write_h5_blocks,
    write_json,
)
from foundation.data.record import HamiltonianRecord

FORMAT = "DeepH"
MARKER = "element.dat"
H_FILE = "hamiltonians.h5"
S_FILE = "overlaps.h5"
INDEX_BASE = 1
DEFAULT_CONVENTION = "openmx"
KEY_HELP = 'DeepH keys read "[Rx, Ry, Rz, i, j]" with 1-based atom indices i, j.'
_FIX = "Rerun DeepH-pack's preprocess (or foundation-data convert) to regenerate the folder."


def _parse_key(name: str) -> BlockKey:
    vals = json.loads(name)
    if not (isinstance(vals, list) and len(vals) == 5 and all(isinstance(v, int) for v in vals)):
        raise ValueError(name)
    rx, ry, rz, i, j = vals
    return (i, j, rx, ry, rz)


def _format_key(k: BlockKey) -> str:
    i, j, rx, ry, rz = k
    return f"[{rx}, {ry}, {rz}, {i + INDEX_BASE}, {j + INDEX_BASE}]"


def is_deeph_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / MARKER).is_file()  # the reader names any other missing file


def _read_orbital_types(path: Path, n_atoms: int) -> list[tuple[int, ...]]:
    lines = [ln.split() for ln in text_lines(path)]
    try:
        shells = [tuple(int(v) for v in ln) for ln in lines]
    except ValueError:
        raise FormatError(
            f"{path}: expected integer angular momenta (one line per atom, e.g. '0 0 1 1 2'). {_FIX}"
        ) from None
    if len(shells) != n_atoms:
        raise FormatError(
            f"{path}: {len(shells)} lines for {n_atoms} atoms in element.dat; one line per atom. {_FIX}"
        )
    return shells


def read_deeph(
    folder: str | os.PathLike,
    *,
    basis: BasisSet | None = None,
    key: str | None = None,
    orbital_convention: str = DEFAULT_CONVENTION,
    require_overlap: bool = True,
    max_distance_A: float | None = None,
    basis_name: str = "deeph",
) -> HamiltonianRecord:
    """Read one DeepH folder into a validated record (package order, H − μS, eV, Å).

    ``basis``: the registry the data belong to (its shell order is the package's; the
    folder's orbital_types.dat must hold the same shells per element, in any order);
    None builds one named ``basis_name`` from orbital_types.dat. ``key`` defaults to the
    key saved by `write_deeph`, else the folder name made shard-safe.
    ``max_distance_A`` drops blocks with |r_ij| ≥ it (OpenMX stores every orbital overlap).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a directory; expected a DeepH folder.")
    el_path = require_file(folder, "element.dat", FORMAT, _FIX)
    numbers = atomic_numbers_checked(
        load_text(el_path, shape=(None,), what="atomic numbers"), el_path
    )
    n = len(numbers)
    lat_path = require_file(folder, "lat.dat", FORMAT, _FIX)
    cell = load_text(lat_path, shape=(3, 3), what="lattice (columns = vectors, Å)").T
    pos_path = require_file(folder, "site_positions.dat", FORMAT, _FIX)
    positions = load_text(pos_path, shape=(3, None), what="positions (3×N, columns = atoms, Å)")
    if positions.shape[1] != n:
        raise FormatError(
            f"{pos_path}: {positions.shape[1]} atoms but element.dat lists {n}; "
            f"the layout is 3×N (columns = atoms). {_FIX}"
        )
    orb_path = require_file(folder, "orbital_types.dat", FORMAT, _FIX)
    source_basis = basis_from_atom_shells(
        numbers, _read_orbital_types(orb_path, n), basis_name, orb_path
    )
    info = load_json(folder / "info.json", required=False)
    if info.get("isspinful", False):
        raise FormatError(
            f"{folder / 'info.json'}: isspinful is true; only spinless Hamiltonians are supported."
        )
    saved = info.get(FOUNDATION_INFO_KEY, {})
    meta = dict(saved.get("meta", {}))
    meta.setdefault("source", "deeph")
    if "fermi_level" in info and not saved:
        meta["fermi_level_eV"] = float(info["fermi_level"])
    if basis is None and "basis_name" in saved:
        source_basis = BasisSet(saved["basis_name"], source_basis.shells)

    h, s, h_path, s_path = read_h_and_s(
        folder,
        (H_FILE, S_FILE),
        lambda path: rebase_blocks(
            read_h5_blocks(path, _parse_key, key_help=KEY_HELP), INDEX_BASE, n, path
        ),
        fmt=FORMAT,
        fix=_FIX,
        require_overlap=require_overlap,
        overlap_fix="Rerun DeepH-pack preprocess with overlaps saved (OpenMX: save_overlap)",
    )
    return record_from_blocks(
        key=key or saved.get("key") or sanitize_key(folder.name),
        numbers=numbers,
        positions=positions.T,
        cell=cell,
        pbc=(True, True, True),
        source_basis=source_basis,
        basis=basis,
        conv=convention(orbital_convention),
        h_blocks=h,
        s_blocks=s,
        h_path=h_path,
        s_path=s_path,
        meta=meta,
        max_distance_A=max_distance_A,
    )


def write_deeph(
    record: HamiltonianRecord,
    folder: str | os.PathLike,
    *,
    orbital_convention: str = DEFAULT_CONVENTION,
) -> Path:
    """Write a record as a DeepH folder (atomically: temporary sibling, then rename)."""
    folder = Path(folder)
    if not np.all(record.pbc):
        raise FormatError(
            f"{record.key}: DeepH folders describe periodic crystals; pbc={record.pbc.tolist()}. "
            "Put the molecule or slab in a large periodic box first."
        )
    h, s = blocks_from_record(record, convention(orbital_convention))
    with atomic_folder(folder) as tmp:
        np.savetxt(tmp / "element.dat", record.numbers, fmt="%d")
        np.savetxt(tmp / "lat.dat", record.cell.T)
        np.savetxt(tmp / "rlat.dat", 2 * np.pi * np.linalg.inv(record.cell))
        np.savetxt(tmp / "site_positions.dat", record.positions.T)
        r_list = sorted({tuple(e[2:5]) for e in record.edges.tolist()})
        np.savetxt(tmp / "R_list.dat", np.array(r_list, dtype=np.int64).reshape(-1, 3), fmt="%d")
        (tmp / "orbital_types.dat").write_text(
            "".join(
                "  ".join(str(l) for l in record.basis.shells_of(int(z))) + "\n"
                for z in record.numbers
            )
        )
        write_json(
            tmp / "info.json",
            {
                "nsites": record.n_atoms,
                "isorthogonal": False,
                "isspinful": False,
                "norbits": int(record.n_orb_per_atom.sum()),
                "fermi_level": float(record.meta.get("fermi_level_eV", 0.0)),
                FOUNDATION_INFO_KEY: record_meta_for_info(record),
            },
        )
        write_h5_blocks(tmp / H_FILE, {_format_key(k): b for k, b in h.items()})
        if s is not None:
            write_h5_blocks(tmp / S_FILE, {_format_key(k): b for k, b in s.items()})
    return folder


__all__ = ["is_deeph_folder", "read_deeph", "write_deeph"]
