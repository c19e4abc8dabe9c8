"""2-process CPU data parallelism through the real CLI: DDP (gloo) and DeepSpeed ZeRO-2.

Each run trains a few steps on the shipped shards; the loss is finite, the validation MAE
falls every epoch, and the first step's loss — the loss of the global batch, all ranks
together — equals that of one process given the union of the two ranks' first batches,
with the same initial weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import compose, overrides, read_metrics, run_cli, train_losses

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
