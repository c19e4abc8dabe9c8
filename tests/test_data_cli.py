"""`foundation-data` in-process: convert, shard, inspect (+ --verify), generate wiring, errors."""

import json

import numpy as np
import pytest

from foundation.data.cli import main
from foundation.data.formats import read_deeph, write_deeph, write_deeptb
from foundation.data.record import HamiltonianRecord
from foundation.data.shards import load_records, read_manifest, shard_paths
from foundation.data.synthetic import random_dataset, random_record


@pytest.fixture(scope="module")
def records():
    return random_dataset(12, seed=5, elements=("Si", "O", "Ga", "As"))


def _same_blocks(a, b):
    assert a.key == b.key and np.array_equal(a.edges, b.edges)
    np.testing.assert_allclose(a.h, b.h, atol=2e-5)
    np.testing.assert_allclose(a.s, b.s, atol=1e-6)


def test_convert_deeph_to_shards_and_inspect(tmp_path, records, capsys):
    for r in records:
        write_deeph(r, tmp_path / "deeph" / "batch" / r.key)
    out = tmp_path / "shards" / "mini"
    argv = ["convert", str(tmp_path / "deeph"), "--from", "deeph", "--to", "shards"]
    assert main([*argv, "--out", str(out), "--samples-per-shard", "4"]) == 0
    assert "wrote 12 structures" in capsys.readouterr().out
    back = {r.key: r for r in load_records(out)}
    for r in records:
        _same_blocks(r, back[r.key])

    assert main(["inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    manifest = read_manifest(out)
    assert f"dataset mini  ({out / 'manifest.json'})" in text
    assert f"structures 12 · atoms {sum(r.n_atoms for r in records)}" in text
    assert f"edges {sum(r.n_edges for r in records)}" in text
    n_si = sum(int((r.numbers == 14).sum()) for r in records)
    s_si = sum(int((r.numbers == 14).any()) for r in records)
    assert any(line.split()[:4] == ["Si", "14", str(n_si), str(s_si)] for line in text.splitlines())
    for split, v in manifest["splits"].items():
        assert f"  {split:<8}{len(v['shards']):>7}{v['n_samples']:>12}{v['n_edges']:>10}" in text
    assert "block entries" in text
    assert "sha256: all" in text
    # random blocks in a basis PySCF cannot integrate: the overlap check stops, naming both
    assert main(["inspect", str(out), "--no-statistics", "--check-overlap"]) == 2
    err = capsys.readouterr().err
    assert "Cannot integrate the basis" in err and "--overlap model" in err


def test_convert_deeptb_to_records_then_shard_then_export(tmp_path, records, capsys):
    for r in records[:4]:
        write_deeptb(r, tmp_path / "dptb" / f"data.{r.key}")
    rec_dir = tmp_path / "records"
    assert main(["convert", str(tmp_path / "dptb"), "--from", "deeptb", "--out", str(rec_dir)]) == 0
    assert sorted(p.name for p in rec_dir.iterdir()) == sorted(r.key for r in records[:4])
    ds = tmp_path / "ds"
    argv = [
        "shard",
        str(rec_dir),
        "--out",
        str(ds),
        "--name",
        "dptb4",
        "--test-compositions",
        "GaAs",
    ]
    assert main([*argv, "--seed", "3"]) == 0
    manifest = read_manifest(ds)
    assert manifest["name"] == "dptb4" and manifest["split_policy"]["seed"] == 3
    capsys.readouterr()
    export = tmp_path / "export"
    assert (
        main(["convert", str(ds), "--from", "shards", "--to", "deeph", "--out", str(export)]) == 0
    )
    for r in records[:4]:
        _same_blocks(r, read_deeph(export / r.key))
    assert isinstance(HamiltonianRecord.load(rec_dir / records[0].key), HamiltonianRecord)


def test_errors_name_the_file_and_exit_2(tmp_path, records, capsys):
    assert main(["convert", str(tmp_path / "nope"), "--from", "deeph", "--out", str(tmp_path)]) == 2
    assert f"{tmp_path / 'nope'}: no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["shard", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "contains no records folder" in capsys.readouterr().err

    folder = write_deeph(records[0], tmp_path / "d" / "one")
    (folder / "overlaps.h5").write_bytes(b"broken")
    argv = [
        "convert",
        str(folder),
        "--from",
        "deeph",
        "--to",
        "shards",
        "--out",
        str(tmp_path / "s"),
    ]
    assert main(argv) == 2
    assert f"{folder / 'overlaps.h5'}: not a readable HDF5 file" in capsys.readouterr().err

    ds = tmp_path / "ds"
    for r in records[:3]:
        r.save(tmp_path / "recs" / r.key)
    assert main(["shard", str(tmp_path / "recs"), "--out", str(ds)]) == 0
    path = shard_paths(ds, "train")[0]
    path.write_bytes(path.read_bytes()[:-1024])
    capsys.readouterr()
    assert main(["inspect", str(ds), "--verify"]) == 2
    assert f"{path}: sha256" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "recs")]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err


def test_shard_refuses_a_held_out_composition_that_removes_an_element(tmp_path, capsys):
    """GaO is the only O compound: --test-compositions GaO exits 2 naming O, GaO and the
    --test-elements fix (no traceback, nothing written); --test-elements O shards it, and
    inspect lists the unseen composition and the unseen element with their counts."""
    formulas = [["Ga", "O"], ["Ga", "As"], ["Si", "As"], ["Ga", "Ga"]]
    for i, f in enumerate(formulas):
        for k in range(3):
            random_record(f"{''.join(f)}-{k}", f, seed=10 * i + k).save(
                tmp_path / "recs" / f"{i}{k}"
            )
    ds = tmp_path / "ds"
    argv = ["shard", str(tmp_path / "recs"), "--out", str(ds)]
    assert main([*argv, "--test-compositions", "GaO"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("foundation-data shard: error: Held-out composition GaO (3 structures)")
    assert "would take O out of the training split" in err and "--test-elements O" in err
    assert "Traceback" not in err and not list(tmp_path.rglob("*.tar"))

    assert main([*argv, "--test-compositions", "GaAs", "--test-elements", "O"]) == 0
    out = capsys.readouterr().out
    assert "unseen composition 3, unseen element 3)" in out
    assert main(["inspect", str(ds)]) == 0
    text = capsys.readouterr().out
    assert "  unseen compositions in test: GaAs 3" in text
    assert "  unseen elements in test: O (GaO 3)" in text


def test_generate_calls_pyscf_generate_dataset(tmp_path, monkeypatch, capsys):
    import ase.io
    from ase.build import bulk

    calls = {}

    def fake_generate_dataset(structures, records_dir, *, workers=1, resume=True, **kw):
        calls.update(keys=[k for k, _ in structures], dir=records_dir, workers=workers, kw=kw)
        return [records_dir / k for k, _ in structures]

    monkeypatch.setattr(
        "foundation.data.dft.pyscf.generate_dataset", fake_generate_dataset, raising=False
    )
    ase.io.write(tmp_path / "Si.prim.cif", bulk("Si"))
    argv = ["generate", str(tmp_path / "Si.prim.cif"), "--records", str(tmp_path / "r")]
    assert main([*argv, "--workers", "2", "--cutoff", "6.5"]) == 0
    assert calls["keys"] == ["Si_prim"] and calls["workers"] == 2
    assert calls["kw"]["cutoff_A"] == 6.5 and calls["kw"]["functional"] == "PBE"
    assert "1 records" in capsys.readouterr().out


def test_manifest_without_stats_is_scanned(tmp_path, records, capsys):
    ds = tmp_path / "ds"
    for r in records[:3]:
        r.save(tmp_path / "recs" / r.key)
    assert main(["shard", str(tmp_path / "recs"), "--out", str(ds)]) == 0
    m = json.loads((ds / "manifest.json").read_text())
    m.pop("stats")
    (ds / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["inspect", str(ds)]) == 0
    assert f"edges {sum(r.n_edges for r in records[:3])}" in capsys.readouterr().out


@pytest.mark.slow
def test_generate_shard_inspect_end_to_end_with_pyscf(tmp_path, capsys):
    import ase.io
    from ase.build import bulk

    ase.io.write(tmp_path / "Si.cif", bulk("Si"))
    records = tmp_path / "records"
    argv = ["generate", str(tmp_path / "Si.cif"), "--records", str(records), "--cutoff", "5"]
    assert main([*argv, "--kmesh", "2,2,2"]) == 0
    assert main(["shard", str(records), "--out", str(tmp_path / "ds"), "--test-fraction", "0"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ds"), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "functional PBE" in text and "structures 1 · atoms 2" in text
    assert any(line.split()[:4] == ["Si", "14", "2", "1"] for line in text.splitlines())
    # the generated S is the exact overlap of the basis (to float32 storage)
    assert main(["inspect", str(tmp_path / "ds"), "--no-statistics", "--check-overlap"]) == 0
    assert "overlap: 1 structures match the exact S" in capsys.readouterr().out
