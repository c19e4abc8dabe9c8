"""``task=finetune_eph``: derivative loss, its parameter gradient, what trains, strategies.

The gradient of the dH/du loss with respect to the weights (a mixed second derivative
through forward-mode autograd) is checked against central differences of the loss in
float64; the random-projection loss against the exact Cartesian rows; the frozen/full
modes against which weights receive gradients; ZeRO-3 is refused; 2-process DDP runs.
"""

from __future__ import annotations

import types

import pytest
import torch
from train_support import REPO, read_metrics, run_cli

from foundation import keys
from foundation.data.graph import collate_graphs, record_to_graph
from foundation.data.shards import load_records
from foundation.train.config import ConfigError
from foundation.train.eph_task import (
    EphFinetuneModule,
    cartesian_derivative_rows,
    projected_derivative,
)

EPH = REPO / "data_shards" / "eph_mini"
PRETRAINED = REPO / "pretrained" / "tiny_pbe_mini.pt"
TARGETS = (keys.H, keys.S, keys.DH, keys.DS)


@pytest.fixture(scope="module")
def records():
    return {r.key: r for r in load_records(EPH)}


def _module(records, **kwargs) -> EphFinetuneModule:
    basis = next(iter(records.values())).basis
    for r in records.values():
        basis = basis.merged(r.basis)
    defaults = {"pretrained": str(PRETRAINED), "basis": basis.to_dict(), "ema_decay": None}
    return EphFinetuneModule(**(defaults | kwargs))


def _batch(module, records, keys_, dtype=torch.float32):
    universal = module.model.universal
    return collate_graphs(
        [record_to_graph(records[k], universal, TARGETS, dtype=dtype) for k in keys_]
    )


def test_derivative_loss_gradient_matches_finite_differences(records):
    """∇_θ of the dH/du loss (reverse mode through the jvp) · v equals the central
    difference of the loss along a random direction v of all weights, in float64."""
    torch.manual_seed(0)
    module = _module(records, backbone="full", targets={keys.DH: 1.0}).double()
    batch = _batch(module, records, ["Si-diamond-00"], torch.float64)
    params = [p for p in module.parameters() if p.requires_grad]
    loss = module.step_losses(batch)[0]
    grads = torch.autograd.grad(loss, params)
    direction = [torch.randn_like(p) * p.detach().abs().mean() for p in params]
    analytic = sum(float((g * v).sum()) for g, v in zip(grads, direction, strict=True))
    eps = 1e-5
    values = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for p, v in zip(params, direction, strict=True):
                p.add_(sign * eps * v)
            values.append(float(module.step_losses(batch)[0]))
            for p, v in zip(params, direction, strict=True):
                p.sub_(sign * eps * v)
    numeric = (values[0] - values[1]) / (2 * eps)
    error = abs(analytic - numeric) / abs(numeric)
    print(
        f"dL/dv: autograd {analytic:.10e}, finite differences {numeric:.10e}, relative {error:.1e}"
    )
    assert error < 1e-6


def test_projected_loss_contracts_the_exact_rows(records):
    """J z and T z of the projection mode equal the exact Cartesian rows contracted with z
    (same z): the projected loss is the exact one seen along z."""
    module = _module(records).double()
    batch = _batch(module, records, ["Si-diamond-ideal", "AlP-zincblende-00"], torch.float64)
    torch.manual_seed(3)
    ((jz, tz, mask, count),) = projected_derivative(module, batch, [keys.DH], 2).values()
    torch.manual_seed(3)
    z = torch.randn(2, *batch[keys.POSITIONS].shape, dtype=torch.float64)
    rows, row_mask = cartesian_derivative_rows(module, batch, [keys.DH])[keys.DH]
    n_edges = batch[keys.N_EDGES].tolist()
    start = 0
    for b, (n, e) in enumerate(zip(batch[keys.N_ATOMS].tolist(), n_edges, strict=True)):
        first = sum(batch[keys.N_ATOMS].tolist()[:b])
        e0 = sum(n_edges[:b])
        weights = z[:, first : first + n].reshape(2, 3 * n)
        block = slice(start, start + 3 * n * e)
        for name, exact in (("J z", rows[block]), ("T z", batch[keys.DH][block])):
            contracted = torch.einsum(
                "kp,pe...->ke...", weights, exact.reshape(3 * n, e, *exact.shape[1:])
            )
            got = (jz if name == "J z" else tz)[:, e0 : e0 + e]
            torch.testing.assert_close(got, contracted, rtol=1e-9, atol=1e-9, msg=name)
        start += 3 * n * e
    assert int(count) == int(row_mask.sum()) and mask.shape == jz.shape


@pytest.mark.parametrize("backbone", ["frozen", "full"])
def test_what_trains_and_every_head_in_the_graph(records, backbone):
    """frozen: only the H head (the head of dh) gets gradients; full: every weight gets a
    gradient tensor, the S head's included (weight 0: an exact zero, not nothing)."""
    module = _module(records, backbone=backbone, targets={keys.DH: 1.0, keys.H: 0.0})
    batch = _batch(module, records, ["AlP-zincblende-ideal"])
    loss, per_target, _ = module.step_losses(batch)
    loss.backward()
    assert set(per_target) == {keys.H, keys.S, keys.DH, "total"}
    for name, p in module.model.named_parameters():
        in_h_head = name.startswith(f"heads.{keys.H}.")
        assert p.requires_grad == (in_h_head or backbone == "full"), name
        if p.requires_grad:
            assert p.grad is not None, name
        if name.startswith(f"heads.{keys.S}.") and p.grad is not None:
            assert torch.count_nonzero(p.grad) == 0, name
    assert float(per_target[keys.DH]) > 0


def test_zero3_is_refused(records):
    from foundation.train.strategies import build_strategy

    module = _module(records)
    module._trainer = types.SimpleNamespace(strategy=build_strategy("deepspeed", stage=3))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        module.setup("fit")


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2"])
def test_two_process_finetune_eph(tmp_path, strategy):
    """2 ranks (gloo) through foundation-train, DDP and ZeRO-2: the run ends, losses are
    finite, the validation dH/du MAE is logged, and the exported model loads."""
    from foundation.train.checkpoint import load_inference_model

    out = tmp_path / strategy
    args = [
        "task=finetune_eph",
        "data=eph_mini",
        f"data.root={EPH}",
        f"paths.output_dir={out}",
        f"task.pretrained={PRETRAINED}",
        f"strategy={strategy}",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "data.steps_per_epoch=2",
        "data.max_edges=400",
        "task.projections=1",
        "task.backbone=full",
        "logger=csv",
        "callbacks.figures=null",
        "test=false",
        "num_threads=1",
    ]
    result = run_cli(args, out, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_metrics(out)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any("val/mae_dh_meV_per_A" in r for r in rows)
    load_inference_model(out / "model.pt")
