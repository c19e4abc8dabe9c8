"""Record ⇄ webdataset shards: writer, manifest, split policy, verified streaming reader.

Layout of a dataset directory (DESIGN.md §4)::

    <dataset>/manifest.json
    <dataset>/train/shard-000000.tar   val/shard-000000.tar   test/shard-000000.tar …

A sample is one `HamiltonianRecord`, stored as the members of ``record.to_files()``:
``{key}.structure.json``, ``{key}.edges.npy``, ``{key}.h.npy``, ``{key}.s.npy`` and one
``{key}.<extra>.npy`` per extra target (``dh``/``ds``: (3N, total), one row per Cartesian
displacement, see `foundation.data.record`). Only ``.json`` and ``.npy`` members are ever
read (npy with ``allow_pickle=False``); anything else, pickle included, is refused.
Keys may hold letters, digits, ``_`` and ``-`` only (webdataset splits names at the
first dot).

Writing is atomic: every shard is written to a hidden temporary file and renamed into
place once complete, and the manifest (sha256, sample and edge counts per shard, basis,
elements, units, split policy, summary statistics) is written last, the same way. Tar
members carry a fixed mtime, so the same records give byte-identical shards.

Split policy (`split_group`, `assign_split`): a record holding an element listed in
``test_elements`` goes to test as an *unseen element*; a record whose reduced composition
(``GaAs`` for Ga2As2) is listed in ``test_compositions`` goes to test as an *unseen
composition*; every other record goes by a hash of ``f"{seed}:{key}"``, so a record's split
depends on nothing but its key and the seed. Every element outside ``test_elements`` must
keep at least one structure in train: a held-out composition that would take an element out
of training (it would measure zero-shot element transfer, not a new composition) is refused
with `SplitPolicyError`, naming the element, the composition and ``--test-elements``.
A *held-out family* (``test_families``: shell-style patterns over keys, e.g.
``slab-*-rocksalt-*`` for every rocksalt slab) sends every matching record to test as well,
so a kind of structure (a surface type) is never seen in training while its compositions
are; such records are scored in the group of their composition and counted per pattern in
the manifest (``held_out_family_counts``).

Streaming: `record_pipeline` is the webdataset pipeline (shard list → split by node →
split by worker → tar → samples → `decode_sample`) that data modules build on;
`split_pipeline` builds it for one split of a dataset directory, with checksums.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from ase.data import chemical_symbols
from ase.formula import Formula

import foundation
from foundation import keys
from foundation.basis import BasisSet
from foundation.data.formats.common import sanitize_key
from foundation.data.record import HamiltonianRecord, RecordError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
ALLOWED_SUFFIXES = (".json", ".npy")
SHARD_MTIME = 0.0
"""Fixed tar member mtime: regenerating the same records gives byte-identical shards."""

_REGENERATE = (
    "re-download the dataset or regenerate it with `foundation-data shard RECORDS... --out {}`"
)


def _package_version() -> str:
    """Installed version (works even when an editable install imports `foundation` as a
    namespace package, where ``foundation.__version__`` is missing)."""
    try:
        return importlib.metadata.version("foundation")
    except importlib.metadata.PackageNotFoundError:
        return getattr(foundation, "__version__", "unknown")


class ShardError(ValueError):
    """A shard dataset is missing, corrupt, tampered with or holds a refused member."""


class SplitPolicyError(ValueError):
    """The split options would leave an element without training structures (or are
    contradictory); the message names the element, the composition and the fix."""


def _fix(dataset: str | os.PathLike) -> str:
    return _REGENERATE.format(dataset)


# ============================================================================ split policy
def reduced_formula(numbers: Iterable[int]) -> str:
    """Reduced chemical formula, e.g. ``GaAs`` for [31, 33, 31, 33]."""
    symbols = "".join(chemical_symbols[int(z)] for z in numbers)
    return Formula(symbols).reduce()[0].format("metal")


def held_out_composition(numbers: Iterable[int], compositions: Sequence[str]) -> str | None:
    """The entry of ``compositions`` (as spelled there) that is the structure's reduced
    composition, in any element order or multiple (``SiGe`` for Ge2Si2), else None."""
    count = Formula(reduced_formula(numbers)).count()
    return next((c for c in compositions if Formula(c).reduce()[0].count() == count), None)


def element_symbols(numbers: Iterable[int]) -> set[str]:
    """Chemical symbols of the distinct atomic numbers in ``numbers``."""
    return {chemical_symbols[int(z)] for z in set(np.asarray(numbers).tolist())}


def check_test_elements(test_elements: Iterable[str]) -> list[str]:
    """``test_elements`` as a list of chemical symbols; raise naming any that is not one."""
    elements = [str(el).strip() for el in test_elements]
    bad = [el for el in elements if el not in chemical_symbols[1:]]
    if bad:
        raise SplitPolicyError(
            f"Unseen test element(s) {', '.join(map(repr, bad))} are not chemical symbols; "
            "write them like --test-elements Se,Te."
        )
    return elements


def split_group(
    numbers: Iterable[int], test_compositions: Sequence[str] = (), test_elements: Sequence[str] = ()
) -> str:
    """What a structure measures when evaluated (one of `keys.SPLIT_GROUPS`): ``unseen_element``
    if it holds an element of ``test_elements``, else ``unseen_composition`` if its reduced
    composition is one of ``test_compositions``, else ``seen``."""
    numbers = np.asarray(numbers)
    if element_symbols(numbers) & set(test_elements):
        return "unseen_element"
    if held_out_composition(numbers, test_compositions) is not None:
        return "unseen_composition"
    return "seen"


def policy_group(numbers: Iterable[int], policy: Mapping) -> int:
    """Index into `keys.SPLIT_GROUPS` of a structure under a manifest's ``split_policy``
    (manifests written before ``test_elements`` existed have none)."""
    group = split_group(
        numbers, policy.get("test_compositions") or (), policy.get("test_elements") or ()
    )
    return keys.SPLIT_GROUPS.index(group)


def hash_fraction(key: str, seed: int) -> float:
    """Deterministic number in [0, 1) from key and seed (sha256; stable across runs/machines)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def held_out_family(key: str, test_families: Sequence[str]) -> str | None:
    """The first pattern of ``test_families`` (shell-style, `fnmatch.fnmatchcase`) that
    ``key`` matches, else None."""
    return next((f for f in test_families if fnmatch.fnmatchcase(key, f)), None)


def assign_split(
    record: HamiltonianRecord,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    test_compositions: Sequence[str] = (),
    test_elements: Sequence[str] = (),
    test_families: Sequence[str] = (),
) -> str:
    """'train', 'val' or 'test' for one record (unseen elements, held-out compositions and
    held-out families always go to test)."""
    if split_group(record.numbers, test_compositions, test_elements) != "seen":
        return "test"
    if held_out_family(record.key, test_families) is not None:
        return "test"
    u = hash_fraction(record.key, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# ============================================================================ statistics
class DatasetStats:
    """Running counts for the manifest and `foundation-data inspect`.

    Per element: atoms and structures containing it; per structure: atoms and edges;
    per block: number of matrix entries (n_orb(i)·n_orb(j)).
    """

    def __init__(self) -> None:
        self.elements: dict[str, dict[str, int]] = {}
        self.atoms: list[int] = []
        self.edges: list[int] = []
        self.block_min = np.inf
        self.block_max = 0
        self.block_sum = 0
        self.n_blocks = 0

    def add(self, record: HamiltonianRecord) -> None:
        zs, counts = np.unique(record.numbers, return_counts=True)
        for z, c in zip(zs.tolist(), counts.tolist(), strict=True):
            e = self.elements.setdefault(chemical_symbols[z], {"atoms": 0, "structures": 0})
            e["atoms"] += c
            e["structures"] += 1
        self.atoms.append(record.n_atoms)
        self.edges.append(record.n_edges)
        sizes = np.prod(record.block_shapes, axis=1)
        self.block_min = min(self.block_min, int(sizes.min()))
        self.block_max = max(self.block_max, int(sizes.max()))
        self.block_sum += int(sizes.sum())
        self.n_blocks += int(sizes.size)

    @staticmethod
    def _summary(values: list[int]) -> dict:
        if not values:
            return {"min": 0, "max": 0, "mean": 0.0, "total": 0}
        a = np.asarray(values)
        return {
            "min": int(a.min()),
            "max": int(a.max()),
            "mean": float(a.mean()),
            "total": int(a.sum()),
        }

    def to_dict(self) -> dict:
        order = sorted(self.elements, key=chemical_symbols.index)
        return {
            "elements": {el: self.elements[el] for el in order},
            "atoms_per_structure": self._summary(self.atoms),
            "edges_per_structure": self._summary(self.edges),
            "block_entries": {
                "min": int(self.block_min) if self.n_blocks else 0,
                "max": int(self.block_max),
                "mean": self.block_sum / self.n_blocks if self.n_blocks else 0.0,
                "total": int(self.block_sum),
            },
        }


# ============================================================================ writing
def check_key(key: str) -> None:
    """Keys become tar member prefixes; webdataset cuts a name at its first dot."""
    if sanitize_key(key) != key:
        raise ValueError(
            f"Record key {key!r} cannot name a shard sample: use letters, digits, '_' and '-' "
            f"only (e.g. {sanitize_key(key)!r})."
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Mapping) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class _SplitWriter:
    """Rolls the shards of one split into hidden temporary files; `commit` renames them."""

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int):
        self.out_dir, self.split, self.per_shard = out_dir, split, samples_per_shard
        self.entries: list[dict] = []
        self._done: list[tuple[Path, Path]] = []  # (temporary, final) of closed shards
        self._writer: wds.TarWriter | None = None
        self._stream = None
        self._tmp: Path | None = None

    def write(self, record: HamiltonianRecord) -> None:
        if self._writer is None:
            final = self.out_dir / self.split / f"shard-{len(self.entries):06d}.tar"
            final.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            self._stream = open(self._tmp, "wb")
            self._writer = wds.TarWriter(self._stream, encoder=False, mtime=SHARD_MTIME)
            self._count = self._edges = 0
        self._writer.write({"__key__": record.key, **record.to_files()})
        self._count += 1
        self._edges += record.n_edges
        if self._count >= self.per_shard:
            self.close()

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._stream.close()
        final = self.out_dir / self.split / f"shard-{len(self.entries):06d}.tar"
        self.entries.append(
            {
                "file": f"{self.split}/{final.name}",
                "n_samples": self._count,
                "n_edges": self._edges,
                "sha256": _sha256(self._tmp),
            }
        )
        self._done.append((self._tmp, final))
        self._writer = self._stream = self._tmp = None

    def commit(self) -> None:
        for tmp, final in self._done:
            os.replace(tmp, final)
        self._done = []

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._stream.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = None
        for tmp, _ in self._done:
            tmp.unlink(missing_ok=True)
        self._done = []


class _TrainCoverage:
    """Which elements keep a structure in the training split, and why the others do not."""

    def __init__(self, test_elements: Sequence[str], seed: int):
        self.test_elements = set(test_elements)
        self.seed = seed
        self.train: set[str] = set()
        self.present: set[str] = set()  # elements of any structure
        self.held_out: dict[str, dict[str, int]] = {}  # element → {held-out formula: count}
        self.hashed_out: dict[str, list[str]] = {}  # element → keys hashed into val/test

    def add(self, numbers: np.ndarray, key: str, split: str, held_out: str | None) -> None:
        """One structure; ``held_out``: its entry of test_compositions, if any."""
        elements = element_symbols(numbers)
        for el in elements:
            self.present.add(el)
            if split == "train":
                self.train.add(el)
            elif held_out is not None:
                held = self.held_out.setdefault(el, {})
                held[held_out] = held.get(held_out, 0) + 1
            elif not self.test_elements & elements:
                self.hashed_out.setdefault(el, []).append(key)

    def check(self) -> None:
        """Raise `SplitPolicyError` for a test element no structure holds, or for an element
        outside ``test_elements`` that has no training structure."""
        absent = sorted(self.test_elements - self.present)
        if absent:
            raise SplitPolicyError(
                f"Unseen test element(s) {', '.join(absent)}: no structure of the dataset "
                "contains them; remove them from --test-elements."
            )
        order = chemical_symbols.index
        for el in sorted(self.present - self.train - self.test_elements, key=order):
            held = self.held_out.get(el, {})
            if held:
                comps = ", ".join(f"{f} ({n} structures)" for f, n in sorted(held.items()))
                raise SplitPolicyError(
                    f"Held-out composition {comps} would take {el} out of the training split: "
                    f"every structure containing {el} is held out, so the {el} embedding never "
                    f"trains and the test measures an unseen element, not an unseen composition. "
                    f"Hold out a composition whose elements all occur in other training "
                    f"structures, or test {el} explicitly as an unseen element with "
                    f"--test-elements {el} (write_shards(test_elements=[{el!r}]))."
                )
            keys_ = self.hashed_out.get(el, [])
            shown = ", ".join(keys_[:5]) + (", …" if len(keys_) > 5 else "")
            raise SplitPolicyError(
                f"Element {el} has no structure in the training split: its {len(keys_)} "
                f"structure(s) ({shown}) all fell into val/test by the hash split (seed "
                f"{self.seed}). Use another --seed, add structures containing {el}, or test it "
                f"explicitly as an unseen element with --test-elements {el}."
            )


def _check_policy(test_compositions: Sequence[str], test_elements: Sequence[str]) -> None:
    """Held-out compositions must be formulas and must not contain an unseen test element
    (a structure is scored in one group only)."""
    for comp in test_compositions:
        try:
            elements = set(Formula(comp).reduce()[0].count())
        except ValueError:
            raise ValueError(f"Held-out composition {comp!r} is not a chemical formula.") from None
        overlap = sorted(elements & set(test_elements))
        if overlap:
            raise SplitPolicyError(
                f"Held-out composition {comp} contains the unseen test element(s) "
                f"{', '.join(overlap)}: its structures are scored as unseen elements already; "
                f"remove {comp} from --test-compositions."
            )


def _one_or_list(values: set):
    values = {v for v in values if v is not None}
    if not values:
        return None
    return next(iter(values)) if len(values) == 1 else sorted(values, key=str)


def write_shards(
    records: Iterable[HamiltonianRecord],
    out_dir: str | os.PathLike,
    *,
    name: str,
    samples_per_shard: int = 32,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    test_compositions: Sequence[str] | None = None,
    test_elements: Sequence[str] | None = None,
    test_families: Sequence[str] | None = None,
    extra_manifest: Mapping | None = None,
) -> dict:
    """Stream records into per-split shards under ``out_dir`` and write its manifest.

    Records are consumed once, in order (memory stays bounded); each split keeps one open
    shard. New shards stay in hidden temporary files until every record is written, so a
    failed run leaves an earlier dataset in ``out_dir`` untouched; then they are renamed
    into place, shards the new manifest does not list are removed and the manifest is
    written last. Returns the manifest.

    ``test_compositions`` (reduced formulas) and ``test_elements`` (symbols) are held out in
    test (see the module docstring), and so is every record whose key matches a pattern
    of ``test_families``; `SplitPolicyError` if an element other than ``test_elements``
    would end up without a training structure.
    """
    out_dir = Path(out_dir)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be ≥ 1, got {samples_per_shard}.")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction <= 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be ≥ 0 "
            "and sum to at most 1."
        )
    test_compositions = list(test_compositions or [])
    test_families = list(test_families or [])
    test_elements = check_test_elements(test_elements or [])
    _check_policy(test_compositions, test_elements)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: _SplitWriter(out_dir, s, samples_per_shard) for s in SPLITS}
    seen: set[str] = set()
    basis: BasisSet | None = None
    stats = DatasetStats()
    functionals, cutoffs, targets, sources = set(), set(), {keys.H}, set()
    held_out: dict[str, int] = {}
    held_out_families = dict.fromkeys(test_families, 0)
    unseen_element: dict[str, int] = {}
    test_groups = dict.fromkeys(keys.SPLIT_GROUPS, 0)
    coverage = _TrainCoverage(test_elements, seed)
    try:
        for record in records:
            check_key(record.key)
            record.check_finite()  # NaN/Inf never reach a shard
            if record.key in seen:
                raise ValueError(f"Duplicate record key {record.key!r}; keys must be unique.")
            seen.add(record.key)
            basis = record.basis if basis is None else basis.merged(record.basis)
            group = split_group(record.numbers, test_compositions, test_elements)
            composition = held_out_composition(record.numbers, test_compositions)
            if group == "unseen_composition":
                held_out[composition] = held_out.get(composition, 0) + 1
            elif group == "unseen_element":
                formula = reduced_formula(record.numbers)
                unseen_element[formula] = unseen_element.get(formula, 0) + 1
            split = assign_split(
                record,
                seed=seed,
                val_fraction=val_fraction,
                test_fraction=test_fraction,
                test_compositions=test_compositions,
                test_elements=test_elements,
                test_families=test_families,
            )
            family = held_out_family(record.key, test_families)
            if family is not None and group == "seen":
                held_out_families[family] += 1
            if split == "test":
                test_groups[group] += 1
            coverage.add(record.numbers, record.key, split, composition)
            writers[split].write(record)
            stats.add(record)
            functionals.add(record.meta.get(keys.FUNCTIONAL))
            cutoffs.add(record.meta.get("edge_cutoff_A"))
            sources.add(record.meta.get(keys.SOURCE))
            if record.s is not None:
                targets.add(keys.S)
            targets.update(record.extras)
        for w in writers.values():
            w.close()
        coverage.check()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if basis is None:
        raise ValueError(f"No records to write into {out_dir}.")

    splits = {
        s: {
            "shards": w.entries,
            "n_samples": sum(e["n_samples"] for e in w.entries),
            "n_edges": sum(e["n_edges"] for e in w.entries),
        }
        for s, w in writers.items()
    }
    manifest = {
        "name": name,
        "format_version": FORMAT_VERSION,
        "generator": "foundation.data.shards.write_shards",
        "created_by": f"foundation {_package_version()}",
        "units": {"length": "Angstrom", "energy": "eV"},
        "basis": basis.to_dict(),
        "elements": basis.elements,
        "functional": _one_or_list(functionals),
        "edge_cutoff_A": _one_or_list(cutoffs),
        "sources": sorted(str(s) for s in sources if s is not None),
        "targets": [keys.H] + sorted(t for t in targets if t != keys.H),
        "n_samples": len(seen),
        "splits": splits,
        "split_policy": {
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "test_compositions": test_compositions,
            "test_elements": test_elements,
            "held_out_counts": held_out,
            "unseen_element_counts": unseen_element,
            "test_groups": test_groups,
            "rule": "an element in test_elements → test (unseen_element); else composition in "
            "test_compositions → test (unseen_composition); else sha256(f'{seed}:{key}') "
            "fraction u: u < test_fraction → test, u < test+val → val, else train (seen); "
            "every element outside test_elements keeps a training structure",
        }
        | (
            {  # only with families, so manifests without them stay byte-identical
                "test_families": test_families,
                "held_out_family_counts": held_out_families,
                "family_rule": "else a key matching a pattern of test_families (fnmatch) → "
                "test, scored in its composition's group",
            }
            if test_families
            else {}
        ),
        "stats": stats.to_dict(),
    } | dict(extra_manifest or {})
    for w in writers.values():
        w.commit()
    keep = {out_dir / e["file"] for s in splits.values() for e in s["shards"]}
    for split in SPLITS:
        for stale in (out_dir / split).glob("shard-*.tar"):
            if stale not in keep:
                stale.unlink()
    _write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


# ============================================================================ reading
def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(
            f"{path}: missing; {dataset_dir} is not a shard dataset (or is incomplete): "
            f"{_fix(dataset_dir)}."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path}: not valid JSON ({exc}); {_fix(dataset_dir)}.") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}; "
            f"upgrade foundation or {_fix(dataset_dir)}."
        )
    return manifest


def _split_entries(dataset_dir: Path, manifest: dict, split: str) -> list[dict]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ShardError(
            f"{dataset_dir / MANIFEST}: no split {split!r} (has {', '.join(splits) or 'none'})."
        )
    entries = splits[split]["shards"]
    for e in entries:
        rel = Path(str(e.get("file", "")))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ShardError(
                f"{dataset_dir / MANIFEST}: split {split!r} lists shard {str(rel)!r} outside the "
                "dataset folder; shard paths must be relative and stay inside it. Rewrite the "
                "manifest with foundation-data shard."
            )
    return entries


def shard_paths(dataset_dir: str | os.PathLike, split: str) -> list[Path]:
    """Shard files of one split, in manifest order."""
    dataset_dir = Path(dataset_dir)
    entries = _split_entries(dataset_dir, read_manifest(dataset_dir), split)
    return [dataset_dir / e["file"] for e in entries]


def _checksums(dataset_dir: Path, manifest: dict, splits: Iterable[str]) -> dict[str, str]:
    return {
        str(dataset_dir / e["file"]): e["sha256"]
        for s in splits
        for e in _split_entries(dataset_dir, manifest, s)
    }


def _verify_file(path: Path, expected: str) -> None:
    dataset = path.parent.parent
    if not path.is_file():
        raise ShardError(f"{path}: shard listed in the manifest is missing; {_fix(dataset)}.")
    actual = _sha256(path)
    if actual != expected:
        raise ShardError(
            f"{path}: sha256 {actual[:16]}… does not match the manifest ({expected[:16]}…): "
            f"the shard is corrupt, truncated or was modified ({locate_damage(path)}); "
            f"{_fix(dataset)}."
        )


def locate_damage(path: str | os.PathLike) -> str:
    """Where reading a shard that fails its checksum breaks: the first sample that does not
    decode or the sample after which the tar ends, else a note that every sample decodes (a
    changed array value cannot be attributed to a sample without per-sample checksums)."""
    path = Path(path)
    try:
        for sample in _shard_samples([{"url": str(path)}]):
            decode_sample(sample, str(path))
    except ShardError as exc:
        reason = str(exc).removesuffix(f"; {_fix(path.parent.parent)}.")
        return reason.removeprefix(f"{path}: ")
    return "every sample still decodes: array values changed, so no sample of it can be trusted"


def verify_dataset(
    dataset_dir: str | os.PathLike,
    on_bad: Callable[[str, Path, ShardError], None] | None = None,
) -> None:
    """Check every shard against the manifest's sha256; raise `ShardError` naming the file,
    or, with ``on_bad``, call ``on_bad(split, path, error)`` for each bad shard and go on."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    for split in manifest["splits"]:
        for path, digest in _checksums(dataset_dir, manifest, [split]).items():
            try:
                _verify_file(Path(path), digest)
            except ShardError as exc:
                if on_bad is None:
                    raise
                on_bad(split, Path(path), exc)


def decode_sample(sample: Mapping[str, bytes], origin: str) -> HamiltonianRecord:
    """Webdataset sample (``{"__key__": …, "structure.json": bytes, "h.npy": bytes, …}``) → record.

    ``origin`` (the shard path) and the key go into every error. Members other than
    .json/.npy are refused; .npy is loaded with ``allow_pickle=False``; array sizes are
    checked against the basis.
    """
    key = sample.get("__key__", "?")
    where = f"{origin}: sample {key!r}"
    dataset = Path(origin).parent.parent
    if "/" in str(key) or "\\" in str(key) or str(key) in ("", ".", ".."):
        raise ShardError(
            f"{where}: member names escape the dataset folder (path separators or '..' in the "
            f"key); {_fix(dataset)}."
        )
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    for suffix in members:
        if not suffix.endswith(ALLOWED_SUFFIXES):
            raise ShardError(
                f"{where}: member '{key}.{suffix}' is refused: shards hold only .json and .npy "
                f"members (pickle and other executable formats are never loaded); {_fix(dataset)}."
            )
    try:
        record = HamiltonianRecord.from_files(members, origin=where)
        if record.key != key:
            raise RecordError(f"{where}: structure.json names key {record.key!r}")
        atoms = record.edges[:, :2]
        if atoms.size and (atoms.min() < 0 or atoms.max() >= record.n_atoms):
            raise RecordError(f"{where}: edges name atoms outside 0…{record.n_atoms - 1}")
        for name, arr in {keys.H: record.h, keys.S: record.s, **record.extras}.items():
            shape = record.target_shape(name)
            if arr is not None and arr.size != int(np.prod(shape)):
                raise RecordError(
                    f"{where}: '{name}.npy' holds {arr.size} values, the basis, "
                    f"{record.n_atoms} atoms and {record.n_edges} edges need {shape}"
                )
    except (RecordError, KeyError, TypeError, ValueError) as exc:
        msg = exc.args[0] if exc.args else repr(exc)
        if not str(msg).startswith(str(origin)):
            msg = f"{where}: {msg}"
        raise ShardError(f"{msg}; {_fix(dataset)}.") from None
    return record


def _shard_samples(
    src: Iterable[Mapping], checksums: Mapping[str, str] | None = None
) -> Iterator[dict]:
    """Pipeline stage: shard urls → raw samples, errors naming the shard and last good key."""
    for item in src:
        url = str(item["url"])
        path = Path(url)
        if checksums is not None:
            if url not in checksums:
                raise ShardError(f"{url}: not listed in the manifest; {_fix(path.parent.parent)}.")
            _verify_file(path, checksums[url])
        last = None
        try:
            with open(path, "rb") as stream:
                files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
                for sample in wds.tariterators.group_by_keys(files):
                    last = sample["__key__"]
                    yield sample
        except FileNotFoundError:
            raise ShardError(f"{url}: shard missing; {_fix(path.parent.parent)}.") from None
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
            after = f" after sample {last!r}" if last is not None else " before its first sample"
            reason = str(exc.args[0]).split(" @ ")[0] if exc.args else repr(exc)
            raise ShardError(
                f"{url}: corrupt or truncated shard ({reason}){after}; {_fix(path.parent.parent)}."
            ) from None


shard_samples = wds.pipelinefilter(_shard_samples)


def _decode(sample: Mapping[str, bytes]) -> HamiltonianRecord:
    return decode_sample(sample, sample["__url__"])


def record_pipeline(
    urls: Sequence[str | os.PathLike],
    *,
    shuffle: int = 0,
    seed: int = 0,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    resampled: bool = False,
    epoch_length: int | None = None,
    checksums: Mapping[str, str] | None = None,
) -> wds.DataPipeline:
    """The webdataset pipeline that streams `HamiltonianRecord`s out of shard files.

    Stages: shard list (shuffled deterministically per epoch when ``shuffle``; or
    ``resampled`` with replacement, seeded per rank and worker) → split by node (rank) →
    split by DataLoader worker → tar → samples → sample shuffle buffer of ``shuffle``
    → `decode_sample`. ``epoch_length`` fixes the samples per epoch (per worker) so every
    rank takes the same number of steps. ``checksums`` ({path: sha256}) verifies each
    shard before it is read. A DataLoader over it needs ``batch_size=None`` or a collate
    function that accepts records.
    """
    urls = [str(u) for u in urls]
    if not urls:
        raise ShardError("record_pipeline: no shard files given (empty split?).")
    if resampled:
        stages: list = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if shuffle:
            stages.append(wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed))
        if split_by_node:
            stages.append(wds.split_by_node)
        if split_by_worker:
            stages.append(wds.split_by_worker)
    stages.append(shard_samples(checksums=None if checksums is None else dict(checksums)))
    if shuffle:
        stages.append(wds.detshuffle(bufsize=shuffle, initial=min(shuffle, 64), seed=seed))
    stages.append(wds.map(_decode))
    pipeline = wds.DataPipeline(*stages)
    if epoch_length is not None:
        pipeline = pipeline.with_epoch(epoch_length)
    return pipeline


def split_pipeline(
    dataset_dir: str | os.PathLike, split: str, *, verify: bool = True, **kwargs
) -> wds.DataPipeline:
    """`record_pipeline` over one split of a dataset directory (checksums from its manifest)."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    urls = [dataset_dir / e["file"] for e in _split_entries(dataset_dir, manifest, split)]
    checksums = _checksums(dataset_dir, manifest, [split]) if verify else None
    return record_pipeline(urls, checksums=checksums, **kwargs)


def iter_records(
    dataset_dir: str | os.PathLike, split: str | None = None, verify: bool = True
) -> Iterator[HamiltonianRecord]:
    """All records of one split (or every split, in manifest order), in shard order.

    Not split by node or worker: every caller sees the whole split. ``verify`` checks each
    shard's sha256 before reading it.
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    for s in [split] if split is not None else list(manifest["splits"]):
        if not _split_entries(dataset_dir, manifest, s):
            continue
        yield from split_pipeline(
            dataset_dir, s, verify=verify, split_by_node=False, split_by_worker=False
        )


def load_records(
    dataset_dir: str | os.PathLike, split: str | None = None
) -> list[HamiltonianRecord]:
    return list(iter_records(dataset_dir, split))


def saved_records(keys_: Sequence[str], source: str | os.PathLike) -> dict[str, HamiltonianRecord]:
    """Key → record for those of ``keys_`` saved in ``source``, in the order of ``keys_``.

    ``source`` is a records directory (one ``<key>/`` folder per record) or a shard dataset
    (with manifest.json, checksums verified): re-sharding a shipped dataset under a new split
    policy reads it back unchanged, in the order its generator wrote it.
    """
    source = Path(source)
    if (source / MANIFEST).is_file():
        found = {r.key: r for r in iter_records(source)}
    else:
        found = {
            k: HamiltonianRecord.load(source / k)
            for k in keys_
            if (source / k / "structure.json").is_file()
        }
    return {k: found[k] for k in keys_ if k in found}


__all__ = [
    "MANIFEST",
    "SPLITS",
    "DatasetStats",
    "ShardError",
    "SplitPolicyError",
    "assign_split",
    "check_key",
    "check_test_elements",
    "decode_sample",
    "element_symbols",
    "hash_fraction",
    "held_out_composition",
    "held_out_family",
    "iter_records",
    "load_records",
    "locate_damage",
    "policy_group",
    "read_manifest",
    "record_pipeline",
    "saved_records",
    "reduced_formula",
    "shard_paths",
    "shard_samples",
    "split_group",
    "split_pipeline",
    "verify_dataset",
    "write_shards",
]
