"""Block errors accumulated over an epoch: MAE overall, on-site / off-site, per element pair,
and per split group (seen / unseen composition / unseen element).

Sums (not means) are kept per (split group, element pair, on-site flag) so that ranks can
add their tables (one all-reduce at epoch end) and every real matrix entry counts exactly
once. Reported in meV for energy-like targets (H in eV) and in 10⁻³ for the dimensionless S.
The split group of a structure comes from the batch (``keys.SPLIT_GROUP``, set by the
evaluation stream from the dataset's split policy); batches without it count in the overall
and per-pair errors only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from ase.data import chemical_symbols

from foundation import keys
from foundation.train.losses import target_mask

# (unit label, factor from stored units); S is dimensionless, everything else eV-based;
# the e-ph derivatives dh (eV/Å) and ds (1/Å) are per Å.
UNITS: dict[str, tuple[str, float]] = {
    keys.S: ("e-3", 1e3),
    keys.DH: ("meV_per_A", 1e3),
    keys.DS: ("e-3_per_A", 1e3),
}
DEFAULT_UNIT = ("meV", 1e3)


def unit(target: str) -> tuple[str, float]:
    return UNITS.get(target, DEFAULT_UNIT)


class BlockErrors:
    """Σ|pred − target| and entry counts per target × split group × unordered element pair ×
    on-site flag.

    Only entries of `losses.target_mask` count (real orbitals of structures that have the
    target). The group axis has one slot per `keys.SPLIT_GROUPS` entry plus a last slot for
    structures of batches without ``keys.SPLIT_GROUP`` (not reported as a group).

    ``elements``: the model's atomic numbers (index order of the pair table).
    """

    def __init__(self, elements: Sequence[int], targets: Sequence[str]):
        self.elements = [int(z) for z in elements]
        self.targets = list(targets)
        lookup = torch.full((max(self.elements) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(self.elements)] = torch.arange(len(self.elements))
        self._lookup = lookup
        n = len(self.elements)
        self._untagged = len(keys.SPLIT_GROUPS)
        self._shape = (len(self.targets), self._untagged + 1, n, n, 2)
        self.abs_sum = torch.zeros(self._shape, dtype=torch.float64)
        self.count = torch.zeros(self._shape, dtype=torch.float64)

    def reset(self) -> None:
        self.abs_sum.zero_()
        self.count.zero_()

    @torch.no_grad()
    def update(
        self, pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], weight: float = 1.0
    ) -> None:
        """Add one batch (``weight`` 0 for a padding batch that must not count)."""
        if weight == 0:
            return
        numbers = batch[keys.NUMBERS]
        src, dst = batch[keys.EDGE_INDEX]
        lookup = self._lookup.to(numbers.device)
        a, b = lookup[numbers[src]], lookup[numbers[dst]]
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        n = len(self.elements)
        if keys.SPLIT_GROUP in batch:
            group = batch[keys.SPLIT_GROUP].to(numbers.device)[batch[keys.EDGE_BATCH]]
        else:
            group = torch.full_like(src, self._untagged)
        pair = (lo * n + hi) * 2 + batch[keys.ONSITE].long()
        cell = group * (n * n * 2) + pair  # flat index into (groups, n, n, 2)
        for t, name in enumerate(self.targets):
            mask = target_mask(batch, name)
            per_edge_count = mask.sum(dim=(1, 2)).double()
            err = (pred[name].double() - batch[name].double()).abs() * mask
            per_edge = err.sum(dim=(1, 2))
            self.abs_sum[t].view(-1).index_add_(0, cell.cpu(), weight * per_edge.cpu())
            self.count[t].view(-1).index_add_(0, cell.cpu(), weight * per_edge_count.cpu())

    def all_reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the local tables by their sums over ranks (``reduce_sum`` is collective)."""
        both = reduce_sum(torch.stack([self.abs_sum, self.count]))
        self.abs_sum, self.count = both[0].cpu(), both[1].cpu()

    def compute(self, per_pair: bool = True) -> dict[str, float]:
        """Metric name → value: ``mae_<t>_<unit>``, ``…_onsite``/``…_offsite``, per split group
        with entries ``mae_<t>_<group>_<unit>`` (and its ``_onsite``/``_offsite``), e.g.
        ``mae_h_unseen_element_meV``, and ``mae_<t>_pair/<A>-<B>_<unit>``."""
        out: dict[str, float] = {}
        for t, name in enumerate(self.targets):
            label, factor = unit(name)

            def mae(s_: torch.Tensor, c_: torch.Tensor, factor: float = factor) -> float | None:
                total = float(c_.sum())
                return factor * float(s_.sum()) / total if total > 0 else None

            groups = [("", slice(None))] + [(f"_{g}", i) for i, g in enumerate(keys.SPLIT_GROUPS)]
            for prefix, g in groups:
                s, c = self.abs_sum[t, g], self.count[t, g]
                for suffix, value in (
                    ("", mae(s, c)),
                    ("_onsite", mae(s[..., 1], c[..., 1])),
                    ("_offsite", mae(s[..., 0], c[..., 0])),
                ):
                    if value is not None:
                        out[f"mae_{name}{prefix}{suffix}_{label}"] = value
            s, c = self.abs_sum[t].sum(0), self.count[t].sum(0)
            if per_pair:
                for i, zi in enumerate(self.elements):
                    for j in range(i, len(self.elements)):
                        value = mae(s[i, j], c[i, j])
                        if value is not None:
                            pair = f"{chemical_symbols[zi]}-{chemical_symbols[self.elements[j]]}"
                            out[f"mae_{name}_pair/{pair}_{label}"] = value
        return out
