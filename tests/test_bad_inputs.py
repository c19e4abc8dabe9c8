"""Bad input to every entry point (foundation-data, foundation-predict, foundation-train).

One table: each case builds its input, runs the command's ``main`` as a user would, and
checks the outcome — exit status 2 with one message naming the file, atom or key and the
fix, and no traceback — or, for inputs that are valid after all (a one-atom molecule, a
slab, DeePTB's dict-form ``basis.dat``, legacy 1-based DeePTB files), exit status 0.
docs/reliability.md counts the cases.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from train_support import REPO, SHIPPED, run_cli

from foundation.data import cli as data_cli
from foundation.data.formats.deeph import write_deeph
from foundation.data.formats.deeptb import write_deeptb
from foundation.data.shards import load_records, shard_paths
from foundation.physics import predict as predict_cli

MODEL = REPO / "pretrained" / "tiny_pbe_mini.pt"


# ----------------------------------------------------------------------------- inputs
def structure(kind: str) -> Atoms:
    """Structures of the cases (elements the shipped model knows unless the case says)."""
    si = bulk("Si", cubic=True)
    if kind == "close":
        si.positions[1] = si.positions[0] + [0.3, 0.0, 0.0]
    elif kind == "nan":
        si.positions[1, 0] = np.nan
    elif kind == "fractional":
        si.positions = si.get_scaled_positions()
    elif kind == "flat_cell":
        si = Atoms("Si2", positions=[[0, 0, 0], [1.3, 1.3, 0.001]], pbc=True,
                   cell=[[5, 0, 0], [0, 5, 0], [0, 0, 0.002]])  # fmt: skip
    elif kind == "unknown_element":
        si = bulk("Fe")
    elif kind == "empty":
        si = Atoms(cell=[5, 5, 5], pbc=True)
    elif kind == "one_atom_molecule":
        si = Atoms("Si", positions=[[0, 0, 0]], pbc=False)
    elif kind == "slab":
        si.pbc = [True, True, False]
    return si


def structure_file(tmp: Path, kind: str) -> Path:
    path = tmp / f"{kind}.xyz"
    structure(kind).write(path, format="extxyz")
    return path


def record():
    return load_records(SHIPPED, "val")[0]


def deeptb_folder(tmp: Path, variant: str) -> Path:
    """A DeePTB folder of a shipped record: dict-form basis.dat or legacy 1-based h5 keys."""
    import h5py
    from ase.data import chemical_symbols

    rec = record()
    folder = write_deeptb(rec, tmp / "deeptb" / "s0")
    if variant == "dict_basis":
        lines = (folder / "basis.dat").read_text().splitlines()
        table = {chemical_symbols[int(z)]: s for z, s in zip(rec.numbers, lines, strict=True)}
        (folder / "basis.dat").write_text(repr(table) + "\n")
    else:
        for name in ("hamiltonians.h5", "overlaps.h5"):
            with h5py.File(folder / name, "r+") as f:
                blocks = {k: f["0"][k][()] for k in f["0"]}
                del f["0"]
                group = f.create_group("1")
                for k, b in blocks.items():
                    i, j, *r = map(int, k.split("_"))
                    group[f"{i + 1}_{j + 1}_{r[0]}_{r[1]}_{r[2]}"] = b
    return folder


def deeph_missing(tmp: Path) -> Path:
    folder = write_deeph(record(), tmp / "deeph" / "s0")
    (folder / "orbital_types.dat").unlink()
    return folder


def nan_record_folder(tmp: Path) -> Path:
    rec = record()
    rec.h[7] = np.nan
    rec.save(tmp / "records" / rec.key)
    return tmp / "records" / rec.key


# ----------------------------------------------------------------------------- commands
def predict(tmp: Path, kind: str) -> list[str]:
    return [str(MODEL), str(structure_file(tmp, kind)), "-o", str(tmp / "out"), "--no-progress"]


def generate(tmp: Path, kind: str) -> list[str]:
    return ["generate", str(structure_file(tmp, kind)), "--records", str(tmp / "records")]


def convert(folder: Path, kind: str, tmp: Path) -> list[str]:
    return ["convert", str(folder), "--from", kind, "--out", str(tmp / "converted")]


Case = tuple[str, Callable[[Path], list[str]], int, str]
CASES: dict[str, Case] = {
    # name: (entry point, argv builder, exit status, message pattern ({file}: the input)
    "predict: atoms < 0.5 Å": (
        "predict", lambda t: predict(t, "close"), 2, r"{file}: atoms 0 \(Si\) and 1 \(Si\) are 0\.300 Å apart.*Check the units"),
    "predict: element outside the basis": (
        "predict", lambda t: predict(t, "unknown_element"), 2, r"element\(s\) Fe unknown to the model.*fine-tune"),
    "predict: empty structure": ("predict", lambda t: predict(t, "empty"), 2, r"{file}: the structure has no atoms"),
    "predict: NaN coordinates": (
        "predict", lambda t: predict(t, "nan"), 2, r"{file}: atom\(s\) \[1\] have non-finite coordinates.*fix"),
    "predict: near-zero cell volume": (
        "predict", lambda t: predict(t, "flat_cell"), 2, r"{file}: the periodic cell has a near-zero volume.*lattice vectors"),
    "predict: fractional coordinates as Cartesian": (
        "predict", lambda t: predict(t, "fractional"), 2, r"{file}: .*fractional coordinates read as Cartesian"),
    "predict: slab (pbc false on z)": ("predict", lambda t: predict(t, "slab"), 0, r"wrote .*deeph"),
    "predict: one-atom molecule": (
        "predict", lambda t: predict(t, "one_atom_molecule"), 0, r"1 atoms, 1 edges"),
    "data generate: atoms < 0.5 Å": (
        "data", lambda t: generate(t, "close"), 2, r"{file}: atoms 0 \(Si\) and 1 \(Si\) are 0\.300 Å apart"),
    "data generate: NaN coordinates": (
        "data", lambda t: generate(t, "nan"), 2, r"{file}: atom\(s\) \[1\] have non-finite coordinates"),
    "data generate: empty structure": ("data", lambda t: generate(t, "empty"), 2, r"{file}: the structure has no atoms"),
    "data generate: near-zero cell volume": (
        "data", lambda t: generate(t, "flat_cell"), 2, r"{file}: the periodic cell has a near-zero volume"),
    "data convert: DeePTB dict-form basis.dat": (
        "data", lambda t: convert(deeptb_folder(t, "dict_basis"), "deeptb", t), 0, r"wrote 1 records folders"),
    "data convert: legacy 1-based DeePTB": (
        "data", lambda t: convert(deeptb_folder(t, "one_based"), "deeptb", t), 0, r"wrote 1 records folders"),
    "data convert: DeepH folder missing a file": (
        "data", lambda t: convert(deeph_missing(t), "deeph", t), 2, r"orbital_types\.dat: missing"),
    "data shard: NaN in a target": (
        "data", lambda t: ["shard", str(nan_record_folder(t)), "--out", str(t / "shards")], 2,
        r"'h' has a non-finite value in block of edge .*recompute or drop the structure"),
}  # fmt: skip
SLOW = {"predict: one-atom molecule"}  # a full prediction (bands, DOS): ~10 s on 2 cores


def _input_file(argv: list[str]) -> str:
    """The structure/folder the case is about (named in its message)."""
    return next(
        a for a in argv if a.endswith(".xyz") or "/deep" in a or "/records" in a
    )  # first input


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES],
)
def test_bad_input_gets_exit_status_and_one_clear_message(name, tmp_path, capsys):
    entry, build, status, pattern = CASES[name]
    argv = build(tmp_path)
    main = predict_cli.main if entry == "predict" else data_cli.main
    assert main(argv) == status
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    text = err if status else out
    expected = pattern.replace("{file}", re.escape(_input_file(argv)))
    assert re.search(expected, text, re.S), text[-2000:]
    if status:
        assert len(err.strip().splitlines()) == 1, err  # one message, not a log


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("case", ["element_outside_basis", "corrupt_shard"])
def test_train_bad_input_exits_2_naming_key_or_shard(case, tmp_path):
    args = ["logger=none", "trainer.max_epochs=1", "test=false", "data.steps_per_epoch=1"]
    if case == "element_outside_basis":
        args.append("+model.basis={name:small,shells:{Si:[0,1],Ge:[0,1]}}")
        pattern = r"element\(s\) .* that the model's basis 'small' lacks.*Leave model.basis unset"
    else:
        data = shutil.copytree(SHIPPED, tmp_path / "pbe_mini")
        shard = shard_paths(data, "train")[0]
        shard.write_bytes(shard.read_bytes()[:1000])
        args.append(f"data.root={data}")
        pattern = re.escape(str(shard)) + r": sha256 .*data\.on_error=skip"
    result = run_cli(args, tmp_path / "run", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert re.search(pattern, result.stderr, re.S), result.stderr[-3000:]
