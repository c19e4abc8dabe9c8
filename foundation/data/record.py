"""`HamiltonianRecord`: one structure with its real-space Hamiltonian and overlap blocks.

Every reader (PySCF, DeepH, DeePTB) produces records and every writer (shards, folders)
consumes them, so conventions are enforced once, here:

* lengths in Å, energies in eV, cell rows are lattice vectors;
* edge e = (i, j, Rx, Ry, Rz) holds H_ij(R) = ⟨φ_i(r−τ_i)|H|φ_j(r−τ_j−R·cell)⟩ with shape
  (n_orb(Z_i), n_orb(Z_j)) in the package orbital order (basis.py);
* both directions of every pair are stored and H_ji(−R) = H_ij(R)ᵀ (real basis);
* `h` holds H − μS with μ = ⟨H,S⟩/⟨S,S⟩ (`meta["energy_zero_eV"]`), so the target does not
  depend on the arbitrary energy zero of the DFT code; `absolute_h()` adds μS back.

Blocks are stored flat (all blocks concatenated in edge order, each row-major), exactly as
in shards, so a record converts to and from npy/json files without copies or pickle.

Extras (``extras``) are further targets in the same block layout: one flat array of the
total block size (e.g. ``h_hse``), or, for the electron–phonon targets `DISPLACEMENT_TARGETS`
(``dh``, ``ds``), a (3N, total) array with one flat block array per Cartesian displacement:
row 3κ + α holds d/du_κα (atom κ, axis α = x, y, z; atom-major) of ``h`` (eV/Å) or ``s``
(1/Å) on the record's own edges, with the lattice fixed (moving atom κ moves all its
periodic images). ``dh`` is the derivative of the stored target H − μS, μ included
(`shifted_derivative`), so it is what the model's H head must reproduce.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foundation import keys
from foundation.basis import BasisSet

HERMITICITY_ATOL_EV = 1e-4
"""Default tolerance (eV, absolute) for H_ji(−R) = H_ij(R)ᵀ; float32 storage of |H| ≲ 100 eV
keeps rounding far below it."""


class RecordError(ValueError):
    """A record violates a convention; the message names the structure, edge and block."""


DISPLACEMENT_TARGETS = (keys.DH, keys.DS)
"""Extras with one row per Cartesian displacement: shape (3N, total), row 3κ + α = d/du_κα."""


def energy_zero(h: np.ndarray, s: np.ndarray) -> float:
    """μ = ⟨H,S⟩/⟨S,S⟩ (eV) over flat block arrays: the shift that best removes S from H."""
    h = np.asarray(h, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    return float(np.dot(h, s) / np.dot(s, s))


def shifted_derivative(
    h: np.ndarray, s: np.ndarray, dh: np.ndarray, ds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(d(H − μS)/dλ, dμ/dλ) from the absolute H, S (flat, eV) and their derivatives dH, dS
    (…, total) along displacement patterns, with μ = `energy_zero` (H, S) on these same
    edges: dμ = (⟨dH,S⟩ + ⟨H,dS⟩ − 2μ⟨S,dS⟩)/⟨S,S⟩ and d(H − μS) = dH − μ dS − dμ S.
    The first is the derivative of a record's stored target ``h``."""
    h, s = np.asarray(h, dtype=np.float64), np.asarray(s, dtype=np.float64)
    dh, ds = np.asarray(dh, dtype=np.float64), np.asarray(ds, dtype=np.float64)
    mu, norm = energy_zero(h, s), float(np.dot(s, s))
    dmu = (dh @ s + ds @ h - 2.0 * mu * (ds @ s)) / norm
    return dh - mu * ds - dmu[..., None] * s, dmu


def _load_npy(data: bytes, where: str) -> np.ndarray:
    """One .npy member (never pickled objects). Corrupt bytes make numpy's header parser raise
    assorted exception types (ValueError, EOFError, SyntaxError, …): all become RecordError."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 — untrusted bytes, numpy raises many types
        raise RecordError(f"{where}: unreadable .npy ({type(exc).__name__}: {exc}).") from None


@dataclass
class HamiltonianRecord:
    """One structure + basis + directed edges + flat H/S blocks + metadata (eV, Å)."""

    key: str
    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    basis: BasisSet
    edges: np.ndarray
    h: np.ndarray
    s: np.ndarray | None
    meta: dict = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
        self.pbc = np.asarray(self.pbc, dtype=bool).reshape(3)
        self.edges = np.asarray(self.edges, dtype=np.int32).reshape(-1, 5)
        self.h = np.asarray(self.h).reshape(-1)
        if self.s is not None:
            self.s = np.asarray(self.s).reshape(-1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_blocks(
        cls,
        key: str,
        numbers: Sequence[int],
        positions: np.ndarray,
        cell: np.ndarray,
        pbc: Sequence[bool],
        basis: BasisSet,
        edges: np.ndarray,
        h_blocks: Sequence[np.ndarray],
        s_blocks: Sequence[np.ndarray] | None,
        meta: Mapping | None = None,
        shift_energy_zero: bool = True,
        dtype: type = np.float32,
        validate: bool = True,
    ) -> HamiltonianRecord:
        """Build from per-edge blocks of the *absolute* H (eV) in package order.

        With ``shift_energy_zero`` (default) the stored target is H − μS and μ goes to meta.
        """
        edges = np.asarray(edges, dtype=np.int32).reshape(-1, 5)
        try:
            n_orb = basis.n_orb_array(numbers) if validate else None
        except KeyError as exc:
            raise RecordError(f"{key}: {exc.args[0]}") from None
        for name, blocks in (("h", h_blocks), ("s", s_blocks)):
            if blocks is None:
                continue
            if len(blocks) != len(edges):
                raise RecordError(f"{key}: {len(blocks)} '{name}' blocks for {len(edges)} edges.")
            if n_orb is None:
                continue
            for e, (b, (i, j)) in enumerate(zip(blocks, edges[:, :2], strict=True)):
                if np.shape(b) != (n_orb[i], n_orb[j]):
                    raise RecordError(
                        f"{key}: '{name}' block of edge {e} {edges[e].tolist()} has shape "
                        f"{np.shape(b)} but basis {basis.name!r} needs {(n_orb[i], n_orb[j])}: "
                        "wrong basis or truncated blocks."
                    )
        h = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1) for b in h_blocks])
        s = (
            None
            if s_blocks is None
            else np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1) for b in s_blocks])
        )
        meta = dict(meta or {})
        if shift_energy_zero:
            if s is None:
                raise RecordError(f"{key}: cannot shift the energy zero without overlap blocks.")
            mu = energy_zero(h, s)
            h = h - mu * s
            meta[keys.ENERGY_ZERO] = mu
        meta.setdefault(keys.ENERGY_ZERO, 0.0)
        rec = cls(
            key=key,
            numbers=np.asarray(numbers),
            positions=positions,
            cell=cell,
            pbc=np.asarray(pbc),
            basis=basis,
            edges=edges,
            h=h.astype(dtype),
            s=None if s is None else s.astype(dtype),
            meta=meta,
        )
        if validate:
            rec.validate()
        return rec

    # ------------------------------------------------------------------ layout
    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.edges.shape[0])

    @property
    def n_orb_per_atom(self) -> np.ndarray:
        return self.basis.n_orb_array(self.numbers)

    @property
    def block_shapes(self) -> np.ndarray:
        """(E, 2) shape of each edge's block."""
        n = self.n_orb_per_atom
        return np.stack([n[self.edges[:, 0]], n[self.edges[:, 1]]], axis=1)

    @property
    def block_offsets(self) -> np.ndarray:
        """(E + 1,) start of each block in the flat arrays (last entry = total size)."""
        sizes = np.prod(self.block_shapes, axis=1)
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def target_shape(self, name: str) -> tuple[int, ...]:
        """Shape a target must have: (total,), or (3N, total) for `DISPLACEMENT_TARGETS`."""
        total = int(self.block_offsets[-1])
        return (3 * self.n_atoms, total) if name in DISPLACEMENT_TARGETS else (total,)

    def target_rows(self, name: str) -> np.ndarray:
        """A target as (rows, total): one row for `h`, `s` and block extras, 3N rows (d/du_κα,
        atom-major) for `DISPLACEMENT_TARGETS`."""
        return self._flat(name).reshape(-1, int(self.block_offsets[-1]))

    def blocks(self, name: str = keys.H, row: int = 0) -> list[np.ndarray]:
        """Per-edge 2-D blocks of `h`, `s` or an extra with the same layout; ``row``: which
        displacement of a `DISPLACEMENT_TARGETS` extra (3κ + α)."""
        flat = self.target_rows(name)[row]
        off = self.block_offsets
        return [
            flat[off[e] : off[e + 1]].reshape(shape) for e, shape in enumerate(self.block_shapes)
        ]

    def _flat(self, name: str) -> np.ndarray:
        if name == keys.H:
            return self.h
        if name == keys.S:
            if self.s is None:
                raise RecordError(f"{self.key}: record has no overlap blocks.")
            return self.s
        if name not in self.extras:
            raise RecordError(
                f"{self.key}: no target {name!r} (has h, s, {', '.join(self.extras) or 'no extras'})."
            )
        return self.extras[name]

    def absolute_h(self) -> np.ndarray:
        """Flat H in eV with the DFT code's energy zero restored (H − μS + μS)."""
        mu = float(self.meta.get(keys.ENERGY_ZERO, 0.0))
        if mu == 0.0:
            return self.h.astype(np.float64)
        return self.h.astype(np.float64) + mu * self._flat(keys.S).astype(np.float64)

    def with_target(self, name: str) -> HamiltonianRecord:
        """This structure with the Hamiltonian target ``name`` (e.g. the extra ``h_hse``) as
        its ``h`` and that target's energy zero (``keys.ENERGY_ZERO_OF``); no extras. For
        band structures of a fine-tuning target with the code that reads ``h``."""
        if name == keys.H:
            return self
        h = self._flat(name)
        if name not in keys.ENERGY_ZERO_OF or h.shape != self.h.shape:
            raise RecordError(
                f"{self.key}: {name!r} is not a Hamiltonian target (those are "
                f"{', '.join(keys.ENERGY_ZERO_OF)})."
            )
        mu = float(self.meta.get(keys.ENERGY_ZERO_OF[name], 0.0))
        return dataclasses.replace(
            self, h=h, extras={}, meta=self.meta | {keys.ENERGY_ZERO: mu, "target": name}
        )

    def edge_vectors(self) -> np.ndarray:
        """(E, 3) r_ij = τ_j + R·cell − τ_i in Å."""
        i, j, r = self.edges[:, 0], self.edges[:, 1], self.edges[:, 2:5]
        return self.positions[j] + r @ self.cell - self.positions[i]

    def reverse_edge_index(self) -> np.ndarray:
        """(E,) index of edge (j, i, −R) for every edge (i, j, R); raises if one is missing."""
        lookup = {tuple(e): k for k, e in enumerate(self.edges.tolist())}
        rev = np.empty(self.n_edges, dtype=np.int64)
        for k, (i, j, rx, ry, rz) in enumerate(self.edges.tolist()):
            other = lookup.get((j, i, -rx, -ry, -rz))
            if other is None:
                raise RecordError(
                    f"{self.key}: edge {k} (i={i}, j={j}, R=({rx},{ry},{rz})) has no reverse edge "
                    f"(j={j}, i={i}, R=({-rx},{-ry},{-rz})); records must hold both directions."
                )
            rev[k] = other
        return rev

    # ------------------------------------------------------------------ validation
    def validate(self, herm_atol: float = HERMITICITY_ATOL_EV) -> None:
        """Check shapes against the basis, finiteness and hermiticity; raise `RecordError`."""
        k = self.key
        if self.positions.shape[0] != self.n_atoms:
            raise RecordError(
                f"{k}: {self.n_atoms} atomic numbers but {len(self.positions)} positions."
            )
        for z in np.unique(self.numbers):
            try:
                self.basis.shells_of(int(z))
            except KeyError as exc:
                raise RecordError(f"{k}: {exc.args[0]}") from None
        if self.n_edges == 0:
            raise RecordError(f"{k}: record has no edges.")
        ij = self.edges[:, :2]
        if ij.min() < 0 or ij.max() >= self.n_atoms:
            bad = int(np.flatnonzero((ij < 0).any(1) | (ij >= self.n_atoms).any(1))[0])
            raise RecordError(
                f"{k}: edge {bad} {self.edges[bad].tolist()} names an atom outside 0..{self.n_atoms - 1}."
            )
        if np.any(self.edges[:, 2:5][:, ~self.pbc] != 0):
            raise RecordError(f"{k}: an edge has a lattice translation along a non-periodic axis.")
        arrays = {keys.H: self.h, keys.S: self.s} | dict(self.extras)
        arrays = {name: arr for name, arr in arrays.items() if arr is not None}
        for name, arr in arrays.items():
            shape = self.target_shape(name)
            if arr.size != int(np.prod(shape)):
                rows = f"{shape[0]} displacements × " if len(shape) == 2 else ""
                raise RecordError(
                    f"{k}: '{name}' holds {arr.size} values but the basis {self.basis.name!r} "
                    f"and {self.n_edges} edges need {rows}{shape[-1]}: wrong basis, atom count "
                    "or truncated blocks."
                )
        self.check_finite()
        rev = self.reverse_edge_index()
        for name in [keys.H, keys.S, *DISPLACEMENT_TARGETS]:
            if name not in arrays:
                continue
            for row in range(self.target_rows(name).shape[0]):
                self._check_hermitian(name, row, rev, herm_atol)

    def check_finite(self) -> None:
        """Raise `RecordError` naming the structure and the atom, cell row or edge block where
        positions, cell or a target hold NaN/Inf (shapes must already match the basis)."""
        k = self.key
        bad_atoms = np.flatnonzero(~np.isfinite(self.positions).all(1))
        if len(bad_atoms):
            raise RecordError(
                f"{k}: non-finite position of atom {int(bad_atoms[0])} "
                f"({self.positions[bad_atoms[0]].tolist()} Å); fix or drop the structure."
            )
        if not np.isfinite(self.cell).all():
            raise RecordError(f"{k}: non-finite cell {self.cell.tolist()}; fix the structure.")
        arrays = {keys.H: self.h, keys.S: self.s} | dict(self.extras)
        for name, arr in arrays.items():
            if arr is None:
                continue
            shape = self.target_shape(name)
            bad = np.argwhere(~np.isfinite(arr.reshape(-1, shape[-1])))
            if len(bad):
                row, at = (int(x) for x in bad[0])
                e = int(np.searchsorted(self.block_offsets, at, side="right") - 1)
                where = f" (displacement row {row})" if len(shape) == 2 else ""
                raise RecordError(
                    f"{k}: '{name}' has a non-finite value in block of edge {e} "
                    f"{self.edges[e].tolist()}{where}; the DFT output is broken: recompute "
                    "or drop the structure."
                )

    def _check_hermitian(self, name: str, row: int, rev: np.ndarray, atol: float) -> None:
        """Block e of ``name`` (displacement ``row``) = transpose of its reverse edge's."""
        blocks = self.blocks(name, row)
        for e, r in enumerate(rev):
            if r < e:
                continue
            err = float(np.max(np.abs(blocks[e] - blocks[r].T)))
            if err > atol:
                where = f" (displacement row {row})" if name in DISPLACEMENT_TARGETS else ""
                raise RecordError(
                    f"{self.key}: '{name}'{where} is not hermitian: block of edge {e} "
                    f"{self.edges[e].tolist()} differs from the transpose of its reverse edge {r} "
                    f"by {err:.3g} (tolerance {atol:g}); check the orbital convention of the source."
                )

    # ------------------------------------------------------------------ files (npy/json)
    def structure_json(self) -> dict:
        return {
            keys.KEY: self.key,
            keys.NUMBERS: self.numbers.tolist(),
            keys.POSITIONS: self.positions.tolist(),
            keys.CELL: self.cell.tolist(),
            keys.PBC: self.pbc.tolist(),
            "basis_set": self.basis.to_dict(),
            keys.META: self.meta,
        }

    def to_files(self) -> dict[str, bytes]:
        """Serialise to named file payloads: structure.json, edges.npy, h.npy, s.npy, extras."""
        files = {"structure.json": json.dumps(self.structure_json()).encode()}
        arrays = {keys.EDGES: self.edges, keys.H: self.h}
        if self.s is not None:
            arrays[keys.S] = self.s
        arrays |= self.extras
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
            files[f"{name}.npy"] = buf.getvalue()
        return files

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], origin: str = "<memory>") -> HamiltonianRecord:
        """Inverse of `to_files`; `origin` (a path or shard name) goes into error messages."""
        try:
            st = json.loads(files["structure.json"])
            arrays = {
                name[: -len(".npy")]: _load_npy(data, f"{origin}: {name}")
                for name, data in files.items()
                if name.endswith(".npy")
            }
            edges = arrays.pop(keys.EDGES)
            h = arrays.pop(keys.H)
        except KeyError as exc:
            raise RecordError(f"{origin}: sample is missing {exc.args[0]!r}.") from None
        except (ValueError, json.JSONDecodeError) as exc:
            raise RecordError(f"{origin}: unreadable sample ({exc}).") from None
        s = arrays.pop(keys.S, None)
        return cls(
            key=st[keys.KEY],
            numbers=np.asarray(st[keys.NUMBERS]),
            positions=np.asarray(st[keys.POSITIONS]),
            cell=np.asarray(st[keys.CELL]),
            pbc=np.asarray(st[keys.PBC]),
            basis=BasisSet.from_dict(st["basis_set"]),
            edges=edges,
            h=h,
            s=s,
            meta=st.get(keys.META, {}),
            extras=arrays,
        )

    def save(self, directory: str | os.PathLike) -> None:
        """Write the record's files into `directory` atomically (tmp dir + rename)."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, data in self.to_files().items():
            (tmp / name).write_bytes(data)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HamiltonianRecord:
        directory = Path(directory)
        if not (directory / "structure.json").is_file():
            raise RecordError(f"{directory}: no structure.json; not a saved record directory.")
        files = {
            p.name: p.read_bytes() for p in directory.iterdir() if p.suffix in (".json", ".npy")
        }
        return cls.from_files(files, origin=str(directory))
