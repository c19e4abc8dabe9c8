"""Band-space loss (foundation.train.band_loss): exact eigenvalues, gradients, training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_support import SHIPPED, compose, overrides

from foundation import keys
from foundation.basis import BasisSet
from foundation.data.graph import collate_graphs, record_to_graph
from foundation.data.shards import load_records, read_manifest
from foundation.physics.kspace import BlochHamiltonian, OverlapError, generalized_eigvalsh
from foundation.train.band_loss import ALIGNMENTS, BANDS, band_term, sample_kpoints
from foundation.train.config import ConfigError
from foundation.train.module import HamiltonianModule

KEYS = ("Si-diamond-00", "InP-wurtzite-00", "Ag-fcc2-01")  # 8, 26 and 18 orbitals
WINDOW_EV = 3.0


@pytest.fixture(scope="module")
def setup():
    basis = BasisSet.from_dict(read_manifest(SHIPPED)["basis"])
    records = {r.key: r for r in load_records(SHIPPED, "train") if r.key in KEYS}
    return basis, records


def _batch(setup, names=KEYS, dtype=torch.float64):
    basis, records = setup
    return collate_graphs(
        [record_to_graph(records[k], basis.universal, dtype=dtype) for k in names]
    )


def _table(setup) -> torch.Tensor:
    return torch.as_tensor(setup[0].universal.mask_table())


def _loss(pred, batch, table, kpts, align="mean") -> torch.Tensor:
    return band_term(pred, batch, table, kpts, WINDOW_EV, align=align).loss_sum


def test_eigenvalues_match_dense_solver_and_dft_prediction_has_zero_loss(setup):
    """The batched torch path (padded structures of 8, 26, 18 orbitals) gives the eigenvalues
    of `BlochHamiltonian` (scipy, per record) to 1e-8 eV, and pred = DFT has zero loss."""
    batch = _batch(setup)
    kpts = sample_kpoints(batch, 3, seed=0, step=7)
    term = band_term(batch[keys.H], batch, _table(setup), kpts, WINDOW_EV)
    assert float(term.loss_sum) == 0.0 and float(term.count) > 0
    for b, name in enumerate(KEYS):
        record = setup[1][name]
        mu = record.meta[keys.ENERGY_ZERO]  # the batch holds H − μS
        expected = BlochHamiltonian.from_record(record).eigenvalues(kpts[b].numpy()) - mu
        n = expected.shape[1]
        np.testing.assert_allclose(term.ref[b, :, :n].numpy(), expected, rtol=0, atol=1e-8)
        np.testing.assert_allclose(term.pred[b, :, :n].numpy(), expected, rtol=0, atol=1e-8)
        assert not term.selected[b, :, n:].any()  # padding bands are never selected
        selected = term.ref[b][term.selected[b]]
        assert (selected - term.fermi_level[b]).abs().max() <= WINDOW_EV
        assert term.selected[b].any(), name


def test_reference_fermi_level_is_midgap_of_sampled_kpoints(setup):
    """Si (8 valence electrons, 4 occupied bands): E_F = ½(max_k ε_4 + min_k ε_5)."""
    batch = _batch(setup, KEYS[:1])
    term = band_term(batch[keys.H], batch, _table(setup), sample_kpoints(batch, 4, 0, 0), 3.0)
    eps = term.ref[0]
    assert float(term.fermi_level[0]) == pytest.approx(
        0.5 * float(eps[:, 3].max() + eps[:, 4].min()), abs=1e-12
    )


@pytest.mark.parametrize("align", ALIGNMENTS)
def test_gradient_matches_central_finite_differences(setup, align):
    """∂loss/∂(predicted blocks) · v equals the central difference along random directions v
    (float64), at a prediction 50 meV off the DFT blocks."""
    batch = _batch(setup)
    table = _table(setup)
    kpts = sample_kpoints(batch, 2, seed=1, step=3)
    g = torch.Generator().manual_seed(0)
    mask = batch[keys.BLOCK_MASK]
    noise = torch.randn(batch[keys.H].shape, generator=g, dtype=torch.float64) * mask
    pred = (batch[keys.H] + 0.05 * noise).requires_grad_()
    (grad,) = torch.autograd.grad(_loss(pred, batch, table, kpts, align), pred)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert float(grad[~mask].abs().max()) == 0.0  # padded entries never matter
    eps = 1e-5
    with torch.no_grad():
        for _ in range(3):
            v = torch.randn(pred.shape, generator=g, dtype=torch.float64) * mask
            fd = (
                _loss(pred + eps * v, batch, table, kpts, align)
                - _loss(pred - eps * v, batch, table, kpts, align)
            ) / (2 * eps)
            assert float((grad * v).sum()) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


def test_gradient_is_finite_at_a_degenerate_spectrum(setup):
    """H_pred(R) = α S(R) makes every eigenvalue equal α at every k (fully degenerate). The
    gradient stays finite, and along the degeneracy-preserving direction S it is the exact
    derivative: d/dα Σ_sel (α − ε_ref)² = 2 Σ_sel (α − ε_ref) unaligned, 0 with the mean
    alignment (a uniform shift)."""
    batch = _batch(setup)
    table = _table(setup)
    kpts = torch.cat([torch.zeros(3, 1, 3, dtype=torch.float64), sample_kpoints(batch, 1, 0, 0)], 1)
    alpha = 0.7
    pred = (alpha * batch[keys.S]).requires_grad_()
    term = band_term(pred, batch, table, kpts, WINDOW_EV, align="none")
    spread = term.pred.detach()[term.selected] - alpha
    assert spread.abs().max() < 1e-9  # degenerate indeed
    (grad,) = torch.autograd.grad(term.loss_sum, pred)
    assert torch.isfinite(grad).all()
    expected = 2.0 * (alpha - term.ref[term.selected]).sum()
    assert float((grad * batch[keys.S]).sum()) == pytest.approx(float(expected), rel=1e-8)
    (grad,) = torch.autograd.grad(_loss(pred, batch, table, kpts, "mean"), pred)
    assert torch.isfinite(grad).all()
    assert float((grad * batch[keys.S]).sum()) == pytest.approx(0.0, abs=1e-8)


def test_band_term_runs_in_float64_under_autocast(setup):
    """A bf16 prediction inside a bf16 autocast region: the eigenproblem still runs in
    float64 (the same loss as the float64 cast of the prediction, outside autocast)."""
    batch = _batch(setup, KEYS[:2])
    table = _table(setup)
    kpts = sample_kpoints(batch, 2, 0, 0)
    pred = (batch[keys.H] + 0.03 * batch[keys.S]).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        term = band_term(pred, batch, table, kpts, WINDOW_EV)
    assert term.loss_sum.dtype == torch.float64 and term.pred.dtype == torch.float64
    expected = _loss(pred.double(), batch, table, kpts)
    assert float(term.loss_sum) == pytest.approx(float(expected), rel=1e-12)


def test_terms_add_over_structures_and_kpoints_do_not_depend_on_the_batch(setup):
    """Data-parallel exactness: a structure draws the same k-points alone or in any batch,
    so the band sums and counts of two sub-batches add up to those of the union batch."""
    table = _table(setup)
    union, first, rest = _batch(setup), _batch(setup, KEYS[:1]), _batch(setup, KEYS[1:])
    k_union = sample_kpoints(union, 2, 0, 5)
    k_first, k_rest = sample_kpoints(first, 2, 0, 5), sample_kpoints(rest, 2, 0, 5)
    assert torch.equal(k_union, torch.cat([k_first, k_rest]))
    assert not torch.equal(k_union, sample_kpoints(union, 2, 0, 6))  # new draw each step
    terms = []
    g = torch.Generator().manual_seed(1)
    noise = {b: 0.02 * torch.randn(batch[keys.H].shape, generator=g, dtype=torch.float64)
             for b, batch in enumerate((first, rest))}  # fmt: skip
    noise = [torch.cat([noise[0], noise[1]]), noise[0], noise[1]]
    for align in ALIGNMENTS:
        terms = [
            band_term(batch[keys.H] + dh, batch, table, kpts, WINDOW_EV, align=align)
            for batch, kpts, dh in zip(
                (union, first, rest), (k_union, k_first, k_rest), noise, strict=True
            )
        ]
        assert float(terms[0].count) == float(terms[1].count + terms[2].count)
        assert float(terms[0].loss_sum) == pytest.approx(
            float(terms[1].loss_sum + terms[2].loss_sum), rel=1e-12
        )


def test_mean_alignment_ignores_a_uniform_shift(setup):
    """H + c S shifts every band by c: the unaligned MSE is c², the mean-aligned one 0."""
    batch = _batch(setup)
    table = _table(setup)
    kpts = sample_kpoints(batch, 2, 0, 5)
    pred = batch[keys.H] + 0.02 * batch[keys.S]
    for align, expected in (("none", 0.02**2), ("mean", 0.0)):
        term = band_term(pred, batch, table, kpts, WINDOW_EV, align=align)
        assert float(term.loss_sum / term.count) == pytest.approx(expected, abs=1e-12), align


def test_errors_name_the_problem(setup):
    batch = _batch(setup, KEYS[:1])
    table = _table(setup)
    kpts = sample_kpoints(batch, 1, 0, 0)
    no_count = dict(batch, **{keys.N_ELECTRONS: torch.tensor([float("nan")])})
    with pytest.raises(ValueError, match="electron count"):
        band_term(batch[keys.H], no_count, table, kpts, WINDOW_EV)
    s = torch.eye(4, dtype=torch.complex128).repeat(1, 2, 1, 1)
    s[0, 1, 2, 2] = -1.0
    with pytest.raises(OverlapError, match=r"batch matrix \[0, 1\].*smallest eigenvalue -1"):
        generalized_eigvalsh(s, s, torch.zeros(1, 2, 3))


# ----------------------------------------------------------------------------- training step
@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    from foundation.train.checkpoint import plain

    cfg = compose(overrides(SHIPPED, tmp_path_factory.mktemp("band")))
    return plain(cfg.model)


def _module(setup, model_config, **kwargs) -> HamiltonianModule:
    torch.manual_seed(0)
    return HamiltonianModule(model=model_config, basis=setup[0].to_dict(), ema_decay=None, **kwargs)


def test_band_term_enters_the_training_step(setup, model_config):
    """Weight 0 leaves the loss (and gradient) exactly as without the term; weight w adds
    w · (band MSE) to the loss, and its gradient reaches the model's weights."""
    batch = _batch(setup, KEYS[:2], dtype=torch.float32)
    plain_module = _module(setup, model_config)
    off = _module(setup, model_config, band_loss={"weight": 0.0, "kpoints": 2})
    on = _module(setup, model_config, band_loss={"weight": 0.1, "kpoints": 2})
    loss_plain, _, _ = plain_module.step_losses(batch)
    loss_off, per_off, _ = off.step_losses(batch)
    loss_on, per_on, _ = on.step_losses(batch)
    assert torch.equal(loss_plain, loss_off) and BANDS not in per_off
    assert torch.isfinite(loss_on) and float(per_on[BANDS]) > 0
    assert float(loss_on.detach()) == pytest.approx(
        float(loss_off.detach()) + 0.1 * float(per_on[BANDS]), rel=1e-5
    )
    assert float(per_on["total"]) == pytest.approx(float(loss_on.detach()), rel=1e-5)
    params = [p for p in on.model.parameters() if p.requires_grad]
    grad_on = torch.autograd.grad(loss_on, params, allow_unused=True)
    grad_off = torch.autograd.grad(
        loss_off, [p for p in off.model.parameters() if p.requires_grad], allow_unused=True
    )
    assert all(g is None or torch.isfinite(g).all() for g in grad_on)
    diff = sum(
        float((a - b).abs().sum()) for a, b in zip(grad_on, grad_off, strict=True) if a is not None
    )
    assert diff > 0


def test_band_loss_config_errors(setup, model_config):
    with pytest.raises(ConfigError, match="did you mean 'window_eV'"):
        _module(setup, model_config, band_loss={"weight": 0.1, "window_ev": 2.0})
    with pytest.raises(ConfigError, match="align='fermi'; choose one of mean, none"):
        _module(setup, model_config, band_loss={"weight": 0.1, "align": "fermi"})
    with pytest.raises(ValueError, match=r"needs \['s'\] in task.targets"):
        _module(setup, model_config, targets={keys.H: 1.0}, band_loss={"weight": 0.1})
