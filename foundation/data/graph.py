"""Graphs for the model: neighbour edges (i, j, R), padded universal blocks, batching.

* `neighbor_edges` lists every directed pair closer than a cutoff (both directions, periodic
  images through the integer shift R) plus one on-site edge (i, i, 0, 0, 0) per atom, sorted
  lexicographically by (i, j, Rx, Ry, Rz) so the order never depends on the neighbour search.
* `record_to_graph` turns a `HamiltonianRecord` into a dict of tensors keyed by
  `foundation.keys`: structure, edges, reverse-edge index, on-site flags, block masks and
  each target as padded (E, n_uni, n_uni) blocks in the universal basis (zeros outside the
  mask). Edge vectors are *not* stored: the model computes r_ij = τ_j + R·cell − τ_i from
  positions so that autograd with respect to positions works.
* `structure_to_graph` does the same for a bare structure (prediction), on `neighbor_edges`.
* `reverse_edge_index` pairs every edge (i, j, R) with its reverse (j, i, −R).
* `collate_graphs` concatenates graphs into one batch (offsetting indices).
* Electron–phonon targets (``dh``, ``ds``: one block array per Cartesian displacement u_κα,
  `foundation.data.record.DISPLACEMENT_TARGETS`) are padded to (3N·E, n_uni, n_uni), rows
  ordered displacement-major (row p·E + e = d/du_p of edge e, p = 3κ + α), so batches of
  structures with different N concatenate like any other target; `displacement_rows` and
  `displacement_tangents` tell a model-side derivative which rows are which.
* `blocks_from_padded` is the inverse of the padding, for export.

Units: Å; blocks in eV (H) or dimensionless (S), package orbital order (DESIGN.md §3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase.neighborlist import primitive_neighbor_list

from foundation import keys
from foundation.basis import UniversalBasis
from foundation.data.record import DISPLACEMENT_TARGETS, HamiltonianRecord, RecordError

_INDEX_KEYS = {keys.EDGE_INDEX: keys.N_ATOMS, keys.EDGE_REVERSE: keys.N_EDGES}


def neighbor_edges(
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: Sequence[bool],
    cutoff_A: float,
) -> np.ndarray:
    """(E, 5) int32 edges (i, j, Rx, Ry, Rz) with |τ_j + R·cell − τ_i| < cutoff_A.

    Both directions of every pair are listed, images of an atom itself (i, i, R ≠ 0) are
    edges like any other, and each atom gets one on-site edge (i, i, 0, 0, 0). Rows are sorted
    by (i, j, Rx, Ry, Rz). Positions and cell rows in Å.
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    n = positions.shape[0]
    if len(np.asarray(numbers).reshape(-1)) != n:
        raise ValueError(f"neighbor_edges: {len(numbers)} atomic numbers but {n} positions.")
    if cutoff_A <= 0:
        raise ValueError(f"neighbor_edges: cutoff_A must be positive, got {cutoff_A}.")
    i, j, shift = primitive_neighbor_list(
        "ijS",
        np.asarray(pbc, dtype=bool),
        np.asarray(cell, dtype=np.float64).reshape(3, 3),
        positions,
        float(cutoff_A),
        self_interaction=False,
        use_scaled_positions=False,
    )
    edges = np.concatenate(
        [
            np.column_stack([i, j, shift]),
            np.column_stack([np.arange(n), np.arange(n), np.zeros((n, 3), dtype=np.int64)]),
        ]
    ).astype(np.int32)
    order = np.lexsort(edges.T[::-1])
    return edges[order]


def reverse_edge_index(edges: np.ndarray, key: str = "structure") -> np.ndarray:
    """(E,) index of edge (j, i, −R) for every edge (i, j, R); raises naming a missing one."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 5)
    flipped = np.concatenate([edges[:, [1, 0]], -edges[:, 2:5]], axis=1)
    _, ids = np.unique(np.concatenate([edges, flipped]), axis=0, return_inverse=True)
    ids = ids.reshape(-1)
    position = np.full(ids.max() + 1, -1, dtype=np.int64)
    position[ids[: len(edges)]] = np.arange(len(edges))
    reverse = position[ids[len(edges) :]]
    if (reverse < 0).any():
        k = int(np.flatnonzero(reverse < 0)[0])
        raise RecordError(
            f"{key}: edge {k} {edges[k].tolist()} has no reverse edge {flipped[k].tolist()}; "
            "graphs must hold both directions of every pair."
        )
    return reverse


def _structure_graph(
    key: str,
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    edges: np.ndarray,
    universal: UniversalBasis,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 5)
    src, dst, shift = edges[:, 0], edges[:, 1], edges[:, 2:5]
    for z in np.unique(numbers):
        try:
            universal.orbital_index(int(z))
        except KeyError as exc:
            raise RecordError(f"{key}: {exc.args[0]}") from None
    masks = universal.mask_table()[numbers]  # (N, n_uni)
    return {
        keys.NUMBERS: torch.as_tensor(numbers, dtype=torch.long),
        keys.POSITIONS: torch.as_tensor(np.asarray(positions).reshape(-1, 3), dtype=dtype),
        keys.CELL: torch.as_tensor(np.asarray(cell), dtype=dtype).reshape(1, 3, 3),
        keys.EDGE_INDEX: torch.as_tensor(np.stack([src, dst]), dtype=torch.long),
        keys.EDGE_SHIFT: torch.as_tensor(shift, dtype=torch.long),
        keys.EDGE_REVERSE: torch.as_tensor(reverse_edge_index(edges, key), dtype=torch.long),
        keys.ONSITE: torch.as_tensor((src == dst) & ~shift.any(axis=1)),
        keys.BLOCK_MASK: torch.as_tensor(masks[src][:, :, None] & masks[dst][:, None, :]),
        keys.N_ATOMS: torch.tensor([len(numbers)], dtype=torch.long),
        keys.N_EDGES: torch.tensor([len(edges)], dtype=torch.long),
    }


def structure_to_graph(
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: Sequence[bool],
    universal: UniversalBasis,
    cutoff_A: float,
    dtype: torch.dtype = torch.float32,
    key: str = "structure",
) -> dict[str, torch.Tensor]:
    """A bare structure (no targets) → graph on `neighbor_edges`, e.g. for prediction.

    Same keys as `record_to_graph` minus the targets; edges (i, j, R) are those of
    ``neighbor_edges(numbers, positions, cell, pbc, cutoff_A)`` in that order.
    """
    edges = neighbor_edges(numbers, positions, cell, pbc, cutoff_A)
    return _structure_graph(key, numbers, positions, cell, edges, universal, dtype)


def _has_target(record: HamiltonianRecord, name: str) -> bool:
    if name == keys.H:
        return True
    if name == keys.S:
        return record.s is not None
    return name in record.extras


def record_to_graph(
    record: HamiltonianRecord,
    universal: UniversalBasis,
    targets: Sequence[str] = (keys.H, keys.S),
    dtype: torch.dtype = torch.float32,
    optional: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """One record → dict of tensors for the model (keys from `foundation.keys`).

    Holds NUMBERS (N,) long, POSITIONS (N, 3), CELL (1, 3, 3), EDGE_INDEX (2, E) long,
    EDGE_SHIFT (E, 3) long, EDGE_REVERSE (E,) long, ONSITE (E,) bool, BLOCK_MASK
    (E, n_uni, n_uni) bool, each target (E, n_uni, n_uni) zero-padded, N_ATOMS and N_EDGES
    (1,) long, N_ELECTRONS (1,) float64 (``meta["n_electrons"]``, NaN when the record has
    none; the band-space loss needs it). Other floating tensors have ``dtype``. Edges are the
    record's, in its order.
    A `DISPLACEMENT_TARGETS` target is (3N·E, n_uni, n_uni): row p·E + e holds d/du_p (p =
    3κ + α) of edge e's block (zero rows when an optional one is absent).

    ``optional``: targets the record may lack (e.g. ``h_hse`` on replayed pretraining data).
    Each gets presence flags ``keys.present(name)`` (E,) bool — all True if the record has it,
    else all False with zero blocks — so graphs with and without it batch together and
    losses/metrics skip the absent ones. Any other target in ``targets`` is required.
    """
    graph = _structure_graph(
        record.key, record.numbers, record.positions, record.cell, record.edges, universal, dtype
    )
    n_electrons = record.meta.get(keys.N_ELECTRONS)
    graph[keys.N_ELECTRONS] = torch.tensor(
        [float("nan") if n_electrons is None else float(n_electrons)], dtype=torch.float64
    )
    numbers, src, dst = record.numbers, record.edges[:, 0], record.edges[:, 1]
    index = {int(z): universal.orbital_index(int(z)) for z in np.unique(numbers)}
    # Place each target's blocks into the padded basis, one species pair at a time.
    z_pairs = np.stack([numbers[src], numbers[dst]], axis=1)
    groups = [np.flatnonzero((z_pairs == p).all(axis=1)) for p in np.unique(z_pairs, axis=0)]
    n_uni = universal.n_orb
    for name in targets:
        padded = np.zeros((record.n_edges, n_uni, n_uni), dtype=np.float64)
        if name in optional:
            has = _has_target(record, name)
            graph[keys.present(name)] = torch.full((record.n_edges,), has)
            if not has:
                padded = padded[:0] if name in DISPLACEMENT_TARGETS else padded
                graph[name] = torch.as_tensor(padded, dtype=dtype)
                continue
        rows = record.target_rows(name)  # raises a RecordError naming the record if absent
        padded = np.zeros((len(rows), record.n_edges, n_uni, n_uni), dtype=np.float64)
        for row in range(len(rows)):
            blocks = record.blocks(name, row)
            for sel in groups:
                ii, jj = index[numbers[src[sel[0]]]], index[numbers[dst[sel[0]]]]
                padded[row, sel[:, None, None], ii[None, :, None], jj[None, None, :]] = np.stack(
                    [blocks[e] for e in sel]
                )
        graph[name] = torch.as_tensor(padded.reshape(-1, n_uni, n_uni), dtype=dtype)
    return graph


def displacement_tangents(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(3·max N_b, N, 3) tangents of a batch: tangent 3a + α moves atom a of *every* structure
    (that has one) along axis α by 1 Å. Structures in a batch do not interact, so the
    derivative of structure b's blocks along it is d/du_(a,α) of that structure alone: 3·max N
    directional derivatives give every structure's 3N_b Cartesian derivatives."""
    n_atoms = batch[keys.N_ATOMS]
    positions = batch[keys.POSITIONS]
    device = positions.device
    start = torch.cumsum(n_atoms, 0) - n_atoms
    atom = torch.arange(positions.shape[0], device=device)
    local = atom - torch.repeat_interleave(start, n_atoms)  # index within its structure
    tangents = torch.zeros(
        3 * int(n_atoms.max()), len(atom), 3, dtype=positions.dtype, device=device
    )
    for axis in range(3):
        tangents[3 * local + axis, atom, axis] = 1.0
    return tangents


def displacement_rows(
    batch: dict[str, torch.Tensor], name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tangent, edge) long index of every row of a collated `DISPLACEMENT_TARGETS` target
    ``name`` (Σ_b 3N_b·E_b rows, per structure displacement-major): the row holds the
    derivative along `displacement_tangents` ``[tangent]`` of the block of batch edge
    ``edge``. Structures whose presence flags (``keys.present(name)``) are False hold no rows."""
    n_edges = batch[keys.N_EDGES]
    device = n_edges.device
    start = torch.cumsum(n_edges, 0) - n_edges
    flags = batch.get(keys.present(name))
    tangent, edge = [], []
    for n, e, e0 in zip(
        batch[keys.N_ATOMS].tolist(), n_edges.tolist(), start.tolist(), strict=True
    ):
        if e == 0 or (flags is not None and not bool(flags[e0])):
            continue
        tangent.append(torch.arange(3 * n, device=device).repeat_interleave(e))
        edge.append(e0 + torch.arange(e, device=device).repeat(3 * n))
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([empty, *tangent]), torch.cat([empty, *edge])


def collate_graphs(graphs: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate graphs into one batch.

    EDGE_INDEX is offset by the atoms and EDGE_REVERSE by the edges of the graphs before it;
    every other tensor is concatenated along its first axis (so CELL becomes (B, 3, 3) and
    N_ATOMS/N_EDGES (B,)). Adds BATCH (N,) and EDGE_BATCH (E,): the structure of each atom/edge.
    """
    if not graphs:
        raise ValueError("collate_graphs: empty list of graphs.")
    names = list(graphs[0])
    for g, graph in enumerate(graphs):
        if list(graph) != names:
            raise ValueError(
                f"collate_graphs: graph {g} has keys {sorted(graph)} but graph 0 has {sorted(names)}."
            )
    n_atoms = torch.cat([g[keys.N_ATOMS] for g in graphs])
    n_edges = torch.cat([g[keys.N_EDGES] for g in graphs])
    starts = {
        keys.N_ATOMS: torch.cumsum(n_atoms, 0) - n_atoms,
        keys.N_EDGES: torch.cumsum(n_edges, 0) - n_edges,
    }
    batch: dict[str, torch.Tensor] = {}
    for name in names:
        if name in (keys.BATCH, keys.EDGE_BATCH):
            continue
        if name in _INDEX_KEYS:
            start = starts[_INDEX_KEYS[name]]
            batch[name] = torch.cat([g[name] + start[b] for b, g in enumerate(graphs)], dim=-1)
        else:
            batch[name] = torch.cat([g[name] for g in graphs], dim=0)
    structure = torch.arange(len(graphs))
    batch[keys.BATCH] = torch.repeat_interleave(structure, n_atoms)
    batch[keys.EDGE_BATCH] = torch.repeat_interleave(structure, n_edges)
    return batch


def blocks_from_padded(
    padded: torch.Tensor | np.ndarray,
    numbers: Sequence[int] | np.ndarray,
    edges: np.ndarray | torch.Tensor,
    universal: UniversalBasis,
) -> list[np.ndarray]:
    """Padded (E, n_uni, n_uni) blocks → per-edge (n_orb(Z_i), n_orb(Z_j)) float64 blocks.

    ``edges`` is either the record's (E, 5) rows (i, j, Rx, Ry, Rz) or an EDGE_INDEX (2, E);
    ``numbers`` are the atomic numbers of the structure. For a record:
    ``blocks_from_padded(pred, record.numbers, record.edges, universal)``.
    """
    if isinstance(padded, torch.Tensor):
        padded = padded.detach().cpu().double().numpy()
    edges = np.asarray(edges.cpu() if isinstance(edges, torch.Tensor) else edges)
    n_edges = padded.shape[0]
    if edges.shape == (n_edges, 5):
        src, dst = edges[:, 0], edges[:, 1]
    elif edges.shape == (2, n_edges):
        src, dst = edges[0], edges[1]
    else:
        raise ValueError(
            f"blocks_from_padded: {n_edges} blocks need edges of shape ({n_edges}, 5) or "
            f"(2, {n_edges}), got {tuple(edges.shape)}."
        )
    numbers = np.asarray(numbers).reshape(-1)
    index = [universal.orbital_index(int(z)) for z in numbers]
    return [
        padded[e][np.ix_(index[i], index[j])] for e, (i, j) in enumerate(zip(src, dst, strict=True))
    ]


__all__ = [
    "blocks_from_padded",
    "collate_graphs",
    "displacement_rows",
    "displacement_tangents",
    "neighbor_edges",
    "record_to_graph",
    "reverse_edge_index",
    "structure_to_graph",
]
