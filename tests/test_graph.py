"""Neighbour edges, padded universal blocks, batching and the export inverse."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from foundation import keys
from foundation.basis import BasisSet
from foundation.data.graph import (
    blocks_from_padded,
    collate_graphs,
    neighbor_edges,
    record_to_graph,
    reverse_edge_index,
    structure_to_graph,
)
from foundation.data.record import HamiltonianRecord, RecordError

BASIS = BasisSet.from_spec({"Na": "2s1p", "Cl": "1s1p1d", "H": "1s"}, name="test")


def _random_record(atoms: Atoms, cutoff: float, seed: int = 0) -> HamiltonianRecord:
    """Consistent toy record: random blocks on neighbor_edges, made hermitian, S = H-like."""
    rng = np.random.default_rng(seed)
    edges = neighbor_edges(atoms.numbers, atoms.positions, atoms.cell[:], atoms.pbc, cutoff)
    lookup = {tuple(e): k for k, e in enumerate(edges.tolist())}
    n = BASIS.n_orb_array(atoms.numbers)
    h = [rng.normal(size=(n[i], n[j])) for i, j in edges[:, :2]]
    for k, (i, j, rx, ry, rz) in enumerate(edges.tolist()):
        r = lookup[(j, i, -rx, -ry, -rz)]
        if r <= k:
            h[k] = h[r].T.copy() if r < k else 0.5 * (h[k] + h[k].T)
    s = [0.1 * b for b in h]
    return HamiltonianRecord.from_blocks(
        "toy", atoms.numbers, atoms.positions, atoms.cell[:], atoms.pbc, BASIS, edges, h, s,
        shift_energy_zero=False, dtype=np.float64,
    )  # fmt: skip


def test_neighbor_edges_both_directions_onsite_and_sorted():
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.rattle(0.05, seed=0)
    edges = neighbor_edges(atoms.numbers, atoms.positions, atoms.cell[:], atoms.pbc, 4.5)
    assert edges.dtype == np.int32 and edges.shape[1] == 5
    rows = [tuple(e) for e in edges.tolist()]
    assert rows == sorted(rows), "edges must be sorted by (i, j, Rx, Ry, Rz)"
    assert len(set(rows)) == len(rows)
    for i in range(len(atoms)):
        assert (i, i, 0, 0, 0) in rows
    for i, j, rx, ry, rz in rows:
        assert (j, i, -rx, -ry, -rz) in rows
        d = np.linalg.norm(
            atoms.positions[j] + np.array([rx, ry, rz]) @ atoms.cell[:] - atoms.positions[i]
        )
        assert d < 4.5
    # images of an atom itself are ordinary edges; the count matches a brute-force search
    brute = 0
    for i in range(2):
        for j in range(2):
            for r in np.ndindex(7, 7, 7):
                r = np.array(r) - 3
                d = np.linalg.norm(atoms.positions[j] + r @ atoms.cell[:] - atoms.positions[i])
                brute += d < 4.5
    assert len(rows) == brute  # brute force counts (i, i, 0) at d = 0 as on-site too


def test_neighbor_edges_molecule_without_cell():
    h2 = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    edges = neighbor_edges(h2.numbers, h2.positions, h2.cell[:], h2.pbc, 3.0)
    assert edges.tolist() == [[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]


def test_record_to_graph_pads_blocks_and_inverts():
    atoms = bulk("NaCl", "rocksalt", a=5.64) * (1, 1, 2)
    atoms.rattle(0.05, seed=1)
    rec = _random_record(atoms, 4.5)
    uni = BASIS.universal
    g = record_to_graph(rec, uni, dtype=torch.float64)
    e, n = rec.n_edges, uni.n_orb
    assert g[keys.H].shape == (e, n, n) and g[keys.BLOCK_MASK].shape == (e, n, n)
    assert g[keys.EDGE_INDEX].shape == (2, e) and g[keys.EDGE_INDEX].dtype == torch.long
    assert g[keys.CELL].shape == (1, 3, 3)
    assert int(g[keys.ONSITE].sum()) == len(atoms)
    assert torch.all(g[keys.H][~g[keys.BLOCK_MASK]] == 0)
    for name in (keys.H, keys.S):
        back = blocks_from_padded(g[name], rec.numbers, rec.edges, uni)
        for a, b in zip(back, rec.blocks(name), strict=True):
            np.testing.assert_array_equal(a, b)
    # the (2, E) edge index works as well, and the reverse index pairs transposed blocks
    back = blocks_from_padded(g[keys.H], rec.numbers, g[keys.EDGE_INDEX], uni)
    rev = g[keys.EDGE_REVERSE].numpy()
    for k in range(e):
        np.testing.assert_array_equal(back[k], back[rev[k]].T)
    assert g[keys.POSITIONS].dtype == torch.float64
    assert record_to_graph(rec, uni)[keys.H].dtype == torch.float32


def test_record_to_graph_names_the_record_for_unknown_elements_and_targets():
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    rec = _random_record(atoms, 4.0)
    small = BasisSet.from_spec({"Na": "2s1p"}).universal
    with pytest.raises(RecordError, match="toy: Element Cl is not in basis"):
        record_to_graph(rec, small)
    with pytest.raises(RecordError, match="toy: no target 'h_hse'"):
        record_to_graph(rec, BASIS.universal, targets=(keys.H, keys.H_HSE))


def test_collate_offsets_indices_and_adds_batch_vectors():
    a = _random_record(bulk("NaCl", "rocksalt", a=5.64), 4.0, seed=2)
    b = _random_record(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]), 3.0, seed=3)
    uni = BASIS.universal
    ga, gb = record_to_graph(a, uni), record_to_graph(b, uni)
    batch = collate_graphs([ga, gb])
    ea, eb = a.n_edges, b.n_edges
    assert batch[keys.CELL].shape == (2, 3, 3)
    assert batch[keys.N_ATOMS].tolist() == [2, 2] and batch[keys.N_EDGES].tolist() == [ea, eb]
    assert batch[keys.BATCH].tolist() == [0, 0, 1, 1]
    assert batch[keys.EDGE_BATCH].tolist() == [0] * ea + [1] * eb
    assert torch.equal(batch[keys.EDGE_INDEX][:, ea:], gb[keys.EDGE_INDEX] + 2)
    assert torch.equal(batch[keys.EDGE_REVERSE][ea:], gb[keys.EDGE_REVERSE] + ea)
    assert torch.equal(batch[keys.H][:ea], ga[keys.H])
    with pytest.raises(ValueError, match="graph 1 has keys"):
        collate_graphs([ga, record_to_graph(b, uni, targets=(keys.H,))])


def test_reverse_edge_index_pairs_edges_and_names_a_missing_one():
    edges = np.array([[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [1, 0, -1, 0, 0], [1, 1, 0, 0, 0]])
    assert reverse_edge_index(edges).tolist() == [0, 2, 1, 3]
    with pytest.raises(RecordError, match=r"cell7: edge 1 \[0, 1, 1, 0, 0\] has no reverse"):
        reverse_edge_index(edges[:2], key="cell7")


def test_structure_to_graph_matches_record_to_graph():
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.rattle(0.05, seed=4)
    rec = _random_record(atoms, 4.5)
    a = structure_to_graph(
        atoms.numbers, atoms.positions, atoms.cell[:], atoms.pbc, BASIS.universal, 4.5
    )
    b = record_to_graph(rec, BASIS.universal, targets=())
    assert set(b) == set(a) | {keys.N_ELECTRONS}  # a bare structure has no electron count
    for name in a:
        assert torch.equal(a[name], b[name]), name
