"""Heads: backbone features → padded universal blocks (E, n_uni, n_uni) per target.

A head is any module ``head(features: BackboneOutput, batch, edges=None) -> Tensor``
returning padded blocks for every edge of the batch, or for the contiguous run ``edges`` (a
slice) of them (chunked inference on large cells, `UniversalHamiltonianModel.predict_chunks`);
`UniversalHamiltonianModel.add_head` attaches new ones (fine-tuning on new targets) without
touching the backbone. `BlockHead` is the one used for H and S (separate instances, separate
weights):

* on-site edges (i, i, 0): irreps from node features of atom i;
* every other edge: irreps from that edge's features;
* irreps → blocks through `blocks.BlockIrreps` (package orbital order);
* exact hermiticity by symmetrisation, H_e = ½ (B_e + B_rev(e)ᵀ): every edge and its reverse
  (j, i, −R) get transposed blocks, and the result does not depend on which direction or
  edge order came first (so atom permutations cannot change it);
* entries outside the two atoms' orbitals are exactly zero;
* the layers predict standardized blocks; `standardize.TargetStatistics` (buffers of the head,
  fitted on the training split by foundation-train, identity until then) turns them into the
  target's units: per-element on-site reference c·I plus per-element-pair, per-shell-pair
  scales, exactly equivariant and symmetric, so the output stays exactly hermitian.

`PairBlockHead` (config type ``pair``) adds a path from the two atoms' node features that
reaches its own, longer ``cutoff_A``: edges beyond the backbone's cutoff (whose edge features
are zero there) still get blocks, e.g. for the longer-ranged exchange of a hybrid functional.

In a model config a head may name a ``base`` head: its output is then added to the base's
(`UniversalHamiltonianModel`), e.g. H_HSE = H_PBE + ΔH with ``heads: {h_hse: {type: block,
base: h}}``; `BlockHead.zero_output_` makes such a ΔH head start at exactly zero.
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import nn

from foundation import keys
from foundation.basis import UniversalBasis
from foundation.model.backbone import (
    BackboneOutput,
    EdgeGeometry,
    RadialBasis,
    TensorProductConvolution,
    edge_vectors,
    linear,
    onsite_flags,
)
from foundation.model.blocks import BlockIrreps
from foundation.model.standardize import TargetStatistics
from foundation.rotations import to_e3nn_frame


def _check_covers(irreps_in: o3.Irreps, needed: o3.Irreps, what: str) -> None:
    have = {ir for _, ir in irreps_in}
    missing = sorted({ir for _, ir in needed if ir not in have})
    if missing:
        raise ValueError(
            f"{what} irreps {irreps_in} lack {', '.join(map(str, missing))}, which the orbital "
            f"blocks of the basis need (l up to 2·l_max of the basis, both parities); add them "
            f"to irreps_node/irreps_edge in the model config."
        )


def edge_lengths(
    batch: dict[str, torch.Tensor], edges: slice | torch.Tensor, onsite: torch.Tensor
) -> torch.Tensor:
    """(n,) lengths |r_ij| (Å) of the selected edges, differentiable w.r.t. positions; on-site
    rows are 0 with no gradient path (no 0/0 in the derivative of |r| at r = 0)."""
    vectors = edge_vectors(batch, edges)
    safe = torch.where(onsite[:, None], torch.ones_like(vectors), vectors)
    return torch.where(onsite, torch.zeros_like(safe[:, 0]), torch.linalg.norm(safe, dim=1))


def symmetric_lengths(
    batch: dict[str, torch.Tensor], edges: slice | torch.Tensor, onsite: torch.Tensor
) -> torch.Tensor:
    """`edge_lengths` averaged with the reverse edges' (j, i, −R): bitwise the same for an
    edge and its reverse, so length-dependent scales keep the blocks exactly hermitian."""
    reverse = batch[keys.EDGE_REVERSE][edges]
    reverse_onsite = onsite_flags(batch)[reverse]
    return 0.5 * (edge_lengths(batch, edges, onsite) + edge_lengths(batch, reverse, reverse_onsite))


class BlockHead(nn.Module):
    """Padded hermitian blocks from node (on-site) and edge (off-site) features.

    irreps_in: node features ``irreps_node``, edge features ``irreps_edge``;
    irreps_out: ``blocks.irreps`` (one irrep set per universal shell pair) → (n_uni, n_uni).
    Output (target units) = ``statistics``(``scale`` · Y) with Y the symmetrised standardized
    blocks: ``statistics`` (`standardize.TargetStatistics`) adds the on-site reference and
    multiplies by the per-species scales; ``scale`` (dimensionless, default 1) is one more
    global factor on Y.
    """

    def __init__(
        self,
        irreps_node: o3.Irreps | str,
        irreps_edge: o3.Irreps | str,
        universal: UniversalBasis,
        scale: float = 1.0,
    ):
        super().__init__()
        self.irreps_node = o3.Irreps(irreps_node)
        self.irreps_edge = o3.Irreps(irreps_edge)
        self.blocks = BlockIrreps(universal)
        self.irreps_out = self.blocks.irreps
        _check_covers(self.irreps_node, self.irreps_out, "Node")
        _check_covers(self.irreps_edge, self.irreps_out, "Edge")
        self.onsite = linear(self.irreps_node, self.irreps_out)
        self.offsite = linear(self.irreps_edge, self.irreps_out)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.statistics = TargetStatistics(universal)

    @torch.no_grad()
    def zero_output_(self) -> None:
        """Zero the output layers: the head then predicts exactly zero standardized blocks,
        i.e. exactly zero blocks when its on-site reference is zero (a ΔH head that starts
        from its base head's prediction; `TargetStatistics.inherit_scales_`), while its
        gradients are not zero."""
        self.onsite.weight.zero_()
        self.offsite.weight.zero_()

    @torch.no_grad()
    def entry_scales(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(E, n_uni, n_uni) per-entry scale of this head's target on every edge of ``batch``
        (target units, no gradient): the statistics' σ_on / σ_off(r) times ``scale``; a loss
        on residuals divided by it weighs every entry relative to its typical size."""
        numbers = batch[keys.NUMBERS]
        src, dst = batch[keys.EDGE_INDEX]
        onsite = onsite_flags(batch)
        lengths = symmetric_lengths(batch, slice(None), onsite)
        scales = self.statistics.scales(numbers[src], numbers[dst], onsite, lengths)
        return scales * self.scale.to(scales.dtype).abs()

    def offsite_irreps(
        self, features: BackboneOutput, batch: dict[str, torch.Tensor], edges: slice | torch.Tensor
    ) -> torch.Tensor:
        """(n, irreps_out) of the selected edges from their edge features."""
        return self.offsite(features.edge[edges])

    def raw_blocks(
        self, features: BackboneOutput, batch: dict[str, torch.Tensor], edges: slice | torch.Tensor
    ) -> torch.Tensor:
        """Unsymmetrised blocks (n, n_uni, n_uni) of the edges selected by ``edges``."""
        src = batch[keys.EDGE_INDEX][0, edges]
        onsite = features.onsite[edges, None]
        irreps = torch.where(
            onsite, self.onsite(features.node)[src], self.offsite_irreps(features, batch, edges)
        )
        return self.blocks.to_blocks(irreps)

    def forward(
        self,
        features: BackboneOutput,
        batch: dict[str, torch.Tensor],
        edges: slice | None = None,
    ) -> torch.Tensor:
        """Blocks of all edges, or of the slice ``edges`` of them; the reverse edges' raw
        blocks are then recomputed rather than looked up, so a chunk needs nothing else."""
        reverse = batch[keys.EDGE_REVERSE]
        if edges is None:
            edges = slice(None)
            raw = self.raw_blocks(features, batch, edges)
            raw_reverse = raw[reverse]
        else:
            raw = self.raw_blocks(features, batch, edges)
            raw_reverse = self.raw_blocks(features, batch, reverse[edges])
        hermitian = 0.5 * (raw + raw_reverse.transpose(-1, -2))
        numbers = batch[keys.NUMBERS]
        src, dst = batch[keys.EDGE_INDEX][:, edges]
        standardized = hermitian * self.scale.to(raw.dtype)
        onsite = features.onsite[edges]
        lengths = symmetric_lengths(batch, edges, onsite)
        blocks = self.statistics(standardized, numbers[src], numbers[dst], onsite, lengths)
        mask = self.blocks.pair_mask(numbers[src], numbers[dst])
        return torch.where(mask, blocks, torch.zeros_like(raw))


class PairBlockHead(BlockHead):
    """`BlockHead` whose off-site blocks also come from the two atoms' node features, out to
    its own cutoff ``cutoff_A`` (Å, at least the backbone's).

    off-site irreps = offsite(e_ij) + Conv(W_i x_i + W_j x_j ; r_ij), where Conv is the
    reference tensor-product convolution (`backbone.TensorProductConvolution`) on this head's
    own radial basis (Bessel × envelope vanishing smoothly at ``cutoff_A``) and spherical
    harmonics up to ``sh_lmax`` of r_ij (e3nn frame). Edge features vanish beyond the backbone
    cutoff, so there only the pair path contributes. Exactly equivariant and hermitian like
    `BlockHead`. irreps_in: node ``irreps_node``, edge ``irreps_edge``; irreps_out: blocks.
    """

    def __init__(
        self,
        irreps_node: o3.Irreps | str,
        irreps_edge: o3.Irreps | str,
        universal: UniversalBasis,
        scale: float = 1.0,
        cutoff_A: float = 12.0,
        sh_lmax: int = 2,
        num_radial: int = 8,
        radial_hidden: int = 16,
        radial_layers: int = 2,
        envelope_p: int = 6,
    ):
        super().__init__(irreps_node, irreps_edge, universal, scale)
        self.cutoff_A = float(cutoff_A)
        self.radial_basis = RadialBasis(cutoff_A, num_radial, envelope_p)
        self.spherical_harmonics = o3.SphericalHarmonics(
            o3.Irreps.spherical_harmonics(sh_lmax), normalize=True, normalization="component"
        )
        self.pair_src = linear(self.irreps_node, self.irreps_node)
        self.pair_dst = linear(self.irreps_node, self.irreps_node)
        self.pair = TensorProductConvolution(
            self.irreps_node,
            self.spherical_harmonics.irreps_out,
            self.irreps_out,
            num_radial,
            radial_hidden,
            radial_layers,
            optimize_einsums=False,
        )

    @torch.no_grad()
    def zero_output_(self) -> None:
        super().zero_output_()
        self.pair.linear.weight.zero_()

    def offsite_irreps(
        self, features: BackboneOutput, batch: dict[str, torch.Tensor], edges: slice | torch.Tensor
    ) -> torch.Tensor:
        src, dst = batch[keys.EDGE_INDEX][:, edges]
        # On-site rows (r = 0) get a dummy vector of the cutoff's length, where the radial
        # features vanish: no 0/0 in the harmonics or in the gradient of |r|.
        dummy = torch.zeros_like(batch[keys.POSITIONS][:1])
        dummy[:, 2] = self.cutoff_A
        onsite = features.onsite[edges, None]
        vectors = torch.where(onsite, dummy, to_e3nn_frame(edge_vectors(batch, edges)))
        geometry = EdgeGeometry(
            edge_ids=torch.arange(len(src), device=src.device),
            src=src,
            dst=dst,
            vectors=vectors,
            sh=self.spherical_harmonics(vectors),
            radial=self.radial_basis(torch.linalg.norm(vectors, dim=1)),
        )
        node = features.node
        pair = self.pair(self.pair_src(node)[src] + self.pair_dst(node)[dst], geometry)
        return super().offsite_irreps(features, batch, edges) + pair


HEADS: dict[str, type[nn.Module]] = {"block": BlockHead, "pair": PairBlockHead}
"""Head classes by config name (``heads: {h: {type: block, scale: 1.0}}``); a head's config
keys besides ``type`` and ``base`` are its constructor's keyword arguments after
``universal`` (``scale``; for ``pair`` also ``cutoff_A``, ``sh_lmax``, ``num_radial``, …)."""


__all__ = ["BlockHead", "HEADS", "PairBlockHead"]
