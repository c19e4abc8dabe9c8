"""`foundation-predict`: checkpoint + any ASE-readable structure → H(R), S(R), bands, DOS.

    foundation-predict model.pt POSCAR -o out/ [--compare dft_folder/] [--overlap exact|model|analytic]
    foundation-predict model.pt POSCAR -o out/ --eph phonopy_params.yaml [--eph-k 0 0 0 ...]
    foundation-predict finetuned.pt POSCAR -o out/ --target hse      # the HSE06 head


Steps: read the structure (ASE; a file ASE cannot read stops with the file name, ASE's
message and a fix) → edges (i, j, R) with `foundation.data.graph.neighbor_edges` at the
model's cutoff → model blocks (padded universal basis → per-element blocks) → a
`HamiltonianRecord` written as a DeepH legacy folder (`foundation.data.formats.deeph`) →
bands on the seekpath path, DOS, Fermi level and gap (`foundation.physics.bands`) as PNG +
JSON. Cells above ``--dense-max-orbitals`` skip the dense band path
(`foundation.physics.large_cell`): Γ-point DOS, Fermi level and gap by the kernel polynomial
method (linear in N, no factorization; ``dos_kpm.png``/``.json``), then ``--n-eigs``
eigenpairs near E_F by ``--eig-solver``; ``--supercell A B C`` builds the large cell from a
small input.

Decisions:

* **Target** (``--target``): which Hamiltonian head gives H — ``h`` (default: the
  pretraining functional, PBE for the shipped models), ``hse`` (= ``h_hse``, the head
  ``task=finetune_hybrid`` adds) or any other head name of the checkpoint (the overlap is
  chosen by ``--overlap``). A checkpoint without that head stops with its list of heads and
  how to make one. ``--compare`` against a saved
  record that holds the same target as an extra (a ``hse_mini`` record) compares with that
  target; a DeepH folder is compared as it is (give the folder of the same functional).
* **Checkpoints**: the exported inference checkpoint (``foundation.inference/1``) or a
  Lightning checkpoint of `foundation-train` (its ``"foundation"`` metadata rebuilds the
  model; ``model.``-prefixed weights); both loaded with ``torch.load(weights_only=True)``.
* **Overlap**: ``--overlap exact`` (default) computes S(R) from the basis' two-center
  tables (`foundation.physics.overlap`: exact to ~1e-14, O(N), cached per basis); a basis
  PySCF cannot integrate (data read from DeePTB/ABACUS folders) stops with a message naming
  the fallback, ``--overlap model``: the model's S head (refused for a model without one).
  ``--overlap analytic`` computes the same exact blocks with PySCF's cell integrals (dense
  per lattice translation: the reference, meant for cells up to a few hundred atoms).
* **Energy zero**: the model predicts H − μS (DESIGN.md §3), so predicted absolute energies
  carry an unknown constant; the Fermi level comes from the electron count (valence
  electrons of the GTH pseudopotential ``--pseudo``, or ``--n-electrons``), and plots and
  band errors are measured from each set's own Fermi level (midgap for insulators).
* **Molecules and slabs** (no periodic axis, or some): ``cutoff`` of vacuum along every
  non-periodic axis, then written as a periodic DeepH folder (no edge crosses the vacuum);
  a molecule's bands reduce to Γ.
* **Electron–phonon** (``--eph PHONONS``): Γ phonons of the structure from a phonopy
  params YAML with force constants or a FORCE_CONSTANTS file of the cell itself
  (`foundation.physics.phonons`); for every optical mode ν the zero-point displacement
  u_ν, the model's ∂_ν H = Σ u·dH/du by forward-mode autograd on the predicted edges (and
  ∂_ν S of the exact tables by forward-mode autograd, of the S head with ``--overlap
  model``, or PySCF finite differences with ``--overlap analytic``), and
  g_mnν(k, q = 0) = c_m†[∂_ν H − ε_n ∂_ν S]c_n at the ``--eph-k`` points (default Γ),
  written to ``eph.npz`` (g in meV, complex (K, M, B, B); the gauge-invariant |g| with
  degenerate states averaged; band energies in eV; frequencies in THz) and summarised in
  ``eph.json``. The model's H carries an unknown energy zero μ(positions), so diagonal
  elements g_nn include an unknown common dμ/du_ν; off-diagonal ones do not depend on it.
* **Memory**: inference runs without autograd in chunks of ``--edge-chunk`` edges
  (`UniversalHamiltonianModel.predict_chunks`): every per-edge step of the backbone and the
  heads holds one chunk of intermediates at a time, and each chunk's padded blocks are
  converted to flat float64 blocks before the next; memory is linear in the number of edges
  (node and edge features, flat blocks) plus a working set bounded by the chunk size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from foundation import keys
from foundation.basis import BasisSet, UniversalBasis
from foundation.data.record import HamiltonianRecord
from foundation.physics.sparse import EIG_SOLVERS

TARGET_ALIASES = {"hse": keys.H_HSE, "hse06": keys.H_HSE, "pbe": keys.H}
"""``--target`` spellings → head names (``pbe`` is the pretraining head ``h``)."""

EDGE_CHUNK = 10_000
"""Default edges per inference chunk: the tiny preset holds ~20 kB of intermediates per edge,
so ~0.2 GB per chunk (measured on a 128-atom Si cell, where chunks of 2k–8k edges also ran
no slower than one piece)."""


class PredictError(RuntimeError):
    """A user-facing failure: the message names the file and the fix."""


# --------------------------------------------------------------------------- inputs
def read_structure(path: str | Path, fmt: str | None = None, index: int | str = -1):
    """One `ase.Atoms` from any ASE-readable file (CIF, POSCAR, extxyz, …).

    Raises `PredictError` naming the file, what ASE said and a fix.
    """
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{path}: no such structure file.")
    try:
        atoms = ase.io.read(path, format=fmt, index=index)
    except Exception as exc:  # ASE raises many types for malformed input
        raise PredictError(
            f"{path}: ASE could not read it as a structure "
            f"({'format ' + fmt if fmt else 'format guessed from the name/content'}): "
            f"{type(exc).__name__}{': ' + str(exc) if str(exc) else ' (no message)'}. Fix: check the file is complete and in a format ASE "
            "reads (CIF, POSCAR/CONTCAR, extxyz, …), or name the format with --format "
            "(e.g. --format vasp for a POSCAR without the usual name)."
        ) from None
    if isinstance(atoms, list):
        atoms = atoms[-1]
    if len(atoms) == 0:
        raise PredictError(f"{path}: the structure has no atoms.")
    if atoms.pbc.any() and abs(atoms.cell.volume) < 1e-6:
        raise PredictError(
            f"{path}: periodic along {atoms.pbc.tolist()} but the cell has zero volume; "
            "give the lattice vectors (or remove the periodic flags for a molecule)."
        )
    return atoms


MIN_DISTANCE_A = 0.5  # closer atoms are an input error (no bond is this short)
MIN_VOLUME_PER_ATOM_A3 = 1.0  # solids have ~5-60 Å³ per atom; below this the cell is degenerate


def check_geometry(atoms, where: str) -> None:
    """Refuse geometries no DFT code would accept: non-finite coordinates or cell, and atoms
    closer than `MIN_DISTANCE_A` (periodic images included), naming the atoms and the
    likely cause (fractional coordinates read as Cartesian Å, duplicated atoms)."""
    from ase.neighborlist import neighbor_list

    bad = ~np.isfinite(atoms.positions).all(axis=1)
    if bad.any():
        raise PredictError(
            f"{where}: atom(s) {np.nonzero(bad)[0][:5].tolist()} have non-finite coordinates; "
            "fix the structure file."
        )
    if not np.isfinite(atoms.cell.array).all():
        raise PredictError(f"{where}: the cell has non-finite entries; fix the lattice vectors.")
    volume = abs(atoms.cell.volume)
    if atoms.pbc.all() and volume < MIN_VOLUME_PER_ATOM_A3 * len(atoms):
        lengths = ", ".join(f"{x:.3g}" for x in atoms.cell.lengths())
        raise PredictError(
            f"{where}: the periodic cell has a near-zero volume ({volume:.3g} Å³ for "
            f"{len(atoms)} atoms; lattice vector lengths {lengths} Å): a lattice vector is "
            "(nearly) zero or two are (nearly) parallel. Give the full lattice vectors in Å, "
            "or mark a vacuum direction non-periodic (pbc) for a slab or molecule."
        )
    i, j, d = neighbor_list("ijd", atoms, MIN_DISTANCE_A)
    if len(d):
        k = int(np.argmin(d))
        frac_like = bool(np.all((atoms.positions > -0.01) & (atoms.positions < 1.01)))
        hint = (
            "all coordinates lie in [0, 1]: fractional coordinates read as Cartesian Å? "
            if frac_like
            else ""
        )
        raise PredictError(
            f"{where}: atoms {int(i[k])} ({atoms[int(i[k])].symbol}) and {int(j[k])} "
            f"({atoms[int(j[k])].symbol}) are {d[k]:.3f} Å apart (< {MIN_DISTANCE_A} Å; "
            f"{len(d) // 2} such pair(s)). {hint}Check the units (Å) and remove duplicate atoms."
        )


def boxed(atoms, vacuum_A: float):
    """A molecule (no periodic axis) or slab/wire (some) made periodic: ``vacuum_A`` of
    vacuum on both sides along each non-periodic axis, so no edge crosses it."""
    if atoms.pbc.all():
        return atoms
    atoms = atoms.copy()
    open_axes = tuple(int(a) for a in np.nonzero(~atoms.pbc)[0])
    atoms.center(vacuum=vacuum_A, axis=open_axes)
    atoms.pbc = True
    return atoms


def valence_electrons(numbers: Sequence[int], pseudo: str = "gth-pbe") -> float:
    """Valence electrons of the structure for a PySCF GTH pseudopotential family."""
    from ase.data import chemical_symbols
    from pyscf.pbc.gto.pseudo import load

    zs, counts = np.unique(np.asarray(numbers), return_counts=True)
    total = 0.0
    for z, c in zip(zs, counts, strict=True):
        try:
            total += c * float(sum(load(pseudo, chemical_symbols[int(z)])[0]))
        except Exception as exc:
            raise PredictError(
                f"pseudopotential {pseudo!r} has no entry for {chemical_symbols[int(z)]} ({exc}); "
                "pass --n-electrons."
            ) from None
    return total


def load_model(path: str | Path):
    """Model from an exported inference checkpoint or a Lightning checkpoint (weights_only)."""
    import torch

    from foundation.model import build_model
    from foundation.train.checkpoint import INFERENCE_FORMAT

    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{path}: no such checkpoint file.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PredictError(
            f"{path}: cannot be loaded with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}). Fix: export an inference checkpoint "
            "(foundation.train.checkpoint.export_inference_checkpoint / the ExportInference "
            "callback) and pass that file."
        ) from None
    if not isinstance(payload, dict):
        raise PredictError(f"{path}: not a foundation checkpoint (no dict inside).")
    if payload.get("format") == INFERENCE_FORMAT:
        meta, state = payload, payload["state_dict"]
    elif "state_dict" in payload and "foundation" in payload:
        meta = payload["foundation"]
        state = {
            k[len("model.") :]: v
            for k, v in payload["state_dict"].items()
            if k.startswith("model.")
        }
    else:
        raise PredictError(
            f"{path}: neither an exported inference checkpoint (format {INFERENCE_FORMAT!r}) "
            "nor a foundation-train Lightning checkpoint (no 'foundation' metadata)."
        )
    model = build_model(meta["model_config"], basis=meta["basis"])
    model.load_state_dict(state)
    return model.eval()


def hamiltonian_head(model, target: str) -> str:
    """The head name of ``--target`` (`TARGET_ALIASES` or a head name); refuses the overlap
    head and names missing in the model with the heads it has."""
    head = TARGET_ALIASES.get(target.lower(), target)
    if head == keys.S or head not in model.heads:
        hint = (
            " Fine-tune one with foundation-train task=finetune_hybrid (see README)."
            if head == keys.H_HSE
            else ""
        )
        raise PredictError(
            f"--target {target}: the model has no Hamiltonian head {head!r} (heads: "
            f"{', '.join(model.heads)}; the overlap head 's' is not a target).{hint}"
        )
    return head


# --------------------------------------------------------------------------- model → blocks
def padded_to_flat(
    padded: np.ndarray, numbers: np.ndarray, edges: np.ndarray, universal: UniversalBasis
) -> np.ndarray:
    """(E, n_uni, n_uni) padded blocks → flat record layout (float64), vectorised by
    species pair (the inverse of the padding in `foundation.data.graph.record_to_graph`)."""
    numbers = np.asarray(numbers)
    zi, zj = numbers[edges[:, 0]], numbers[edges[:, 1]]
    n_orb = np.zeros(int(numbers.max()) + 1, dtype=np.int64)
    for z in np.unique(numbers):
        n_orb[z] = len(universal.orbital_index(int(z)))
    offsets = np.concatenate([[0], np.cumsum(n_orb[zi] * n_orb[zj])])
    out = np.empty(int(offsets[-1]))
    for a, b in np.unique(np.stack([zi, zj], 1), axis=0):
        sel = np.flatnonzero((zi == a) & (zj == b))
        ii, jj = universal.orbital_index(int(a)), universal.orbital_index(int(b))
        blocks = padded[sel][:, ii][:, :, jj].reshape(len(sel), -1)
        out[offsets[sel][:, None] + np.arange(blocks.shape[1])] = blocks
    return out


def predict_record(
    model,
    atoms,
    *,
    key: str = "structure",
    target: str = keys.H,
    overlap: str = "exact",
    edge_chunk: int = EDGE_CHUNK,
    pseudo: str = "gth-pbe",
    n_electrons: float | None = None,
    progress: bool = True,
) -> tuple[HamiltonianRecord, dict]:
    """Predict H(R) (− μS, unknown μ) and S(R) for ``atoms``; returns (record, timings).

    ``target``: the Hamiltonian head (or `TARGET_ALIASES` name) whose blocks become the
    record's ``h``; ``edge_chunk``: edges per inference chunk (bounds the working set; see the module notes).
    """
    from tqdm import tqdm

    from foundation.data.graph import collate_graphs, structure_to_graph

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    head = hamiltonian_head(model, target)
    check_geometry(atoms, key)
    atoms = boxed(atoms, float(model.cutoff_A))
    numbers = atoms.numbers
    unknown = sorted({int(z) for z in numbers} - set(model.basis.atomic_numbers))
    if unknown:
        from ase.data import chemical_symbols

        raise PredictError(
            f"{key}: element(s) {', '.join(chemical_symbols[z] for z in unknown)} unknown to the "
            f"model (it knows {', '.join(model.elements)}). Use a model trained on data with "
            "these elements, or fine-tune this one on a dataset that adds them."
        )
    if overlap == "model" and keys.S not in model.heads:
        raise PredictError(
            f"the model has no overlap head (heads: {list(model.heads)}); rerun with "
            "--overlap exact to compute the exact S(R) of its basis."
        )
    if overlap == "exact":
        from foundation.physics.overlap import can_integrate

        if not can_integrate(model.basis):  # before inference, not after it
            raise PredictError(
                f"the overlap of the model's basis {model.basis.name!r} cannot be computed "
                "exactly here (PySCF does not know its radial functions: data read from "
                "DeePTB/ABACUS folders); rerun with --overlap model to use the model's S head."
            )
    # structure_to_graph builds its edges with neighbor_edges at the model's cutoff.
    graph = structure_to_graph(
        numbers,
        atoms.positions,
        atoms.cell.array,
        atoms.pbc,
        model.universal,
        model.cutoff_A,
        key=key,
    )
    edges = np.concatenate(
        [graph[keys.EDGE_INDEX].T.numpy(), graph[keys.EDGE_SHIFT].numpy()], axis=1
    ).astype(np.int32)
    batch = collate_graphs([graph])
    timings["graph_s"] = time.perf_counter() - t0
    names = [head] + ([keys.S] if overlap == "model" else [])
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    model_s = blocks_s = 0.0
    bar = tqdm(total=len(edges), desc="model blocks", unit="edge", disable=not progress)
    t1 = time.perf_counter()
    for sl, out in model.predict_chunks(batch, edge_chunk, names):
        t2 = time.perf_counter()
        model_s += t2 - t1
        for name in names:
            parts[name].append(
                padded_to_flat(out[name].double().numpy(), numbers, edges[sl], model.universal)
            )
        bar.update(sl.stop - sl.start)
        t1 = time.perf_counter()
        blocks_s += t1 - t2
    bar.close()
    flat = {name: np.concatenate(p) for name, p in parts.items()}
    del parts
    timings["model_s"] = model_s
    t2 = time.perf_counter()
    if overlap == "analytic":
        flat[keys.S] = analytic_overlap(atoms, model.basis, edges)
    elif overlap == "exact":
        flat[keys.S] = table_overlap(model, atoms, edges)
    timings["blocks_s"] = blocks_s + time.perf_counter() - t2
    n_el = valence_electrons(numbers, pseudo) if n_electrons is None else float(n_electrons)
    record = HamiltonianRecord(
        key=key,
        numbers=numbers,
        positions=atoms.positions,
        cell=atoms.cell.array,
        pbc=atoms.pbc,
        basis=model.basis.subset(sorted(set(int(z) for z in numbers))),
        edges=edges,
        h=flat[head],
        s=flat[keys.S],
        meta={
            keys.SOURCE: "foundation-predict",
            "target": head,
            keys.ENERGY_ZERO: 0.0,
            keys.N_ELECTRONS: n_el,
            "energy_zero_note": "model predicts H − μS; the absolute energy zero is unknown",
            "overlap": overlap,
            "edge_cutoff_A": float(model.cutoff_A),
        },
    )
    return record, timings


def predict_eph(
    model,
    record: HamiltonianRecord,
    phonons,
    kpoints_frac: np.ndarray,
    *,
    head: str = keys.H,
    overlap: str = "exact",
    chunk_size: int | None = None,
):
    """(Couplings (g in eV), zero-point displacements (M, N, 3) Å) of the optical Γ modes of
    ``phonons`` (`GammaPhonons` of this cell) for the model's ``head`` on ``record``'s edges
    (a `predict_record` result). ``overlap``: ``exact`` (∂S of the basis' overlap tables),
    ``model`` (∂S from the S head) or ``analytic`` (PySCF finite differences).
    ``chunk_size``: modes per vectorised jvp (memory)."""
    import ase

    from foundation.data.graph import record_to_graph
    from foundation.physics.eph import flat_blocks, mode_couplings, model_hamiltonian_derivative
    from foundation.physics.kspace import BlochHamiltonian

    patterns = phonons.zero_point_patterns()
    if len(patterns) == 0:
        raise PredictError(
            f"{phonons.source}: no optical Γ mode above 0.5 THz (frequencies "
            f"{np.round(phonons.frequencies_THz, 3).tolist()} THz); nothing couples at q = 0."
        )
    graph = record_to_graph(record, model.universal, targets=())
    heads = [head] + ([keys.S] if overlap == "model" else [])
    derivative = model_hamiltonian_derivative(model, graph, patterns, heads, chunk_size)
    flat = {
        name: flat_blocks(d, record.numbers, record.edges, model.universal)
        for name, d in derivative.items()
    }
    if overlap == "analytic":
        from foundation.data.dft.pyscf import overlap_derivatives

        atoms = ase.Atoms(
            numbers=record.numbers, positions=record.positions, cell=record.cell, pbc=True
        )
        flat[keys.S] = overlap_derivatives(atoms, record.edges, patterns, basis=model.basis.name)
    elif overlap == "exact":
        from foundation.physics.overlap import exact_overlap_derivative

        flat[keys.S] = exact_overlap_derivative(
            _tables(model, record.edge_vectors()), record.numbers, record.positions,
            record.cell, record.edges, patterns,
        )  # fmt: skip
    bloch = BlochHamiltonian.from_record(record)
    return mode_couplings(bloch, flat[head], flat[keys.S], kpoints_frac), patterns


def write_eph(args: argparse.Namespace, model, atoms, record: HamiltonianRecord, out: Path) -> dict:
    """``--eph``: g of the Γ optical modes at ``--eph-k`` → out/eph.npz + eph.json; returns the
    summary (module notes)."""
    from foundation.physics.phonons import PhononError, load_gamma_phonons

    if not atoms.pbc.all():
        raise PredictError(f"{args.structure}: --eph needs a 3-D periodic crystal.")
    try:
        phonons = load_gamma_phonons(args.eph, structure=atoms)
    except PhononError as exc:
        raise PredictError(str(exc)) from None
    kpoints = np.array(args.eph_k or [[0.0, 0.0, 0.0]], dtype=np.float64)
    t0 = time.perf_counter()
    couplings, patterns = predict_eph(
        model, record, phonons, kpoints, head=record.meta["target"], overlap=args.overlap
    )
    modes = phonons.optical_modes
    g_meV = 1e3 * couplings.g_eV
    abs_meV = 1e3 * couplings.degenerate_abs()
    np.savez(
        out / "eph.npz",
        g_meV=g_meV,
        abs_g_meV=abs_meV,
        eigenvalues_eV=couplings.eigenvalues_eV,
        kpoints_frac=kpoints,
        modes=modes,
        frequencies_THz=phonons.frequencies_THz[modes],
        displacements_A=patterns,
    )
    summary = {
        "phonons": str(args.eph),
        "target": record.meta["target"],
        "modes": modes.tolist(),
        "frequencies_THz": phonons.frequencies_THz[modes].tolist(),
        "kpoints_frac": kpoints.tolist(),
        "max_abs_g_meV": float(abs_meV.max()),
        "file": str(out / "eph.npz"),
        "arrays": {
            "g_meV": "complex (K, M, B, B): g_mn(k, q=0) of mode M, bands m, n; meV",
            "abs_g_meV": "(K, M, B, B) |g| averaged over degenerate states; meV",
            "eigenvalues_eV": "(K, B) band energies at k, model energy zero; eV",
            "kpoints_frac": "(K, 3) fractional k", "modes": "(M,) phonon mode indices",
            "frequencies_THz": "(M,)", "displacements_A": "(M, N, 3) zero-point u; Å",
        },
        "energy_zero_note": "diagonal g_nn include the unknown dμ/du of the model's energy zero",
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    (out / "eph.json").write_text(json.dumps(summary, indent=1))
    return summary


def _tables(model, vectors: np.ndarray):
    """The model basis' overlap tables, long enough for ``vectors`` (E, 3) Å."""
    from foundation.physics.overlap import OverlapTables

    reach = float(np.linalg.norm(vectors, axis=1).max(initial=0.0))
    return OverlapTables(model.basis, r_max_A=max(reach, float(model.cutoff_A)))


def table_overlap(model, atoms, edges: np.ndarray) -> np.ndarray:
    """Exact S(R) blocks (flat record layout) from the basis' two-center tables: O(N)."""
    from foundation.physics.overlap import OverlapError, edge_displacements, exact_overlap

    positions, cell = atoms.positions, atoms.cell.array
    tables = _tables(model, edge_displacements(positions, cell, edges))
    try:
        return exact_overlap(tables, atoms.numbers, positions, cell, edges)
    except OverlapError as exc:
        raise PredictError(str(exc)) from None


def analytic_overlap(
    atoms, basis: BasisSet, edges: np.ndarray, max_orbitals: int = 6000
) -> np.ndarray:
    """Exact S(R) blocks (flat record layout) from PySCF one-electron integrals."""
    from foundation.data.dft.pyscf import _ao_to_package, _exact_overlap, build_cell

    n_orb = basis.n_orb_array(atoms.numbers)
    if n_orb.sum() > max_orbitals:
        raise PredictError(
            f"--overlap analytic computes S per lattice translation densely ({n_orb.sum()} "
            f"orbitals > {max_orbitals}); use --overlap exact (the basis' tables, O(N))."
        )
    cell = build_cell(atoms, basis=basis.name)
    shifts, inverse = np.unique(edges[:, 2:5], axis=0, return_inverse=True)
    s_r = _exact_overlap(cell, shifts.astype(float))
    u = _ao_to_package(cell, basis, atoms.get_chemical_symbols())
    off = np.concatenate([[0], np.cumsum(n_orb)])
    blocks = [
        u[i] @ s_r[r, off[i] : off[i + 1], off[j] : off[j + 1]] @ u[j].T
        for (i, j), r in zip(edges[:, :2].tolist(), inverse.reshape(-1).tolist(), strict=True)
    ]
    return np.concatenate([b.reshape(-1) for b in blocks])


# --------------------------------------------------------------------------- reference
def read_reference(path: str | Path, target: str = keys.H) -> HamiltonianRecord:
    """A DFT reference for --compare: a DeepH folder or a saved record directory (with
    ``target`` as its H where the record holds it as an extra, e.g. ``h_hse``)."""
    from foundation.data.formats.deeph import is_deeph_folder, read_deeph

    path = Path(path)
    if (path / "structure.json").is_file():
        record = HamiltonianRecord.load(path)
        return record.with_target(target) if target in record.extras else record
    if is_deeph_folder(path):
        return read_deeph(path)
    raise PredictError(
        f"{path}: not a DeepH folder (element.dat, hamiltonians.h5, overlaps.h5) nor a saved "
        "record (structure.json + npy); give the DFT folder of the same structure."
    )


def _same_structure(a: HamiltonianRecord, b: HamiltonianRecord, where: str) -> None:
    if a.n_atoms != b.n_atoms or not np.array_equal(a.numbers, b.numbers):
        raise PredictError(f"{where}: the reference holds a different structure (atoms/elements).")
    # Same crystal up to a rotation: same cell metric and fractional positions (mod 1).
    # Bands at fractional k are frame-independent, so a rotated copy (e.g. via CIF) is fine.
    metric = np.abs(a.cell @ a.cell.T - b.cell @ b.cell.T).max()
    fa = np.linalg.solve(a.cell.T, a.positions.T).T
    fb = np.linalg.solve(b.cell.T, b.positions.T).T
    dfrac = np.abs((fa - fb + 0.5) % 1.0 - 0.5).max()
    if metric > 1e-3 or dfrac > 1e-4:
        raise PredictError(
            f"{where}: the reference lattice (metric off by {metric:.2g} Å²) or fractional "
            f"positions (off by {dfrac:.2g}) differ from the input; compare against the DFT data "
            "of exactly this structure, same cell and atom order."
        )


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="foundation-predict",
        description="Predict DFT Hamiltonians H(R), S(R) with a foundation model; write a DeepH "
        "folder, band structure and DOS (PNG + JSON), and print the gap and Fermi level.",
    )
    p.add_argument("checkpoint", help="exported inference checkpoint or Lightning .ckpt")
    p.add_argument("structure", help="any ASE-readable structure file (CIF, POSCAR, xyz, …)")
    p.add_argument(
        "-o", "--out", default="predict_out", help="output folder (default: %(default)s)"
    )
    p.add_argument("--format", default=None, help="ASE format name when not guessable")
    p.add_argument(
        "--target",
        default=keys.H,
        help="Hamiltonian head: h (default, the pretraining functional), hse (= h_hse, "
        "added by task=finetune_hybrid) or another head name of the checkpoint",
    )
    p.add_argument(
        "--overlap",
        choices=["exact", "model", "analytic"],
        default="exact",
        help="S(R) from the basis' two-center tables (exact, default), the model's S head, or "
        "PySCF's cell integrals (analytic: dense, small cells)",
    )
    p.add_argument("--compare", default=None, help="DFT folder (DeepH or saved record) to compare")
    p.add_argument("--pseudo", default="gth-pbe", help="GTH family for the electron count")
    p.add_argument("--n-electrons", type=float, default=None)
    p.add_argument("--smearing", type=float, default=0.1, help="DOS/metal smearing, eV")
    p.add_argument("--kspacing", type=float, default=0.2, help="DOS mesh spacing, 1/Å (2π incl.)")
    p.add_argument("--path-spacing", type=float, default=0.025, help="band path step, 1/Å")
    p.add_argument("--dense-max-orbitals", type=int, default=3000)
    p.add_argument(
        "--supercell",
        type=int,
        nargs=3,
        default=None,
        metavar=("A", "B", "C"),
        help="repeat the input cell A×B×C times before predicting (large cells from a small input)",
    )
    p.add_argument("--n-eigs", type=int, default=20, help="large cells: eigenpairs near E_F")
    p.add_argument(
        "--eig-solver",
        choices=EIG_SOLVERS,
        default="auto",
        help="large cells: interior eigensolver (auto: SuperLU below 6000 orbitals, PARDISO "
        "above when installed, MINRES beyond 6·10⁴ orbitals; see scripts/bench_physics.py)",
    )
    p.add_argument(
        "--fermi",
        choices=["kpm", "bisection"],
        default="kpm",
        help="large cells: DOS and E_F by the kernel polynomial method (linear in N, default) "
        "or E_F by inertia bisection (one sparse LU per step, exact at Γ, no DOS)",
    )
    p.add_argument(
        "--kpm-resolution", type=float, default=0.1, help="KPM DOS resolution, eV (sets moments)"
    )
    p.add_argument("--kpm-vectors", type=int, default=4, help="KPM random vectors")
    p.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="large cells: energy (eV, model zero) to find eigenpairs near, instead of E_F",
    )
    p.add_argument(
        "--edge-chunk",
        type=int,
        default=EDGE_CHUNK,
        help="edges per inference chunk: bounds the working memory (default: %(default)s)",
    )
    p.add_argument(
        "--eph",
        default=None,
        metavar="PHONONS",
        help="electron–phonon couplings of the Γ optical modes: phonopy params YAML with force "
        "constants, or a FORCE_CONSTANTS file of this cell; writes eph.npz (g in meV)",
    )
    p.add_argument(
        "--eph-k",
        type=float,
        nargs=3,
        action="append",
        metavar=("K1", "K2", "K3"),
        help="fractional electron k-point for --eph (repeat for several; default Γ)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except PredictError as exc:
        print(f"foundation-predict: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from foundation.data.formats.deeph import write_deeph
    from foundation.physics import bands as B
    from foundation.physics.kspace import BlochHamiltonian, OverlapError
    from foundation.physics.large_cell import large_cell_spectrum, write_kpm_dos

    progress = not args.no_progress
    atoms = read_structure(args.structure, args.format)
    if args.supercell:
        atoms = atoms.repeat(tuple(args.supercell))
    check_geometry(atoms, str(args.structure))  # names the file before the model loads
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model(args.checkpoint)
    key = Path(args.structure).stem
    record, timings = predict_record(
        model,
        atoms,
        key=key,
        target=args.target,
        overlap=args.overlap,
        edge_chunk=args.edge_chunk,
        pseudo=args.pseudo,
        n_electrons=args.n_electrons,
        progress=progress,
    )
    timings["load_and_predict_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_deeph(record, out / "deeph")
    eph = write_eph(args, model, atoms, record, out) if args.eph else None
    ham = BlochHamiltonian.from_record(record)
    summary: dict = {
        "structure": str(args.structure),
        "checkpoint": str(args.checkpoint),
        "target": record.meta["target"],
        "n_atoms": record.n_atoms,
        "n_edges": record.n_edges,
        "n_orbitals": ham.n_orb,
        "n_electrons": ham.n_electrons,
        "deeph_folder": str(out / "deeph"),
        "timings_s": timings,
    }
    t1 = time.perf_counter()
    try:
        if ham.n_orb <= args.dense_max_orbitals:
            es = B.electronic_structure(
                ham,
                path=B.kpath(ham.atoms, reference_distance=args.path_spacing),
                mesh_spacing=args.kspacing,
                smearing_eV=args.smearing,
                progress=progress,
            )
            ref = None
            if args.compare:
                ref_rec = read_reference(args.compare, record.meta["target"])
                _same_structure(record, ref_rec, str(args.compare))
                ref_ham = BlochHamiltonian.from_record(ref_rec)
                ref_ham.n_electrons = ref_ham.n_electrons or ham.n_electrons
                ref = B.electronic_structure(
                    ref_ham,
                    path=es.path,
                    mesh=es.mesh,
                    smearing_eV=args.smearing,
                    progress=progress,
                )
                summary["compare"] = {
                    "reference": str(args.compare),
                    "band_errors": B.band_errors(
                        es.bands, ref.bands, es.fermi.fermi_level_eV, ref.fermi.fermi_level_eV
                    ),
                    "reference_gap_eV": ref.fermi.gap_eV,
                    "gap_error_meV": 1e3 * (es.fermi.gap_eV - ref.fermi.gap_eV),
                }
                ref.write_json(out / "bands_reference.json")
            es.write_json(out / "bands.json")
            B.plot_bands(es, out / "bands.png", reference=ref)
            B.plot_dos(es, out / "dos.png", reference=ref)
            summary["fermi"] = es.fermi.to_dict()
            summary["kpath"] = es.path.note
        else:
            info, kpm_result = large_cell_spectrum(
                ham,
                n_eigs=args.n_eigs,
                eig_solver=args.eig_solver,
                fermi=args.fermi,
                sigma=args.sigma,
                kpm_resolution_eV=args.kpm_resolution,
                kpm_vectors=args.kpm_vectors,
                progress=progress,
            )
            if kpm_result is not None:
                write_kpm_dos(kpm_result, info["fermi"], out, title=f"{key}: KPM DOS (Γ)")
            summary["fermi"] = info.pop("fermi") | {"note": "large cell: Γ point only"}
            summary["large_cell"] = info
            if args.compare:
                summary["compare"] = "skipped: cell above --dense-max-orbitals"
    except ImportError as exc:  # an optional eigensolver that is not installed
        raise PredictError(str(exc)) from None
    except OverlapError as exc:
        hint = " (predicted S; try --overlap exact)" if args.overlap == "model" else ""
        raise PredictError(f"{exc}{hint}") from None
    timings["physics_s"] = time.perf_counter() - t1
    if eph is not None:
        summary["eph"] = eph
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    f = summary["fermi"]
    print(
        f"{key} ({record.meta['target']}): {record.n_atoms} atoms, {record.n_edges} edges, "
        f"{ham.n_orb} orbitals; "
        f"E_F = {f['fermi_level_eV']:.4f} eV, gap = {f.get('gap_eV', 0.0):.4f} eV "
        f"({f.get('convention', '')}); energies relative to the model's energy zero"
    )
    if "large_cell" in summary:
        lc = summary["large_cell"]
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in lc["timings_s"].items())
        print(f"large cell (Γ): {steps}; peak memory {max(lc['peak_rss_GB'].values()):.2f} GB")
    if isinstance(summary.get("compare"), dict):
        c = summary["compare"]["band_errors"]
        print(
            f"vs {args.compare}: band MAE {c['all_mae_meV']:.1f} meV (max {c['all_max_meV']:.1f}), "
            f"within ±{c['window_eV']:g} eV of E_F {c.get('window_mae_meV', float('nan')):.1f} meV; "
            f"gap error {summary['compare']['gap_error_meV']:.1f} meV"
        )
    if eph is not None:
        print(
            f"e-ph: {len(eph['modes'])} Γ modes ({', '.join(f'{f:.2f}' for f in eph['frequencies_THz'])} "
            f"THz) at {len(eph['kpoints_frac'])} k-point(s); max |g| {eph['max_abs_g_meV']:.1f} meV "
            f"→ {eph['file']}"
        )
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    print(f"wrote {out}/: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
