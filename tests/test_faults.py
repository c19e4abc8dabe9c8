"""Fault injection: preemption (SIGTERM), a killed rank under torchrun, a killed or failing
checkpoint write, an incompatible checkpoint, and constants that must never come from a file.

Each fault ends either in the same result as an uninterrupted run or in a clear stop that
names the cause; docs/reliability.md has the table.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import pytorch_lightning as pl
import torch
from train_support import REPO, LossRecorder, compose, overrides

from foundation.train.checkpoint import AtomicCheckpointIO, atomic_torch_save
from foundation.train.config import ConfigError

FAST = ["callbacks.figures=null", "callbacks.export=null"]


def fit_resumable(cfg, callbacks=()):
    """build + fit honouring the ckpt_path that auto_resume may have set."""
    from foundation.train.cli import build

    trainer, module, datamodule = build(cfg)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    return trainer, module


class SigtermAt(pl.Callback):
    """Sends this process SIGTERM after optimizer step ``step`` (as a scheduler would)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_writes_checkpoint_and_auto_resume_continues_exactly(data, tmp_path):
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    full = LossRecorder()
    fit_resumable(compose(overrides(data, tmp_path / "full", *FAST)), [full])
    reference = dict(full.losses)
    assert sorted(reference) == list(range(1, 9))

    run = tmp_path / "preempted"
    args = overrides(data, run, *FAST, "auto_resume=true")
    first = LossRecorder()
    with pytest.raises(SIGTERMException):
        fit_resumable(compose(args), [first, SigtermAt(3)])
    assert [s for s, _ in first.losses] == [1, 2, 3]  # stopped after the step it was in
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3  # written on SIGTERM, mid-epoch (epoch end is step 4)

    resumed = LossRecorder()
    cfg = compose(args)
    trainer, _ = fit_resumable(cfg, [resumed])
    assert cfg.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert [s for s, _ in resumed.losses] == list(range(4, 9))
    for step, loss in resumed.losses:
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-9), step

    # The same checkpoint into a run that builds another head set or basis: a clear stop.
    last = str(run / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=r"heads \['h'\] \(checkpoint\) vs \['h', 's'\] \(run\)"):
        fit_resumable(compose([*overrides(data, tmp_path / "b", *FAST), f"ckpt_path={last}",
                               "model.overlap_head=true"]))  # fmt: skip
    from foundation.data.shards import read_manifest

    shells = ",".join(f"{el}:[0]" for el in read_manifest(data)["elements"])
    basis = f"+model.basis={{name:other,shells:{{{shells}}}}}"  # s shells only
    with pytest.raises(
        ConfigError, match=r"\(checkpoint\) vs 'other' \(run\): shells .*task.pretrained"
    ):
        fit_resumable(
            compose([*overrides(data, tmp_path / "c", *FAST), f"ckpt_path={last}", basis])
        )


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (KeyboardInterrupt("killed during save"), "killed during save"),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "Writing checkpoint {path} failed "
         r"\(No space left on device\); the previous file is unchanged. Free space"),
    ],
)  # fmt: skip
def test_failed_checkpoint_write_keeps_previous_and_names_path(
    tmp_path, monkeypatch, error, message
):
    """An interrupt or a full disk in the middle of torch.save: the old file stays loadable,
    no temporary is left behind, a disk error names the path and the fix."""
    from foundation.train import checkpoint as ckpt_module

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def fails_halfway(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise error

    monkeypatch.setattr(ckpt_module.torch, "save", fails_halfway)
    with pytest.raises(type(error), match=message.format(path=path)):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


WRITER = """
import sys, torch
from foundation.train.checkpoint import atomic_torch_save
print("writing", flush=True)
while True:  # ~200 MB per write: slow enough to be killed in the middle
    atomic_torch_save({"step": 2, "w": torch.zeros(50_000_000)}, sys.argv[1])
"""


def test_kill_9_during_checkpoint_write_keeps_previous(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "writing"
    tmp = tmp_path / f".last.ckpt.tmp-{proc.pid}"
    deadline = time.monotonic() + 60
    while not (tmp.exists() and tmp.stat().st_size > 1_000_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tmp.exists(), "the writer never started its temporary file"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 1 or saved["w"].numel() == 50_000_000  # old or complete, never torn
    if tmp.exists():  # the killed writer's temporary: removed by the next successful write
        atomic_torch_save({"step": 3}, path)
        assert not tmp.exists() and torch.load(path, weights_only=True)["step"] == 3


def test_derived_constants_are_rebuilt_not_loaded(tmp_path):
    """e3nn's Wigner-3j blocks and masks are not in a saved state_dict, and an (older) file
    that still has them — here with doubled Wigner-3j values — cannot change them."""
    from foundation.model import build_model
    from foundation.model.derived import derived_buffer_names
    from foundation.train.checkpoint import load_inference_checkpoint, load_inference_model

    shipped = REPO / "pretrained" / "tiny_pbe_mini.pt"
    payload = load_inference_checkpoint(shipped)
    model = load_inference_model(shipped)
    derived = derived_buffer_names(model)
    w3j = sorted(n for n in derived if "_w3j" in n)
    assert w3j and any(n.endswith("output_mask") for n in derived)
    assert not derived & set(model.state_dict())  # not written any more
    assert set(w3j) <= set(payload["state_dict"])  # the shipped (older) file has them

    tampered = dict(payload["state_dict"])
    for name in w3j:
        tampered[name] = tampered[name] * 2.0
    fresh = build_model(payload["model_config"], basis=payload["basis"])
    fresh.load_state_dict(tampered)  # strict: nothing missing, nothing unexpected
    built = dict(model.named_buffers())  # built by this code (the file's copies were dropped)
    loaded = dict(fresh.named_buffers())
    assert all(torch.equal(loaded[n], built[n]) for n in w3j)
    reference = dict(model.named_parameters())
    assert all(torch.equal(p, reference[n]) for n, p in fresh.named_parameters())


# ----------------------------------------------------------------------------- torchrun
def torchrun(args: list[str], out, max_restarts: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        f"--max-restarts={max_restarts}", "-m", "foundation.train.cli",
        f"hydra.run.dir={out}", *args,
    ]  # fmt: skip
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


def all_losses(out) -> dict[int, list[float]]:
    """step → train/loss of every CSV version (a restarted run logs into a new one)."""
    losses: dict[int, list[float]] = {}
    for version in sorted(out.glob("csv/version_*")):
        for row in _rows(version / "metrics.csv"):
            if "train/loss" in row:
                losses.setdefault(int(row["step"]), []).append(row["train/loss"])
    return losses


def _rows(path):
    import csv

    with open(path) as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kill_9_of_one_rank_under_torchrun_restarts_from_last_checkpoint(data, tmp_path):
    args = overrides(
        data, tmp_path / "unused", *FAST,
        "trainer.devices=2", "strategy=ddp", "task.ema_decay=null", "auto_resume=true",
        "data.steps_per_epoch=6", "trainer.max_epochs=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.every_n_epochs=null",
        "callbacks.model_checkpoint.monitor=null",
    )  # fmt: skip
    args = [a for a in args if not a.startswith("paths.output_dir")]
    reference = torchrun(args, tmp_path / "reference", max_restarts=0)
    assert reference.wait(timeout=900) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    expected = {s: v[0] for s, v in all_losses(tmp_path / "reference").items()}
    assert len(expected) == 12  # 2 epochs x 6 steps

    out = tmp_path / "killed"
    launcher = torchrun(args, out, max_restarts=1)
    marker = out / "checkpoints" / "epoch000-step000004.ckpt"
    deadline = time.monotonic() + 600
    while not marker.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    victim = rank_process(launcher, 1)
    assert marker.exists() and victim is not None, (tmp_path / "killed.log").read_text()[-3000:]
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    resumed_log = None
    while launcher.poll() is None and time.monotonic() - killed_at < 900:
        if (
            resumed_log is None
            and "auto_resume: resuming from" in (tmp_path / "killed.log").read_text()
        ):
            resumed_log = time.monotonic() - killed_at
        time.sleep(0.2)
    assert launcher.wait(timeout=60) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    print(f"kill -9 → restarted ranks resuming: {resumed_log:.1f} s; → run finished: "
          f"{time.monotonic() - killed_at:.1f} s")  # fmt: skip
    log = (tmp_path / "killed.log").read_text()
    assert "auto_resume: resuming from" in log
    losses = all_losses(out)
    assert len(list(out.glob("csv/version_*"))) == 2  # the first attempt and the restart
    restart = _rows(sorted(out.glob("csv/version_*"))[-1] / "metrics.csv")
    resumed = [int(r["step"]) for r in restart if "train/loss" in r]
    assert resumed and resumed[0] > min(expected) and resumed[-1] == max(expected), resumed
    for step in resumed:  # every step after the restart equals the uninterrupted run
        assert losses[step][-1] == pytest.approx(expected[step], rel=1e-6, abs=1e-9), step
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
