"""Shared machinery of the block-folder formats (DeepH legacy, DeePTB).

Both formats hold one structure per folder: a few text files describing the structure and
the basis, plus ``hamiltonians.h5`` / ``overlaps.h5`` with one dataset per atom pair and
lattice translation (i, j, R), each block of shape (n_orb(i), n_orb(j)) in the source
code's orbital order, H in eV. They differ only in file names, key spelling, index base,
axis layout of the text files and the m-order convention, so each format module states
those facts and calls the functions here:

* `load_text` / `load_json` / `read_h5_blocks`: readers whose errors name the file, what is
  wrong and the fix (`FormatError`);
* `record_from_blocks`: source blocks → `HamiltonianRecord` in the package convention
  (both directions completed by transposition, shapes checked against the basis);
* `blocks_from_record`: the inverse, absolute H (the DFT energy zero restored);
* `atomic_folder` / `write_h5_blocks`: write a whole folder into a temporary sibling and
  rename it into place, so a crash never leaves a half-written folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from foundation import keys
from foundation.basis import BasisSet, OrbitalConvention, shell_spec
from foundation.data.record import HamiltonianRecord, RecordError

BlockKey = tuple[int, int, int, int, int]
"""(i, j, Rx, Ry, Rz) with 0-based atom indices, the package's edge layout."""

FOUNDATION_INFO_KEY = "foundation"
"""Key in a folder's info.json under which the writers keep the record key and meta."""

_KEY_FORBIDDEN = re.compile(r"[^A-Za-z0-9_\-]")


class FormatError(ValueError):
    """A folder does not follow its format; the message names the file, the problem and the fix."""


def sanitize_key(name: str) -> str:
    """A record key safe for shards (letters, digits, '_' and '-'; webdataset splits at '.')."""
    key = _KEY_FORBIDDEN.sub("_", name.strip())
    if not key:
        raise ValueError(f"Cannot build a record key from {name!r}.")
    return key


# ------------------------------------------------------------------------------ reading
def require_file(folder: Path, name: str, fmt: str, fix: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FormatError(f"{path}: missing; a {fmt} folder needs {name}. {fix}")
    return path


def load_text(
    path: Path, *, dtype: type = float, shape: tuple[int | None, ...], what: str
) -> np.ndarray:
    """np.loadtxt with a shape check (None = any length); errors name the file and the fix."""
    try:
        with warnings.catch_warnings():  # an empty file fails the shape check below
            warnings.simplefilter("ignore", UserWarning)
            arr = np.loadtxt(path, dtype=dtype, ndmin=len(shape))
    except (ValueError, OSError) as exc:
        raise FormatError(
            f"{path}: cannot parse {what} ({exc}); the file must hold plain numbers "
            f"in {len(shape)}-D layout {shape}. Regenerate it with the format's converter."
        ) from None
    if arr.ndim != len(shape) or any(
        n is not None and n != m for n, m in zip(shape, arr.shape, strict=True)
    ):
        raise FormatError(
            f"{path}: {what} has shape {arr.shape}, expected {shape} "
            "(None = any length); the file is truncated or belongs to another structure."
        )
    return arr


def text_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text file; undecodable bytes raise `FormatError`."""
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not a text file ({exc}); fix or regenerate it.") from None


def load_json(path: Path, *, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise FormatError(f"{path}: missing; write it with the format's converter.")
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc}); fix or regenerate the file.") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


def atomic_numbers_checked(numbers: np.ndarray, path: Path) -> np.ndarray:
    from ase.data import chemical_symbols

    numbers = np.asarray(numbers)
    if not np.all(numbers == np.round(numbers)):
        raise FormatError(f"{path}: atomic numbers must be integers, found {numbers.tolist()}.")
    numbers = numbers.astype(np.int64)
    bad = [int(z) for z in numbers if not 0 < z < len(chemical_symbols)]
    if bad:
        raise FormatError(
            f"{path}: unknown element (atomic number {bad[0]}); atomic numbers run from 1 to "
            f"{len(chemical_symbols) - 1}. Fix the file."
        )
    return numbers


def read_h5_blocks(
    path: Path,
    parse_key: Callable[[str], tuple[int, int, int, int, int]],
    *,
    groups: Sequence[str] = (),
    key_help: str,
) -> dict[tuple[int, int, int, int, int], np.ndarray]:
    """All blocks of one h5 file as {raw key tuple: float64 array}.

    ``parse_key`` turns a dataset name into an (i, j, Rx, Ry, Rz) tuple in the file's own
    index base. ``groups``: candidate names of a group holding the datasets (the first one
    present wins; none present = datasets at the root). Truncated/corrupt files and bad
    keys raise `FormatError` naming the file and the key.
    """
    import h5py

    fix = "The file is truncated or corrupt: copy it again or rerun the converter that wrote it."
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise FormatError(f"{path}: missing.") from None
    except OSError as exc:
        raise FormatError(f"{path}: not a readable HDF5 file ({exc}). {fix}") from None
    blocks: dict[tuple[int, int, int, int, int], np.ndarray] = {}
    with f:
        found = [g for g in groups if isinstance(f.get(g), h5py.Group)]
        node = f[found[0]] if found else f
        try:
            names = list(node.keys())
        except (OSError, RuntimeError) as exc:
            raise FormatError(f"{path}: cannot list datasets ({exc}). {fix}") from None
        if not names:
            raise FormatError(f"{path}: holds no blocks. {fix}")
        for name in names:
            try:
                is_dataset = isinstance(node.get(name), h5py.Dataset)
            except (OSError, RuntimeError, KeyError) as exc:
                raise FormatError(f"{path}: entry {name!r} cannot be read ({exc}). {fix}") from None
            if not is_dataset:
                raise FormatError(
                    f"{path}: {name!r} is a group, not a block; files with several frames are "
                    "not supported: split them into one folder per structure."
                )
            try:
                raw = parse_key(name)
            except (ValueError, TypeError, json.JSONDecodeError):
                raise FormatError(
                    f"{path}: dataset key {name!r} is malformed; {key_help}"
                ) from None
            try:
                data = node[name][()]
            except (OSError, RuntimeError, KeyError, TypeError) as exc:
                raise FormatError(f"{path}: block {name!r} cannot be read ({exc}). {fix}") from None
            data = np.asarray(data)
            if np.iscomplexobj(data):
                raise FormatError(
                    f"{path}: block {name!r} is complex (spinful / SOC data); only real spinless "
                    "Hamiltonians are supported. Recompute without spin-orbit coupling."
                )
            if data.ndim != 2:
                raise FormatError(
                    f"{path}: block {name!r} has shape {data.shape}; blocks must be 2-D matrices."
                )
            if raw in blocks:
                raise FormatError(f"{path}: block {raw} appears twice (key {name!r}).")
            blocks[raw] = data.astype(np.float64)
    return blocks


def rebase_blocks(
    blocks: Mapping[tuple[int, int, int, int, int], np.ndarray], base: int, n_atoms: int, path: Path
) -> dict[BlockKey, np.ndarray]:
    """Shift atom indices from the file's base to 0-based and check the range."""
    out: dict[BlockKey, np.ndarray] = {}
    for (i, j, rx, ry, rz), b in blocks.items():
        i0, j0 = i - base, j - base
        if not (0 <= i0 < n_atoms and 0 <= j0 < n_atoms):
            raise FormatError(
                f"{path}: block (i={i}, j={j}, R=({rx},{ry},{rz})) names an atom outside "
                f"{base}..{n_atoms - 1 + base} ({n_atoms} atoms, {base}-based indices); "
                "the h5 file belongs to another structure."
            )
        out[(i0, j0, rx, ry, rz)] = b
    return out


# ------------------------------------------------------------------------------ basis
def read_h_and_s(
    folder: Path,
    names: tuple[str, str],
    read: Callable[[Path], dict[BlockKey, np.ndarray]],
    *,
    fmt: str,
    fix: str,
    require_overlap: bool,
    overlap_fix: str,
) -> tuple[dict[BlockKey, np.ndarray], dict[BlockKey, np.ndarray] | None, Path, Path]:
    """(H blocks, S blocks or None, H path, S path) of a folder, each file read by ``read``
    (0-based keys). A missing S is an error naming ``overlap_fix`` unless not required."""
    h_path = require_file(folder, names[0], fmt, fix)
    h = read(h_path)
    s_path = folder / names[1]
    if s_path.is_file():
        s = read(s_path)
    elif require_overlap:
        raise FormatError(
            f"{s_path}: missing; records need S for the energy zero μ = ⟨H,S⟩/⟨S,S⟩. "
            f"{overlap_fix}, or pass require_overlap=False to read H alone."
        )
    else:
        s = None
    return h, s, h_path, s_path


def basis_from_atom_shells(
    numbers: np.ndarray, atom_shells: Sequence[tuple[int, ...]], name: str, path: Path
) -> BasisSet:
    """Registry from per-atom shell lists; every atom of an element must have the same shells."""
    if len(atom_shells) != len(numbers):
        raise FormatError(
            f"{path}: {len(atom_shells)} basis lines for {len(numbers)} atoms; one line per atom."
        )
    per_element: dict[int, tuple[int, ...]] = {}
    for a, (z, ls) in enumerate(zip(numbers.tolist(), atom_shells, strict=True)):
        if z in per_element and per_element[z] != tuple(ls):
            raise FormatError(
                f"{path}: atom {a} (Z={z}) has shells {shell_spec(ls)} but an earlier atom of the "
                f"same element has {shell_spec(per_element[z])}; one basis per element."
            )
        per_element[z] = tuple(ls)
    return BasisSet(name, per_element)


def element_transform(
    source_shells: Sequence[int], package_shells: Sequence[int], conv: OrbitalConvention
) -> np.ndarray:
    """U (package ← source) for one element: m-order/sign convention plus shell reordering.

    The k-th source shell of angular momentum l maps to the k-th package shell of that l.
    U is a signed permutation, so its inverse is its transpose.
    """
    source_shells, package_shells = list(source_shells), list(package_shells)
    if sorted(source_shells) != sorted(package_shells):
        raise ValueError(
            f"shells {shell_spec(source_shells)} cannot map onto {shell_spec(package_shells)}"
        )
    src_off = np.concatenate([[0], np.cumsum([2 * l + 1 for l in source_shells])])
    pkg_off = np.concatenate([[0], np.cumsum([2 * l + 1 for l in package_shells])])
    src_of_l: dict[int, list[int]] = {}
    for s, l in enumerate(source_shells):
        src_of_l.setdefault(l, []).append(s)
    taken: dict[int, int] = {}
    u = np.zeros((int(pkg_off[-1]), int(src_off[-1])))
    for p, l in enumerate(package_shells):
        k = taken.get(l, 0)
        taken[l] = k + 1
        s = src_of_l[l][k]
        n = 2 * l + 1
        u[pkg_off[p] : pkg_off[p] + n, src_off[s] : src_off[s] + n] = conv.shell_matrix(l)
    return u


def _transforms(
    numbers: np.ndarray, source: BasisSet, package: BasisSet, conv: OrbitalConvention, path: Path
) -> dict[int, np.ndarray]:
    out = {}
    for z in np.unique(numbers).tolist():
        try:
            out[z] = element_transform(source.shells_of(z), package.shells_of(z), conv)
        except (KeyError, ValueError) as exc:
            raise FormatError(
                f"{path}: element Z={z}: {exc.args[0]} (basis {package.name!r}); pass the basis "
                "the data was computed with, or omit it to take the basis from the folder."
            ) from None
    return out


# ------------------------------------------------------------------------------ records
def record_from_blocks(
    *,
    key: str,
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: Sequence[bool],
    source_basis: BasisSet,
    basis: BasisSet | None,
    conv: OrbitalConvention,
    h_blocks: Mapping[BlockKey, np.ndarray],
    s_blocks: Mapping[BlockKey, np.ndarray] | None,
    h_path: Path,
    s_path: Path | None,
    meta: Mapping,
    max_distance_A: float | None = None,
) -> HamiltonianRecord:
    """Blocks in the source order (0-based keys, absolute H in eV) → validated record.

    Edges = union of the H and S keys, each completed with its reverse (j, i, −R) by
    transposition when the file stores only one direction; a block missing from one file
    but present in the other is zero (the converters drop blocks below ~1e-8). Edges are
    sorted by (i, j, Rx, Ry, Rz). ``max_distance_A`` keeps only edges with
    |r_ij| < max_distance_A (on-site blocks always) and is recorded as ``edge_cutoff_A``.
    """
    basis = source_basis if basis is None else basis
    u = _transforms(numbers, source_basis, basis, conv, h_path)
    n_src = source_basis.n_orb_array(numbers)
    edge_set = set(h_blocks) | set(s_blocks or {})
    edge_set |= {(j, i, -rx, -ry, -rz) for i, j, rx, ry, rz in edge_set}
    edges = np.array(sorted(edge_set), dtype=np.int32).reshape(-1, 5)
    if max_distance_A is not None:
        r = positions[edges[:, 1]] + edges[:, 2:5] @ cell - positions[edges[:, 0]]
        onsite = (edges[:, 0] == edges[:, 1]) & ~edges[:, 2:5].any(axis=1)
        edges = edges[onsite | (np.linalg.norm(r, axis=1) < max_distance_A)]
        meta = {**meta, "edge_cutoff_A": float(max_distance_A)}
    if len(edges) and np.any(edges[:, 2:5][:, ~np.asarray(pbc, bool)] != 0):
        raise FormatError(
            f"{h_path}: a block has a lattice translation along a non-periodic axis "
            f"(pbc={list(map(bool, pbc))}); fix the pbc flags."
        )

    def converted(blocks: Mapping[BlockKey, np.ndarray], path: Path) -> list[np.ndarray]:
        missing = [a for a in range(len(numbers)) if (a, a, 0, 0, 0) not in blocks]
        if missing:
            raise FormatError(
                f"{path}: no on-site block for atom {missing[0]} (0-based; i = j, R = (0,0,0)); "
                "every atom has one, so the file is incomplete or belongs to another structure. "
                "Regenerate it with the converter that wrote it."
            )
        out = []
        for i, j, rx, ry, rz in edges.tolist():
            shape = (int(n_src[i]), int(n_src[j]))
            b = blocks.get((i, j, rx, ry, rz))
            if b is None:
                rev = blocks.get((j, i, -rx, -ry, -rz))
                b = np.zeros(shape) if rev is None else rev.T
            if b.shape != shape:
                zi, zj = numbers[i], numbers[j]
                raise FormatError(
                    f"{path}: block (i={i}, j={j}, R=({rx},{ry},{rz})) has shape {b.shape} but "
                    f"atoms Z={zi}, Z={zj} with basis {shell_spec(source_basis.shells_of(zi))} / "
                    f"{shell_spec(source_basis.shells_of(zj))} need {shape}: the basis file does "
                    "not match the h5 file (wrong basis or another structure)."
                )
            out.append(u[numbers[i]] @ b @ u[numbers[j]].T)
        return out

    h = converted(h_blocks, h_path)
    s = None if s_blocks is None else converted(s_blocks, s_path or h_path)
    try:
        return HamiltonianRecord.from_blocks(
            key=key,
            numbers=numbers,
            positions=positions,
            cell=cell,
            pbc=pbc,
            basis=basis,
            edges=edges,
            h_blocks=h,
            s_blocks=s,
            meta=meta,
            shift_energy_zero=s is not None,
        )
    except RecordError as exc:
        raise FormatError(f"{h_path.parent}: {exc}") from None


def blocks_from_record(
    record: HamiltonianRecord, conv: OrbitalConvention, source_basis: BasisSet | None = None
) -> tuple[dict[BlockKey, np.ndarray], dict[BlockKey, np.ndarray] | None]:
    """Inverse of `record_from_blocks`: {(i, j, R): block} in the source order, absolute H (eV).

    ``source_basis`` orders the shells in the file (default: the record's own order).
    """
    source_basis = record.basis if source_basis is None else source_basis
    u = _transforms(record.numbers, source_basis, record.basis, conv, Path(record.key))
    edge_keys = [tuple(e) for e in record.edges.tolist()]
    shapes = record.block_shapes
    off = record.block_offsets

    def back(flat: np.ndarray) -> dict[BlockKey, np.ndarray]:
        out = {}
        for e, k in enumerate(edge_keys):
            b = flat[off[e] : off[e + 1]].reshape(shapes[e])
            out[k] = u[record.numbers[k[0]]].T @ b @ u[record.numbers[k[1]]]
        return out

    h = back(record.absolute_h())
    s = None if record.s is None else back(record.s.astype(np.float64))
    return h, s


def record_meta_for_info(record: HamiltonianRecord) -> dict:
    """What the writers keep in info.json so that reading back restores key and meta."""
    meta = {k: v for k, v in record.meta.items() if k != keys.ENERGY_ZERO}
    return {"key": record.key, "basis_name": record.basis.name, "meta": meta}


# ------------------------------------------------------------------------------ writing
@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``folder`` in one rename."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def write_h5_blocks(
    path: Path, blocks: Mapping[str, np.ndarray], *, group: str | None = None
) -> None:
    """One float64 dataset per block name, optionally inside ``group``."""
    import h5py

    with h5py.File(path, "w") as f:
        node = f if group is None else f.create_group(group)
        for name, block in blocks.items():
            node.create_dataset(name, data=np.asarray(block, dtype=np.float64))


def write_json(path: Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


__all__ = [
    "BlockKey",
    "FormatError",
    "atomic_folder",
    "atomic_numbers_checked",
    "basis_from_atom_shells",
    "blocks_from_record",
    "element_transform",
    "load_json",
    "load_text",
    "read_h5_blocks",
    "rebase_blocks",
    "record_from_blocks",
    "record_meta_for_info",
    "require_file",
    "sanitize_key",
    "write_h5_blocks",
    "write_json",
]
