"""Interoperability proven through the real peer: folders written by `write_deeptb` load in
DeePTB 2.2.1's own dataset loader, and the blocks DeePTB rebuilds from its features
(`feature_to_block`, the path its training and inference use) read back here unchanged.

DeePTB is not a dependency (its torch-scatter builds from source): the test runs where its
interpreter is found (``$DPTB_PYTHON``, default /work/dptb-venv/bin/python; install as in
scripts/bench_peer_deeptb.py) and is skipped with that reason elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from foundation import keys
from foundation.data.formats.deeptb import read_deeptb, write_deeptb
from foundation.data.shards import load_records, read_manifest
from foundation.physics.kspace import BlochHamiltonian

DPTB_PYTHON = Path(os.environ.get("DPTB_PYTHON", "/work/dptb-venv/bin/python"))

DRIVER = r"""
import glob, json, os, sys
import h5py
import numpy as np
from dptb.data import AtomicData, OrbitalMapper
from dptb.data.build import build_dataset
from dptb.data.interfaces.ham_to_feature import feature_to_block

args = json.load(open(sys.argv[1]))
ds = build_dataset(root=args["root"], prefix="frame", type="DefaultDataset",
                   get_Hamiltonian=True, get_overlap=True, r_max=args["r_max"], er_max=None,
                   oer_max=None, basis=args["basis"], orthogonal=False)
idp = OrbitalMapper(args["basis"], method="e3tb")
folders = glob.glob(os.path.join(args["root"], "frame.*"))
positions = {os.path.basename(p): np.loadtxt(os.path.join(p, "positions.dat")).reshape(-1, 3)
             for p in folders}
assert len(ds) == len(folders), (len(ds), len(folders))
for k in range(len(ds)):
    data = idp(AtomicData.to_AtomicDataDict(ds[k]))
    pos = data["pos"].detach().double().numpy()  # the dataset's order is not the folders'
    name = next(n for n, p in positions.items() if p.shape == pos.shape and np.allclose(p, pos))
    os.makedirs(os.path.join(args["out"], name))
    for file, overlap in (("hamiltonians.h5", False), ("overlaps.h5", True)):
        with h5py.File(os.path.join(args["out"], name, file), "w") as f:
            group = f.create_group("0")
            for key, block in feature_to_block(data, idp, overlap=overlap).items():
                group[key] = block.detach().double().numpy()
"""


def _dptb() -> Path:
    if not DPTB_PYTHON.is_file():
        pytest.skip(f"DeePTB is not installed ({DPTB_PYTHON} missing; set DPTB_PYTHON or "
                    "install it as scripts/bench_peer_deeptb.py describes)")  # fmt: skip
    probe = subprocess.run([DPTB_PYTHON, "-c", "import dptb"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{DPTB_PYTHON} cannot import dptb: {probe.stderr.strip()[-200:]}")
    return DPTB_PYTHON


def _run_deeptb(data: Path, records: list, root: Path, tmp: Path) -> subprocess.CompletedProcess:
    """DeePTB's loader and feature_to_block over the folders in ``root`` → ``tmp/dptb``."""
    from ase.data import chemical_symbols

    from foundation.basis import BasisSet, shell_spec

    manifest = read_manifest(data)
    shells = BasisSet.from_dict(manifest["basis"])
    present = sorted({int(z) for r in records for z in r.numbers})
    args = {
        "root": str(root),
        "out": str(tmp / "dptb"),
        "basis": {chemical_symbols[z]: shell_spec(sorted(shells.shells_of(z))) for z in present},
        "r_max": float(manifest["edge_cutoff_A"]),
    }
    (tmp / "args.json").write_text(json.dumps(args))
    (tmp / "driver.py").write_text(DRIVER)
    return subprocess.run(
        [_dptb(), tmp / "driver.py", tmp / "args.json"],
        capture_output=True, text=True, timeout=600, cwd=tmp,
    )  # fmt: skip


def test_deeptb_loads_our_folders_and_returns_the_same_blocks(data, tmp_path):
    _dptb()
    records = list(load_records(data, "val"))[:3]
    records += [next(r for r in load_records(data, "train") if 47 in r.numbers.tolist())]  # Ag: d
    root, out = tmp_path / "export", tmp_path / "dptb"
    names = [f"frame.{k:03d}" for k in range(len(records))]
    for name, record in zip(names, records, strict=True):
        write_deeptb(record, root / name)
    run = _run_deeptb(data, records, root, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]  # e.g. DeePTB's strict info.json check
    k = np.array([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0], [0.5, 0.0, 0.25]])
    for name, record in zip(names, records, strict=True):
        for f in ("atomic_numbers.dat", "positions.dat", "cell.dat", "basis.dat", "info.json"):
            (out / name / f).write_bytes((root / name / f).read_bytes())
        back = read_deeptb(out / name, basis=record.basis)
        # Every block comes back equal; DeePTB's own neighbour list (r < r_max) also lists the
        # images our generator dropped (outside the Wigner–Seitz cell of the BvK supercell):
        # those come back as zero blocks.
        mine = {tuple(e): n for n, e in enumerate(record.edges.tolist())}
        h_back, s_back = back.blocks(), back.blocks(keys.S)
        h_mine, s_mine = record.blocks(), record.blocks(keys.S)
        shift = record.meta[keys.ENERGY_ZERO] - back.meta[keys.ENERGY_ZERO]
        worst, extra = 0.0, 0
        for n, e in enumerate(back.edges.tolist()):
            if tuple(e) not in mine:
                extra += 1
                assert not np.any(h_back[n]) and not np.any(s_back[n]), e
                continue
            m = mine.pop(tuple(e))
            worst = max(worst, np.abs(s_back[n] - s_mine[m]).max(),
                        np.abs(h_back[n] - h_mine[m] - shift * s_mine[m]).max())  # fmt: skip
        assert not mine, f"blocks lost in DeePTB: {list(mine)[:5]}"
        ours, theirs = BlochHamiltonian.from_record(record), BlochHamiltonian.from_record(back)
        err = np.abs(theirs.eigenvalues(k) - ours.eigenvalues(k)).max()
        print(f"{record.key}: {record.n_edges} blocks through DeePTB (+{extra} zero images), "
              f"max block difference {worst:.1e}, band error {err:.1e} eV")  # fmt: skip
        assert worst < 1e-5 and err < 1e-4  # DeePTB holds blocks in float32


def test_deeptb_refuses_extra_info_keys_as_our_old_writer_wrote_them(data, tmp_path):
    """Why info.json holds only DeePTB's keys: its strict check refuses anything else."""
    _dptb()
    record = next(iter(load_records(data, "val")))
    folder = write_deeptb(record, tmp_path / "export" / "frame.000")
    info = json.loads((folder / "info.json").read_text())
    (folder / "info.json").write_text(json.dumps(info | {"foundation": {"key": record.key}}))
    run = _run_deeptb(data, [record], tmp_path / "export", tmp_path)
    assert run.returncode != 0 and "foundation" in run.stderr
