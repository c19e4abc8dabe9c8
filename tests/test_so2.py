"""SO(2) convolution: edge frames, parity selection, exact O(3) equivariance with d shells,
finite gradients along lattice axes, mmax truncation, chunked = unchunked.

The generic model checks (`tests/test_model.py`) already run for every registered convolution;
these add what is specific to the rotate-to-the-axis construction, in float64 throughout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from e3nn import o3

from foundation import keys, testing
from foundation.basis import BasisSet
from foundation.data.graph import structure_to_graph
from foundation.model import build_model
from foundation.model.so2 import EdgeFrames, MMajorLayout, SO2Convolution, unpack_wigner
from foundation.rotations import double_precision, e3nn_frame_matrix, random_rotation

SPD_BASIS = BasisSet.from_spec({"Ti": "2s2p1d", "O": "1s1p", "Ag": "1s1p1d"}, name="test-spd")
IRREPS = "8x0e+4x0o+4x1o+4x1e+4x2e+2x2o+2x3o+2x3e+2x4e+2x4o"


def _model(**overrides):
    torch.manual_seed(0)
    cfg = dict(
        cutoff_A=5.0,
        num_layers=2,
        irreps_node=IRREPS,
        sh_lmax=2,
        radial_hidden=16,
        conv="so2",
        optimize_einsums=False,
    )
    with double_precision():
        return build_model(cfg | overrides, basis=SPD_BASIS).double()


def _graph(atoms, cutoff=5.0):
    return structure_to_graph(
        atoms.numbers, atoms.positions, atoms.cell[:], atoms.pbc, SPD_BASIS.universal, cutoff,
        dtype=torch.float64,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tio_graph():
    atoms = bulk("TiO", "rocksalt", a=4.2) * (1, 1, 2)
    atoms[0].symbol = "Ag"
    atoms.rattle(0.07, seed=3)
    return _graph(atoms)


def test_edge_frames_are_the_wigner_d_of_a_rotation_taking_the_axis_to_the_edge():
    """D_l(R_e) is e3nn's D of a rotation with R_e ŷ = r̂ (orthogonal, det +1 rotation of Y_l)."""
    torch.manual_seed(0)
    with double_precision():
        frames = EdgeFrames(4)
        v = torch.randn(64, 3, dtype=torch.float64) * 3.0
        packed = frames(v)
        y_axis = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
        for l in range(5):
            d = unpack_wigner(packed, l)
            eye = torch.eye(2 * l + 1, dtype=torch.float64)
            torch.testing.assert_close(d @ d.transpose(1, 2), eye.expand_as(d), atol=1e-12, rtol=0)
            y_r = o3.spherical_harmonics(l, v, normalize=True)
            y_axis_l = o3.spherical_harmonics(l, y_axis, normalize=True)
            torch.testing.assert_close(d @ y_axis_l, y_r, atol=1e-12, rtol=0)
        # the whole packed set is one representation: D_2 equals e3nn's D of the same rotation
        rot = torch.stack([unpack_wigner(packed, 1)[k] for k in range(3)])
        for k in range(3):
            expected = o3.Irrep(2, 1).D_from_matrix(rot[k])
            torch.testing.assert_close(unpack_wigner(packed, 2)[k], expected, atol=1e-12, rtol=0)


def test_mmajor_layout_round_trips_and_records_parity_classes():
    layout = MMajorLayout(o3.Irreps(IRREPS), mmax=4)
    assert sorted(layout.lmajor.tolist()) == list(range(o3.Irreps(IRREPS).dim))
    assert sorted(layout.mmajor.tolist()) == list(range(len(layout.lmajor)))
    back = layout.mmajor_to_lmajor()
    torch.testing.assert_close(back[layout.mmajor], torch.arange(len(layout.mmajor)))
    # m = 0 holds every channel; s = p·(−1)^l is +1 for 0e, 1o, 2e, … and −1 for 0o, 1e, …
    assert layout.counts[0] == sum(mul for mul, _ in o3.Irreps(IRREPS))
    assert layout.sign[0][:8].tolist() == [1] * 8 and layout.sign[0][8:12].tolist() == [-1] * 4
    truncated = MMajorLayout(o3.Irreps(IRREPS), mmax=1)
    assert (
        len(truncated.counts) == 2 and (truncated.mmajor_to_lmajor() == len(truncated.mmajor)).any()
    )


@pytest.mark.parametrize("mmax", [None, 2, 1])
def test_so2_model_is_o3_equivariant_with_d_shells(tio_graph, mmax):
    model = _model(mmax=mmax)
    errors = testing.assert_equivariant(
        model, tio_graph, SPD_BASIS.universal.shells, seeds=(0, 1), rtol=1e-10
    )
    print(f"mmax={mmax}: worst relative equivariance error {max(errors.values()):.1e}")


def test_convolution_alone_is_equivariant_and_vanishes_with_the_radial_features():
    """Conv(D x; Q r) = D Conv(x; r) for proper and improper Q, per edge, and zero output
    when the radial features are zero (the cutoff)."""
    torch.manual_seed(1)
    with double_precision():
        irreps = o3.Irreps(IRREPS)
        conv = SO2Convolution(irreps, None, irreps, num_radial=6, radial_hidden=8).double()
        frames = EdgeFrames(4)
        vectors = torch.randn(20, 3, dtype=torch.float64)
        radial = torch.randn(20, 6, dtype=torch.float64)
        x = torch.randn(20, irreps.dim, dtype=torch.float64)

        class Geo:
            def __init__(self, v, r):
                self.wigner, self.radial = frames(v), r

        out = conv(x, Geo(vectors, radial))
        assert out.abs().max() > 0
        for improper in (False, True):
            q = torch.as_tensor(random_rotation(5, improper=improper))
            q3 = e3nn_frame_matrix(q)  # the rotation in e3nn's (y, z, x) frame
            d = irreps.D_from_matrix(q3)
            rotated = conv(x @ d.T, Geo(vectors @ q3.T, radial))
            torch.testing.assert_close(rotated, out @ d.T, atol=1e-12, rtol=1e-10)
        assert conv(x, Geo(vectors, torch.zeros_like(radial))).abs().max() == 0


def test_gradients_are_finite_for_edges_along_lattice_axes():
    """A cubic cell has edges exactly along x, y and z (and e3nn's polar axis): the frame's
    singular direction is elsewhere, so forces/dH/du by autograd stay finite and equal to FD."""
    atoms = bulk("TiO", "rocksalt", a=4.2, cubic=True)
    graph = _graph(atoms, cutoff=4.3)
    vectors = atoms.get_distances(0, range(len(atoms)), mic=True, vector=True)
    assert np.isclose(np.abs(vectors).max(axis=1), np.linalg.norm(vectors, axis=1)).sum() > 1
    model = _model(cutoff_A=4.3)
    positions = graph[keys.POSITIONS].clone().requires_grad_(True)
    out = model(graph | {keys.POSITIONS: positions})
    (grad,) = torch.autograd.grad(sum(v.square().sum() for v in out.values()), positions)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    err = testing.assert_fd_gradient(model, graph, n_coordinates=3, rtol=1e-6)
    print(f"axis-aligned edges: autograd vs FD relative error {err:.1e}")


def test_chunked_inference_equals_one_pass(tio_graph):
    model = _model()
    full = model(tio_graph)
    for edges, part in model.predict_chunks(tio_graph, edge_chunk=37):
        for name, blocks in part.items():
            torch.testing.assert_close(blocks, full[name][edges], atol=1e-12, rtol=1e-10)


def test_mmax_is_refused_for_the_tensor_product():
    with pytest.raises(ValueError, match="'mmax' applies to conv so2 only"):
        _model(conv="tensor_product", mmax=2)
