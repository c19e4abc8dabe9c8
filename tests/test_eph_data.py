"""Electron–phonon targets in records, shards and batches (no DFT, no model).

``dh``/``ds`` are (3N, total) extras, one flat block array per Cartesian displacement; they
validate (size, finiteness, hermiticity row by row), survive shards, and pad to
(3N·E, n_uni, n_uni) rows in graphs so that structures with different N batch together.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from foundation import keys
from foundation.data.graph import (
    collate_graphs,
    displacement_rows,
    displacement_tangents,
    record_to_graph,
)
from foundation.data.record import RecordError, energy_zero, shifted_derivative
from foundation.data.shards import iter_records, write_shards
from foundation.data.synthetic import random_record


def _hermitian_rows(record, rng: np.random.Generator) -> np.ndarray:
    """(3N, total) random rows with X_ji(−R) = X_ij(R)ᵀ in every row."""
    rev = record.reverse_edge_index()
    off = record.block_offsets
    rows = rng.standard_normal((3 * record.n_atoms, int(off[-1])))
    for row in rows:
        for e, r in enumerate(rev):
            if r > e:
                block = row[off[e] : off[e + 1]].reshape(record.block_shapes[e])
                row[off[r] : off[r + 1]] = block.T.reshape(-1)
            elif r == e:
                block = row[off[e] : off[e + 1]].reshape(record.block_shapes[e])
                row[off[e] : off[e + 1]] = (0.5 * (block + block.T)).reshape(-1)
    return rows


@pytest.fixture()
def records():
    """Two synthetic records (2 and 3 atoms) with dh/ds extras."""
    rng = np.random.default_rng(0)
    out = []
    for k, symbols in enumerate((["Si", "C"], ["Ga", "As", "O"])):
        rec = random_record(f"eph-{k}", symbols, seed=k)
        rec.extras[keys.DH] = _hermitian_rows(rec, rng).astype(np.float32)
        rec.extras[keys.DS] = _hermitian_rows(rec, rng).astype(np.float32)
        rec.validate()
        out.append(rec)
    return out


def test_shifted_derivative_is_the_derivative_of_the_stored_target():
    """d(H − μS)/dλ with μ = ⟨H,S⟩/⟨S,S⟩ recomputed at every λ, by central differences."""
    rng = np.random.default_rng(1)
    h, s, dh, ds = rng.standard_normal((4, 50))
    s += 3.0
    analytic, dmu = shifted_derivative(h, s, dh[None], ds[None])

    def target(lam: float) -> tuple[np.ndarray, float]:
        hl, sl = h + lam * dh, s + lam * ds
        mu = energy_zero(hl, sl)
        return hl - mu * sl, mu

    step = 1e-6
    (tp, mp), (tm, mm) = target(step), target(-step)
    np.testing.assert_allclose(analytic[0], (tp - tm) / (2 * step), atol=1e-7)
    np.testing.assert_allclose(dmu[0], (mp - mm) / (2 * step), atol=1e-7)


def test_displacement_targets_are_validated(records):
    rec = records[0]
    good = rec.extras[keys.DH]
    rec.extras[keys.DH] = good[:-1]
    with pytest.raises(RecordError, match=r"'dh' holds .* need 6 displacements ×"):
        rec.validate()
    bad = good.copy()
    bad[4, 7] = np.nan
    rec.extras[keys.DH] = bad
    with pytest.raises(RecordError, match=r"'dh' has a non-finite value .*displacement row 4"):
        rec.validate()
    skew = good.copy()
    first_offsite = int(np.flatnonzero(rec.edges[:, 0] != rec.edges[:, 1])[0])
    skew[2, rec.block_offsets[first_offsite]] += 1.0
    rec.extras[keys.DH] = skew
    with pytest.raises(RecordError, match=r"'dh' \(displacement row 2\) is not hermitian"):
        rec.validate()


def test_displacement_targets_survive_shards(records, tmp_path):
    manifest = write_shards(records, tmp_path, name="eph", val_fraction=0, test_fraction=0)
    assert {keys.DH, keys.DS} <= set(manifest["targets"])
    back = {r.key: r for r in iter_records(tmp_path)}
    for rec in records:
        for name in (keys.DH, keys.DS):
            np.testing.assert_array_equal(back[rec.key].target_rows(name), rec.extras[name])


def test_graph_rows_and_batch_layout(records):
    """Row p·E + e of a graph's dh is the padded block of displacement p on edge e; in a
    batch, `displacement_rows` names each row's tangent and batch edge, and
    `displacement_tangents` moves atom a of every structure."""
    universal = records[1].basis.merged(records[0].basis).universal
    graphs = [record_to_graph(r, universal, (keys.H, keys.DH)) for r in records]
    for rec, graph in zip(records, graphs, strict=True):
        n_rows = 3 * rec.n_atoms
        assert graph[keys.DH].shape == (n_rows * rec.n_edges, universal.n_orb, universal.n_orb)
        padded = graph[keys.DH].reshape(n_rows, rec.n_edges, universal.n_orb, universal.n_orb)
        for p in (0, n_rows - 1):
            single = record_to_graph(rec, universal, (keys.H,))
            single_rec = replace(rec, h=rec.target_rows(keys.DH)[p])
            expected = record_to_graph(single_rec, universal, (keys.H,))[keys.H]
            torch.testing.assert_close(padded[p], expected)
            assert torch.equal(single[keys.BLOCK_MASK], graph[keys.BLOCK_MASK])
    batch = collate_graphs(graphs)
    tangent, edge = displacement_rows(batch, keys.DH)
    assert (
        len(tangent) == batch[keys.DH].shape[0] == sum(3 * r.n_atoms * r.n_edges for r in records)
    )
    e0 = records[0].n_edges
    second = slice(3 * records[0].n_atoms * e0, None)
    assert int(edge[second].min()) == e0 and int(tangent[second].max()) == 3 * 3 - 1
    tangents = displacement_tangents(batch)
    assert tangents.shape == (9, 5, 3)
    # tangent 3a + α moves atom a of both structures (atoms 0|2 for a = 0), only atom 4 for a = 2
    assert torch.equal(tangents[1].nonzero(), torch.tensor([[0, 1], [2, 1]]))
    assert torch.equal(tangents[8].nonzero(), torch.tensor([[4, 2]]))


def test_absent_optional_displacement_target_has_no_rows(records):
    """A structure without dh (replayed data) holds no rows and `displacement_rows` skips it."""
    universal = records[1].basis.merged(records[0].basis).universal
    bare = replace(records[1], extras={})
    graphs = [
        record_to_graph(r, universal, (keys.H, keys.DH), optional=(keys.DH,))
        for r in (records[0], bare)
    ]
    batch = collate_graphs(graphs)
    tangent, edge = displacement_rows(batch, keys.DH)
    assert batch[keys.DH].shape[0] == len(edge) == 6 * records[0].n_edges
    assert int(edge.max()) < records[0].n_edges
