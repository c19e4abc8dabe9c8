"""Streaming datamodule: edge budgets, determinism, equal steps per rank, exact-once eval."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from train_support import make_dataset

from foundation import keys
from foundation.data.datamodule import (
    EVAL_WEIGHT,
    DataConfigError,
    ShardDataModule,
    pack_by_edges,
)


@pytest.fixture(scope="module")
def dm(tmp_path_factory) -> ShardDataModule:
    root = make_dataset(tmp_path_factory.mktemp("shards") / "synth")
    return ShardDataModule(root, max_edges=120, steps_per_epoch=6, shuffle_buffer=16, seed=3)


def keys_of(batches):
    return [[r.key for r in records] for _, records in batches]


def test_pack_by_edges_respects_budget_and_keeps_oversize_items_alone():
    sizes = [30, 50, 40, 200, 10, 10]
    batches = list(pack_by_edges(sizes, lambda e: e, 100, None))
    assert batches == [[30, 50], [40], [200], [10, 10]]
    assert list(pack_by_edges(sizes, lambda e: e, 1000, 2)) == [[30, 50], [40, 200], [10, 10]]


def test_train_stream_is_deterministic_and_depends_on_epoch_and_rank(dm):
    a = keys_of(dm.train_stream(rank=0, world_size=2).record_batches())
    b = keys_of(dm.train_stream(rank=0, world_size=2).record_batches())
    assert a == b and len(a) == 6
    other_rank = keys_of(dm.train_stream(rank=1, world_size=2).record_batches())
    stream = dm.train_stream(rank=0, world_size=2)
    stream.epoch = 1
    other_epoch = keys_of(stream.record_batches())
    assert a != other_rank and a != other_epoch
    for _, records in dm.train_stream().record_batches():
        assert sum(r.n_edges for r in records) <= 120 or len(records) == 1


def test_every_rank_and_worker_layout_gives_fixed_epoch_length(dm):
    for workers in (0, 2):
        stream = dm.train_stream(rank=1, world_size=2)
        batches = list(DataLoader(stream, batch_size=None, num_workers=workers))
        assert len(batches) == len(stream) == 6
        assert [int(b["batch_position"][1]) for b in batches] == list(range(6))
        for b in batches:
            assert (
                b[keys.BLOCK_MASK].shape[0] == b[keys.EDGE_INDEX].shape[1] <= 120
                or len(b[keys.N_ATOMS]) == 1
            )


def test_skip_resumes_the_same_epoch_stream(dm):
    full = [b["batch_position"].tolist() for b in dm.train_stream()]
    stream = dm.train_stream()
    stream.skip = 4
    tail = list(stream)
    assert [b["batch_position"].tolist() for b in tail] == full[4:]
    ref = list(dm.train_stream())[4:]
    assert all(torch.equal(x[keys.H], y[keys.H]) for x, y in zip(tail, ref, strict=True))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_stream_counts_every_structure_once_with_equal_steps(dm, world):
    from foundation.data.shards import iter_records

    expected = sorted(r.key for r in iter_records(dm.root, "val"))
    n_struct, steps = 0, []
    for rank in range(world):
        batches = list(
            DataLoader(dm.eval_stream("val", rank, world), batch_size=None, num_workers=2)
        )
        steps.append(len(batches))
        n_struct += sum(int(b[keys.N_ATOMS].numel() * b[EVAL_WEIGHT][0]) for b in batches)
    assert len(set(steps)) == 1, steps
    assert n_struct == len(expected)


def test_missing_directory_names_path_and_command(tmp_path):
    with pytest.raises(DataConfigError, match=r"does not exist .*foundation-data shard"):
        ShardDataModule(tmp_path / "nope")


def test_state_dict_round_trip_sets_resume_position(dm):
    dm.on_before_batch_transfer({"batch_position": torch.tensor([2, 3])}, 0)
    state = dm.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == 4
    fresh = ShardDataModule(dm.root, max_edges=120, steps_per_epoch=6, seed=3)
    fresh.load_state_dict(state)
    assert fresh._epoch_start() == (2, 4)
    fresh.load_state_dict({"epoch": 2, "consumed": 6, "seed": 3})  # closed epoch → next one
    assert fresh._epoch_start() == (3, 0)
