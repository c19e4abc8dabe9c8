"""LightningDataModule over a shard directory (``data_shards/<name>/``, see shards.py).

Streaming, deterministic, and safe for many ranks:

* **Train** (``resampled``): every (rank, worker) draws shards with replacement from the
  train split with its own generator seeded by (seed, epoch, rank, worker), reads them with
  webdataset, mixes samples through a shuffle buffer and packs them into edge-budget
  batches. An epoch is a fixed number of steps (``steps_per_epoch``) on every rank, so
  ranks never wait for one another at the end of uneven shards.
* **Val / test**: every rank streams the whole split in manifest order and packs it into
  the same global list of edge-budget batches; batch k goes to rank k % world_size (then
  round-robin to that rank's workers). Ranks left one batch short get a copy flagged
  ``EVAL_WEIGHT = 0``, so every rank runs the same number of steps (no collective hangs)
  and every structure counts exactly once in the metrics.
* **Split groups**: val/test batches tag each structure as seen, unseen composition or
  unseen element (``keys.SPLIT_GROUP``, from the manifest's split policy) so the metrics
  report the three apart.
* **Batches** hold as many structures as fit ``max_edges`` edges (a structure larger than
  the budget is a batch of its own), collated with `foundation.data.graph.collate_graphs`.
* **Replay** (optional, fine-tuning): every train batch also takes structures of a second
  dataset (e.g. the pretraining data) filling ``fraction`` of the edge budget. Targets the
  replayed dataset lacks (``h_hse``) get presence flags (`keys.present`), zero blocks on
  its structures, and count in no loss or metric there.
* **Damaged data** (``on_error``): ``stop`` ends the run at the first missing, corrupt or
  truncated shard or undecodable sample with a `ShardError` naming the shard, the sample
  and the fix. ``skip`` leaves them out and goes on: shards that fail their checksum at
  setup are dropped whole (a changed array value cannot be pinned to one sample), samples
  that fail to decode while streaming are skipped, the rest of a truncated shard too. Every
  skip is logged; `ShardDataModule.skipped` counts them (stream events reach the main
  process with the batch that follows them, ``SKIPPED``) for the run summary and loggers.
* **Exact resume**: each train batch carries ``BATCH_POSITION = (epoch, index)``; the
  datamodule records the last batch handed to the model (``on_before_batch_transfer``) and
  checkpoints it (``state_dict``), and a resumed run skips the batches already consumed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from foundation import keys
from foundation.basis import BasisSet
from foundation.data.graph import collate_graphs, record_to_graph
from foundation.data.record import HamiltonianRecord

log = logging.getLogger(__name__)

BATCH_POSITION = "batch_position"
"""(2,) long tensor (epoch, index within the epoch) of a train batch; removed before the model."""
EVAL_WEIGHT = "eval_weight"
"""(1,) float tensor: 1 for a real val/test batch, 0 for a padding copy (metrics skip it)."""
SKIPPED = "skipped"
"""List of messages (shard, sample, reason) of data skipped since the previous batch of the
same stream (``on_error=skip``); removed before the model."""
ON_ERROR = ("stop", "skip")
MAX_FAILED_SHARDS_IN_A_ROW = 64
"""With ``on_error=skip``, this many shard reads in a row without one good sample stop the
run: the data is broken as a whole, not here and there."""


class DataConfigError(ValueError):
    """The data configuration cannot work (missing shards, bad budget); the message says the fix."""


# ----------------------------------------------------------------------------- helpers
def _seed(*parts: int) -> int:
    """A 64-bit seed that depends on every part (order matters)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]
    )


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _read_records(
    urls: Iterable[str], skipped: list[str] | None = None
) -> Iterator[HamiltonianRecord]:
    """Records from an iterable of shard paths, in shard and member order.

    Without ``skipped`` the first damaged shard or sample raises `ShardError`; with a list,
    the error's message is appended to it (and logged) and reading goes on with the next
    sample (undecodable sample) or shard (missing or truncated shard).
    """
    from foundation.data.shards import ShardError, decode_sample, shard_samples

    if skipped is None:
        for sample in shard_samples()({"url": u} for u in urls):
            yield decode_sample(sample, sample["__url__"])
        return

    def note(exc: ShardError) -> None:
        log.warning("data.on_error=skip: %s", exc)
        skipped.append(str(exc))

    failed_in_a_row = 0
    for url in urls:
        good = False
        try:
            for sample in shard_samples()([{"url": url}]):
                try:
                    record = decode_sample(sample, url)
                except ShardError as exc:
                    note(exc)
                    continue
                good = True
                yield record
        except ShardError as exc:
            note(exc)
        failed_in_a_row = 0 if good else failed_in_a_row + 1
        if failed_in_a_row >= MAX_FAILED_SHARDS_IN_A_ROW:
            raise ShardError(
                f"{failed_in_a_row} shard reads in a row gave no usable sample (last: {url}); "
                "the dataset is broken as a whole: check data.root and rebuild it with "
                "`foundation-data shard`."
            )


def pack_by_edges(
    items: Iterable[Any], n_edges: Callable[[Any], int], max_edges: int, max_structures: int | None
) -> Iterator[list[Any]]:
    """Greedy edge-budget packing in stream order: a batch closes when the next item would
    push it past ``max_edges`` (or past ``max_structures``); an item larger than the budget
    forms a batch of its own."""
    batch: list[Any] = []
    edges = 0
    for item in items:
        e = n_edges(item)
        full = max_structures is not None and len(batch) >= max_structures
        if batch and (edges + e > max_edges or full):
            yield batch
            batch, edges = [], 0
        batch.append(item)
        edges += e
    if batch:
        yield batch


class _GraphStream(IterableDataset):
    """Shared settings: shards, padding basis, targets (``optional``: those some structures
    may lack, with presence flags) and batch budget."""

    def __init__(
        self,
        shards: Sequence[str],
        basis: BasisSet,
        targets: Sequence[str],
        max_edges: int,
        max_structures: int | None,
        rank: int = 0,
        world_size: int = 1,
        optional: Sequence[str] = (),
        on_error: str = "stop",
    ):
        self.shards = list(shards)
        self.basis = basis
        self.targets = tuple(targets)
        self.optional = tuple(optional)
        self.max_edges = int(max_edges)
        self.max_structures = max_structures
        self.rank = rank
        self.world_size = world_size
        self.on_error = on_error
        self._skipped: list[str] | None = [] if on_error == "skip" else None

    def _records(self, urls: Iterable[str]) -> Iterator[HamiltonianRecord]:
        return _read_records(urls, self._skipped)

    def _with_skips(self, out: dict[str, Any]) -> dict[str, Any]:
        """Attach (and forget) the skips noted since this stream's previous batch."""
        if self._skipped:
            out[SKIPPED] = list(self._skipped)
            self._skipped.clear()
        return out

    def _collate(self, records: list[HamiltonianRecord]) -> dict[str, torch.Tensor]:
        universal = self.basis.universal
        return collate_graphs(
            [record_to_graph(r, universal, self.targets, optional=self.optional) for r in records]
        )

    def _batches(
        self, records: Iterable[HamiltonianRecord], max_edges: int | None = None
    ) -> Iterator[list[HamiltonianRecord]]:
        budget = self.max_edges if max_edges is None else max_edges
        return pack_by_edges(records, lambda r: r.n_edges, budget, self.max_structures)


class TrainStream(_GraphStream):
    """Resampled shards → shuffle buffer → edge-budget batches; ``steps`` batches per epoch
    on every rank. ``epoch`` and ``skip`` (batches already consumed this epoch) are set by
    the loader before each pass. With ``replay_shards`` each batch is ``1 − replay_fraction``
    of the edge budget from ``shards`` and ``replay_fraction`` from ``replay_shards``."""

    def __init__(
        self,
        *args: Any,
        steps: int,
        shuffle_buffer: int,
        seed: int,
        replay_shards: Sequence[str] = (),
        replay_fraction: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.steps = int(steps)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.replay_shards = list(replay_shards)
        self.replay_fraction = float(replay_fraction)
        self.epoch = 0
        self.skip = 0

    def __len__(self) -> int:
        return self.steps

    def _shuffled_records(
        self, shards: Sequence[str], rng: random.Random
    ) -> Iterator[HamiltonianRecord]:
        """Records of shards drawn with replacement, mixed through the shuffle buffer."""

        def resampled() -> Iterator[str]:
            while True:
                yield shards[rng.randrange(len(shards))]

        records = self._records(resampled())
        if self.shuffle_buffer > 1:
            records = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(
                records
            )
        return records

    def record_batches(
        self, worker: int = 0, num_workers: int = 1
    ) -> Iterator[tuple[int, list[HamiltonianRecord]]]:
        """(index in the epoch, records) of the batches this worker makes: w, w + nw, …"""
        seed = (self.seed, self.epoch, self.rank, worker)
        records = self._shuffled_records(self.shards, random.Random(_seed(*seed)))
        if self.replay_shards:
            replay_edges = max(1, round(self.replay_fraction * self.max_edges))
            own = self._batches(records, max(1, self.max_edges - replay_edges))
            replayed = self._shuffled_records(self.replay_shards, random.Random(_seed(*seed, 1)))
            batches = (
                a + b for a, b in zip(own, self._batches(replayed, replay_edges), strict=False)
            )
        else:
            batches = self._batches(records)
        indices = range(worker, self.steps, num_workers)  # DataLoader takes workers round-robin
        yield from zip(indices, batches, strict=False)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for index, batch in self.record_batches(*_worker()):
            if index < self.skip:
                continue
            out = self._collate(batch)
            out[BATCH_POSITION] = torch.tensor([self.epoch, index], dtype=torch.long)
            yield self._with_skips(out)


class EvalStream(_GraphStream):
    """The whole split once, in manifest order; batch k → rank k % world_size; the ranks left
    one short get a weight-0 copy so every rank runs the same number of steps. With a
    ``split_policy`` (the manifest's) every batch carries ``keys.SPLIT_GROUP``: per structure,
    seen / unseen composition / unseen element (`foundation.data.shards.policy_group`)."""

    def __init__(self, *args: Any, split_policy: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.split_policy = split_policy

    def _collate(self, records: list[HamiltonianRecord]) -> dict[str, torch.Tensor]:
        from foundation.data.shards import policy_group

        out = super()._collate(records)
        if self.split_policy is not None:
            groups = [policy_group(r.numbers, self.split_policy) for r in records]
            out[keys.SPLIT_GROUP] = torch.tensor(groups, dtype=torch.long)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        w, nw = _worker()
        local = 0  # index of the next batch of this rank
        last = None
        n_batches = 0
        for k, batch in enumerate(self._batches(self._records(self.shards))):
            n_batches = k + 1
            if k % self.world_size != self.rank:
                continue
            if local % nw == w:
                out = self._collate(batch)
                out[EVAL_WEIGHT] = torch.ones(1)
                yield self._with_skips(out)
            local += 1
            last = batch
        per_rank = -(-n_batches // self.world_size)
        if local < per_rank and local % nw == w:
            pad = last if last is not None else next(self._batches(self._records(self.shards)))
            out = self._collate(pad)
            out[EVAL_WEIGHT] = torch.zeros(1)
            yield self._with_skips(out)


class _TrainLoader(DataLoader):
    """A DataLoader that tells its stream the epoch and the batches to skip before each pass."""

    def __init__(self, stream: TrainStream, start: Callable[[], tuple[int, int]], **kwargs: Any):
        super().__init__(stream, batch_size=None, **kwargs)
        self._start = start

    def __iter__(self):
        self.dataset.epoch, self.dataset.skip = self._start()
        return super().__iter__()


# ----------------------------------------------------------------------------- datamodule
class ShardDataModule(pl.LightningDataModule):
    """Train/val/test loaders over ``root`` (a shard directory with manifest.json).

    Args:
        root: dataset directory (``data_shards/<name>``).
        targets: targets to load as padded blocks (``h``, ``s``, extras); must be in the
            manifest's ``targets``.
        max_edges: edge budget of one batch (per rank).
        max_structures: optional cap on structures per batch.
        steps_per_epoch: train batches per epoch on every rank (fixed: resampled streaming).
        shuffle_buffer: samples held in the train shuffle buffer.
        num_workers: DataLoader workers per rank.
        seed: data-order seed (train order is a function of seed, epoch, rank, worker).
        verify: check every shard's sha256 against the manifest before training.
        splits: names of the train, val and test splits in the manifest.
        replay: optional ``{root, fraction, split}``: mix structures of the dataset at
            ``root`` (split ``split``, default train) into every train batch, ``fraction``
            (default 0.25) of the edge budget, e.g. pretraining data while fine-tuning on
            new targets; its basis must agree with this dataset's on shared elements.
        on_error: ``stop`` (default) or ``skip`` damaged shards and samples (see the module
            docstring); skips are counted in ``skipped``, logged and listed in the run summary.
    """

    def __init__(
        self,
        root: str | Path,
        targets: Sequence[str] = (keys.H, keys.S),
        max_edges: int = 4096,
        max_structures: int | None = None,
        steps_per_epoch: int = 100,
        shuffle_buffer: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        verify: bool = True,
        splits: Sequence[str] = ("train", "val", "test"),
        replay: Mapping[str, Any] | None = None,
        on_error: str = "stop",
    ):
        super().__init__()
        from foundation.data.shards import read_manifest

        self.root = Path(root)
        if not (self.root / "manifest.json").is_file():
            what = "does not exist" if not self.root.exists() else "has no manifest.json"
            raise DataConfigError(
                f"Shard directory {self.root} {what} (config key data.root). Build it from "
                f"records with `foundation-data shard <record dirs...> --out {self.root}` (see "
                "`foundation-data shard --help`), or point data.root at an existing dataset."
            )
        if max_edges <= 0 or steps_per_epoch <= 0:
            raise DataConfigError("data.max_edges and data.steps_per_epoch must be positive.")
        if on_error not in ON_ERROR:
            raise DataConfigError(f"data.on_error={on_error!r}: must be one of {ON_ERROR}.")
        self.on_error = on_error
        self.skipped: dict[str, int] = {}
        """Message of each skipped shard or sample → times it was skipped (this rank)."""
        self._excluded: dict[str, str] = {}  # shard path → its split, left out at setup
        self._verified = False
        self._logged_skips = 0
        self.manifest = read_manifest(self.root)
        self.targets = tuple(targets)
        missing = [
            t for t in self.targets if t not in self.manifest.get("targets", [keys.H, keys.S])
        ]
        if missing:
            raise DataConfigError(
                f"{self.root}: target(s) {missing} are not in this dataset "
                f"(it has {self.manifest.get('targets')}); fix data.targets."
            )
        self.split_names = dict(zip(("train", "val", "test"), splits, strict=True))
        for split in self.split_names.values():
            if split not in self.manifest["splits"]:
                raise DataConfigError(
                    f"{self.root}: no split {split!r} in manifest.json "
                    f"(has {sorted(self.manifest['splits'])}); fix data.splits."
                )
        self.max_edges = int(max_edges)
        self.max_structures = max_structures
        self.steps_per_epoch = int(steps_per_epoch)
        self.shuffle_buffer = int(shuffle_buffer)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.verify = verify
        self.basis = BasisSet.from_dict(self.manifest["basis"])
        self.replay = None if replay is None else self._replay(dict(replay))
        self._consumed = (0, 0)  # (epoch, batches of that epoch handed to the model)
        self._resume: tuple[int, int] | None = None

    def _replay(self, replay: dict[str, Any]) -> dict[str, Any]:
        """Checked replay settings; widens ``self.basis`` to the replayed dataset's elements."""
        from foundation.data.shards import read_manifest

        unknown = set(replay) - {"root", "fraction", "split"}
        if unknown or "root" not in replay:
            raise DataConfigError(
                f"data.replay takes root (required), fraction and split; got {sorted(replay)}."
            )
        root = Path(replay["root"])
        fraction = float(replay.get("fraction", 0.25))
        split = str(replay.get("split", "train"))
        if not 0.0 < fraction < 1.0:
            raise DataConfigError(f"data.replay.fraction={fraction}: must lie in (0, 1).")
        if not (root / "manifest.json").is_file():
            raise DataConfigError(
                f"Replay dataset {root} has no manifest.json (config key data.replay.root); "
                "point it at a shard directory such as data_shards/pbe_mini."
            )
        manifest = read_manifest(root)
        if split not in manifest["splits"]:
            raise DataConfigError(
                f"Replay dataset {root} has no split {split!r} (has {sorted(manifest['splits'])}); "
                "fix data.replay.split."
            )
        try:
            self.basis = self.basis.merged(BasisSet.from_dict(manifest["basis"]))
        except ValueError as exc:
            raise DataConfigError(
                f"Replay dataset {root} cannot share batches with {self.root}: {exc}"
            ) from None
        has = manifest.get("targets", [keys.H, keys.S])
        return {
            "root": root,
            "fraction": fraction,
            "split": split,
            "elements": list(manifest.get("elements", [])),
            "optional": tuple(t for t in self.targets if t not in has),
        }

    # ------------------------------------------------------------------ properties
    @property
    def elements(self) -> list[str]:
        """Elements of the dataset (and of the replayed one)."""
        own = list(self.manifest.get("elements", self.basis.elements))
        extra = [] if self.replay is None else self.replay["elements"]
        return own + [el for el in extra if el not in own]

    def use_basis(self, basis: BasisSet) -> None:
        """Pad blocks in ``basis`` (the model's; a superset of the dataset's elements)."""
        self.basis = basis

    def shards(self, stage: str) -> list[str]:
        from foundation.data.shards import shard_paths

        paths = [str(p) for p in shard_paths(self.root, self.split_names[stage])]
        return [p for p in paths if p not in self._excluded]

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    # ------------------------------------------------------------------ lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Verify the shards once (foundation-train calls it before fitting the target
        statistics, Lightning again at fit)."""
        if self.verify and stage in (None, "fit") and not self._verified:
            self._verify(self.root)
            if self.replay is not None:
                self._verify(self.replay["root"])
            self._verified = True

    def _verify(self, root: Path) -> None:
        """Checksums of every shard of ``root``: stop at the first bad one, or (``skip``)
        leave the bad ones out, counted, as long as every split keeps a shard."""
        from foundation.data.shards import ShardError, verify_dataset

        def bad(split: str, path: Path, exc: ShardError) -> None:
            if self.on_error == "stop":
                raise ShardError(
                    f"{exc} Or set data.on_error=skip to go on without this shard's samples."
                ) from None
            self._excluded[str(path)] = split
            self._note_skips([f"{exc} (the whole shard is left out)"])

        verify_dataset(root, on_bad=bad)
        if root == self.root:
            for stage in self.split_names:
                if not self.shards(stage):
                    raise DataConfigError(
                        f"{self.root}: every shard of split {self.split_names[stage]!r} is "
                        "missing or damaged (data.on_error=skip has nothing left); rebuild the "
                        "dataset with `foundation-data shard`."
                    )

    def _note_skips(self, messages: Sequence[str]) -> None:
        """Count skipped data and warn once per new message."""
        for message in messages:
            if message not in self.skipped:
                log.warning("data.on_error=skip: %s", message)
            self.skipped[message] = self.skipped.get(message, 0) + 1

    def _log_skips(self) -> None:
        """Tell the trainer's loggers the number of skips so far (``data/skipped``) when it
        changed (setup-time skips at the first batch)."""
        total = sum(self.skipped.values())
        trainer = self.trainer
        if total != self._logged_skips and trainer is not None and trainer.loggers:
            for logger in trainer.loggers:
                logger.log_metrics({"data/skipped": float(total)}, step=trainer.global_step)
            self._logged_skips = total

    def train_stream(self, rank: int = 0, world_size: int = 1) -> TrainStream:
        replay = {}
        if self.replay is not None:
            from foundation.data.shards import shard_paths

            root, split = self.replay["root"], self.replay["split"]
            replay = {
                "replay_shards": [str(p) for p in shard_paths(root, split)],
                "replay_fraction": self.replay["fraction"],
                "optional": self.replay["optional"],
            }
        return TrainStream(
            self.shards("train"),
            self.basis,
            self.targets,
            self.max_edges,
            self.max_structures,
            rank=rank,
            world_size=world_size,
            steps=self.steps_per_epoch,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            on_error=self.on_error,
            **replay,
        )

    def eval_stream(self, stage: str, rank: int = 0, world_size: int = 1) -> EvalStream:
        return EvalStream(
            self.shards(stage),
            self.basis,
            self.targets,
            self.max_edges,
            self.max_structures,
            rank=rank,
            world_size=world_size,
            split_policy=self.manifest.get("split_policy", {}),
            on_error=self.on_error,
        )

    def _loader_kwargs(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "persistent_workers": False}

    def train_dataloader(self) -> DataLoader:
        rank, world = self._ranks()
        return _TrainLoader(
            self.train_stream(rank, world), self._epoch_start, **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.eval_stream("val", *self._ranks()), batch_size=None, **self._loader_kwargs()
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(
            self.eval_stream("test", *self._ranks()), batch_size=None, **self._loader_kwargs()
        )

    def _epoch_start(self) -> tuple[int, int]:
        """(epoch, batches to skip) for the train pass about to start.

        After a resume the datamodule's own record of the last batch handed to the model
        decides: Lightning creates the first iterator before it moves past an epoch that a
        checkpoint closed, so its epoch counter can still name the finished epoch.
        """
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        skip = 0
        if self._resume is not None:
            epoch, skip = self._resume
            if skip >= self.steps_per_epoch:
                epoch, skip = epoch + 1, 0
            self._resume = None
        self._consumed = (epoch, skip)
        return epoch, skip

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        self._note_skips(batch.pop(SKIPPED, []))
        self._log_skips()
        position = batch.pop(BATCH_POSITION, None)
        if position is not None:
            self._consumed = (int(position[0]), int(position[1]) + 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._consumed[0], "consumed": self._consumed[1], "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            log.warning(
                "Resuming with data seed %s but the checkpoint used %s: the data order differs.",
                self.seed,
                state["seed"],
            )
        self._resume = (int(state["epoch"]), int(state["consumed"]))
