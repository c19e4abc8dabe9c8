"""Webdataset shards: round trip, checksums, refused members, corrupt shards, split policy."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from foundation import keys
from foundation.data.shards import (
    ShardError,
    SplitPolicyError,
    assign_split,
    decode_sample,
    element_symbols,
    iter_records,
    load_records,
    policy_group,
    read_manifest,
    record_pipeline,
    reduced_formula,
    shard_paths,
    split_group,
    split_pipeline,
    verify_dataset,
    write_shards,
)
from foundation.data.synthetic import random_dataset, random_record


@pytest.fixture(scope="module")
def records():
    recs = random_dataset(24, seed=7, elements=("C", "O", "Si", "Ga", "As"))
    recs[0].extras["h_hse"] = (recs[0].h * 1.1).astype(np.float32)
    return recs


@pytest.fixture
def dataset(tmp_path, records):
    write_shards(records, tmp_path / "ds", name="unit", samples_per_shard=5, seed=1)
    return tmp_path / "ds"


def _same(a, b):
    assert a.key == b.key
    for name in ("numbers", "positions", "cell", "pbc", "edges", "h", "s"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.basis == b.basis and a.meta == b.meta
    assert a.extras.keys() == b.extras.keys()
    for k in a.extras:
        assert np.array_equal(a.extras[k], b.extras[k])


def test_round_trip_is_identical(dataset, records):
    manifest = read_manifest(dataset)
    back = {r.key: r for r in load_records(dataset)}
    assert set(back) == {r.key for r in records}
    for r in records:
        _same(r, back[r.key])
    counts = {s: len(load_records(dataset, s)) for s in ("train", "val", "test")}
    assert counts == {s: manifest["splits"][s]["n_samples"] for s in counts}
    assert sum(counts.values()) == manifest["n_samples"] == len(records)
    assert manifest["targets"] == ["h", "h_hse", "s"]
    assert manifest["units"] == {"length": "Angstrom", "energy": "eV"}
    assert manifest["elements"] == ["C", "O", "Si", "Ga", "As"]
    assert sum(e["n_edges"] for e in manifest["splits"]["train"]["shards"]) == sum(
        r.n_edges for r in load_records(dataset, "train")
    )
    names = {p.name for p in (dataset / "train").iterdir()}
    assert all(n.startswith("shard-") and n.endswith(".tar") for n in names)  # no temp files


def test_members_are_json_and_npy_only_and_shards_are_reproducible(tmp_path, dataset, records):
    with tarfile.open(shard_paths(dataset, "train")[0]) as tf:
        names = tf.getnames()
    key = names[0].split(".")[0]
    assert {n[len(key) + 1 :] for n in names if n.startswith(key + ".")} >= {
        "structure.json",
        "edges.npy",
        "h.npy",
        "s.npy",
    }
    assert all(n.endswith((".json", ".npy")) for n in names)
    again = write_shards(records, tmp_path / "again", name="unit", samples_per_shard=5, seed=1)
    first = read_manifest(dataset)
    assert [e["sha256"] for e in again["splits"]["train"]["shards"]] == [
        e["sha256"] for e in first["splits"]["train"]["shards"]
    ]


def test_rewrite_removes_stale_shards(tmp_path, records):
    out = tmp_path / "ds"
    write_shards(records, out, name="unit", samples_per_shard=2)
    n_before = len(list((out / "train").glob("*.tar")))
    m = write_shards(records, out, name="unit", samples_per_shard=50)
    assert len(list((out / "train").glob("*.tar"))) == 1 < n_before
    assert len(load_records(out)) == m["n_samples"]


def test_failed_rewrite_leaves_the_old_dataset_intact(dataset, records):
    def broken():
        yield from records[:12]
        raise RuntimeError("DFT crashed")

    with pytest.raises(RuntimeError, match="DFT crashed"):
        write_shards(broken(), dataset, name="unit", samples_per_shard=2, seed=1)
    verify_dataset(dataset)
    assert len(load_records(dataset)) == len(records)
    assert not [p for p in dataset.rglob("*") if p.name.startswith(".")]


def test_checksum_mismatch_is_detected_and_named(dataset):
    path = shard_paths(dataset, "train")[1]
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(
        ShardError, match=rf"{path}: sha256 .* does not match the manifest.*foundation-data shard"
    ):
        verify_dataset(dataset)
    with pytest.raises(ShardError, match=str(path)):
        list(iter_records(dataset, "train"))


def test_missing_shard_and_manifest_are_named(dataset):
    path = shard_paths(dataset, "val")[0]
    path.unlink()
    with pytest.raises(ShardError, match=rf"{path}: shard listed in the manifest is missing"):
        verify_dataset(dataset)
    (dataset / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest.json: missing"):
        read_manifest(dataset)


def test_truncated_shard_is_named_with_last_key(dataset):
    path = shard_paths(dataset, "train")[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=rf"{path}: corrupt or truncated shard .* after sample '"):
        list(iter_records(dataset, "train", verify=False))
    with pytest.raises(ShardError, match=rf"{path}: sha256"):
        list(iter_records(dataset, "train"))


def _append_member_and_rehash(dataset, path, name, payload):
    """Add a member to a shard and fix its manifest checksum (a 'valid' but hostile shard)."""
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        dst.addfile(info, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())
    import hashlib

    manifest = json.loads((dataset / "manifest.json").read_text())
    for e in manifest["splits"]["train"]["shards"]:
        if dataset / e["file"] == path:
            e["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (dataset / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("member", ["evil.pickle", "evil.payload.pyd", "evil.structure.json.pkl"])
def test_non_json_npy_member_is_refused_by_name(dataset, member):
    import pickle

    path = shard_paths(dataset, "train")[0]
    _append_member_and_rehash(dataset, path, member, pickle.dumps({"x": 1}))
    verify_dataset(dataset)  # checksums agree: the refusal comes from the member type
    with pytest.raises(ShardError, match=rf"{path}: sample 'evil': member '{member}' is refused"):
        list(iter_records(dataset, "train"))


def test_member_escaping_the_dataset_folder_is_refused(dataset, records):
    """A tar member named ../x… (a hostile or broken writer) and a manifest listing a shard
    outside the dataset folder stop with the shard, the sample and the fix."""
    path = shard_paths(dataset, "train")[0]
    _append_member_and_rehash(dataset, path, "../evil.structure.json", b"{}")
    with pytest.raises(ShardError, match=rf"{path}: sample '../evil': member names escape"):
        list(iter_records(dataset, "train"))
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["file"] = "../../etc/passwd"
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"lists shard '../../etc/passwd' outside the dataset"):
        list(iter_records(dataset, "val"))


def test_pickled_npy_is_refused(dataset, records):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    sample = {"__key__": records[0].key, **records[0].to_files(), "h.npy": buf.getvalue()}
    with pytest.raises(ShardError, match=r"shard-x.tar: sample .*allow_pickle=False"):
        decode_sample(sample, "ds/train/shard-x.tar")


def test_wrong_array_size_is_named(records):
    files = records[1].to_files()
    buf = io.BytesIO()
    np.save(buf, records[1].h[:-3])
    sample = {"__key__": records[1].key, **files, "h.npy": buf.getvalue()}
    with pytest.raises(ShardError, match=rf"sample '{records[1].key}': 'h.npy' holds"):
        decode_sample(sample, "ds/train/shard-000000.tar")


def test_split_is_deterministic_and_held_out_compositions_go_to_test(tmp_path):
    recs = random_dataset(60, seed=11, elements=("Ga", "As", "Si", "O"))
    recs += [random_record(f"gaas-{k}", ["Ga", "As"] * (1 + k % 2), seed=k) for k in range(4)]
    held = {r.key for r in recs if reduced_formula(r.numbers) in ("GaAs", "SiO2")}
    assert len(held) >= 4

    def splits(seed):
        m = write_shards(
            recs,
            tmp_path / f"s{seed}",
            name="x",
            seed=seed,
            val_fraction=0.2,
            test_fraction=0.2,
            test_compositions=["AsGa", "SiO2"],
        )
        return {
            r.key: s
            for s in ("train", "val", "test")
            for r in load_records(tmp_path / f"s{seed}", s)
        }, m

    a, manifest = splits(0)
    b, _ = splits(0)
    c, _ = splits(1)
    assert a == b
    assert a != c
    assert all(a[k] == "test" and c[k] == "test" for k in held)
    free = [k for k in a if k not in held]
    assert {a[k] for k in free} == {"train", "val", "test"}
    assert manifest["split_policy"]["test_compositions"] == ["AsGa", "SiO2"]
    assert sum(manifest["split_policy"]["held_out_counts"].values()) == len(held)
    for r in recs:
        assert (
            assign_split(
                r, seed=0, val_fraction=0.2, test_fraction=0.2, test_compositions=["GaAs", "SiO2"]
            )
            == a[r.key]
        )


def _compounds():
    """GaC, GaO, GaAs, SiAs and Ga₂ cells (3 each): O occurs only in GaO."""
    formulas = [["Ga", "C"], ["Ga", "O"], ["Ga", "As"], ["Si", "As"], ["Ga", "Ga"]]
    return [
        random_record(f"{''.join(f)}-{k}", f, seed=10 * i + k)
        for i, f in enumerate(formulas)
        for k in range(3)
    ]


def _splits_of(root):
    return {r.key: s for s in ("train", "val", "test") for r in load_records(root, s)}


def test_held_out_composition_that_removes_an_element_from_train_is_refused(tmp_path):
    """GaO is the only O compound: holding it out would make O an unseen element. The
    error names the element, the composition and --test-elements; nothing is written and an
    earlier dataset in the directory stays intact."""
    recs = _compounds()
    out = tmp_path / "ds"
    before = write_shards(recs, out, name="x", test_compositions=["GaAs"], test_elements=["O"])
    with pytest.raises(SplitPolicyError) as err:
        write_shards(recs, out, name="x", test_compositions=["GaO"])
    msg = str(err.value)
    assert "Held-out composition GaO (3 structures) would take O out of the training split" in msg
    assert "--test-elements O" in msg
    assert read_manifest(out) == before
    assert not list(out.rglob(".*tmp*"))
    verify_dataset(out)


def test_test_elements_hold_out_every_structure_of_the_element(tmp_path):
    """--test-elements O: all GaO cells go to test as unseen elements, the held-out GaAs as
    an unseen composition (Ga and As keep training structures); the manifest counts both."""
    recs = _compounds()
    m = write_shards(
        recs,
        tmp_path / "ds",
        name="x",
        val_fraction=0.1,
        test_fraction=0.1,
        test_compositions=["GaAs"],
        test_elements=["O"],
    )
    split = _splits_of(tmp_path / "ds")
    for r in recs:
        group = split_group(r.numbers, ["GaAs"], ["O"])
        assert group == {"GaO": "unseen_element", "GaAs": "unseen_composition"}.get(
            r.key.split("-")[0], "seen"
        )
        assert policy_group(r.numbers, m["split_policy"]) == keys.SPLIT_GROUPS.index(group)
        if group != "seen":
            assert split[r.key] == "test"
    policy = m["split_policy"]
    assert policy["test_elements"] == ["O"] and policy["test_compositions"] == ["GaAs"]
    assert policy["held_out_counts"] == {"GaAs": 3}
    assert policy["unseen_element_counts"] == {"GaO": 3}
    seen_in_test = sum(1 for r in recs if split[r.key] == "test") - 6
    assert policy["test_groups"] == {
        "seen": seen_in_test,
        "unseen_composition": 3,
        "unseen_element": 3,
    }
    train_elements = {int(z) for r in recs if split[r.key] == "train" for z in r.numbers}
    assert train_elements == {6, 14, 31, 33}  # C, Si, Ga, As: every element but O


def test_held_out_family_goes_to_test_and_is_counted(tmp_path):
    """test_families=["GaAs-*", "Si*-2"]: every GaAs cell and SiAs-2 go to test, counted per
    pattern in the manifest; a family holding every C structure (GaC-*) is refused, like a
    composition would be; without families the manifest has no family keys."""
    recs = _compounds()
    m = write_shards(recs, tmp_path / "ds", name="x", test_families=["GaAs-*", "Si*-2"])
    split = _splits_of(tmp_path / "ds")
    for r in recs:
        if r.key.startswith("GaAs-") or r.key == "SiAs-2":
            assert split[r.key] == "test", r.key
    policy = m["split_policy"]
    assert policy["test_families"] == ["GaAs-*", "Si*-2"]
    assert policy["held_out_family_counts"] == {"GaAs-*": 3, "Si*-2": 1}
    assert "test_families" not in write_shards(recs, tmp_path / "plain", name="x")["split_policy"]
    with pytest.raises(SplitPolicyError, match="Element C has no structure in the training"):
        write_shards(recs, tmp_path / "ds2", name="x", test_families=["GaC-*"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"test_compositions": ["GaO"], "test_elements": ["O"]},
            "Held-out composition GaO contains the unseen test element.* O",
        ),
        ({"test_elements": ["Xe"]}, "Unseen test element.* Xe: no structure"),
        ({"test_elements": ["Qq"]}, "'Qq' are not chemical symbols"),
    ],
)
def test_contradictory_split_options_are_refused(tmp_path, options, message):
    with pytest.raises(SplitPolicyError, match=message):
        write_shards(_compounds(), tmp_path / "ds", name="x", **options)
    assert not list((tmp_path / "ds").rglob("*.tar*"))


def test_hash_split_that_leaves_an_element_out_of_train_is_refused(tmp_path):
    """An element whose only structures all hash into val/test is refused too (naming it and
    the keys), with --seed or --test-elements as the fix."""
    recs = _compounds()
    with pytest.raises(SplitPolicyError, match=r"Element C has no structure in the training.*"
                       r"GaC-0.*--test-elements C"):  # fmt: skip
        write_shards(recs, tmp_path / "ds", name="x", val_fraction=0.5, test_fraction=0.5)


def test_bad_keys_and_duplicates_are_refused(tmp_path):
    rec = random_record("bad.key", ["Si", "O"], seed=0)
    with pytest.raises(ValueError, match=r"'bad.key' cannot name a shard sample.*'bad_key'"):
        write_shards([rec], tmp_path / "x", name="x")
    rec = random_record("dup", ["Si", "O"], seed=0)
    with pytest.raises(ValueError, match="Duplicate record key 'dup'"):
        write_shards([rec, rec], tmp_path / "y", name="y")
    assert not list((tmp_path / "y").rglob("*.tar*"))  # nothing half-written is left


def test_pipeline_splits_shards_over_dataloader_workers(dataset, records):
    urls = sum((shard_paths(dataset, s) for s in ("train", "val", "test")), [])
    loader = torch.utils.data.DataLoader(
        record_pipeline(urls, shuffle=8, seed=3), batch_size=None, num_workers=2
    )
    keys = [r.key for r in loader]
    assert sorted(keys) == sorted(r.key for r in records)
    resampled = split_pipeline(dataset, "train", resampled=True, epoch_length=30)
    assert len([r.key for r in resampled]) == 30


SHIPPED = Path(__file__).resolve().parents[1] / "data_shards"


@pytest.mark.parametrize(
    ("name", "held_out", "groups"),
    [
        (
            "pbe_mini",
            {"InAs": 4, "PbTe": 9},
            {"seen": 19, "unseen_composition": 13, "unseen_element": 9},
        ),
        ("hse_mini", {"PbTe": 5}, {"seen": 0, "unseen_composition": 5, "unseen_element": 5}),
    ],
)
def test_shipped_splits_keep_every_element_but_the_unseen_one_in_train(name, held_out, groups):
    """The shipped PBE and HSE06 sets: Se (only in PbSe) is the explicit unseen element;
    every other element has training structures, so the held-out compositions measure
    composition transfer only."""
    root = SHIPPED / name
    manifest = read_manifest(root)
    policy = manifest["split_policy"]
    assert policy["test_elements"] == ["Se"] and policy["held_out_counts"] == held_out
    train = {el for r in load_records(root, "train") for el in element_symbols(r.numbers)}
    assert train == set(manifest["elements"]) - {"Se"}
    test = load_records(root, "test")
    counted = {g: 0 for g in keys.SPLIT_GROUPS}
    for r in test:
        counted[keys.SPLIT_GROUPS[policy_group(r.numbers, policy)]] += 1
    assert counted == policy["test_groups"] == groups
