"""DeePTB data folders (``dptb data`` / ABACUS interface output) ⇄ `HamiltonianRecord`.

Format facts, checked against deepmodeling/DeePTB (dptb/data/interfaces/abacus.py,
dptb/data/dataset/_default_dataset.py, dptb/data/interfaces/ham_to_feature.py,
dptb/utils/constants.py):

* ``atomic_numbers.dat``: one atomic number per line.
* ``cell.dat``: 3×3 in Å, **rows** = lattice vectors. ``positions.dat``: N×3 in Å, rows =
  atoms, Cartesian unless info.json says ``"pos_type": "frac"``.
* ``basis.dat``: either one line per atom with its shells as counts per l (``2s2p1d``), or
  one Python dict line per element (``{'Si': '1s1p', 'O': '2s2p1d'}``), the form DeePTB's
  own examples and exporter write; both are read. ABACUS stores orbitals l-major (all s,
  then all p, …), so the spec fixes the order. Our writer writes the per-atom form.
* ``info.json`` (in the folder or its parent): ``nframes``, ``natoms``, ``pos_type``,
  ``pbc`` (bool or list). DeePTB 2.2.1 checks this file strictly and refuses any other key
  (``dargs ArgumentKeyError: undefined key … in strict mode``), so our writer puts exactly
  these keys there and keeps its own (record key, meta, basis name) in ``foundation.json``
  next to it, a file DeePTB does not read; older folders with a ``"foundation"`` entry in
  info.json are still read.
* ``hamiltonians.h5`` / ``overlaps.h5``: a group per frame (``"0"``; legacy files ``"1"``)
  holding one dataset per block named ``"i_j_Rx_Ry_Rz"``: **0-based** atom indices in
  current DeePTB (legacy files are 1-based; the base is detected from the on-site blocks,
  which every atom has). Shape (n_orb(i), n_orb(j)); H in **eV** (ABACUS Rydberg ×
  13.605698). A missing direction is the transpose of the stored one.
* Orbital order: DeePTB stores blocks in its own order m = −l … l without the ABACUS
  (−1)^m phase (ABACUS2DeePTB is applied while converting), i.e. the package order:
  ``convention("deeptb")`` is the identity. A folder written with the raw ABACUS order
  (m = 0, +1, −1, … with (−1)^m) reads with ``orbital_convention="abacus"``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from foundation.basis import BasisSet, convention, parse_shell_spec, shell_spec
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

FORMAT = "DeePTB"
MARKER = "atomic_numbers.dat"
H_FILE = "hamiltonians.h5"
S_FILE = "overlaps.h5"
FRAME_GROUPS = ("0", "1")
DEFAULT_CONVENTION = "deeptb"
KEY_HELP = 'DeePTB keys read "i_j_Rx_Ry_Rz" (0-based atom indices) inside group "0".'
_FIX = "Rerun DeePTB's data preprocessing (or foundation-data convert) to regenerate the folder."


def _parse_key(name: str) -> BlockKey:
    parts = name.split("_")
    if len(parts) != 5:
        raise ValueError(name)
    i, j, rx, ry, rz = (int(p) for p in parts)
    return (i, j, rx, ry, rz)


def _format_key(k: BlockKey) -> str:
    return "_".join(str(v) for v in k)


def is_deeptb_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / MARKER).is_file()  # the reader names any other missing file


SIDECAR = "foundation.json"
DEEPTB_INFO_KEYS = ("nframes", "natoms", "pos_type", "pbc")


def _read_basis_dict(path: Path, text: str, numbers: np.ndarray) -> list[tuple[int, ...]]:
    """The dict form ``{'Si': '1s1p'}`` → shells per atom (never evaluates code)."""
    import ast

    from ase.data import chemical_symbols

    try:
        table = ast.literal_eval(text)
        if not isinstance(table, dict):
            raise ValueError("not a dict")
        specs = {str(el): parse_shell_spec(str(spec)) for el, spec in table.items()}
    except (ValueError, SyntaxError) as exc:
        raise FormatError(
            f"{path}: cannot read the element → shells dict ({exc}); expected e.g. "
            f"{{'Si': '1s1p'}} or one line per atom such as '2s2p1d'. {_FIX}"
        ) from None
    missing = sorted({chemical_symbols[int(z)] for z in numbers} - set(specs))
    if missing:
        raise FormatError(
            f"{path}: no shells for element(s) {', '.join(missing)} (it lists "
            f"{', '.join(specs)}). {_FIX}"
        )
    return [specs[chemical_symbols[int(z)]] for z in numbers]


def _read_basis_lines(path: Path, numbers: np.ndarray) -> list[tuple[int, ...]]:
    n_atoms = len(numbers)
    lines = text_lines(path)
    if len(lines) == 1 and lines[0].startswith("{"):
        return _read_basis_dict(path, lines[0], numbers)
    if len(lines) != n_atoms:
        raise FormatError(
            f"{path}: {len(lines)} lines for {n_atoms} atoms in atomic_numbers.dat; "
            f"one line per atom such as '2s2p1d' (or one dict line {{'Si': '1s1p'}}). {_FIX}"
        )
    try:
        return [parse_shell_spec(ln) for ln in lines]
    except ValueError as exc:
        raise FormatError(f"{path}: {exc}") from None


def _index_base(blocks: dict, path: Path) -> int:
    base = min(min(k[0], k[1]) for k in blocks)
    if base not in (0, 1):
        raise FormatError(
            f"{path}: smallest atom index is {base}; expected 0 (current DeePTB) or 1 (legacy). "
            f"The on-site blocks are missing or the file belongs to another structure. {_FIX}"
        )
    return base


def read_deeptb(
    folder: str | os.PathLike,
    *,
    basis: BasisSet | None = None,
    key: str | None = None,
    orbital_convention: str = DEFAULT_CONVENTION,
    require_overlap: bool = True,
    max_distance_A: float | None = None,
    basis_name: str = "deeptb",
) -> HamiltonianRecord:
    """Read one single-frame DeePTB folder into a validated record (package order, eV, Å).

    ``basis``: the registry the data belong to (shells per element must match basis.dat
    up to shell order; basis.dat may then be absent); None builds one named
    ``basis_name`` from basis.dat. ``key`` defaults to the key saved by `write_deeptb`,
    else the folder name made shard-safe (``data.0`` → ``data_0``).
    ``max_distance_A`` drops blocks with |r_ij| ≥ it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a directory; expected a DeePTB folder.")
    info = load_json(folder / "info.json", required=False) or load_json(
        folder.parent / "info.json", required=False
    )
    if int(info.get("nframes", 1)) != 1:
        raise FormatError(
            f"{folder / 'info.json'}: nframes = {info['nframes']}; only single-frame folders "
            "are read. Split the trajectory into one folder per frame."
        )
    z_path = require_file(folder, MARKER, FORMAT, _FIX)
    numbers = atomic_numbers_checked(
        load_text(z_path, shape=(None,), what="atomic numbers"), z_path
    )
    n = len(numbers)
    pos_path = require_file(folder, "positions.dat", FORMAT, _FIX)
    positions = load_text(pos_path, shape=(n, 3), what="positions (N×3, rows = atoms, Å)")
    pbc_info = info.get("pbc", True)
    pbc = np.broadcast_to(np.asarray(pbc_info, dtype=bool), (3,)).copy()
    cell_path = folder / "cell.dat"
    if cell_path.is_file():
        cell = load_text(cell_path, shape=(3, 3), what="cell (rows = lattice vectors, Å)")
    elif pbc.any():
        raise FormatError(
            f"{cell_path}: missing; periodic structures (pbc={pbc.tolist()}) need it. {_FIX}"
        )
    else:
        cell = np.zeros((3, 3))
    pos_type = info.get("pos_type", "cart")
    if pos_type == "frac":
        positions = positions @ cell
    elif pos_type not in ("cart", "ase"):
        raise FormatError(f"{folder / 'info.json'}: pos_type {pos_type!r}; expected cart or frac.")

    basis_path = folder / "basis.dat"
    if basis_path.is_file():
        source_basis = basis_from_atom_shells(
            numbers, _read_basis_lines(basis_path, numbers), basis_name, basis_path
        )
    elif basis is not None:
        # DeePTB can take the basis from its input instead of basis.dat; ABACUS order is l-major.
        source_basis = BasisSet(
            basis.name, {z: tuple(sorted(basis.shells_of(z))) for z in np.unique(numbers).tolist()}
        )
    else:
        raise FormatError(
            f"{basis_path}: missing; write one line per atom such as '2s2p1d', or pass basis=."
        )
    saved = load_json(folder / SIDECAR, required=False) or (
        info.get(FOUNDATION_INFO_KEY, {}) if (folder / "info.json").is_file() else {}
    )
    meta = dict(saved.get("meta", {}))
    meta.setdefault("source", "deeptb")
    if basis is None and "basis_name" in saved:
        source_basis = BasisSet(saved["basis_name"], source_basis.shells)

    def read(path: Path) -> dict:
        raw = read_h5_blocks(path, _parse_key, groups=FRAME_GROUPS, key_help=KEY_HELP)
        return rebase_blocks(raw, _index_base(raw, path), n, path)

    h, s, h_path, s_path = read_h_and_s(
        folder,
        (H_FILE, S_FILE),
        read,
        fmt=FORMAT,
        fix=_FIX,
        require_overlap=require_overlap,
        overlap_fix="Rerun the DeePTB preprocessing with overlaps (parse_overlap)",
    )
    return record_from_blocks(
        key=key or saved.get("key") or sanitize_key(folder.name),
        numbers=numbers,
        positions=positions,
        cell=cell,
        pbc=pbc,
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


def write_deeptb(
    record: HamiltonianRecord,
    folder: str | os.PathLike,
    *,
    orbital_convention: str = DEFAULT_CONVENTION,
) -> Path:
    """Write a record as a current-style DeePTB folder (group "0", 0-based keys), atomically;
    DeePTB 2.2.1 loads it (tests/test_deeptb_peer.py). H is absolute (the record's energy zero
    added back), as DeePTB's own ABACUS-derived folders hold it.

    basis.dat can only express l-major shell order, so blocks are written with each
    element's shells sorted by l; reading back with ``basis=record.basis`` restores the
    record's own shell order.
    """
    folder = Path(folder)
    file_basis = BasisSet(
        record.basis.name, {el: tuple(sorted(ls)) for el, ls in record.basis.shells.items()}
    )
    h, s = blocks_from_record(record, convention(orbital_convention), file_basis)
    # exactly DEEPTB_INFO_KEYS: DeePTB refuses any other key in info.json
    info = {"nframes": 1, "natoms": record.n_atoms, "pos_type": "cart", "pbc": record.pbc.tolist()}
    with atomic_folder(folder) as tmp:
        np.savetxt(tmp / MARKER, record.numbers, fmt="%d")
        np.savetxt(tmp / "cell.dat", record.cell)
        np.savetxt(tmp / "positions.dat", record.positions)
        (tmp / "basis.dat").write_text(
            "".join(shell_spec(file_basis.shells_of(int(z))) + "\n" for z in record.numbers)
        )
        write_json(tmp / "info.json", info)
        write_json(tmp / SIDECAR, record_meta_for_info(record))
        write_h5_blocks(tmp / H_FILE, {_format_key(k): b for k, b in h.items()}, group="0")
        if s is not None:
            write_h5_blocks(tmp / S_FILE, {_format_key(k): b for k, b in s.items()}, group="0")
    return folder


__all__ = ["is_deeptb_folder", "read_deeptb", "write_deeptb"]
