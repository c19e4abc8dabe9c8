"""Fine-tuning the shipped PBE model on HSE06 Hamiltonians (task=finetune_hybrid).

Runs on the shipped pretrained model (pretrained/tiny_pbe_mini.pt) and the shipped paired
PBE/HSE06 dataset (data_shards/hse_mini): one short frozen-backbone ΔH fine-tune through
foundation-train, shared by the tests that need a trained model.
"""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase import Atoms
from train_support import REPO, SHIPPED, compose, fit, read_metrics, run_cli

from foundation import keys, testing
from foundation.basis import BasisSet
from foundation.data.graph import collate_graphs, record_to_graph, structure_to_graph
from foundation.data.shards import load_records, policy_group, read_manifest
from foundation.model import build_model
from foundation.model.backbone import edge_vectors
from foundation.physics.bands import band_gap
from foundation.physics.kspace import BlochHamiltonian
from foundation.physics.predict import main as predict_main
from foundation.physics.predict import padded_to_flat, predict_record
from foundation.rotations import double_precision
from foundation.train.checkpoint import load_inference_checkpoint, load_inference_model
from foundation.train.cli import check_dataset_fits_model
from foundation.train.config import ConfigError
from foundation.train.finetune import FinetuneModule, check_compatible, prepare_model

PRETRAINED = REPO / "pretrained" / "tiny_pbe_mini.pt"
HSE = REPO / "data_shards" / "hse_mini"

pytestmark = pytest.mark.skipif(
    not (HSE / "manifest.json").is_file() or not PRETRAINED.is_file(),
    reason=f"needs the shipped {HSE.relative_to(REPO)} and {PRETRAINED.relative_to(REPO)}",
)


def _pretrained(double: bool = False):
    """The shipped model, rebuilt from its config (float64 + float64 Clebsch–Gordan
    coefficients with ``double``, for equivariance checks to 1e-8).

    The shipped checkpoint still holds e3nn's Wigner-3j buffers in float32; they are never
    loaded (`foundation.model.derived`), so the float64 model keeps its float64 ones."""
    payload = load_inference_checkpoint(PRETRAINED)
    config = payload["model_config"] | {"optimize_einsums": False}
    with double_precision() if double else torch.no_grad():
        model = build_model(config, basis=payload["basis"])
    model.load_state_dict(payload["state_dict"])
    return model.double() if double else model


def _pretrained_weights(model) -> dict[str, torch.Tensor]:
    """The shipped state_dict without derived buffers (rebuilt by the code, never exported)."""
    from foundation.model.derived import derived_buffer_names

    derived = derived_buffer_names(model)
    state = load_inference_checkpoint(PRETRAINED)["state_dict"]
    return {k: v for k, v in state.items() if k not in derived}


def _batch(records, universal, dtype=torch.float32):
    graphs = [record_to_graph(r, universal, (keys.H, keys.S, keys.H_HSE), dtype, (keys.H_HSE,))
              for r in records]  # fmt: skip
    return collate_graphs(graphs)


# ----------------------------------------------------------------------------- fine-tune run
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A short fine-tune (ΔH head, frozen backbone) on hse_mini/train through foundation-train:
    (module, export path, wall seconds)."""
    out = tmp_path_factory.mktemp("finetune")
    cfg = compose(
        [
            "task=finetune_hybrid",
            "data=hse_mini",
            f"data.root={HSE}",
            f"task.pretrained={PRETRAINED}",
            f"paths.output_dir={out}",
            "data.max_edges=1024",
            "data.steps_per_epoch=20",
            "trainer.max_epochs=4",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "task.lr=1e-2",
            "task.warmup_steps=5",
            "callbacks.figures=null",
            "logger=csv",
            "test=false",
            "num_threads=1",
        ]
    )
    start = time.perf_counter()
    _, module = fit(cfg)
    return module, out / "model.pt", time.perf_counter() - start


def _gap(record, h_flat: np.ndarray) -> float:
    """Gap (eV) of ``record``'s structure with Hamiltonian blocks ``h_flat`` and its DFT S, on
    a Γ-centred mesh plus the record's DFT band k-points."""
    ham = BlochHamiltonian(
        record.numbers,
        record.basis,
        record.edges,
        h_flat,
        record.s,
        cell=record.cell,
        pbc=record.pbc,
        n_electrons=record.meta[keys.N_ELECTRONS],
    )
    return band_gap(ham, mesh_spacing=0.3, kpts=record.meta["dft_bands"]["kpts_frac"])


def _gap_rows(model, pbe_model, records) -> np.ndarray:
    """Per record: gaps (eV) of HSE06 DFT, PBE DFT, the PBE model, the fine-tuned model and
    DFT PBE + the learned ΔH = h_hse − h."""
    rows = []
    for record in records:
        batch = _batch([record], model.universal)
        with torch.no_grad():
            out = model(batch)
            predicted = [pbe_model(batch)[keys.H], out[keys.H_HSE], out[keys.H_HSE] - out[keys.H]]
        pbe, hse, delta = (
            padded_to_flat(p.double().numpy(), record.numbers, record.edges, model.universal)
            for p in predicted
        )
        rows.append(
            (
                _gap(record, record.extras[keys.H_HSE]),
                _gap(record, record.h),
                _gap(record, pbe),
                _gap(record, hse),
                _gap(record, record.h + delta),
            )
        )
    return np.array(rows)


def test_finetuned_gaps_are_closer_to_hse06(finetuned):
    """The exported fine-tuned model predicts h_hse. Gaps of the structures it never trained
    on, per split group: seen compositions (hse_mini's validation cells), the unseen
    composition PbTe (Pb and Te train) and the unseen element set PbSe (Se never trains).

    Measured (80 steps, 2-core CPU, 2026-12-02), gap MAE vs HSE06 in eV, PBE model →
    fine-tuned; DFT PBE → DFT PBE + learned ΔH: seen 1.19 → 0.55; 0.82 → 0.13. PbTe
    0.92 → 0.87; 0.32 → 0.41 (the learned ΔH does not transfer to the new composition: it
    closes the PbTe gaps). PbSe 0.60 → 0.60 (the pretrained model makes every PbSe cell a
    metal); 0.26 → 0.21. Asserted on seen compositions only: the fine-tuned model beats the
    PBE model and ΔH takes the DFT PBE gaps most of the way to HSE06. On PbTe the fine-tuned
    vs PBE-model ordering is not robust (0.87 < 0.92 here, 0.94 > 0.92 after the 400 steps
    of scripts/bench_finetune.py), so the unseen groups are printed, not asserted."""
    _, export, seconds = finetuned
    model = load_inference_model(export)
    pbe_model = _pretrained()
    assert list(model.heads) == [keys.H, keys.S, keys.H_HSE] and model.bases == {"h_hse": "h"}
    policy = read_manifest(HSE)["split_policy"]
    records = load_records(HSE, "val") + load_records(HSE, "test")
    rows = _gap_rows(model, pbe_model, records)
    groups = np.array([keys.SPLIT_GROUPS[policy_group(r.numbers, policy)] for r in records])
    mae = {}
    for group in keys.SPLIT_GROUPS:
        ref_hse, *others = rows[groups == group].T
        mae[group] = [float(np.mean(np.abs(g - ref_hse))) for g in others]
        print(
            f"\n{group}: {int((groups == group).sum())} structures, fine-tune {seconds:.0f} s: gap "
            "MAE vs HSE06 (eV) PBE model {:.3f}, fine-tuned {:.3f}; DFT PBE {:.3f}, "
            "DFT PBE + learned ΔH {:.3f}".format(*mae[group][1:3], mae[group][0], mae[group][3])
        )
    for record, row in zip(records, rows, strict=True):
        print(f"  {record.key}: HSE06 {row[0]:.3f}  PBE {row[1]:.3f}  PBE model {row[2]:.3f}  "
              f"fine-tuned {row[3]:.3f}  PBE + ΔH {row[4]:.3f} eV")  # fmt: skip
    mae_dft, mae_pbe, mae_ft, mae_delta = mae["seen"]
    assert mae_ft < mae_pbe
    assert mae_delta < 0.5 * mae_dft


def test_predict_cli_target_hse_compares_with_hse06(finetuned, tmp_path, capsys):
    """foundation-predict --target hse on a validation SiGe cell (not trained on): the model's
    h_hse blocks, and with --compare on its hse_mini record the bands are checked against the
    HSE06 DFT ones; its gap error is smaller than the pretrained PBE model's against the same
    HSE06 data.
    A model without an h_hse head is refused with the fix."""
    from ase.io import write

    _, export, _ = finetuned
    record = next(r for r in load_records(HSE, "val") if r.key.startswith("SiGe"))
    record.save(tmp_path / "paired")  # h (PBE) and the extra h_hse: --target picks h_hse
    record.with_target(keys.H_HSE).save(tmp_path / "hse_only")  # HSE06 as its only H
    structure = tmp_path / "cell.vasp"
    write(structure, Atoms(numbers=record.numbers, positions=record.positions,
                           cell=record.cell, pbc=True), format="vasp")  # fmt: skip
    common = [
        "--no-progress",
        "--kspacing",
        "0.5",
        "--path-spacing",
        "0.1",
    ]
    runs = {
        "finetuned": [str(export), str(structure), "--target", "hse", "--compare",
                      str(tmp_path / "paired")],
        "pbe_model": [str(PRETRAINED), str(structure), "--compare", str(tmp_path / "hse_only")],
    }  # fmt: skip
    gap_error = {}
    for name, args in runs.items():
        assert predict_main([*args, "-o", str(tmp_path / name), *common]) == 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        gap_error[name] = abs(summary["compare"]["gap_error_meV"])
        assert summary["target"] == (keys.H_HSE if name == "finetuned" else keys.H)
    print(f"\n{record.key}: |gap error| vs HSE06 DFT (meV) {gap_error}")
    assert gap_error["finetuned"] < gap_error["pbe_model"]

    model = load_inference_model(export)
    atoms = Atoms(numbers=record.numbers, positions=record.positions, cell=record.cell, pbc=True)
    predicted, _ = predict_record(model, atoms, target="hse", progress=False)
    with torch.no_grad():
        out = model(collate_graphs([record_to_graph(predicted, model.universal, targets=())]))
    for head, same in ((keys.H_HSE, True), (keys.H, False)):
        flat = padded_to_flat(out[head].double().numpy(), predicted.numbers, predicted.edges,
                              model.universal)  # fmt: skip
        assert np.allclose(predicted.h, flat, rtol=0, atol=1e-6) == same, head
    capsys.readouterr()
    assert predict_main([str(PRETRAINED), str(structure), "--target", "hse", "-o",
                         str(tmp_path / "refused"), *common]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no Hamiltonian head 'h_hse'" in err and "task=finetune_hybrid" in err


def test_frozen_backbone_stays_bit_identical(finetuned):
    """backbone=frozen: every pretrained tensor is exported unchanged, the new head moved."""
    module, export, _ = finetuned
    before = _pretrained_weights(module.model)
    after = load_inference_checkpoint(export)["state_dict"]
    assert set(before) <= set(after)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"pretrained tensors changed: {changed[:5]}"
    live = module.model.state_dict()
    assert all(torch.equal(before[name], live[name].cpu()) for name in before)
    new = [name for name in after if name.startswith("heads.h_hse.")]
    assert new and any(after[name].abs().max() > 0 for name in new)
    counts = module.parameter_counts
    assert counts["trainable"] == counts["new_head"] > 0 and counts["lora"] == 0


# ----------------------------------------------------------------------------- compatibility
def test_incompatible_checkpoint_is_refused_with_the_fix():
    model = _pretrained()
    shells = model.basis.to_dict()["shells"]
    cases = [
        (BasisSet("gth-dzvp", {"Si": shells["Si"]}), "gth-dzvp"),
        (BasisSet(model.basis.name, {"Si": shells["Si"], "O": [0, 1]}), "element(s) O"),
        (BasisSet(model.basis.name, {"Si": [0, 0, 1, 1, 2]}), "Element Si has shells 1s1p"),
    ]
    for dataset, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            check_compatible(model, dataset, PRETRAINED)
        assert str(PRETRAINED) in str(err.value) and "Fix:" in str(err.value)
    with pytest.raises(ConfigError, match="task.pretrained is required"):
        FinetuneModule(basis=model.basis.to_dict())
    with pytest.raises(ConfigError, match="no such checkpoint"):
        FinetuneModule(basis=model.basis.to_dict(), pretrained="no/such/model.pt")


# ----------------------------------------------------------------------------- equivariance
def test_lora_and_wide_head_are_equivariant_and_lora_starts_exact():
    """LoRA adapters start at exactly the pretrained output and stay exactly equivariant
    once trained (random adapters); a head with a longer cutoff predicts equivariant,
    hermitian blocks for edges beyond the backbone's cutoff."""
    torch.manual_seed(0)
    model = _pretrained(double=True)
    record = load_records(HSE, "test")[0]
    wide = model.backbone.cutoff_A + 2.0
    graph = structure_to_graph(record.numbers, record.positions, record.cell, record.pbc,
                               model.universal, wide, dtype=torch.float64)  # fmt: skip
    batch = collate_graphs([graph])
    before = model(batch)
    with double_precision():
        prepare_model(model, backbone="lora", lora_rank=2, head_cutoff_A=wide)
    after = model(batch)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(after[keys.H_HSE], after[keys.H])  # ΔH starts at zero
    with torch.no_grad():  # as if trained: adapters and the pair path away from zero
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    errors = testing.assert_equivariant(model, batch, model.universal.shells, seeds=(0,))
    out = model(batch)
    testing.assert_hermitian(out, batch)
    testing.assert_masked(out, batch)
    lengths = torch.linalg.norm(edge_vectors(batch), dim=1)
    far = lengths > model.backbone.cutoff_A
    assert far.any() and out[keys.H][far].abs().max() == 0.0  # backbone features vanish there
    assert out[keys.H_HSE][far].abs().max() > 0.0
    print(f"\nworst relative equivariance error {max(errors.values()):.1e}, "
          f"{int(far.sum())} edges beyond {model.backbone.cutoff_A} Å")  # fmt: skip

    manifest = SimpleNamespace(root=HSE, elements=["Si"], manifest={"edge_cutoff_A": wide})
    check_dataset_fits_model(manifest, model)  # the head reaches the dataset's edges
    with pytest.raises(ConfigError, match="the model reaches"):
        check_dataset_fits_model(manifest, _pretrained())


# ----------------------------------------------------------------------------- replay
def test_replayed_structures_do_not_count_for_h_hse():
    """A batch mixing hse_mini structures with replayed pbe_mini ones (no h_hse) has the
    h_hse loss of the hse_mini structures alone; on a replay-only batch the h_hse head
    still gets (zero) gradients, so it is in every step's graph."""
    module = FinetuneModule(
        pretrained=str(PRETRAINED), targets={keys.H_HSE: 1.0, keys.H: 0.1, keys.S: 0.1}
    )
    universal = module.model.universal
    hse = load_records(HSE, "train")[:2]
    replay = load_records(SHIPPED, "train")[:2]
    _, alone, _ = module.step_losses(_batch(hse, universal))
    _, mixed, _ = module.step_losses(_batch([replay[0], hse[0], replay[1], hse[1]], universal))
    assert torch.allclose(mixed[keys.H_HSE], alone[keys.H_HSE], rtol=1e-5, atol=0)
    assert not torch.isclose(mixed[keys.H], alone[keys.H], rtol=1e-3, atol=0)  # h: all count

    loss, only_replay, _ = module.step_losses(_batch(replay, universal))
    assert only_replay[keys.H_HSE] == 0.0
    loss.backward()
    grads = {n: p.grad for n, p in module.model.heads[keys.H_HSE].named_parameters()}
    assert grads and all(g is not None for g in grads.values()), grads
    assert all(g.abs().max() == 0 for g in grads.values())


def test_replay_datamodule_mixes_both_datasets(tmp_path):
    """data.replay: each train batch holds structures of both datasets, flagged by
    h_hse_present."""
    from foundation.data.datamodule import ShardDataModule

    dm = ShardDataModule(HSE, targets=[keys.H, keys.S, keys.H_HSE], max_edges=1200,
                         replay={"root": SHIPPED, "fraction": 0.5})  # fmt: skip
    assert set(dm.elements) == set(load_inference_checkpoint(PRETRAINED)["elements"])
    stream = dm.train_stream()
    _, records = next(stream.record_batches())
    batch = stream._collate(records)
    flags = batch[keys.present(keys.H_HSE)]
    assert flags.any() and (~flags).any()
    assert batch[keys.H_HSE][~flags].abs().max() == 0


# ----------------------------------------------------------------------------- strategies
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2"])
def test_two_process_finetune_hybrid_with_lora_and_replay(tmp_path, strategy):
    """2 ranks (gloo) through foundation-train, DDP and ZeRO-2, LoRA adapters and replay of
    pbe_mini (batches where a rank holds few or no h_hse structures): the run ends with
    finite losses and validation on both epochs; in the export every pretrained tensor is
    the shipped one bit for bit (LoRA keeps them frozen under both strategies) while the
    ΔH head and the adapters have moved away from their zero start."""
    out = tmp_path / strategy
    args = [
        "task=finetune_hybrid",
        "data=hse_mini",
        f"data.root={HSE}",
        f"data.replay={{root: {SHIPPED}, fraction: 0.5}}",
        f"paths.output_dir={out}",
        f"task.pretrained={PRETRAINED}",
        "task.backbone=lora",
        "task.lora_rank=2",
        "task.targets.h=0.1",
        "task.ema_decay=null",
        "task.lr=1e-2",
        "task.warmup_steps=2",
        f"strategy={strategy}",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "data.steps_per_epoch=4",
        "data.max_edges=500",
        "logger=csv",
        "callbacks.figures=null",
        "test=false",
        "num_threads=1",
    ]
    result = run_cli(args, out, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_metrics(out)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 8 and all(np.isfinite(losses))
    val = [r["val/mae_meV"] for r in rows if "val/mae_meV" in r]
    assert len(val) == 2 and all(np.isfinite(val)), val
    model = load_inference_model(out / "model.pt")
    assert keys.H_HSE in model.heads and model.bases == {keys.H_HSE: keys.H}
    before = _pretrained_weights(model)
    after = load_inference_checkpoint(out / "model.pt")["state_dict"]
    frozen = {name.replace(".parametrizations.weight.original", ".weight"): t
              for name, t in after.items() if not name.startswith("heads.h_hse.")
              and ".parametrizations.weight.0." not in name}  # fmt: skip
    # a checkpoint from before standardization has no statistics: they load as identity
    added = {n for n in set(frozen) - set(before) if ".statistics." in n}
    assert all(not frozen[n].any() for n in added if n.endswith(("n_structures", "reference")))
    assert set(frozen) - added == set(before)
    # (DeepSpeed casts the module to float32, the float64 Bessel-frequency buffer too)
    assert [n for n in before if not torch.equal(before[n].to(frozen[n].dtype), frozen[n])] == []
    adapters = [t for n, t in after.items() if ".parametrizations.weight.0.up." in n]
    assert adapters and any(t.abs().max() > 0 for t in adapters)
    new_head = [t for n, t in after.items() if n.startswith("heads.h_hse.")]
    assert any(t.abs().max() > 0 for t in new_head)
