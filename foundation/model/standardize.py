"""Per-species standardization of block targets (DESIGN.md §5): heads predict standardized
values, the model speaks the target's units (eV for H, 1 for S) outside.

For a target T (``h``, ``s``) and an edge between atoms of elements Zi, Zj, the block of
universal shells (a, b) is

    on-site  (i, i, 0):  T_ab = c_ab(Zi) · I  +  σ_on(Zi, a, b) · Y_ab
    off-site (others):   T_ab = σ_off(Zi, a, Zj, b; r) · Y_ab,
                         log σ_off = f(Zi, a) + f(Zj, b) − (κ(Zi, a) + κ(Zj, b)) r − q r²

where Y is the head's standardized (order-one) output and

* ``c_ab(Z)`` (target units) is the on-site reference: the mean over the training atoms of
  element Z of the invariant, l = 0 part trace(T_ab)/(2l+1) of each on-site block between two
  shells of the same l (a = b: the shell's mean level; a ≠ b: e.g. the overlap of two s
  shells); c·I rotates into itself, so the reference is exactly equivariant. Blocks between
  shells of different l have no invariant part and no reference.
* ``σ_on(Z, a, b)`` is the RMS of the on-site residual T_ab − c_ab·I over the training atoms of
  element Z (symmetric in a, b).
* ``f(Z, a)`` are per-element, per-shell log factors and ``κ(Z, a)`` (1/Å) per-element,
  per-shell decay rates, with one global curvature ``q`` (1/Å²), fitted jointly by weighted
  least squares to log RMS of the off-site blocks of every (Zi, a, Zj, b) group seen in
  training in bins of the edge length r (Å; weight: √ of the bin's block count). Hamiltonian
  blocks fall by ~10³ between 2.5 and 8.5 Å: a scale without r would leave the head's
  order-one noise at the size of the nearest-neighbour blocks on the many long edges, whose
  coherent sum dominates band errors. The product form is symmetric under (Zi, a) ↔ (Zj, b), so the
  symmetrised (hermitian) output stays exactly hermitian, and it is defined for every pair of
  elements of the basis — also for a pair that never occurs in training (the held-out
  composition InAs of pbe_mini has In–As bonds that train never shows), which gets the
  product of the factors the two elements earned in their other compounds.

Scales are per shell-pair scalars and the reference is c·I, so standardization commutes with
rotations and inversion exactly. RMS values below ``FLOOR_RATIO`` × the target's overall RMS
are raised to it (the on-site overlap of a fixed basis is a per-element constant: its
residual is rounding noise, and its scale becomes that floor — the head can then barely move
it away from the exact reference).

An element of the basis absent from the fitted data (a zero-shot element; DESIGN.md §4 keeps
them out of pretraining) gets, per universal shell, the mean log factor and the mean
reference of the fitted elements that have that shell, and as on-site scale the geometric
mean of theirs — finite, never NaN. `TargetStatistics` holds the result as persistent
buffers of its head (state_dict, Lightning checkpoint, exported ``model.pt``, fine-tuning);
a head that was never fitted (unit tests, synthetic data) has identity statistics (c = 0,
σ = 1), and a state_dict from before standardization loads as identity.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from ase.data import chemical_symbols
from torch import nn

from foundation import keys
from foundation.basis import L_LETTERS, UniversalBasis

FLOOR_RATIO = 1e-4
"""RMS floor of a (element, shell pair) group relative to the target's overall RMS."""
MAX_STRUCTURES = 2000
"""Default cap on the training structures streamed for the fit (foundation-train)."""
_STAT_BUFFERS = (
    "onsite_reference",
    "onsite_scale",
    "offsite_log_factor",
    "offsite_log_decay",
    "offsite_log_curvature",
    "n_structures",
)
_LENGTH_BUFFERS = ("offsite_log_decay", "offsite_log_curvature")
BIN_A = 0.5
"""Width (Å) of the edge-length bins of the off-site fit."""
MAX_BINS = 40
"""Bins of the off-site fit (longer edges share the last one)."""


def _shell_layout(universal: UniversalBasis) -> tuple[np.ndarray, np.ndarray]:
    """(shell of each universal orbital (n_uni,), same-l-same-m pattern (n_uni, n_uni))."""
    shells = np.asarray(universal.shells)
    shell_of = np.repeat(np.arange(len(shells)), 2 * shells + 1)
    m_of = np.concatenate([np.arange(2 * l + 1) for l in shells])
    l_of = shells[shell_of]
    eye = (l_of[:, None] == l_of[None, :]) & (m_of[:, None] == m_of[None, :])
    return shell_of, eye


class TargetStatistics(nn.Module):
    """Per-species reference and scales of one target (module notes), applied by its head.

    Persistent buffers (rows: the basis's elements by increasing Z, ``elements``):
    ``onsite_reference`` (n_el, n_shell, n_shell), target units, c_ab(Z) (zero unless shells
    a, b have the same l); ``onsite_scale`` (n_el, n_shell, n_shell) σ_on, target units;
    ``offsite_log_factor`` (n_el, n_shell) f(Z, a), log of target units / 2;
    ``offsite_log_decay`` (n_el, n_shell) κ(Z, a), 1/Å; ``offsite_log_curvature`` () q, 1/Å²;
    ``n_structures`` () training structures they were fitted on (0: identity statistics).
    """

    def __init__(self, universal: UniversalBasis):
        super().__init__()
        self.universal = universal
        self.elements = sorted(universal.basis.atomic_numbers)
        n_el, n_shell = len(self.elements), len(universal.shells)
        self.register_buffer("onsite_reference", torch.zeros(n_el, n_shell, n_shell))
        self.register_buffer("onsite_scale", torch.ones(n_el, n_shell, n_shell))
        self.register_buffer("offsite_log_factor", torch.zeros(n_el, n_shell))
        self.register_buffer("offsite_log_decay", torch.zeros(n_el, n_shell))
        self.register_buffer("offsite_log_curvature", torch.zeros((), dtype=torch.float64))
        self.register_buffer("n_structures", torch.zeros((), dtype=torch.long))
        row = torch.full((len(chemical_symbols),), -1, dtype=torch.long)
        row[self.elements] = torch.arange(n_el)
        shell_of, eye = _shell_layout(universal)
        self.register_buffer("row_of_z", row, persistent=False)
        self.register_buffer("shell_of_orbital", torch.as_tensor(shell_of), persistent=False)
        self.register_buffer("orbital_eye", torch.as_tensor(eye), persistent=False)

    @property
    def fitted(self) -> bool:
        return int(self.n_structures) > 0

    # ------------------------------------------------------------------ apply
    def _orbital(self, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(n_el, n_shell, n_shell) shell-pair table → (n_el, n_uni, n_uni) orbital table."""
        s = self.shell_of_orbital
        return table.to(dtype)[:, s][:, :, s]

    def scales(
        self,
        numbers_i: torch.Tensor,
        numbers_j: torch.Tensor,
        onsite: torch.Tensor,
        lengths: torch.Tensor,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """(E, n_uni, n_uni) scale of every entry (target units): σ_on on on-site edges,
        σ_off(r) elsewhere, for edges with atomic numbers ``numbers_i``, ``numbers_j`` (E,),
        on-site flags ``onsite`` (E,) and lengths (E,) in Å (on-site rows unused). Exactly
        symmetric under swapping the two sides (an edge and its reverse)."""
        rows_i, rows_j = self.row_of_z[numbers_i], self.row_of_z[numbers_j]
        shell = self.shell_of_orbital
        r = lengths.to(dtype)[:, None]
        curvature = 0.5 * self.offsite_log_curvature.to(dtype) * r * r
        # per side: f − κ r − q r²/2, so the product carries the whole − q r²
        log_f, log_k = self.offsite_log_factor.to(dtype), self.offsite_log_decay.to(dtype)
        side_i = torch.exp(log_f[rows_i][:, shell] - log_k[rows_i][:, shell] * r - curvature)
        side_j = torch.exp(log_f[rows_j][:, shell] - log_k[rows_j][:, shell] * r - curvature)
        # one product per entry, F_i,a · F_j,b = F_j,b · F_i,a: exactly symmetric (hermitian)
        offsite = side_i[:, :, None] * side_j[:, None, :]
        onsite_scale = self._orbital(self.onsite_scale, dtype)[rows_i]
        return torch.where(onsite[:, None, None], onsite_scale, offsite)

    def forward(
        self,
        standardized: torch.Tensor,
        numbers_i: torch.Tensor,
        numbers_j: torch.Tensor,
        onsite: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Blocks in target units from standardized blocks (E, n_uni, n_uni): `scales` times
        the blocks, plus the on-site reference c·I on on-site edges."""
        dtype = standardized.dtype
        out = standardized * self.scales(numbers_i, numbers_j, onsite, lengths, dtype)
        reference = self._orbital(self.onsite_reference, dtype) * self.orbital_eye
        rows = self.row_of_z[numbers_i]
        return out + torch.where(onsite[:, None, None], reference[rows], torch.zeros_like(out))

    # ------------------------------------------------------------------ set / copy
    @torch.no_grad()
    def set_(
        self,
        onsite_reference: np.ndarray | torch.Tensor,
        onsite_scale: np.ndarray | torch.Tensor,
        offsite_log_factor: np.ndarray | torch.Tensor,
        n_structures: int,
        offsite_log_decay: np.ndarray | torch.Tensor | None = None,
        offsite_log_curvature: float = 0.0,
    ) -> None:
        """Load fitted statistics (shapes of the buffers; rows by increasing Z; no decay when
        ``offsite_log_decay`` is None). The on-site tables must be symmetric in the two shells
        (to 1e-6 relative); they are stored exactly symmetric, so the output stays exactly
        hermitian."""
        if offsite_log_decay is None:
            offsite_log_decay = torch.zeros_like(self.offsite_log_decay)
        values = (
            onsite_reference,
            onsite_scale,
            offsite_log_factor,
            offsite_log_decay,
            offsite_log_curvature,
        )
        for name, value in zip(_STAT_BUFFERS, values, strict=False):
            buffer = getattr(self, name)
            value = torch.as_tensor(np.asarray(value), dtype=torch.float64)
            if value.shape != buffer.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {buffer.shape}.")
            if not torch.isfinite(value).all() or (name == "onsite_scale" and (value <= 0).any()):
                raise ValueError(f"{name}: statistics must be finite (scales positive).")
            if value.ndim == 3:
                asymmetry = (value - value.transpose(1, 2)).abs().max()
                if asymmetry > 1e-6 * max(1.0, float(value.abs().max())):
                    raise ValueError(f"{name}: not symmetric in the two shells ({asymmetry:.3g}).")
                value = 0.5 * (value + value.transpose(1, 2))
            buffer.copy_(value.to(buffer.dtype))
        self.n_structures.fill_(int(n_structures))

    @torch.no_grad()
    def inherit_scales_(self, other: TargetStatistics) -> None:
        """Take ``other``'s scales with a zero reference: a ΔH head added to a base head
        predicts corrections of the base's magnitude around zero."""
        self.onsite_reference.zero_()
        for name in _STAT_BUFFERS[1:]:
            getattr(self, name).copy_(getattr(other, name))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint written before standardization has none of these buffers: its heads
        # predicted target units directly, i.e. identity statistics, which we keep; one
        # written before the length dependence lacks only κ and q (zero: no decay). Any
        # other missing buffer is a damaged file, reported by the strict load.
        identity = {"onsite_scale": torch.ones_like(self.onsite_scale)}
        missing = [name for name in _STAT_BUFFERS if prefix + name not in state_dict]
        if len(missing) == len(_STAT_BUFFERS) or set(missing) <= set(_LENGTH_BUFFERS):
            for name in missing:
                value = identity.get(name, torch.zeros_like(getattr(self, name)))
                state_dict[prefix + name] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ report
    def describe(self, unit: str) -> list[str]:
        """Table lines: per element, the on-site reference c_aa of each shell and the
        off-site factor exp f(Z, a) per shell, both in ``unit`` (target units; σ_off of a
        pair is the product of the two factors)."""
        shells = self.universal.shells
        names = [f"{L_LETTERS[l]}{k}" for k, l in enumerate(shells)]
        status = (
            f"fitted on {int(self.n_structures)} structures"
            if self.fitted
            else "identity (not fitted)"
        )
        lines = [
            f"    {status}; per element: on-site reference c (shell mean level, {unit}) | "
            f"on-site residual scale σ_on ({unit}) | off-site factor exp f ({unit}^½) | "
            f"decay κ (1/Å); curvature q = {float(self.offsite_log_curvature):.4g} /Å²"
        ]
        first = self.universal.shell_offsets[:-1]
        for row, z in enumerate(self.elements):
            has = self.universal.mask(z)[first]  # the element has this universal shell
            cells = []
            for label, table in (
                ("c", self.onsite_reference[row].diagonal()),
                ("σ_on", self.onsite_scale[row].diagonal()),
                ("exp f", torch.exp(self.offsite_log_factor[row])),
                ("κ", self.offsite_log_decay[row]),
            ):
                values = " ".join(
                    f"{n}={float(v):.4g}" for n, v, h in zip(names, table, has, strict=True) if h
                )
                cells.append(f"{label}: {values}")
            lines.append(f"    {chemical_symbols[z]:<3} " + " | ".join(cells))
        return lines


# ----------------------------------------------------------------------------- fitting
class StatisticsAccumulator:
    """Streams padded graphs (`foundation.data.graph.record_to_graph`, float64) of one target
    once and fits `TargetStatistics` values (module notes). Float64 sums; the result depends
    only on the graphs and their order, so every rank fitting the same files agrees."""

    def __init__(self, universal: UniversalBasis, target: str, length_dependent: bool = True):
        self.universal = universal
        self.target = target
        self.length_dependent = length_dependent
        self.elements = sorted(universal.basis.atomic_numbers)
        self.row_of_z = {z: k for k, z in enumerate(self.elements)}
        shells = np.asarray(universal.shells)
        n_el, n_sh = len(self.elements), len(shells)
        shell_of, self.eye = _shell_layout(universal)
        self.onehot = np.eye(n_sh)[shell_of]  # (n_uni, n_shell)
        self.dim = 2 * shells + 1
        self.same_l = shells[:, None] == shells[None, :]
        self.has = np.stack(
            [universal.mask(z)[universal.shell_offsets[:-1]] for z in self.elements]
        )
        self.n_on = np.zeros(n_el)
        self.trace_on = np.zeros((n_el, n_sh, n_sh))  # Σ trace/(2l+1), same-l pairs
        self.sq_on = np.zeros((n_el, n_sh, n_sh))
        self.n_off = np.zeros((n_el, n_el, MAX_BINS))
        self.sq_off = np.zeros((n_el, n_el, MAX_BINS, n_sh, n_sh))
        self.n_structures = 0

    def add(self, graph: Mapping[str, torch.Tensor]) -> None:
        """One structure's graph (or a batch) holding the target's padded blocks."""
        blocks = graph[self.target].detach().cpu().double().numpy()
        numbers = graph[keys.NUMBERS].cpu().numpy()
        src, dst = graph[keys.EDGE_INDEX].cpu().numpy()
        onsite = graph[keys.ONSITE].cpu().numpy()
        rows_i = np.array([self.row_of_z[int(z)] for z in numbers])[src]
        rows_j = np.array([self.row_of_z[int(z)] for z in numbers])[dst]
        p = self.onehot
        sq = np.einsum("ou,eop,pv->euv", p, blocks**2, p, optimize=True)
        from foundation.model.backbone import edge_vectors

        lengths = torch.linalg.norm(edge_vectors(dict(graph)), dim=1).cpu().numpy()
        bins = np.minimum((lengths / BIN_A).astype(np.int64), MAX_BINS - 1)
        off = (rows_i[~onsite], rows_j[~onsite], bins[~onsite])
        np.add.at(self.sq_off, off, sq[~onsite])
        np.add.at(self.n_off, off, 1.0)
        on = blocks[onsite] * self.eye
        trace = np.einsum("ou,eop,pv->euv", p, on, p, optimize=True) / self.dim[:, None]
        np.add.at(self.trace_on, rows_i[onsite], trace * self.same_l)
        np.add.at(self.sq_on, rows_i[onsite], sq[onsite])
        np.add.at(self.n_on, rows_i[onsite], 1.0)
        self.n_structures += int(graph.get(keys.N_ATOMS, torch.ones(1)).numel())

    def fit(self) -> dict[str, np.ndarray | int]:
        """``{onsite_reference, onsite_scale, offsite_log_factor, n_structures}`` (module
        notes), ready for `TargetStatistics.set_`."""
        if self.n_on.sum() == 0 or self.n_off.sum() == 0:
            raise ValueError(
                f"Target {self.target!r}: no on-site or no off-site blocks to fit statistics on "
                f"({self.n_structures} structures); fit on the training split."
            )
        size = self.dim[:, None] * self.dim[None, :]  # entries per shell-pair block
        pair = self.has[:, :, None] & self.has[:, None, :]  # (n_el, n_sh, n_sh)
        seen = self.n_on > 0
        n_on = np.maximum(self.n_on, 1.0)[:, None, None]
        reference = np.where(pair & self.same_l, self.trace_on / n_on, 0.0)
        reference = 0.5 * (reference + reference.transpose(0, 2, 1))
        # Σ‖T − c·I‖² = Σ‖T‖² − n (2l+1) c² on same-l pairs (c·I has norm² (2l+1) c²)
        residual = self.sq_on - self.n_on[:, None, None] * self.dim[:, None] * reference**2
        residual = 0.5 * (residual + residual.transpose(0, 2, 1))
        rms_on = np.sqrt(np.maximum(residual, 0.0) / (n_on * size))
        pair_off = self.has[:, None, None, :, None] & self.has[None, :, None, None, :]
        counts = self.n_off[:, :, :, None, None] * pair_off  # (n_el, n_el, bins, n_sh, n_sh)
        rms_off = np.sqrt(self.sq_off / np.maximum(counts, 1.0) / size)
        total_sq = self.sq_off.sum() + np.where(pair, residual, 0.0).sum()
        total_n = (counts * size).sum() + (self.n_on[:, None, None] * pair * size).sum()
        floor = FLOOR_RATIO * math.sqrt(total_sq / total_n)
        if not self.length_dependent:  # one RMS per group over all lengths, no decay
            counts = counts.sum(axis=2, keepdims=True)
            rms_off = np.sqrt(
                self.sq_off.sum(axis=2, keepdims=True) / np.maximum(counts, 1.0) / size
            )
        log_factor, log_decay, curvature = self._fit_log_factors(
            np.log(np.maximum(rms_off, floor)), counts
        )
        onsite_scale = np.maximum(rms_on, floor)
        # elements never seen: means over the fitted elements that have the same shells
        for row in np.flatnonzero(~seen):
            for a in range(len(self.dim)):
                for b in range(len(self.dim)):
                    donors = seen & self.has[:, a] & self.has[:, b]
                    if donors.any():
                        reference[row, a, b] = reference[donors, a, b].mean()
                        onsite_scale[row, a, b] = np.exp(np.log(onsite_scale[donors, a, b]).mean())
                    else:
                        onsite_scale[row, a, b] = np.exp(log_factor[row, a] + log_factor[row, b])
        return {
            "onsite_reference": reference,
            "onsite_scale": onsite_scale,
            "offsite_log_factor": log_factor,
            "offsite_log_decay": log_decay,
            "offsite_log_curvature": curvature,
            "n_structures": self.n_structures,
        }

    def _fit_log_factors(
        self, log_rms: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """(f, κ, q) minimising Σ_g n_g (f[Zi,a] + f[Zj,b] − (κ[Zi,a] + κ[Zj,b]) r_g − q r_g²
        − log rms_g)² over observed groups g = (Zi, Zj, length bin, a, b) with bin centre r_g,
        plus a weak pull (1e-3 √n) towards (mean half log rms, no decay) that fixes the gauge of
        bipartite data; unobserved (Z, a) get the mean over the elements that have shell a."""
        n_el, n_sh = self.has.shape
        groups = np.argwhere(counts > 0)  # (G, 5): row_i, row_j, bin, a, b
        weights = np.sqrt(counts[tuple(groups.T)])
        # bin centres (Å); without length dependence one bin at r = 0: κ = q = 0 exactly
        r = (groups[:, 2] + 0.5) * BIN_A if self.length_dependent else np.zeros(len(groups))
        observed = np.zeros((n_el, n_sh), dtype=bool)
        observed[groups[:, 0], groups[:, 3]] = True
        observed[groups[:, 1], groups[:, 4]] = True
        unknowns = np.argwhere(observed)
        n_u = len(unknowns)
        column = -np.ones((n_el, n_sh), dtype=np.int64)
        column[tuple(unknowns.T)] = np.arange(n_u)
        # columns: f of each unknown, κ of each unknown, q
        matrix = np.zeros((len(groups) + 2 * n_u, 2 * n_u + 1))
        rhs = np.zeros(len(matrix))
        g = np.arange(len(groups))
        for side_row, side_shell in ((0, 3), (1, 4)):
            col = column[groups[:, side_row], groups[:, side_shell]]
            np.add.at(matrix, (g, col), weights)
            np.add.at(matrix, (g, n_u + col), -weights * r)
        matrix[g, 2 * n_u] = -weights * r * r
        values = log_rms[tuple(groups.T)]
        rhs[: len(groups)] = weights * values
        prior = 0.5 * np.average(values, weights=weights**2)
        pull = 1e-3 * math.sqrt(counts.sum())
        rows = len(groups) + np.arange(2 * n_u)
        matrix[rows, np.arange(2 * n_u)] = pull
        rhs[len(groups) : len(groups) + n_u] = pull * prior
        solution = np.linalg.lstsq(matrix, rhs, rcond=None)[0]
        log_factor = np.full((n_el, n_sh), prior)
        log_decay = np.zeros((n_el, n_sh))
        log_factor[tuple(unknowns.T)] = solution[:n_u]
        log_decay[tuple(unknowns.T)] = solution[n_u : 2 * n_u]
        for table in (log_factor, log_decay):
            for a in range(n_sh):
                donors = observed[:, a]
                fallback = table[donors, a].mean() if donors.any() else table[observed].mean()
                table[~observed[:, a], a] = fallback
        return log_factor, log_decay, float(solution[2 * n_u])


def standardized_heads(model: nn.Module) -> dict[str, TargetStatistics]:
    """Head name → its `TargetStatistics`, for the heads that carry statistics and have no
    ``base`` (a ΔH head inherits its base's scales instead, `TargetStatistics.inherit_scales_`)."""
    bases = getattr(model, "bases", {})
    return {
        name: head.statistics
        for name, head in model.heads.items()
        if isinstance(getattr(head, "statistics", None), TargetStatistics) and name not in bases
    }


def fit_statistics(
    records: Iterable,
    universal: UniversalBasis,
    targets: Sequence[str],
    length_dependent: bool = False,
) -> dict[str, TargetStatistics]:
    """`TargetStatistics` of each of ``targets`` fitted in one pass over ``records``
    (`HamiltonianRecord`s of a training split), padded in ``universal``; without
    ``length_dependent`` the off-site scales do not decay with r (κ = q = 0)."""
    from foundation.data.graph import record_to_graph

    accumulators = {
        name: StatisticsAccumulator(universal, name, length_dependent) for name in targets
    }
    for record in records:
        graph = record_to_graph(record, universal, list(targets), dtype=torch.float64)
        for acc in accumulators.values():
            acc.add(graph)
    fitted = {}
    for name, acc in accumulators.items():
        fitted[name] = TargetStatistics(universal)
        fitted[name].set_(**acc.fit())
    return fitted


def fit_model_statistics(
    model: nn.Module, records: Iterable, targets: Sequence[str]
) -> dict[str, TargetStatistics]:
    """Fit the statistics of the model's heads named in ``targets`` (e.g. the dataset's h, s)
    from ``records`` in one pass and set them in place on those heads; returns them by name.
    Off-site scales decay with the edge length when the model config has
    ``standardize_length: true``."""
    stats = {n: s for n, s in standardized_heads(model).items() if n in targets}
    if not stats:
        return {}
    length = bool((getattr(model, "config", None) or {}).get("standardize_length", False))
    for name, fitted in fit_statistics(records, model.universal, list(stats), length).items():
        stats[name].load_state_dict(fitted.state_dict())
    return stats


def sample_records(
    shards: Sequence[str], max_structures: int | None = MAX_STRUCTURES, seed: int = 0
) -> Iterator:
    """Records of ``shards`` for the statistics fit: shards in a fixed shuffled order (seeded,
    the same on every rank) and at most ``max_structures`` records (None: all)."""
    from foundation.data.shards import record_pipeline

    order = sorted(str(s) for s in shards)
    random.Random(seed).shuffle(order)
    pipeline = record_pipeline(order, split_by_node=False, split_by_worker=False)
    for k, record in enumerate(pipeline):
        if max_structures is not None and k >= max_structures:
            return
        yield record


__all__ = [
    "FLOOR_RATIO",
    "MAX_STRUCTURES",
    "StatisticsAccumulator",
    "TargetStatistics",
    "fit_model_statistics",
    "fit_statistics",
    "sample_records",
    "standardized_heads",
]
