#!/usr/bin/env python
"""Side-by-side against the peer package DeePTB (e3tb model): same shards, same CPU time.

Both models learn the same targets (the shards' H − μS blocks, eV) and are scored by one
function (`score`) on the same blocks: MAE of H over the real orbitals of every block of
the DFT records (the flat record layout holds no padding), per split (val, test) and per
split group of the manifest's split policy (seen compositions, unseen compositions,
unseen elements; `foundation.data.shards.split_group`).

* DeePTB runs in its own virtual environment (``--dptb``, default ``$DPTB_BIN`` or
  /work/dptb-venv/bin/dptb); only the data export and the scoring run here. Each split is
  written with our DeePTB writer (`foundation.data.formats.deeptb.write_deeptb`, the
  records' energy zero set to 0 so the files hold H − μS, the values we train on), then
  ``dptb train input.json -o <dir>`` trains an e3tb model (slem embedding, ~31 k
  parameters, 29.9 k on pbe_mini; our demo's small preset: 86 k, tiny: 27 k) for ``--minutes`` of wall time counted from its first
  training step (setup — data loading, statistics — is not counted, like Lightning's
  ``trainer.max_time``), on ``--threads`` threads; then it is stopped and its latest
  checkpoint predicts every val/test structure (a small driver run with DeePTB's python:
  `dptb.nn.build.build_model`, its dataset, `feature_to_block`), the blocks come back as
  DeePTB h5 files and are read with our reader (`read_deeptb`).
* Ours: ``--ours-run`` (a finished foundation-train run directory holding model.pt, or a
  model.pt / .ckpt file) or, without it, ``foundation-train experiment=pretrain_demo`` for
  the same minutes (its recipe: 2 torch threads, records decoded in the training process).
* Training throughput, both sides: structures/s (structures over wall time of the steps
  after a warm-up) on the same 32 training structures (the first 32 of the train split),
  4 structures per step, same thread count; DeePTB: ``dptb train`` timed from its
  per-iteration log lines; ours: foundation-train with data.max_structures=4 (edge budget
  unbounded), from its per-step timings.
* Both subprocesses are pinned to the same ``--threads`` CPUs when the machine has more.

Interop facts: DeePTB checks info.json strictly (only nframes, natoms, pos_type, pbc,
bandinfo), which our writer now respects (its own metadata goes to foundation.json;
tests/test_deeptb_peer.py checks the folders load in DeePTB); DeePTB loads
only folders named ``<prefix>.<suffix>`` (here ``frame.000`` …) and takes the basis from
its input (``{"Ag": "1s1p1d"}``), not from basis.dat; its predicted blocks come keyed
``i_j_Rx_Ry_Rz`` (0-based) in group "0", one direction per atom pair. Its on-site blocks
of an element it never trained on (pbe_mini's Se) come out slightly asymmetric (0.04 eV
measured); our reader checks hermiticity, so the driver symmetrizes on-site blocks and
the JSON records the largest asymmetry. The DFT blocks pushed through DeePTB's own
block → feature → block path and read back must match to float precision (JSON
``*_dft_roundtrip_mae_meV``, ~1e-14 meV measured): that checks export, orbital order
and read-back.

    python scripts/bench_peer_deeptb.py --minutes 10 --threads 2 \\
        --out bench_results/bench_peer_deeptb.json
    python scripts/bench_peer_deeptb.py --minutes 1 --ours-run outputs/train/<run>   # smoke

Without DeePTB installed it prints how to install it and exits 0. DeePTB 2.2.1 installs
into its own venv: ``python3 -m venv /work/dptb-venv``, ``pip install torch==2.13.0``
(CPU wheel), ``pip install --no-deps dptb==2.2.1``, its Requires-Dist except torch, and
``MAX_JOBS=1 pip install --no-build-isolation torch-scatter==2.1.2`` (builds from source).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DPTB = "/work/dptb-venv/bin/dptb"
INSTALL_HINT = (
    "python3 -m venv /work/dptb-venv && /work/dptb-venv/bin/pip install torch==2.13.0 && "
    "/work/dptb-venv/bin/pip install --no-deps dptb==2.2.1 && /work/dptb-venv/bin/pip install "
    "'scipy>=1.11,<1.13' spglib matplotlib ase pyyaml dargs==0.4.4 'e3nn>=0.5.1' "
    "torch-runstats==0.2.0 'torch_geometric>=2.4.0' opt-einsum==3.3.0 'h5py>=3.7,<3.12,!=3.10.0' "
    "lmdb==1.4.1 pyfiglet==1.0.2 tensorboard seekpath 'rich>=13' && MAX_JOBS=1 "
    "/work/dptb-venv/bin/pip install --no-build-isolation torch-scatter==2.1.2 "
    "(then pass --dptb /work/dptb-venv/bin/dptb or set DPTB_BIN)"
)
PREFIX = "frame"
SPLITS = ("train", "val", "test")
SCORED = ("val", "test")
BENCH_N, BENCH_BATCH = 32, 4

# e3tb with the slem (strictly local) embedding; sized like our tiny preset (~31 k params
# on pbe_mini's s, p, d basis). The hidden irreps hold every block irrep of an spd basis.
DPTB_MODEL = {
    "embedding": {
        "method": "slem",
        "r_max": None,  # filled in: the dataset's edge cutoff
        "irreps_hidden": "8x0e+6x1o+4x2e+2x3o+2x4e",
        "avg_num_neighbors": 50,
        "n_layers": 2,
        "n_radial_basis": 8,
        "env_embed_multiplicity": 2,
        "latent_channels": [32],
        "latent_dim": 32,
        "tp_radial_emb": False,
        "res_update": True,
    },
    "prediction": {"method": "e3tb", "scales_trainable": False, "shifts_trainable": False},
}
DPTB_TRAIN = {
    "num_epoch": 100000,  # stopped by the wall-time budget
    "batch_size": BENCH_BATCH,
    "optimizer": {"type": "Adam", "lr": 0.005},
    "lr_scheduler": {"type": "rop", "factor": 0.8, "patience": 100, "min_lr": 1e-5},
    "update_lr_per_iter": True,
    "loss_options": {
        "train": {"method": "hamil_abs", "onsite_shift": False},
        "validation": {"method": "hamil_abs", "onsite_shift": False},
    },
    "save_freq": 10,
    "validation_freq": 10,
    "display_freq": 10,
    "max_ckpt": 2,
}

# Run with DeePTB's own python (its venv); reads/writes only files in plain formats.
DRIVER = r"""
import glob, json, os, sys, time
import h5py, numpy as np, torch

def dataset(cfg, root, ham=True):
    from dptb.data.build import build_dataset
    co = cfg["common_options"]
    return build_dataset(root=root, prefix="frame", type="DefaultDataset", get_Hamiltonian=ham,
                         r_max=cfg["r_max"], er_max=None, oer_max=None, basis=co["basis"],
                         orthogonal=False)

def predict(args):
    from dptb.data import AtomicData
    from dptb.data.interfaces.ham_to_feature import feature_to_block
    from dptb.nn.build import build_model
    torch.set_default_dtype(torch.float32)
    cfg = json.load(open(args["config"]))
    model = build_model(checkpoint=args["checkpoint"])
    model.eval()
    out = {"n_params": sum(p.numel() for p in model.parameters())}
    for root, dest in args["roots"].items():
        ds = dataset(cfg, root)
        names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "frame.*")))
        assert len(ds) == len(names), (len(ds), len(names))
        t0 = time.perf_counter()
        asym = {"pred": 0.0, "oracle": 0.0}
        for k, name in enumerate(names):
            data = AtomicData.to_AtomicDataDict(ds[k])
            with torch.no_grad():
                oracle = feature_to_block(data=model.idp(dict(data)), idp=model.idp)
                pred = feature_to_block(data=model(model.idp(dict(data))), idp=model.idp)
            for tag, blocks in (("pred", pred), ("oracle", oracle)):
                folder = os.path.join(dest, tag, name)
                os.makedirs(folder, exist_ok=True)
                with h5py.File(os.path.join(folder, "hamiltonians.h5"), "w") as f:
                    g = f.create_group("0")
                    for key, b in blocks.items():
                        b = b.detach().double().numpy()
                        i, j, rx, ry, rz = map(int, key.split("_"))
                        if i == j and rx == ry == rz == 0:  # on-site: must be symmetric
                            asym[tag] = max(asym[tag], float(np.abs(b - b.T).max()))
                            b = 0.5 * (b + b.T)
                        g[key] = b
        out[root] = {"structures": len(names), "predict_s": time.perf_counter() - t0,
                     "onsite_asymmetry_max_eV": asym}
    json.dump(out, open(args["result"], "w"))

if __name__ == "__main__":
    args = json.load(open(sys.argv[2]))
    {"predict": predict}[sys.argv[1]](args)
"""


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------- environment
def cpu_set(threads: int) -> list[int] | None:
    """The first ``threads`` CPUs this process may use (None when that is all of them)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return None
    return cpus[:threads] if threads < len(cpus) else None


def thread_env(threads: int) -> dict[str, str]:
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
        WANDB_MODE="disabled",
    )


def popen(cmd: Sequence[str], threads: int, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    cpus = cpu_set(threads)
    with open(log, "w") as f:
        return subprocess.Popen(
            [str(c) for c in cmd],
            cwd=cwd,
            env=thread_env(threads),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )


def run(cmd: Sequence[str], threads: int, log: Path, cwd: Path = REPO) -> float:
    t0 = time.perf_counter()
    rc = popen(cmd, threads, log, cwd).wait()
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise BenchError(f"{' '.join(map(str, cmd[:3]))} … exited {rc}; log {log}:\n{tail}")
    return time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group of ``proc`` (a session of its own: nothing else), so
    training stops at the budget. DeePTB's Saver writes a checkpoint file before it moves
    the ``*.latest.pth`` link onto it, so the link always names a complete file."""
    for sig, wait in ((signal.SIGKILL, 10),):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- data export
def shell_string(ls: Sequence[int]) -> str:
    """DeePTB basis string of a shell list: [0, 1, 2] → ``1s1p1d``."""
    from foundation.basis import shell_spec

    return shell_spec(sorted(ls))


def export_deeptb(records: Sequence, root: Path) -> list[str]:
    """Write ``records`` as DeePTB folders ``root/frame.NNN`` (H − μS); returns the folder
    names in record order."""
    from foundation import keys
    from foundation.data.formats.deeptb import write_deeptb

    root.mkdir(parents=True, exist_ok=True)
    names = []
    for k, record in enumerate(records):
        name = f"{PREFIX}.{k:04d}"
        write_deeptb(
            dataclasses.replace(record, meta=record.meta | {keys.ENERGY_ZERO: 0.0}), root / name
        )
        names.append(name)
    return names


def read_predictions(pred_root: Path, export_root: Path, names: Sequence[str], records):
    """DeePTB's predicted h5 files → records (our reader, package order), one per name."""
    from foundation.data.formats.deeptb import read_deeptb

    out = []
    for name, record in zip(names, records, strict=True):
        folder = pred_root / name
        for f in ("atomic_numbers.dat", "positions.dat", "cell.dat", "basis.dat", "info.json",
                  "foundation.json"):  # fmt: skip
            shutil.copy(export_root / name / f, folder / f)
        out.append(read_deeptb(folder, basis=record.basis, key=record.key, require_overlap=False))
    return out


def aligned_h(pred, record) -> tuple[np.ndarray, int]:
    """Predicted flat H in ``record``'s edge order (a block the prediction lacks is 0);
    returns it and the number of record blocks missing from the prediction."""
    index = {tuple(e): n for n, e in enumerate(pred.edges.tolist())}
    p_off, r_off = pred.block_offsets, record.block_offsets
    out = np.zeros(len(record.h))
    missing = 0
    for n, e in enumerate(record.edges.tolist()):
        m = index.get(tuple(e))
        if m is None:
            missing += 1
            continue
        out[r_off[n] : r_off[n + 1]] = pred.h[p_off[m] : p_off[m + 1]]
    return out, missing


# --------------------------------------------------------------------------- scoring
def score(records: Sequence, preds: Sequence[np.ndarray], policy: Mapping) -> dict:
    """MAE of H (meV) over every real orbital entry of every block, all structures and per
    split group; ``preds[k]`` is flat in ``records[k]``'s layout (eV)."""
    from foundation.data.shards import split_group

    groups: dict[str, list[np.ndarray]] = {}
    for record, pred in zip(records, preds, strict=True):
        err = np.abs(np.asarray(pred, np.float64) - record.h.astype(np.float64))
        group = split_group(
            record.numbers, policy.get("test_compositions") or (), policy.get("test_elements") or ()
        )
        groups.setdefault("all", []).append(err)
        groups.setdefault(group, []).append(err)
    return {
        g: {
            "mae_meV": 1e3 * float(np.concatenate(e).mean()),
            "structures": len(e),
            "entries": int(sum(len(x) for x in e)),
        }
        for g, e in groups.items()
    }


def ours_predictions(model, records: Sequence) -> list[np.ndarray]:
    """Our model's flat H blocks (eV) on each record's own edges."""
    import torch

    from foundation import keys
    from foundation.data.graph import collate_graphs, record_to_graph
    from foundation.physics.predict import padded_to_flat

    out = []
    with torch.no_grad():
        for r in records:
            batch = collate_graphs([record_to_graph(r, model.universal, targets=())])
            padded = model(batch)[keys.H].double().numpy()
            out.append(padded_to_flat(padded, r.numbers, r.edges, model.universal))
    return out


# --------------------------------------------------------------------------- DeePTB side
def dptb_config(basis: Mapping, r_max: float, root: Path, val_root: Path | None, seed: int):
    return {
        "common_options": {
            "basis": {el: shell_string(ls) for el, ls in basis.items()},
            "device": "cpu",
            "dtype": "float32",
            "overlap": False,
            "seed": seed,
        },
        "model_options": {
            "embedding": DPTB_MODEL["embedding"] | {"r_max": r_max},
            "prediction": DPTB_MODEL["prediction"],
        },
        "train_options": DPTB_TRAIN,
        "data_options": {
            "r_max": r_max,
            "train": {"root": str(root), "prefix": PREFIX, "get_Hamiltonian": True},
            **(
                {"validation": {"root": str(val_root), "prefix": PREFIX, "get_Hamiltonian": True}}
                if val_root is not None
                else {}
            ),
        },
    }


def train_dptb(dptb: Path, cfg: dict, work: Path, minutes: float, threads: int) -> dict:
    """``dptb train`` for ``minutes`` counted from its first logged training line; returns
    timings and the latest checkpoint."""
    (work / "input.json").write_text(json.dumps(cfg, indent=1) + "\n")
    out = work / "train_out"
    log = work / "dptb_train.log"
    t0 = time.perf_counter()
    proc = popen([dptb, "train", work / "input.json", "-o", out], threads, log, cwd=work)
    started = None
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            text = log.read_text(errors="replace") if log.exists() else ""
            if started is None and "Model parameters" in text:
                started = time.perf_counter()
            if started is not None and time.perf_counter() - started >= 60 * minutes:
                break
    finally:
        stop(proc)
    end = time.perf_counter()
    text = log.read_text(errors="replace")
    if started is None:
        raise BenchError(f"dptb train never started training; log {log}:\n{text[-3000:]}")
    ckpts = sorted((out / "checkpoint").glob("*.latest.pth"))
    if not ckpts:
        raise BenchError(f"dptb train saved no checkpoint in {out / 'checkpoint'}; log {log}")
    found = re.search(r"Model parameters:\s*([\d,]+)", text)
    n_params = int(found.group(1).replace(",", "")) if found else None
    iters = [ln for ln in text.splitlines() if "iteration" in ln.lower()]
    return {
        "setup_s": started - t0,
        "train_wall_s": end - started,
        "checkpoint": str(ckpts[-1].resolve()),
        "n_params_log": n_params,
        "last_log_line": iters[-1].strip() if iters else None,
        "log": str(log),
    }


def throughput_dptb(
    dptb: Path, cfg: dict, work: Path, threads: int, steps: int, warmup: int
) -> dict:
    """``dptb train`` on the 32 structures (batch 4, every iteration logged), timed from the
    log: structures/s between the end of iteration ``warmup`` and of ``warmup + steps``
    (the log is polled every 0.05 s; DeePTB's own loop, its per-epoch checkpoint included)."""
    cfg = json.loads(json.dumps(cfg))
    cfg["train_options"] |= {"display_freq": 1, "save_freq": 100000, "update_lr_per_iter": False}
    (work / "tput_input.json").write_text(json.dumps(cfg, indent=1) + "\n")
    log = work / "dptb_throughput.log"
    proc = popen(
        [dptb, "train", work / "tput_input.json", "-o", work / "tput_out"], threads, log, cwd=work
    )
    seen: dict[int, float] = {}
    try:
        while proc.poll() is None and len(seen) <= warmup + steps:
            time.sleep(0.05)
            now = time.perf_counter()
            for line in log.read_text(errors="replace").splitlines():
                if "iteration:" in line:
                    k = int(line.split("iteration:")[1].split()[0])
                    seen.setdefault(k, now)
    finally:
        stop(proc)
    ks = sorted(seen)
    if len(ks) < 2:
        raise BenchError(f"dptb train logged {len(ks)} iterations; log {log}")
    k0 = ks[min(warmup, len(ks) - 2)]
    k1 = ks[-1]
    rate = BENCH_BATCH * (k1 - k0) / (seen[k1] - seen[k0])
    return {"structures_per_s": rate, "steps_timed": k1 - k0, "timing": "log polling"}


def driver(python: Path, work: Path, mode: str, args: dict, threads: int) -> dict:
    script = work / "dptb_driver.py"
    script.write_text(DRIVER)
    args = dict(args, result=str(work / f"{mode}_result.json"))
    (work / f"{mode}_args.json").write_text(json.dumps(args))
    run(
        [python, script, mode, work / f"{mode}_args.json"],
        threads,
        work / f"dptb_{mode}.log",
        cwd=work,
    )
    return json.loads((work / f"{mode}_result.json").read_text())


# --------------------------------------------------------------------------- our side
def train_args(threads: int) -> list[str]:
    return [
        f"num_threads={threads}",  # the demo's measured recipe: all threads to torch,
        "data.num_workers=0",  # records decoded in the training process
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]


def train_ours(dataset: Path, work: Path, minutes: float, threads: int) -> dict:
    out = work / "ours_run"
    total = int(round(60 * minutes))
    cmd = [
        sys.executable,
        "-m",
        "foundation.train.cli",
        "experiment=pretrain_demo",
        f"data.root={dataset.resolve()}",
        f"hydra.run.dir={out}",
        f"paths.output_dir={out}",
        f"trainer.max_time=00:{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}",
        "trainer.max_epochs=100000",
        "callbacks.figures=null",
        "test=false",
        *train_args(threads),
    ]
    wall = run(cmd, threads, work / "ours_train.log")
    return {"run_dir": str(out), "wall_s": wall, "model": str(out / "model.pt")}


def throughput_ours(data32: Path, work: Path, threads: int, steps: int, warmup: int) -> dict:
    out = work / "ours_tput"
    cmd = [
        sys.executable,
        "-m",
        "foundation.train.cli",
        "experiment=pretrain_demo",
        f"data.root={data32.resolve()}",
        f"hydra.run.dir={out}",
        f"paths.output_dir={out}",
        f"data.max_structures={BENCH_BATCH}",
        "data.max_edges=1000000",
        f"data.steps_per_epoch={steps + warmup}",
        "trainer.max_epochs=1",
        "trainer.max_time=null",
        "trainer.log_every_n_steps=1",
        "callbacks.figures=null",
        "callbacks.model_checkpoint=null",
        "callbacks.export=null",
        "test=false",
        "+trainer.limit_val_batches=0",
        *train_args(threads),
    ]
    run(cmd, threads, work / "ours_tput.log")
    (metrics,) = sorted(out.glob("csv/version_*/metrics.csv"))[-1:]
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/structures_per_s")]
    rows = rows[warmup:]
    if not rows:
        raise BenchError(f"{metrics}: no timed steps")
    n = sum(float(r["train/structures_per_s"]) * float(r["train/step_time_s"]) for r in rows)
    return {
        "structures_per_s": n / sum(float(r["train/step_time_s"]) for r in rows),
        "median_step_structures_per_s": statistics.median(
            float(r["train/structures_per_s"]) for r in rows
        ),
        "steps_timed": len(rows),
    }


# --------------------------------------------------------------------------- main
def resolve_dptb(arg: str | None) -> Path | None:
    path = Path(arg or os.environ.get("DPTB_BIN") or DEFAULT_DPTB)
    if path.is_file() and os.access(path, os.X_OK) and (path.parent / "python").exists():
        return path
    found = shutil.which(str(path)) if not path.is_absolute() else None
    return Path(found) if found else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time per side")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (cores) per side")
    p.add_argument("--dataset", type=Path, default=REPO / "data_shards" / "pbe_mini")
    p.add_argument(
        "--ours-run",
        type=Path,
        default=None,
        help="finished foundation-train run dir (model.pt) or checkpoint file; "
        "default: train experiment=pretrain_demo for --minutes",
    )
    p.add_argument(
        "--dptb", default=None, help=f"dptb executable (default $DPTB_BIN or {DEFAULT_DPTB})"
    )
    p.add_argument("--throughput-steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep intermediate files here")
    p.add_argument("--out", type=Path, default=REPO / "bench_results" / "bench_peer_deeptb.json")
    args = p.parse_args(argv)

    dptb = resolve_dptb(args.dptb)
    if dptb is None:
        print(
            "SKIPPED bench_peer_deeptb: DeePTB (dptb) is not installed "
            f"(looked for {args.dptb or os.environ.get('DPTB_BIN') or DEFAULT_DPTB}). "
            f"Install it into its own venv:\n  {INSTALL_HINT}"
        )
        return 0
    python = dptb.parent / "python"

    from foundation.data.shards import load_records, read_manifest, write_shards

    manifest = read_manifest(args.dataset)
    policy = manifest.get("split_policy", {})
    r_max = float(manifest.get("edge_cutoff_A") or 9.0)
    basis = manifest["basis"]["shells"]
    records = {s: load_records(args.dataset, s) for s in SPLITS}
    bench32 = records["train"][:BENCH_N]

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_peer_deeptb_")
        work = Path(tmp.name)
    else:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "meta": {
            "dataset": str(args.dataset),
            "minutes": args.minutes,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "cpus_pinned": cpu_set(args.threads),
            "platform": platform.platform(),
            "dptb": str(dptb),
            "r_max_A": r_max,
            "target": "H − μS blocks (eV) of the shards; MAE over real orbitals, meV",
            "dptb_model_options": DPTB_MODEL,
            "dptb_train_options": DPTB_TRAIN,
        }
    }
    try:
        t0 = time.perf_counter()
        names = {s: export_deeptb(records[s], work / "deeptb" / s) for s in SPLITS}
        export_deeptb(bench32, work / "deeptb" / "bench32")
        result["meta"]["export_s"] = time.perf_counter() - t0
        print(f"exported {sum(map(len, names.values()))} structures to {work / 'deeptb'}")

        # ---- DeePTB: train, predict, throughput
        cfg = dptb_config(
            basis, r_max, work / "deeptb" / "train", work / "deeptb" / "val", args.seed
        )
        print(f"DeePTB: training {args.minutes} min on {args.threads} threads …", flush=True)
        dtrain = train_dptb(dptb, cfg, work, args.minutes, args.threads)
        print(f"DeePTB: setup {dtrain['setup_s']:.0f} s, trained {dtrain['train_wall_s']:.0f} s")
        roots = {str(work / "deeptb" / s): str(work / "dptb_pred" / s) for s in SCORED}
        pcfg = {"common_options": cfg["common_options"], "r_max": r_max}
        (work / "predict_config.json").write_text(json.dumps(pcfg))
        dpred = driver(
            python,
            work,
            "predict",
            {"checkpoint": dtrain["checkpoint"], "config": str(work / "predict_config.json"),
             "roots": roots},
            args.threads,
        )  # fmt: skip
        tcfg = dptb_config(basis, r_max, work / "deeptb" / "bench32", None, args.seed)
        print("DeePTB: throughput …", flush=True)
        dtput = throughput_dptb(dptb, tcfg, work, args.threads, args.throughput_steps, args.warmup)
        dptb_side: dict = {"train": dtrain, "n_params": dpred["n_params"], "throughput": dtput}
        for s in SCORED:
            out = {}
            for tag in ("pred", "oracle"):
                preds = read_predictions(
                    work / "dptb_pred" / s / tag, work / "deeptb" / s, names[s], records[s]
                )
                aligned = [aligned_h(pr, r) for pr, r in zip(preds, records[s], strict=True)]
                out[tag] = score(records[s], [a for a, _ in aligned], policy)
                out[tag]["all"]["blocks_missing"] = int(sum(m for _, m in aligned))
            dptb_side[s] = out["pred"]
            # DeePTB's own block ⇄ feature round trip of the DFT blocks: ~0 proves the
            # export, the orbital order and the read-back (an interop check, not a score).
            dptb_side[f"{s}_dft_roundtrip_mae_meV"] = out["oracle"]["all"]["mae_meV"]
            dptb_side[f"{s}_blocks_missing"] = out["pred"]["all"]["blocks_missing"]
        result["deeptb"] = dptb_side

        # ---- ours
        ours: dict = {}
        if args.ours_run is not None:
            path = args.ours_run / "model.pt" if args.ours_run.is_dir() else args.ours_run
            ours["train"] = {"model": str(path), "given": True}
        else:
            print(
                f"ours: foundation-train experiment=pretrain_demo, {args.minutes} min …", flush=True
            )
            ours["train"] = train_ours(args.dataset, work, args.minutes, args.threads)
            path = Path(ours["train"]["model"])
        from foundation.physics.predict import load_model

        model = load_model(path)
        for s in SCORED:
            ours[s] = score(records[s], ours_predictions(model, records[s]), policy)
        ours["n_params"] = sum(p.numel() for p in model.parameters())
        del model
        data32 = work / "ours_bench32"
        write_shards(bench32, data32, name="bench32", samples_per_shard=BENCH_N, val_fraction=0.0,
                     test_fraction=0.0)  # fmt: skip
        print("ours: throughput …", flush=True)
        ours["throughput"] = throughput_ours(
            data32, work, args.threads, args.throughput_steps, args.warmup
        )
        result["ours"] = ours
    finally:
        if tmp is not None:
            tmp.cleanup()

    # ---- table
    rows = [("val", "all"), ("val", "seen")] + [
        ("test", g) for g in ("all", "seen", "unseen_composition", "unseen_element")
    ]
    print(f"\n{'MAE H (meV)':<28}{'ours':>10}{'DeePTB':>10}{'ours/DeePTB':>13}")
    ratios = {}
    for s, g in rows:
        a = result["ours"][s].get(g, {}).get("mae_meV")
        b = result["deeptb"][s].get(g, {}).get("mae_meV")
        if a is None or b is None:
            continue
        ratios[f"{s}/{g}"] = a / b
        print(f"{s + ' ' + g:<28}{a:>10.2f}{b:>10.2f}{a / b:>13.2f}")
    ta = result["ours"]["throughput"]["structures_per_s"]
    tb = result["deeptb"]["throughput"]["structures_per_s"]
    print(f"{'train structures/s':<28}{ta:>10.1f}{tb:>10.1f}{ta / tb:>13.2f}")
    print(f"{'parameters':<28}{result['ours']['n_params']:>10}{result['deeptb']['n_params']:>10}")
    print(
        "DeePTB DFT round trip (export → its features → blocks → our reader), MAE meV: "
        + ", ".join(f"{s} {result['deeptb'][f'{s}_dft_roundtrip_mae_meV']:.2g}" for s in SCORED)
    )
    result["ratios_ours_over_deeptb"] = ratios | {"throughput_ours_over_deeptb": ta / tb}
    result["goals"] = {
        "mae_seen_le_half": all(ratios[k] <= 0.5 for k in ("val/all", "test/seen") if k in ratios),
        "throughput_ge_2x": ta / tb >= 2.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
