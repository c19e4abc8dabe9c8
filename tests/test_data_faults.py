"""Damaged data during training: ``data.on_error: stop | skip`` and NaN/Inf at write time.

A copy of a small synthetic dataset gets a flipped byte, a truncated tar, a missing shard or
an undecodable sample. ``stop`` ends with a `ShardError` naming the shard, the damaged sample
(where reading can pin it) and the fixes; ``skip`` leaves exactly the damaged data out, goes
on training, and counts every skip for the run summary.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from torch.utils.data import DataLoader
from train_support import compose, make_dataset, overrides

from foundation.data.datamodule import DataConfigError, ShardDataModule
from foundation.data.record import RecordError
from foundation.data.shards import (
    ShardError,
    shard_paths,
    write_shards,
)
from foundation.data.synthetic import random_record


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("faults") / "synth")


@pytest.fixture
def dataset(clean, tmp_path):
    return shutil.copytree(clean, tmp_path / "synth")


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


def _shard_records(path):
    from foundation.data.datamodule import _read_records

    return list(_read_records([str(path)]))


def datamodule(root, on_error, verify=True) -> ShardDataModule:
    return ShardDataModule(
        root, max_edges=120, steps_per_epoch=12, shuffle_buffer=4, on_error=on_error, verify=verify
    )


def drain(dm: ShardDataModule, stage: str = "train", workers: int = 0) -> list[str]:
    """Keys of every structure the stage's loader yields, each batch passed through the
    datamodule's transfer hook (which counts the skips it carries)."""
    loader = {
        "train": dm.train_dataloader,
        "val": dm.val_dataloader,
        "test": dm.test_dataloader,
    }[stage]()
    if workers:
        loader = DataLoader(loader.dataset, batch_size=None, num_workers=workers)
    seen = []
    for batch in loader:
        dm.on_before_batch_transfer(batch, 0)
        seen += list(batch["n_atoms"])
    return seen


def test_stop_names_shard_damaged_sample_and_both_fixes(dataset):
    path = shard_paths(dataset, "train")[0]
    good = _shard_records(path)
    truncate(path)
    dm = datamodule(dataset, "stop")
    with pytest.raises(ShardError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(path) in message and "does not match the manifest" in message
    # reading the damaged shard pins the break: the tar ends after one of its own samples
    assert "truncated shard" in message and any(f"after sample '{r.key}'" in message for r in good)
    assert "foundation-data shard" in message and "data.on_error=skip" in message

    missing = shard_paths(dataset, "val")[0]
    path.write_bytes(b"")
    missing.unlink()
    with pytest.raises(ShardError, match=rf"{path}: sha256 .*before its first sample"):
        datamodule(dataset, "stop").setup("fit")


def test_stop_without_verification_names_the_undecodable_sample(dataset):
    path = shard_paths(dataset, "train")[1]
    data = bytearray(path.read_bytes())
    at = data.index(b"\x93NUMPY")  # header of the first .npy member
    data[at + 1 : at + 6] = b"XXXXX"
    path.write_bytes(bytes(data))
    dm = datamodule(dataset, "stop", verify=False)
    dm.setup("fit")
    with pytest.raises(ShardError, match=rf"{path}: sample '[^']+'"):
        drain(dm)


def test_skip_leaves_out_bad_shards_at_setup_and_counts_them(dataset):
    flipped, truncated, missing, *kept = shard_paths(dataset, "train")
    assert kept
    lost = {r.key for p in (flipped, truncated, missing) for r in _shard_records(p)}
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01  # one flipped bit, same size
    flipped.write_bytes(bytes(data))
    truncate(truncated)
    missing.unlink()

    dm = datamodule(dataset, "skip")
    dm.setup("fit")
    assert dm.shards("train") == [str(p) for p in kept]
    assert len(dm.skipped) == 3
    text = " ".join(dm.skipped)
    for path in (flipped, truncated, missing):
        assert str(path) in text
    # training goes on with the remaining shards only: no key of a left-out shard comes back
    train_keys = {r.key for _, batch in dm.train_stream().record_batches() for r in batch}
    assert train_keys and not train_keys & lost


def test_skip_all_shards_of_a_split_damaged_is_a_config_error(dataset):
    for path in shard_paths(dataset, "val"):
        path.unlink()
    with pytest.raises(DataConfigError, match="every shard of split 'val'"):
        datamodule(dataset, "skip").setup("fit")


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_while_streaming_counts_each_damaged_sample(dataset, workers):
    """verify=false (or damage after verification): the undecodable sample and the tail of a
    truncated shard are skipped while streaming, in loader workers too; everything else of
    the split is read, and the skips reach the datamodule with the batches."""
    undecodable, truncated = shard_paths(dataset, "train")[:2]
    data = bytearray(undecodable.read_bytes())
    at = data.index(b"\x93NUMPY")
    data[at + 1 : at + 6] = b"XXXXX"
    undecodable.write_bytes(bytes(data))
    truncate(truncated)
    dm = datamodule(dataset, "skip", verify=False)
    dm.setup("fit")
    drain(dm, "train", workers)
    messages = list(dm.skipped)
    assert any(str(undecodable) in m and "sample '" in m for m in messages), messages
    assert any(str(truncated) in m and "truncated shard" in m for m in messages), messages
    assert sum(dm.skipped.values()) >= 2


def test_skipped_data_reaches_the_run_summary_and_logger(dataset, tmp_path, caplog):
    from foundation.train.cli import train

    path = shard_paths(dataset, "train")[0]
    truncate(path)
    cfg = compose(
        overrides(
            dataset,
            tmp_path / "run",
            "data.on_error=skip",
            "trainer.max_epochs=1",
            "callbacks=none",
        )
    )
    with caplog.at_level(logging.INFO, logger="foundation.train.cli"):
        train(cfg)
    (line,) = [r.message for r in caplog.records if r.message.startswith("Finished:")]
    assert "Skipped data (data.on_error=skip): 1 damaged shard(s)/sample(s)" in line
    assert str(path) in line
    assert str(path) in (tmp_path / "run" / "skipped_data.json").read_text()
    metrics = (next((tmp_path / "run").glob("csv/version_*/metrics.csv"))).read_text()
    assert "data/skipped" in metrics


def test_nan_guard_count_in_summary(tmp_path):
    from foundation.train.cli import faults_summary

    assert faults_summary({}, 0, tmp_path) == ""
    assert "Non-finite steps skipped by the NaN guard: 3" in faults_summary({}, 3, tmp_path)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("positions", r"bad-0001: non-finite position of atom 1"),
        ("cell", r"bad-0001: non-finite cell"),
        ("h", r"bad-0001: 'h' has a non-finite value in block of edge"),
        ("s", r"bad-0001: 's' has a non-finite value in block of edge"),
    ],
)
def test_nan_or_inf_is_refused_at_shard_write_time(tmp_path, field, message):
    good = random_record("good-0000", ["Si", "C"], seed=0)
    bad = random_record("bad-0001", ["Si", "C", "O"], seed=1)
    array = getattr(bad, field)
    array.reshape(-1)[4 if field in ("h", "s") else 3 if field == "positions" else 0] = (
        np.inf if field == "s" else np.nan
    )
    with pytest.raises(RecordError, match=message):
        write_shards([good, bad], tmp_path / "out", name="out", samples_per_shard=1)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").rglob("*.tar"))
