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


def test_test_batches_tag_split_groups_and_metrics_report_each_group(tmp_path):
    """Test batches carry each structure's split group from the manifest policy; BlockErrors
    reports the MAE of each group apart. A prediction off by (g + 1) meV on every entry of
    group g gives exactly 1, 2 and 3 meV for seen, unseen composition and unseen element."""
    from foundation.data.shards import split_group, write_shards
    from foundation.data.synthetic import random_record
    from foundation.train.metrics import BlockErrors

    formulas = [["Ga", "O"], ["Ga", "As"], ["Si", "As"], ["Ga", "Ga"], ["Si", "Si"]]
    records = [
        random_record(f"{''.join(f)}-{k}", f, seed=10 * i + k)
        for i, f in enumerate(formulas)
        for k in range(4)
    ]
    root = tmp_path / "ds"
    write_shards(
        records, root, name="groups", test_fraction=0.3, test_compositions=["GaAs"],
        test_elements=["O"],
    )  # fmt: skip
    dm = ShardDataModule(root, targets=(keys.H,), max_edges=150)
    errors = BlockErrors(dm.basis.atomic_numbers, [keys.H])
    tagged = {g: 0 for g in keys.SPLIT_GROUPS}
    for batch in dm.eval_stream("test"):
        group = batch[keys.SPLIT_GROUP]
        for b in range(len(group)):
            numbers = batch[keys.NUMBERS][batch[keys.BATCH] == b]
            expected = split_group(numbers, ["GaAs"], ["O"])
            assert keys.SPLIT_GROUPS[int(group[b])] == expected
            tagged[expected] += 1
        offset = 1e-3 * (group[batch[keys.EDGE_BATCH]] + 1).to(batch[keys.H].dtype)
        pred = {keys.H: batch[keys.H] + offset[:, None, None]}
        errors.update(pred, batch, float(batch.pop(EVAL_WEIGHT)[0]))
    assert tagged["seen"] > 0 and tagged["unseen_composition"] == tagged["unseen_element"] == 4
    values = errors.compute(per_pair=False)
    for g, expected in zip(keys.SPLIT_GROUPS, (1.0, 2.0, 3.0), strict=True):
        for part in ("", "_onsite", "_offsite"):
            assert values[f"mae_h_{g}{part}_meV"] == pytest.approx(expected, rel=1e-4)
    assert 1.0 < values["mae_h_meV"] < 3.0

    val = next(iter(dm.eval_stream("val")))
    assert val[keys.SPLIT_GROUP].tolist() == [0] * len(val[keys.N_ATOMS])
    val.pop(keys.SPLIT_GROUP)  # a batch without tags counts in the overall MAE only
    untagged = BlockErrors(dm.basis.atomic_numbers, [keys.H])
    untagged.update({keys.H: val[keys.H] + 1e-3}, val)
    assert set(untagged.compute(per_pair=False)) == {
        "mae_h_meV",
        "mae_h_onsite_meV",
        "mae_h_offsite_meV",
    }
