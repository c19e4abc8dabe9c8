"""2-process CPU data parallelism through the real CLI: DDP (gloo) and DeepSpeed ZeRO-1/2/3.

Each run trains a few steps on the shipped shards; the loss is finite, the validation MAE
falls every epoch, and the first step's loss — the loss of the global batch, all ranks
together — equals that of one process given the union of the two ranks' first batches,
with the same initial weights. Over 20 optimizer steps (slow tests) the parameters of every
strategy equal those of one process trained on the union batches, for pretraining and for
fine-tunes with a frozen backbone and with LoRA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_support import (
    effective_weights,
    exported_weights,
    fit_union_batches,
    relative_difference,
)
from train_support import REPO, compose, overrides, read_metrics, run_cli, train_losses

from foundation.data.graph import collate_graphs, record_to_graph

pytestmark = pytest.mark.multiprocess

RUN = [
    "trainer.devices=2",
    "trainer.max_epochs=3",
    "task.lr=1e-2",
    "task.ema_decay=null",
    "callbacks.figures=null",
    "model.overlap_head=true",  # H and S losses, as these runs were measured with
]


def single_process_global_batch_loss(data: Path, tmp: Path) -> float:
    """Loss of rank 0's + rank 1's first batches in one process (same seed → same weights)."""
    from foundation.train.cli import build

    _, module, datamodule = build(compose(overrides(data, tmp, *RUN)))
    records = []
    for rank in (0, 1):
        _, batch = next(datamodule.train_stream(rank=rank, world_size=2).record_batches())
        records += batch
    batch = collate_graphs(
        [record_to_graph(r, module.model.universal, datamodule.targets) for r in records]
    )
    with torch.no_grad():
        _, per_target, _ = module.step_losses(batch)
    return float(per_target["total"])


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2"])
def test_two_process_training_matches_single_process_first_step(data, tmp_path, strategy):
    out = tmp_path / strategy
    result = run_cli(overrides(data, out, f"strategy={strategy}", *RUN), out, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = train_losses(out)
    steps = sorted(losses)
    assert len(steps) == 12 and all(torch.isfinite(torch.tensor(list(losses.values()))))
    # Batches differ step to step, so the learning signal is the validation MAE: the same
    # validation structures after every epoch, falling epoch by epoch.
    val = [row["val/mae_meV"] for row in read_metrics(out) if "val/mae_meV" in row]
    assert len(val) == 3 and val[0] > val[1] > val[2], val
    expected = single_process_global_batch_loss(data, tmp_path / "single")
    assert losses[steps[0]] == pytest.approx(expected, rel=1e-5)
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "model.pt").exists()


# ----------------------------------------------------------------------------- 20 steps
STEPS_20 = [
    "data.steps_per_epoch=20",
    "trainer.max_epochs=1",
    "task.ema_decay=null",  # the raw weights are compared (and ZeRO-3 needs it)
    "task.lr=1e-2",
    "task.warmup_steps=2",
    "callbacks.model_checkpoint=null",
    "callbacks.figures=null",
    "+trainer.limit_val_batches=0",
]
TOLERANCE = 1e-5
"""Relative: max over weight tensors of ‖Δ‖∞ / ‖θ‖∞ (LoRA: of W + A·B). Measured in float32
(2026-12-03): pretraining 7.8e-8 for DDP and ZeRO-1/2/3 alike (the summation order of the
all-reduce), fine-tunes 2.1e-7 (frozen backbone) and 1.1e-6 (LoRA) for DDP and ZeRO-1/2/3;
1e-5 is the issue's bound."""
STRATEGIES = ["ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"]


def finetune_args(out: Path, backbone: str) -> list[str]:
    """A 20-step fine-tune of the shipped tiny PBE model on hse_mini (h_hse head)."""
    return [
        "task=finetune_hybrid",
        "data=hse_mini",
        f"data.root={REPO / 'data_shards' / 'hse_mini'}",
        f"task.pretrained={REPO / 'pretrained' / 'tiny_pbe_mini.pt'}",
        f"task.backbone={backbone}",
        f"paths.output_dir={out}",
        "data.max_edges=700",
        "data.shuffle_buffer=8",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "test=false",
        "num_threads=1",
        *STEPS_20,
    ]


def initial_state(args: list[str]) -> dict[str, torch.Tensor]:
    from foundation.train.cli import build

    _, module, _ = build(compose([*args, "trainer.devices=1", "strategy=single"]))
    return effective_weights(module.model)


@pytest.fixture(scope="module")
def references(data, tmp_path_factory):
    """Per run kind: (initial, after 20 union-batch steps in one process) model states."""
    cache: dict[str, tuple[dict, dict]] = {}

    def get(kind: str, args: list[str]):
        if kind not in cache:
            cache[kind] = (initial_state(args), fit_union_batches(args))
        return cache[kind]

    return get


def run_args(kind: str, data: Path, out: Path) -> list[str]:
    if kind == "pretrain":
        return overrides(data, out, *STEPS_20)
    return finetune_args(out, kind.removeprefix("finetune_"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "strategy"),
    [("pretrain", s) for s in STRATEGIES]
    + [(f"finetune_{b}", s) for b in ("frozen", "lora") for s in STRATEGIES],
)
def test_20_steps_on_2_processes_equal_one_process_on_the_union_batches(
    data, tmp_path, references, kind, strategy
):
    initial, expected = references(kind, run_args(kind, data, tmp_path / "single"))
    out = tmp_path / strategy
    args = [*run_args(kind, data, out), "trainer.devices=2", f"strategy={strategy}"]
    result = run_cli(args, out, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(train_losses(out)) == 20
    got = exported_weights(out)
    moved = relative_difference(initial, expected)
    assert moved > 100 * TOLERANCE  # 20 steps moved the weights far beyond the tolerance
    difference = relative_difference(expected, got)
    print(f"{kind} {strategy}: relative parameter difference {difference:.2e} (moved {moved:.2e})")
    assert difference <= TOLERANCE, (kind, strategy, difference)
