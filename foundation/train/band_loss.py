"""Band-space loss: eigenvalues of the predicted H(k) against the DFT ones near E_F.

Why: block errors of a few meV add up coherently over the ~150 neighbours inside 9 Å, so
bands near the Fermi level can be off by hundreds of meV while the block MAE looks small;
the block loss never looks at bands. This term does.

Per structure of a training batch and per step:

1. ``kpoints`` random fractional k-points, drawn from a generator seeded by (``seed``, the
   global step, a fingerprint of the structure: atom count, edge count, Σ Z·(index+1)). The
   draw depends on the structure and the step only, not on the rank or the batch it landed
   in, so a data-parallel step equals one process holding the union batch, and a resumed
   run draws the same k-points.
2. Dense H(k) of the prediction and of the DFT target (both H − μS, the stored energy zero)
   and the DFT S(k), real orbitals only (`kspace.bloch_matrices`; padding rows of smaller
   structures carry ``PAD_EV`` on the H diagonal and 1 on the S diagonal, so their
   eigenvalues sort above every real band and are never selected); all in float64
   whatever the autocast dtype.
3. ε = eigvalsh(L⁻¹ H L⁻†) with S = L L† (`kspace.generalized_eigvalsh`; one Cholesky per
   S(k) for both Hamiltonians). The loss uses eigenvalues only, whose gradient stays finite
   at degeneracies.
4. Reference Fermi level from the electron count at the drawn k-points: with n_occ =
   n_electrons/2, E_F = ½(max_k ε_ref[⌈n_occ⌉−1] + min_k ε_ref[⌊n_occ⌋]): the midgap of the
   sampled k-points for an insulator (VBM/CBM mean), the middle of the partly filled band for
   an odd count. For a metal it is a rough estimate, which the wide window tolerates.
5. Selected: entries (k, n) whose *reference* eigenvalue lies within ±``window_eV`` of that
   E_F (a fixed index set per step, the same band indices of prediction and reference; a
   degenerate reference multiplet is in or out as a whole). Error d = ε_pred − ε_ref; with
   ``align="mean"`` (default) each structure's mean d over its selection is subtracted
   first, so a uniform shift of the predicted bands costs nothing here (the block loss
   already pins the absolute level; band metrics measure each spectrum from its own Fermi
   level) and the term spends itself on dispersion and gaps; ``align="none"`` compares
   both spectra on the stored energy zero (H − μS). Loss: Σ d² in eV² over the selection,
   with its count; the module divides by the global count like every other term (a sum
   over structures, so data-parallel exactness holds).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from foundation import keys
from foundation.physics.kspace import bloch_matrices, generalized_eigvalsh
from foundation.train.config import ConfigError, suggest

BANDS = "bands"
"""Name of the band term among the loss terms (logged as ``train/loss_bands``, eV²)."""

ALIGNMENTS = ("mean", "none")
"""How predicted and reference spectra are aligned before the squared error (module notes)."""

PAD_EV = 1.0e4
"""Diagonal of the padding orbitals of H(k) (eV): far above any valence band."""


@dataclass(frozen=True)
class BandLossConfig:
    """``task.band_loss``: the band-space term and its knobs.

    Attributes:
        weight: loss weight (0: off, nothing is computed).
        kpoints: random fractional k-points per structure and step.
        window_eV: half-width of the energy window around the reference Fermi level (eV).
        target: Hamiltonian target whose bands are compared (``h``; ``h_hse`` to fine-tune).
        seed: seed of the k-point draws.
        align: ``mean`` (per-structure mean error removed: shift-invariant) or ``none``.
    """

    weight: float = 0.0
    kpoints: int = 2
    window_eV: float = 3.0
    target: str = keys.H
    seed: int = 0
    align: str = "mean"

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"task.band_loss.weight must be ≥ 0, got {self.weight}.")
        if self.kpoints < 1:
            raise ConfigError(f"task.band_loss.kpoints must be ≥ 1, got {self.kpoints}.")
        if self.window_eV <= 0:
            raise ConfigError(f"task.band_loss.window_eV must be positive, got {self.window_eV}.")
        if self.align not in ALIGNMENTS:
            raise ConfigError(
                f"task.band_loss.align={self.align!r}; choose one of {', '.join(ALIGNMENTS)}."
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> BandLossConfig:
        """From the ``task.band_loss`` mapping (None: off); unknown keys are errors."""
        config = dict(config or {})
        known = [f.name for f in fields(cls)]
        for key in config:
            if key not in known:
                raise ConfigError(f"task.band_loss.{key} is not a setting; {suggest(key, known)}")
        return cls(**config)

    @property
    def enabled(self) -> bool:
        return self.weight > 0


def sample_kpoints(batch: Mapping[str, torch.Tensor], n: int, seed: int, step: int) -> torch.Tensor:
    """(B, n, 3) float64 fractional k-points in [0, 1)³ per structure of ``batch``, a function
    of (``seed``, ``step``, the structure's fingerprint) only (module notes). Components along
    non-periodic axes are harmless: edges never cross them (R = 0 there)."""
    n_atoms = batch[keys.N_ATOMS].tolist()
    n_edges = batch[keys.N_EDGES].tolist()
    numbers = batch[keys.NUMBERS].cpu()
    starts = np.cumsum([0, *n_atoms])
    kpts = np.empty((len(n_atoms), n, 3))
    for b, (na, ne) in enumerate(zip(n_atoms, n_edges, strict=True)):
        z = numbers[starts[b] : starts[b + 1]]
        fingerprint = int((z * torch.arange(1, na + 1)).sum())
        rng = np.random.default_rng([seed, step, na, ne, fingerprint])
        kpts[b] = rng.random((n, 3))
    return torch.as_tensor(kpts, device=batch[keys.N_ATOMS].device)


def reference_fermi_level(
    eigenvalues: torch.Tensor, n_orb: torch.Tensor, n_electrons: torch.Tensor
) -> torch.Tensor:
    """(B,) reference Fermi level (eV) from (B, nk, n_max) ascending eigenvalues at the drawn
    k-points: ½(max_k ε[⌈n_occ⌉−1] + min_k ε[⌊n_occ⌋]), n_occ = n_electrons / 2 (module notes);
    band indices clamped to each structure's real bands."""
    n_occ = n_electrons.to(torch.float64) / 2.0
    top = n_orb - 1
    below = torch.minimum((torch.ceil(n_occ).long() - 1).clamp_min(0), top)
    above = torch.minimum(torch.floor(n_occ).long(), top)
    nk = eigenvalues.shape[1]
    take = lambda idx: eigenvalues.gather(2, idx[:, None, None].expand(-1, nk, 1))[..., 0]  # noqa: E731
    return 0.5 * (take(below).amax(1) + take(above).amin(1))


@dataclass
class BandTerm:
    """One batch's band term: Σ (ε_pred − ε_ref)² (eV²) over ``count`` selected eigenvalues,
    and the eigenvalues themselves (B, nk, n_max; for diagnostics and tests)."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    abs_error_sum: torch.Tensor
    pred: torch.Tensor
    ref: torch.Tensor
    selected: torch.Tensor
    fermi_level: torch.Tensor


def band_term(
    pred_h: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    orbital_table: torch.Tensor,
    kpts: torch.Tensor,
    window_eV: float,
    target: str = keys.H,
    align: str = "mean",
) -> BandTerm:
    """The band term of one batch (module notes) at the given k-points (B, nk, 3).

    ``pred_h``: predicted (E, n_uni, n_uni) blocks of ``target``; ``orbital_table``:
    (max_Z, n_uni) bool element masks (`UniversalBasis.mask_table`). The batch needs
    ``target``, ``keys.S`` and ``keys.N_ELECTRONS``; structures whose presence flag of the
    target is False (``keys.present(target)``) select nothing. ``align``: `ALIGNMENTS`.
    """
    if align not in ALIGNMENTS:
        raise ValueError(f"align={align!r}; choose one of {', '.join(ALIGNMENTS)}.")
    for name in (target, keys.S, keys.N_ELECTRONS):
        if name not in batch:
            raise KeyError(
                f"The band loss needs batch[{name!r}] (targets must include {target!r} and "
                f"{keys.S!r}; records need meta[{keys.N_ELECTRONS!r}])."
            )
    n_electrons = batch[keys.N_ELECTRONS].to(torch.float64)
    if not bool(torch.isfinite(n_electrons).all()):
        missing = torch.nonzero(~torch.isfinite(n_electrons))[:, 0].tolist()
        raise ValueError(
            f"The band loss needs the electron count of every structure; structures {missing} "
            f"of the batch have none (record meta[{keys.N_ELECTRONS!r}]). Set task.band_loss."
            "weight=0 for this dataset or add the valence electron counts to its records."
        )
    orbitals = orbital_table.to(pred_h.device)[batch[keys.NUMBERS]]
    common = (batch[keys.EDGE_INDEX], batch[keys.EDGE_SHIFT], orbitals, batch[keys.BATCH], kpts)
    with torch.autocast(pred_h.device.type, enabled=False):  # float64 whatever the precision
        h_pred, n_orb = bloch_matrices(pred_h, *common, pad_diagonal=PAD_EV)
        with torch.no_grad():
            h_ref, _ = bloch_matrices(batch[target], *common, pad_diagonal=PAD_EV)
            s, _ = bloch_matrices(batch[keys.S], *common, pad_diagonal=1.0)
        eigs = generalized_eigvalsh(torch.stack([h_pred, h_ref]), s, kpts)
    pred, ref = eigs[0], eigs[1].detach()
    fermi = reference_fermi_level(ref, n_orb, n_electrons)
    n_max = ref.shape[-1]
    real_band = torch.arange(n_max, device=ref.device)[None, None, :] < n_orb[:, None, None]
    selected = real_band & ((ref - fermi[:, None, None]).abs() <= window_eV)
    flags = batch.get(keys.present(target))
    if flags is not None:
        has = torch.zeros(len(n_orb), dtype=torch.bool, device=flags.device)
        has[batch[keys.EDGE_BATCH][flags]] = True
        selected = selected & has[:, None, None]
    diff = torch.where(selected, pred - ref, torch.zeros_like(pred))
    if align == "mean":
        per_structure = selected.sum((1, 2)).clamp_min(1)
        shift = diff.sum((1, 2)) / per_structure
        diff = torch.where(selected, diff - shift[:, None, None], torch.zeros_like(diff))
    return BandTerm(
        loss_sum=diff.square().sum(),
        count=selected.sum().to(torch.float64),
        abs_error_sum=diff.detach().abs().sum(),
        pred=pred,
        ref=ref,
        selected=selected,
        fermi_level=fermi,
    )
