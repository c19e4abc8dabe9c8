"""Per-species target standardization (foundation.model.standardize): what is fitted, that the
model still speaks eV (and stays exactly equivariant and hermitian), and that the statistics
travel with the model through the checkpoint, export, fine-tuning and foundation-train."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from train_support import REPO, SHIPPED, compose, make_dataset, overrides

from foundation import keys, testing
from foundation.basis import BasisSet
from foundation.data.graph import collate_graphs, record_to_graph
from foundation.data.shards import load_records, read_manifest, shard_paths
from foundation.model import build_model
from foundation.model.backbone import edge_vectors
from foundation.model.standardize import (
    BIN_A,
    StatisticsAccumulator,
    TargetStatistics,
    fit_model_statistics,
    fit_statistics,
    sample_records,
)
from foundation.rotations import double_precision
from foundation.train.checkpoint import (
    export_inference_checkpoint,
    load_inference_checkpoint,
    load_inference_model,
)

pytestmark = pytest.mark.skipif(
    not (SHIPPED / "manifest.json").is_file(), reason="needs the shipped data_shards/pbe_mini"
)
TINY = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())
PRETRAINED = REPO / "pretrained" / "tiny_pbe_mini.pt"


@pytest.fixture(scope="module")
def basis() -> BasisSet:
    return BasisSet.from_dict(read_manifest(SHIPPED)["basis"])


@pytest.fixture(scope="module")
def train_records():
    return load_records(SHIPPED, "train")


def _symbols_free(records, *symbols):
    from ase.data import atomic_numbers

    banned = {atomic_numbers[s] for s in symbols}
    return [r for r in records if not banned & set(r.numbers.tolist())]


def _tiny(basis, double=False, **overrides):
    torch.manual_seed(0)
    cfg = TINY | {"cutoff_A": 9.0, "optimize_einsums": False} | overrides
    if not double:
        return build_model(cfg, basis=basis)
    with double_precision():  # float64 Clebsch–Gordan coefficients: checks to 1e-8
        return build_model(cfg, basis=basis).double()


# ----------------------------------------------------------------------------- the fit
def test_reference_is_the_mean_onsite_level_and_scales_fit_the_blocks(basis, train_records):
    """c(Z, shell) = mean over atoms of trace(on-site block)/(2l+1); the off-site product
    scales follow the RMS of each observed (Zi, a, Zj, b) group."""
    universal = basis.universal
    records = train_records[:30]
    stats = fit_statistics(records, universal, [keys.H, keys.S], length_dependent=True)
    h, s = stats[keys.H], stats[keys.S]
    assert int(h.n_structures) == 30

    # direct check for every (element, shell): mean of trace/(2l+1) over on-site blocks
    levels: dict[tuple[int, int], list[float]] = {}
    for rec in records:
        for e, block in enumerate(rec.blocks(keys.H)):
            i, j, *shift = rec.edges[e]
            if i != j or any(shift):
                continue
            z = int(rec.numbers[i])
            offset = 0
            for a, l in enumerate(basis.shells_of(z)):
                n = 2 * l + 1
                sub = block[offset : offset + n, offset : offset + n]
                levels.setdefault((z, a), []).append(float(np.trace(sub)) / n)
                offset += n
    for (z, a), values in levels.items():
        row = h.elements.index(z)
        shell = int(np.flatnonzero(universal.mask(z)[universal.shell_offsets[:-1]])[a])
        assert float(h.onsite_reference[row, shell, shell]) == pytest.approx(np.mean(values))
    # on-site S of a fixed basis is a per-element constant: reference 1 on the diagonal,
    # residual scale at the floor (rounding noise of float32 storage)
    diag = s.onsite_reference.diagonal(dim1=1, dim2=2)
    present = diag != 0
    assert torch.allclose(diag[present], torch.ones(int(present.sum())), atol=1e-6)
    assert float(s.onsite_scale.max()) < 1e-4 < float(h.onsite_scale.min()) * 100

    # product scales with their length decay reproduce the RMS of each observed (Zi, Zj,
    # length bin, a, b) group within a factor of ~2 (log error), over blocks spanning 10³
    acc = StatisticsAccumulator(universal, keys.H)
    for rec in records:
        acc.add(record_to_graph(rec, universal, [keys.H], dtype=torch.float64))
    size = acc.dim[:, None] * acc.dim[None, :]
    pair = acc.has[:, None, None, :, None] & acc.has[None, :, None, None, :]
    counts = acc.n_off[:, :, :, None, None] * pair
    seen = counts > 0
    rms = np.sqrt(acc.sq_off[seen] / (counts * size)[seen])
    f, k = h.offsite_log_factor.double().numpy(), h.offsite_log_decay.double().numpy()
    r = ((np.arange(acc.n_off.shape[2]) + 0.5) * BIN_A)[None, None, :, None, None]
    side_i, side_j = f[:, None, None, :, None], f[None, :, None, None, :]
    decay = k[:, None, None, :, None] + k[None, :, None, None, :]
    model = side_i + side_j - decay * r - float(h.offsite_log_curvature) * r**2
    log_error = np.log(rms) - np.broadcast_to(model, counts.shape)[seen]
    weighted = np.sqrt(np.average(log_error**2, weights=counts[seen]))
    spread = np.log(rms.max() / rms.min())
    print(f"weighted RMS log error {weighted:.2f} over a log range of {spread:.1f}")
    assert weighted < 0.7, f"weighted RMS log error of the product scales: {weighted:.2f}"
    assert float(h.offsite_log_decay.mean()) > 0.1  # Hamiltonian blocks decay with length


def test_unseen_pair_and_unseen_element_get_finite_transferable_statistics(basis, train_records):
    """Train without any In–As bond (held-out InAs is that case in pbe_mini) and without Se
    at all: the In–As scale is the product of factors In and As earned elsewhere, and Se gets
    the documented fallback (mean over the elements with the same shells) — never NaN."""
    universal = basis.universal
    records = _symbols_free(train_records, "Se")
    has_in_as = [
        r for r in records if {49, 33} <= set(r.numbers.tolist())
    ]  # no InAs in train: the pair is unseen
    assert not has_in_as
    stats = fit_statistics(records, universal, [keys.H])[keys.H]
    for name in ("onsite_reference", "onsite_scale", "offsite_log_factor"):
        assert torch.isfinite(getattr(stats, name)).all(), name
    row = {z: k for k, z in enumerate(stats.elements)}
    f = stats.offsite_log_factor
    # In–As s–p scale: exp(f_In,s + f_As,p), within the range of the pairs seen in training
    in_as = float(torch.exp(f[row[49], 0] + f[row[33], 1]))
    seen = torch.exp(f[:, None, 0] + f[None, :, 1])
    assert float(seen.min()) <= in_as <= float(seen.max())
    # Se (unseen, shells s p): per shell, the mean log factor and mean reference of the
    # fitted elements (all of which have s and p shells)
    donors = [row[z] for z in stats.elements if z != 34]
    assert torch.allclose(f[row[34], :2], f[donors, :2].mean(0), atol=1e-6)
    ref = stats.onsite_reference[row[34], :2, :2]
    assert torch.allclose(ref, stats.onsite_reference[donors, :2, :2].mean(0), atol=1e-6)
    assert (stats.onsite_scale[row[34]] > 0).all()


def test_fit_is_deterministic_and_sampling_is_capped(basis):
    shards = [str(p) for p in shard_paths(SHIPPED, "train")]
    first = fit_statistics(sample_records(shards, 20), basis.universal, [keys.H])[keys.H]
    again = fit_statistics(sample_records(shards, 20), basis.universal, [keys.H])[keys.H]
    assert int(first.n_structures) == 20
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name  # bitwise: every rank agrees


# ----------------------------------------------------------------------------- the model
def _randomize(stats: TargetStatistics, seed: int) -> None:
    """Non-trivial statistics (different per element and shell pair, symmetric)."""
    g = torch.Generator().manual_seed(seed)
    n_el, n_sh = stats.offsite_log_factor.shape
    ref = torch.randn(n_el, n_sh, n_sh, generator=g, dtype=torch.float64)
    scale = torch.rand(n_el, n_sh, n_sh, generator=g, dtype=torch.float64) + 0.1
    stats.set_(
        ref + ref.transpose(1, 2),
        scale + scale.transpose(1, 2),
        torch.randn(n_el, n_sh, generator=g, dtype=torch.float64),
        n_structures=1,
        offsite_log_decay=0.5 * torch.rand(n_el, n_sh, generator=g, dtype=torch.float64),
        offsite_log_curvature=0.02,
    )


def test_standardized_heads_stay_exactly_equivariant_hermitian_and_masked(basis, train_records):
    model = _tiny(basis, double=True)
    for k, head in enumerate(model.heads.values()):
        _randomize(head.statistics, k)
    graphs = [record_to_graph(r, basis.universal, dtype=torch.float64) for r in train_records[:2]]
    batch = collate_graphs(graphs)
    errors = testing.assert_equivariant(model, batch, basis.universal.shells)
    assert max(errors.values()) < 1e-10
    out = model(batch)
    testing.assert_hermitian(out, batch)
    testing.assert_masked(out, batch)
    # the length-dependent scales are part of the function: dH/dτ by autograd = FD
    err = testing.assert_fd_gradient(model, graphs[0], n_coordinates=3, rtol=1e-6)
    print(f"standardized heads: autograd vs FD relative error {err:.1e}")
    # chunked inference applies the same statistics to every slice of edges
    chunks = model.predict_chunks(batch, edge_chunk=97, names=[keys.H])
    joined = torch.cat([blocks[keys.H] for _, blocks in chunks])
    assert torch.allclose(joined, out[keys.H], atol=1e-12)


def test_zero_output_predicts_the_reference_exactly(basis, train_records):
    """With its layers zeroed a head returns c·I on-site and 0 off-site: the model speaks eV,
    and the fitted overlap reference alone already reproduces every on-site S block."""
    model = _tiny(basis)
    fit_model_statistics(model, train_records[:40], [keys.H, keys.S])
    for head in model.heads.values():
        head.zero_output_()
    graph = record_to_graph(train_records[50], basis.universal)
    batch = collate_graphs([graph])
    with torch.no_grad():
        out = model(batch)
    onsite = batch[keys.ONSITE]
    assert torch.equal(out[keys.H][~onsite], torch.zeros_like(out[keys.H][~onsite]))
    mask = batch[keys.BLOCK_MASK][onsite]
    err = (out[keys.S][onsite] - batch[keys.S][onsite])[mask].abs().max()
    assert float(err) < 1e-6
    z = int(batch[keys.NUMBERS][0])
    stats = model.heads[keys.H].statistics
    first = basis.universal.orbital_index(z)[0]  # the element's s shell (universal shell 0)
    expected = stats.onsite_reference[stats.elements.index(z), 0, 0]
    assert float(out[keys.H][onsite][0, first, first]) == pytest.approx(float(expected))


def test_statistics_survive_export_and_weights_only_reload(basis, train_records, tmp_path):
    model = _tiny(basis)
    fit_model_statistics(model, train_records[:20], [keys.H, keys.S])
    path = export_inference_checkpoint(model, tmp_path / "model.pt")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert int(payload["state_dict"]["heads.h.statistics.n_structures"]) == 20
    loaded = load_inference_model(path)
    for name, value in model.state_dict().items():
        if ".statistics." in name:
            assert torch.equal(value, loaded.state_dict()[name]), name
    batch = collate_graphs([record_to_graph(train_records[60], basis.universal)])
    with torch.no_grad():
        a, b = model.eval()(batch), loaded(batch)
    assert torch.equal(a[keys.H], b[keys.H]) and torch.equal(a[keys.S], b[keys.S])


def test_state_dict_from_before_standardization_loads_as_identity(basis):
    model = _tiny(basis)
    old = {k: v for k, v in model.state_dict().items() if ".statistics." not in k}
    fresh = _tiny(basis)
    fit_h = fresh.heads[keys.H].statistics
    fit_h.onsite_scale.fill_(3.0)
    fresh.load_state_dict(old)  # strict: no missing keys reported
    assert not fit_h.fitted and torch.equal(fit_h.onsite_scale, torch.ones_like(fit_h.onsite_scale))
    partial = dict(model.state_dict())
    del partial["heads.h.statistics.onsite_scale"]
    with pytest.raises(RuntimeError, match="onsite_scale"):  # a damaged file is not hidden
        fresh.load_state_dict(partial)


def test_set_refuses_non_finite_or_non_positive_statistics(basis):
    stats = TargetStatistics(basis.universal)
    bad = torch.ones_like(stats.onsite_scale)
    bad[0, 0, 0] = 0.0
    with pytest.raises(ValueError, match="positive"):
        stats.set_(stats.onsite_reference, bad, stats.offsite_log_factor, 1)
    with pytest.raises(ValueError, match="shape"):
        stats.set_(stats.onsite_reference[:1], stats.onsite_scale, stats.offsite_log_factor, 1)


# ----------------------------------------------------------------------------- fine-tuning
def test_finetune_inherits_statistics(basis, train_records, tmp_path):
    """ΔH head: the base's scales, no reference (first prediction = base exactly); direct
    head: the base's statistics; both survive the fine-tuned model's export."""
    from foundation.train.finetune import prepare_model

    batch = collate_graphs([record_to_graph(train_records[3], basis.universal)])
    for mode in ("delta", "direct"):
        model = _tiny(basis)
        fit_model_statistics(model, train_records[:20], [keys.H, keys.S])
        prepare_model(model, head=mode, backbone="frozen")
        base, new = model.heads[keys.H].statistics, model.heads[keys.H_HSE].statistics
        assert torch.equal(new.onsite_scale, base.onsite_scale)
        assert torch.equal(new.offsite_log_factor, base.offsite_log_factor)
        reference = (
            torch.zeros_like(base.onsite_reference) if mode == "delta" else base.onsite_reference
        )
        assert torch.equal(new.onsite_reference, reference)
        with torch.no_grad():
            out = model(batch)
        assert torch.equal(out[keys.H_HSE], out[keys.H])
        loaded = load_inference_model(export_inference_checkpoint(model, tmp_path / f"{mode}.pt"))
        for name, value in model.state_dict().items():
            if ".statistics." in name:
                assert torch.equal(value, loaded.state_dict()[name]), name


@pytest.mark.skipif(not PRETRAINED.is_file(), reason="needs pretrained/tiny_pbe_mini.pt")
def test_pretrained_statistics_are_kept_by_finetune_module():
    from foundation.train.finetune import FinetuneModule

    payload = load_inference_checkpoint(PRETRAINED)
    module = FinetuneModule(pretrained=str(PRETRAINED), basis=payload["basis"])
    assert not module.fresh_model
    stats = module.model.heads[keys.H].statistics
    saved = payload["state_dict"].get("heads.h.statistics.onsite_scale")
    expected = torch.ones_like(stats.onsite_scale) if saved is None else saved
    assert torch.equal(stats.onsite_scale, expected)


# ----------------------------------------------------------------------------- foundation-train
def test_foundation_train_fits_statistics_on_the_train_split(tmp_path):
    """build() fits the heads' statistics on the train split of a fresh model (identical to a
    direct fit of that split), and leaves them at identity with model.standardize=false."""
    from foundation.train.cli import build

    data = make_dataset(tmp_path / "synthetic")
    _, module, datamodule = build(compose(overrides(data, tmp_path / "run")))
    stats = module.model.heads[keys.H].statistics
    direct = fit_statistics(load_records(data, "train"), module.model.universal, [keys.H])[keys.H]
    assert stats.fitted and int(stats.n_structures) == int(direct.n_structures)
    assert torch.allclose(stats.offsite_log_factor, direct.offsite_log_factor, atol=1e-6)
    assert torch.allclose(stats.onsite_reference, direct.onsite_reference, atol=1e-6)

    cfg = compose(overrides(data, tmp_path / "off", "model.standardize=false"))
    _, module, _ = build(cfg)
    assert not module.model.heads[keys.H].statistics.fitted


def test_inspect_prints_the_statistics(capsys):
    from foundation.data.cli import main

    assert main(["inspect", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    n_train = read_manifest(SHIPPED)["splits"]["train"]["n_samples"]
    assert "target statistics (split train" in out and f"fitted on {n_train} structures" in out
    assert "In  c: s0=" in out and "d2=" in out


def test_normalized_loss_divides_each_residual_by_its_entry_scale(basis, train_records):
    """task.normalize_loss: Σ((pred − target)/σ)² over real entries, σ = σ_on on-site and the
    length-dependent σ_off(r) elsewhere; long edges then weigh like short ones."""
    from foundation.train.losses import target_mask
    from foundation.train.module import HamiltonianModule

    cfg = TINY | {"cutoff_A": 9.0, "optimize_einsums": False}
    module = HamiltonianModule(
        model=cfg, basis=basis.to_dict(), ema_decay=None, normalize_loss=True
    )
    for head, fitted in fit_statistics(
        train_records[:20], basis.universal, [keys.H, keys.S], length_dependent=True
    ).items():
        module.model.heads[head].statistics.load_state_dict(fitted.state_dict())
    batch = collate_graphs([record_to_graph(r, basis.universal) for r in train_records[:2]])
    with torch.no_grad():
        pred = module.model(batch)
        terms = module.loss_terms(pred, batch)
    for name in (keys.H, keys.S):
        scales = module.model.heads[name].entry_scales(batch)
        mask = target_mask(batch, name)
        expected = (((pred[name] - batch[name]) / scales)[mask] ** 2).sum()
        torch.testing.assert_close(terms[name][0], expected, rtol=1e-5, atol=0)
    # long edges get much smaller scales than nearest neighbours
    lengths = torch.linalg.norm(edge_vectors(batch), dim=1)
    h_scale = module.model.heads[keys.H].entry_scales(batch)[:, 0, 0]
    short, long = h_scale[(lengths > 2) & (lengths < 3)], h_scale[lengths > 8]
    assert float(long.max()) < 0.05 * float(short.min())
