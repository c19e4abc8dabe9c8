"""Single-process training: fit, checkpoints, exact resume, NaN guard, config errors, loggers."""

from __future__ import annotations

import json
import time

import pytest
import pytorch_lightning as pl
import torch
from train_support import LossRecorder, compose, fit, overrides, read_metrics, run_cli

from foundation import keys
from foundation.data.shards import read_manifest
from foundation.train.checkpoint import load_inference_checkpoint, load_inference_model
from foundation.train.config import ConfigError
from foundation.train.module import NonFiniteLossError


def test_fit_writes_config_checkpoint_and_inference_export(data, tmp_path):
    cfg = compose(overrides(data, tmp_path))
    rec = LossRecorder()
    trainer, module = fit(cfg, [rec])
    losses = [loss for _, loss in rec.losses]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    meta = ckpt["foundation"]
    assert meta["config"]["data"]["root"] == str(data)  # resolved run config
    manifest = read_manifest(data)
    assert meta["elements"] == manifest["elements"] and meta["basis"] == manifest["basis"]
    assert meta["units"]["energy"] == "eV"
    # last.ckpt is the latest state (step 8) even when the second epoch did not improve val MAE.
    assert ckpt["global_step"] == 8
    assert meta["code_version"].startswith("0.1.0") and meta["ema"]["updates"] == 8

    payload = load_inference_checkpoint(tmp_path / "model.pt")  # torch.load(weights_only=True)
    assert json.loads(json.dumps({k: v for k, v in payload.items() if k != "state_dict"}))
    model = load_inference_model(tmp_path / "model.pt")
    batch = next(iter(trainer.datamodule.val_dataloader()))
    batch.pop("eval_weight")
    with module.ema.applied(module.model), torch.no_grad():
        expected = module.model(batch)[keys.H]
    with torch.no_grad():
        assert torch.equal(model(batch)[keys.H], expected)


def test_resume_after_interruption_matches_uninterrupted_run(data, tmp_path):
    every = [
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.every_n_epochs=null",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.figures=null",
        "callbacks.export=null",
    ]
    full = LossRecorder()
    fit(compose(overrides(data, tmp_path / "full", *every)), [full])
    reference = dict(full.losses)
    assert sorted(reference) == list(range(1, 9))  # 2 epochs x 4 steps
    # A new process state restarted from a checkpoint of step 2 (mid-epoch 0) and of step 4
    # (end of epoch 0) must continue with exactly the uninterrupted losses.
    for name, first in (("epoch000-step000002.ckpt", 3), ("epoch000-step000004.ckpt", 5)):
        resumed = LossRecorder()
        ckpt = tmp_path / "full" / "checkpoints" / name
        fit(compose(overrides(data, tmp_path / name, *every)), [resumed], ckpt_path=ckpt)
        assert [s for s, _ in resumed.losses] == list(range(first, 9)), name
        for step, loss in resumed.losses:
            assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-9), (name, step)


def test_nan_batch_is_skipped_without_update(data, tmp_path):
    class PoisonSecondBatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 0 and batch_idx == 1:
                batch[keys.H][0, 0, 0] = float("nan")
                self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 0 and batch_idx == 1:
                self.after = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    poison = PoisonSecondBatch()
    trainer, module = fit(compose(overrides(data, tmp_path, "trainer.max_epochs=1")), [poison])
    assert module.bad_steps == 1
    assert trainer.global_step == 3  # 4 batches, one skipped
    assert all(torch.equal(poison.before[n], poison.after[n]) for n in poison.before)
    assert trainer.callback_metrics["train/bad_steps"] == 1

    with pytest.raises(NonFiniteLossError, match="max_bad_steps"):
        fit(
            compose(
                overrides(data, tmp_path / "strict", "trainer.max_epochs=1", "task.max_bad_steps=0")
            ),
            [PoisonSecondBatch()],
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+trainer.max_epoch=3", "did you mean 'max_epochs'"),
        ("+data.max_edge=10", "did you mean 'max_edges'"),
        ("+task.learning_rate=1", "task.learning_rate"),
        ("+model.num_layer=2", "did you mean 'num_layers'"),
        ("+epochs=3", "Unknown top-level config key 'epochs'"),
        ("+callbacks.model_checkpoint.monitr=x", "did you mean 'monitor'"),
        ("+model.basis={name:small,shells:{Si:[0,1],Ge:[0,1]}}", "Al, P, S, Cl, As, Se, Br, Ag"),
        ("+trainer.gradient_clip_val=1.0", "task.grad_clip_norm"),
        ("strategy=deepspeed_stage_3", "task.ema_decay=null"),
    ],
)
def test_wrong_config_stops_before_training(data, tmp_path, override, message):
    from foundation.train.cli import build

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        build(compose(overrides(data, tmp_path, override)))


def test_cli_missing_shard_directory_names_path_and_fix(tmp_path):
    missing = tmp_path / "no_such_dataset"
    result = run_cli([f"data.root={missing}", "logger=none"], tmp_path / "run", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"Shard directory {missing} does not exist" in result.stderr
    assert "foundation-data shard" in result.stderr


def test_loggers_wandb_offline_tensorboard_csv(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(
        overrides(
            data,
            tmp_path,
            "logger=many",
            "trainer.max_epochs=1",
            "callbacks.figures.every_n_epochs=1",
        )
    )
    trainer, _ = fit(cfg)
    wandb_logger = next(lg for lg in trainer.loggers if isinstance(lg, pl.loggers.WandbLogger))
    wandb_logger.experiment.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")  # offline run log (protobuf records): metric keys in it
    deadline = time.monotonic() + 60  # wandb's service process flushes asynchronously
    while b"val/mae_meV" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"train/loss" in log.read_bytes() and b"val/mae_meV" in log.read_bytes()
    assert list((run_dir / "files" / "media" / "images").rglob("parity_h_*.png"))
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "figures" / "epoch0000_parity_h.png").exists()
    assert (tmp_path / "figures" / "epoch0000_bands.png").exists()


def test_multirun_sweep_runs_each_job_in_its_own_directory(data, tmp_path):
    sweep = tmp_path / "sweep"
    args = [a for a in overrides(data, tmp_path) if not a.startswith("paths.output_dir")]
    result = run_cli(
        [
            "-m",
            *args,
            f"hydra.sweep.dir={sweep}",
            "task.lr=1e-3,2e-3",
            "trainer.max_epochs=1",
            "data.steps_per_epoch=2",
            "callbacks=none",
        ],
        tmp_path / "unused",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, lr in (("0", 0.001), ("1", 0.002)):
        rows = read_metrics(sweep / job)
        assert any("train/loss" in r for r in rows)
        assert (sweep / job / ".hydra" / "overrides.yaml").read_text().count(f"task.lr={lr}") == 1
        val_mae = next(r["val/mae_meV"] for r in reversed(rows) if "val/mae_meV" in r)
        assert f"val H MAE {val_mae:.2f} meV" in (sweep / job / "cli.log").read_text()


def test_overlap_head_is_trained_only_where_the_basis_cannot_be_integrated(data, tmp_path):
    """model.overlap_head=auto (the presets): no S head for the PySCF basis of the shipped
    shards (S is exact at inference), an S head for synthetic data in a basis PySCF does not
    know, and for the band-space loss (it needs the DFT S in the batch)."""
    from train_support import make_dataset

    from foundation.train.cli import build

    _, module, _ = build(cfg := compose(overrides(data, tmp_path / "pyscf")))
    assert list(module.model.heads) == [keys.H] and list(module.targets) == [keys.H]
    assert cfg.model.overlap_head is False  # the saved run config says what ran

    synthetic = make_dataset(tmp_path / "synthetic")
    _, module, _ = build(cfg := compose(overrides(synthetic, tmp_path / "syn")))
    assert keys.S in module.model.heads and keys.S in module.targets
    assert cfg.model.overlap_head is True

    _, module, _ = build(compose(overrides(data, tmp_path / "band", "task.band_loss.weight=0.01")))
    assert keys.S in module.targets
    with pytest.raises(ConfigError, match="overlap_head"):
        build(compose(overrides(data, tmp_path / "bad", "model.overlap_head=maybe")))
