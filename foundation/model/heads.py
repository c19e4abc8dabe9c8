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
* entries outside the two atoms' orbitals are exactly zero.
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import nn

from foundation import keys
from foundation.basis import UniversalBasis
from foundation.model.backbone import BackboneOutput, linear
from foundation.model.blocks import BlockIrreps


def _check_covers(irreps_in: o3.Irreps, needed: o3.Irreps, what: str) -> None:
    have = {ir for _, ir in irreps_in}
    missing = sorted({ir for _, ir in needed if ir not in have})
    if missing:
        raise ValueError(
            f"{what} irreps {irreps_in} lack {', '.join(map(str, missing))}, which the orbital "
            f"blocks of the basis need (l up to 2·l_max of the basis, both parities); add them "
            f"to irreps_node/irreps_edge in the model config."
        )


class BlockHead(nn.Module):
    """Padded hermitian blocks from node (on-site) and edge (off-site) features.

    irreps_in: node features ``irreps_node``, edge features ``irreps_edge``;
    irreps_out: ``blocks.irreps`` (one irrep set per universal shell pair) → (n_uni, n_uni).
    ``scale`` (e.g. the target's standard deviation, in the target's units) multiplies the
    output so that the layers work with numbers of order one.
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

    def raw_blocks(
        self, features: BackboneOutput, batch: dict[str, torch.Tensor], edges: slice | torch.Tensor
    ) -> torch.Tensor:
        """Unsymmetrised blocks (n, n_uni, n_uni) of the edges selected by ``edges``."""
        src = batch[keys.EDGE_INDEX][0, edges]
        onsite = features.onsite[edges, None]
        irreps = torch.where(
            onsite, self.onsite(features.node)[src], self.offsite(features.edge[edges])
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
        mask = self.blocks.pair_mask(numbers[src], numbers[dst])
        return torch.where(mask, hermitian * self.scale.to(raw.dtype), torch.zeros_like(raw))


HEADS: dict[str, type[nn.Module]] = {"block": BlockHead}
"""Head classes by config name (``heads: {h: {type: block, scale: 1.0}}``)."""


__all__ = ["BlockHead", "HEADS"]
