"""Equivariant message passing that updates node and edge features.

Edges are the graph's directed edges (i, j, R) other than the on-site ones (i, i, 0); their
vectors r_ij = τ_j + R·cell − τ_i (Å) are computed here from positions, so derivatives with
respect to positions flow through autograd. Vectors enter e3nn in the (y, z, x) frame
(`foundation.rotations`), which makes e3nn's irreps coincide with the package orbital order.

Every edge feature is proportional to a smooth radial envelope that vanishes, with its first
two derivatives, at the cutoff (bias-free radial MLPs and zero-preserving gates keep it so),
and messages to nodes likewise; so features, predicted blocks and their derivatives are
continuous when atoms cross the cutoff.

The convolution is pluggable (`CONVOLUTIONS`): ``"tensor_product"`` is the reference e3nn
tensor product with radial-MLP weights; ``"so2"`` (`foundation.model.so2`) is the fast
eSCN-style path (per-edge rotation to the polar axis, per-|m| linear maps), whose per-edge
Wigner-D matrices the backbone computes once per forward pass and shares between layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from e3nn import nn as enn
from e3nn import o3
from torch import nn

from foundation import keys
from foundation.model import so2
from foundation.rotations import to_e3nn_frame


# ----------------------------------------------------------------------------- geometry
class RadialBasis(nn.Module):
    """Bessel functions × polynomial envelope of the edge length (Å).

    φ_n(r) = √(2/c) sin(nπr/c)/r · u(r/c), n = 1 … num_basis, with the DimeNet envelope
    u(d) = 1 − (p+1)(p+2)/2 d^p + p(p+2) d^{p+1} − p(p+1)/2 d^{p+2} for d < 1 and 0 beyond;
    u and its first two derivatives vanish at d = 1.
    irreps_out = num_basis x 0e.
    """

    def __init__(self, cutoff_A: float, num_basis: int = 8, envelope_p: int = 6):
        super().__init__()
        self.cutoff_A = float(cutoff_A)
        self.p = int(envelope_p)
        self.irreps_out = o3.Irreps(f"{num_basis}x0e")
        self.register_buffer(
            "frequencies", math.pi * torch.arange(1, num_basis + 1, dtype=torch.float64)
        )

    def envelope(self, d: torch.Tensor) -> torch.Tensor:
        p = self.p
        poly = (
            1.0
            - (p + 1) * (p + 2) / 2 * d**p
            + p * (p + 2) * d ** (p + 1)
            - p * (p + 1) / 2 * d ** (p + 2)
        )
        return torch.where(d < 1.0, poly, torch.zeros_like(d))

    def forward(self, lengths: torch.Tensor) -> torch.Tensor:
        d = (lengths / self.cutoff_A)[:, None]
        w = self.frequencies.to(lengths.dtype)
        bessel = math.sqrt(2.0 / self.cutoff_A) * torch.sin(w * d) / lengths[:, None]
        return bessel * self.envelope(d)


@dataclass
class EdgeGeometry:
    """Geometry of the non-on-site edges: index into the graph's edges, endpoints, features."""

    edge_ids: torch.Tensor  # (E',) positions of these edges in the graph's edge list
    src: torch.Tensor  # (E',) i (centre atom; messages are aggregated here)
    dst: torch.Tensor  # (E',) j (neighbour)
    vectors: torch.Tensor  # (E', 3) r_ij in Å, e3nn frame (y, z, x)
    sh: torch.Tensor | None  # (E', irreps_sh.dim) harmonics of r_ij ('component' norm)
    radial: torch.Tensor  # (E', num_basis) Bessel × envelope
    wigner: torch.Tensor | None = None  # (E', Σ(2l+1)²) packed D_l(R_e) (`so2.EdgeFrames`)

    def __len__(self) -> int:
        return self.src.shape[0]

    def __getitem__(self, edges: slice) -> EdgeGeometry:
        """The geometry of a contiguous run of these edges (views, no copies)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return EdgeGeometry(**{k: None if v is None else v[edges] for k, v in fields.items()})


def edge_slices(n_edges: int, edge_chunk: int | None) -> list[slice]:
    """Consecutive slices of at most ``edge_chunk`` edges covering ``range(n_edges)``; a single
    slice when ``edge_chunk`` is None (no chunking)."""
    if edge_chunk is not None and edge_chunk < 1:
        raise ValueError(f"edge_chunk must be a positive number of edges, got {edge_chunk}.")
    if edge_chunk is None or edge_chunk >= n_edges:
        return [slice(0, n_edges)]
    return [slice(s, min(s + edge_chunk, n_edges)) for s in range(0, n_edges, edge_chunk)]


def map_edge_chunks(
    fn: Callable[[slice, EdgeGeometry], torch.Tensor],
    geometry: EdgeGeometry,
    edge_chunk: int | None,
) -> torch.Tensor:
    """``fn(edges, geometry[edges])`` for consecutive chunks of edges, stacked along dim 0.

    Per-edge work (convolutions, gates) then only ever holds one chunk of intermediates, so
    inference memory is linear in the number of edges with a working set bounded by
    ``edge_chunk``; None is one call on all edges (training, autograd).
    """
    parts = edge_slices(len(geometry), edge_chunk)
    if len(parts) == 1:
        return fn(parts[0], geometry[parts[0]])
    out = None
    for edges in parts:
        y = fn(edges, geometry[edges])
        if out is None:
            out = y.new_empty((len(geometry), *y.shape[1:]))
        out[edges] = y
    return out


def edge_vectors(
    batch: dict[str, torch.Tensor], edges: slice | torch.Tensor | None = None
) -> torch.Tensor:
    """(E, 3) Cartesian r_ij = τ_j + R·cell − τ_i (Å), differentiable w.r.t. positions/cell;
    only of the edges selected by ``edges`` (a slice or index tensor) when given."""
    edges = slice(None) if edges is None else edges
    pos = batch[keys.POSITIONS]
    src, dst = batch[keys.EDGE_INDEX][:, edges]
    cell = batch[keys.CELL].reshape(-1, 3, 3)
    edge_batch = batch.get(keys.EDGE_BATCH)
    edge_batch = torch.zeros_like(src) if edge_batch is None else edge_batch[edges]
    shift = batch[keys.EDGE_SHIFT][edges].to(pos.dtype)
    return pos[dst] + torch.einsum("ea,eab->eb", shift, cell[edge_batch]) - pos[src]


def onsite_flags(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(E,) bool: edge is (i, i, 0, 0, 0)."""
    if keys.ONSITE in batch:
        return batch[keys.ONSITE].bool()
    src, dst = batch[keys.EDGE_INDEX]
    return (src == dst) & (batch[keys.EDGE_SHIFT] == 0).all(dim=1)


def linear(irreps_in: o3.Irreps | str, irreps_out: o3.Irreps | str) -> o3.Linear:
    """e3nn Linear without einsum-path optimisation: for a Linear (one small matmul per irrep)
    opt_einsum_fx gains nothing at run time but costs about a second of build per layer."""
    return o3.Linear(irreps_in, irreps_out, _optimize_einsums=False)


# ----------------------------------------------------------------------------- convolutions
class Convolution(nn.Module):
    """Interface: per-edge features (E', irreps_in) + geometry → (E', irreps_out).

    Implementations must be equivariant and proportional to the radial features (zero radial
    features ⇒ zero output), so that edge contributions vanish smoothly at the cutoff.
    ``needs_sh`` / ``needs_wigner``: which per-edge geometry the backbone must compute
    (spherical harmonics ``geometry.sh``, Wigner-D matrices ``geometry.wigner``).
    """

    irreps_in: o3.Irreps
    irreps_out: o3.Irreps
    needs_sh = True
    needs_wigner = False

    def forward(self, x: torch.Tensor, geometry: EdgeGeometry) -> torch.Tensor:
        raise NotImplementedError


class TensorProductConvolution(Convolution):
    """Reference convolution: the 'uvu' tensor product x ⊗ Y(r̂) with radial-MLP weights.

    Every path (l_in ⊗ l_sh → l_out) whose output type occurs in irreps_out gets one weight
    per channel u, from a bias-free MLP of the radial features:
    out_path[u] = w_path,u(r) · (x_u ⊗ Y)_path; a linear layer then mixes the paths into
    irreps_out. The weights multiply the unweighted e3nn product afterwards (the same
    function as passing them into the product) so that backward does not slice the
    (E, n_weights) tensor once per path, which costs O(paths × E × n_weights).
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_sh: o3.Irreps,
        irreps_out: o3.Irreps,
        num_radial: int,
        radial_hidden: int = 64,
        radial_layers: int = 2,
        optimize_einsums: bool = True,
    ):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_sh = o3.Irreps(irreps_sh)
        self.irreps_out = o3.Irreps(irreps_out)
        wanted = {ir for _, ir in self.irreps_out}
        mid, instructions = [], []
        for i1, (mul, ir1) in enumerate(self.irreps_in):
            for i2, (_, ir2) in enumerate(self.irreps_sh):
                for ir in ir1 * ir2:
                    if ir in wanted:
                        instructions.append((i1, i2, len(mid), "uvu", False))
                        mid.append((mul, ir))
        irreps_mid, perm, _ = o3.Irreps(mid).sort()
        self.irreps_mid = irreps_mid
        self.tp = o3.TensorProduct(
            self.irreps_in,
            self.irreps_sh,
            irreps_mid,
            [(a, b, perm[c], mode, w) for a, b, c, mode, w in instructions],
            _optimize_einsums=optimize_einsums,
        )
        # weight k (one per path and channel) multiplies the 2l+1 components of its copy
        copy_of_component = torch.arange(irreps_mid.num_irreps).repeat_interleave(
            torch.tensor([ir.dim for mul, ir in irreps_mid for _ in range(mul)])
        )
        self.register_buffer("copy_of_component", copy_of_component, persistent=False)
        self.radial = enn.FullyConnectedNet(
            [num_radial] + [radial_hidden] * radial_layers + [irreps_mid.num_irreps],
            torch.nn.functional.silu,
        )
        # same memory layout, fewer irreps: the linear slices its input once per irrep
        self.linear = linear(irreps_mid.simplify(), self.irreps_out)

    def forward(self, x: torch.Tensor, geometry: EdgeGeometry) -> torch.Tensor:
        weights = self.radial(geometry.radial)[:, self.copy_of_component]
        return self.linear(self.tp(x, geometry.sh) * weights)


class SO2Convolution(so2.SO2Convolution, Convolution):
    """The SO(2) convolution of `foundation.model.so2` under the `Convolution` interface."""

    needs_sh = False


CONVOLUTIONS: dict[str, type[Convolution]] = {
    "tensor_product": TensorProductConvolution,
    "so2": SO2Convolution,
}
"""Registry of convolutions by config name (`conv:` in conf/model/*.yaml)."""

CONV_OPTIONS: dict[str, tuple[str, ...]] = {"tensor_product": (), "so2": ("mmax",)}
"""Model-config keys that only some convolutions take (None in the config: not passed)."""


def make_convolution(name: str, **kwargs) -> Convolution:
    if name not in CONVOLUTIONS:
        raise ValueError(f"Unknown convolution {name!r}; known: {', '.join(CONVOLUTIONS)}.")
    return CONVOLUTIONS[name](**kwargs)


# ----------------------------------------------------------------------------- layers
class GatedLinear(nn.Module):
    """Linear map to gate inputs, then e3nn Gate: irreps_in → irreps_out.

    Scalars 0e pass through SiLU and 0o through tanh; every l > 0 irrep of irreps_out is
    multiplied by a sigmoid of its own 0e gate. All maps send 0 to 0.
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        scalars = o3.Irreps([(m, ir) for m, ir in self.irreps_out if ir.l == 0])
        gated = o3.Irreps([(m, ir) for m, ir in self.irreps_out if ir.l > 0])
        acts = {1: torch.nn.functional.silu, -1: torch.tanh}
        self.gate = enn.Gate(
            scalars,
            [acts[ir.p] for _, ir in scalars],
            o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps(""),
            [torch.sigmoid] if gated.num_irreps else [],
            gated,
        )
        self.linear = linear(self.irreps_in, self.gate.irreps_in)
        if self.gate.irreps_out != self.irreps_out:
            raise ValueError(
                f"irreps {self.irreps_out} must be sorted and simplified for the gate "
                f"(got gate output {self.gate.irreps_out}); write e.g. {self.irreps_out.sort()[0].simplify()}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.linear(x))


class InteractionLayer(nn.Module):
    """One round of message passing, updating nodes then edges, both with residuals.

    node:  x_i ← x_i + Gate( W_m · (1/n̄) Σ_j Conv(W_s x_j + W_e e_ij ; r_ij) + W_x x_i )
    edge:  e_ij ← e_ij + Gate( W_c · Conv(W_i x_i + W_j x_j + W_e' e_ij ; r_ij) )
    irreps_in = irreps_out = (irreps_node, irreps_edge).
    """

    def __init__(
        self,
        irreps_node: o3.Irreps,
        irreps_edge: o3.Irreps,
        irreps_sh: o3.Irreps,
        num_radial: int,
        conv: str = "tensor_product",
        radial_hidden: int = 64,
        radial_layers: int = 2,
        avg_num_neighbors: float = 20.0,
        optimize_einsums: bool = True,
        conv_options: dict | None = None,
    ):
        super().__init__()
        self.irreps_node = o3.Irreps(irreps_node)
        self.irreps_edge = o3.Irreps(irreps_edge)
        self.avg_num_neighbors = float(avg_num_neighbors)
        conv_kwargs = dict(
            irreps_sh=irreps_sh,
            num_radial=num_radial,
            radial_hidden=radial_hidden,
            radial_layers=radial_layers,
            optimize_einsums=optimize_einsums,
            **(conv_options or {}),
        )
        node, edge = self.irreps_node, self.irreps_edge
        # node update
        self.msg_src = linear(node, node)
        self.msg_edge = linear(edge, node)
        self.msg_conv = make_convolution(conv, irreps_in=node, irreps_out=node, **conv_kwargs)
        self.node_self = linear(node, node)
        self.node_update = GatedLinear(node, node)
        # edge update
        self.edge_src = linear(node, edge)
        self.edge_dst = linear(node, edge)
        self.edge_self = linear(edge, edge)
        self.edge_conv = make_convolution(conv, irreps_in=edge, irreps_out=edge, **conv_kwargs)
        self.edge_update = GatedLinear(edge, edge)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        geometry: EdgeGeometry,
        edge_chunk: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, e) → updated (x, e); per-edge work in chunks of ``edge_chunk`` edges (None:
        all at once). Messages of each chunk are summed into the nodes before the node update,
        so the result does not depend on the chunking (up to the order of float additions)."""
        sent = self.msg_src(x)
        aggregated = torch.zeros_like(x)
        for edges in edge_slices(len(geometry), edge_chunk):
            g = geometry[edges]
            messages = self.msg_conv(sent[g.dst] + self.msg_edge(e[edges]), g)
            aggregated = aggregated.index_add(0, g.src, messages)
        x = x + self.node_update(aggregated / self.avg_num_neighbors + self.node_self(x))
        x_src, x_dst = self.edge_src(x), self.edge_dst(x)

        def update_edges(edges: slice, g: EdgeGeometry) -> torch.Tensor:
            pair = x_src[g.src] + x_dst[g.dst] + self.edge_self(e[edges])
            return e[edges] + self.edge_update(self.edge_conv(pair, g))

        return x, map_edge_chunks(update_edges, geometry, edge_chunk)


# ----------------------------------------------------------------------------- backbone
@dataclass
class BackboneOutput:
    """Features for the heads: nodes (N, irreps_node), edges (E, irreps_edge) over ALL graph
    edges (rows of on-site edges (i, i, 0) are zero), and the geometry of non-on-site edges."""

    node: torch.Tensor
    edge: torch.Tensor
    onsite: torch.Tensor  # (E,) bool
    geometry: EdgeGeometry


class Backbone(nn.Module):
    """Species embedding → radial basis and spherical harmonics → interaction layers.

    irreps_in: atomic numbers (species of ``elements``) and edge vectors;
    irreps_out: node features ``irreps_node`` and edge features ``irreps_edge``.
    ``optimize_einsums`` lets e3nn optimise the tensor products' contraction paths: faster
    forward passes for a build that takes seconds longer (tests switch it off).
    """

    def __init__(
        self,
        elements: list[int],
        cutoff_A: float,
        irreps_node: str,
        irreps_edge: str | None = None,
        num_layers: int = 3,
        sh_lmax: int = 4,
        num_radial: int = 8,
        radial_hidden: int = 64,
        radial_layers: int = 2,
        envelope_p: int = 6,
        avg_num_neighbors: float = 20.0,
        conv: str = "tensor_product",
        optimize_einsums: bool = True,
        conv_options: dict | None = None,
    ):
        super().__init__()
        self.elements = [int(z) for z in elements]
        self.cutoff_A = float(cutoff_A)
        self.irreps_node = o3.Irreps(irreps_node)
        self.irreps_edge = o3.Irreps(irreps_edge or irreps_node)
        self.irreps_sh = o3.Irreps.spherical_harmonics(sh_lmax)
        species = torch.full((119,), -1, dtype=torch.long)
        species[self.elements] = torch.arange(len(self.elements))
        self.register_buffer("species_index", species, persistent=False)
        self.irreps_species = o3.Irreps(f"{len(self.elements)}x0e")

        self.embedding = linear(self.irreps_species, self.irreps_node)
        self.radial_basis = RadialBasis(cutoff_A, num_radial, envelope_p)
        self.spherical_harmonics = o3.SphericalHarmonics(
            self.irreps_sh, normalize=True, normalization="component"
        )
        conv_kwargs = dict(
            irreps_sh=self.irreps_sh,
            num_radial=num_radial,
            radial_hidden=radial_hidden,
            radial_layers=radial_layers,
            optimize_einsums=optimize_einsums,
            **(conv_options or {}),
        )
        conv_class = CONVOLUTIONS.get(conv, Convolution)
        self.needs_sh = conv_class.needs_sh
        self.frames = (
            so2.EdgeFrames(max(ir.l for _, ir in self.irreps_node + self.irreps_edge))
            if conv_class.needs_wigner
            else None
        )
        self.edge_embedding_src = linear(self.irreps_node, self.irreps_node)
        self.edge_embedding_dst = linear(self.irreps_node, self.irreps_node)
        self.edge_embedding = make_convolution(
            conv, irreps_in=self.irreps_node, irreps_out=self.irreps_edge, **conv_kwargs
        )
        self.layers = nn.ModuleList(
            InteractionLayer(
                self.irreps_node,
                self.irreps_edge,
                self.irreps_sh,
                num_radial,
                conv=conv,
                radial_hidden=radial_hidden,
                radial_layers=radial_layers,
                avg_num_neighbors=avg_num_neighbors,
                optimize_einsums=optimize_einsums,
                conv_options=conv_options,
            )
            for _ in range(num_layers)
        )

    def geometry(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, EdgeGeometry]:
        onsite = onsite_flags(batch)
        edge_ids = torch.nonzero(~onsite).squeeze(1)
        src, dst = batch[keys.EDGE_INDEX][:, edge_ids]
        vectors = to_e3nn_frame(edge_vectors(batch)[edge_ids])
        lengths = torch.linalg.norm(vectors, dim=1)
        geometry = EdgeGeometry(
            edge_ids=edge_ids,
            src=src,
            dst=dst,
            vectors=vectors,
            sh=self.spherical_harmonics(vectors) if self.needs_sh else None,
            radial=self.radial_basis(lengths),
            wigner=None if self.frames is None else self.frames(vectors),
        )
        return onsite, geometry

    def forward(
        self, batch: dict[str, torch.Tensor], edge_chunk: int | None = None
    ) -> BackboneOutput:
        """Features of ``batch``; ``edge_chunk`` bounds the edges whose intermediates are alive
        at once (large cells at inference; None = all edges in one go)."""
        onsite, geometry = self.geometry(batch)
        species = self.species_index[batch[keys.NUMBERS]]
        x = self.embedding(nn.functional.one_hot(species, len(self.elements)).to(geometry.radial))
        x_src, x_dst = self.edge_embedding_src(x), self.edge_embedding_dst(x)
        e = map_edge_chunks(
            lambda _, g: self.edge_embedding(x_src[g.src] + x_dst[g.dst], g), geometry, edge_chunk
        )
        for layer in self.layers:
            x, e = layer(x, e, geometry, edge_chunk)
        edge = e.new_zeros(onsite.shape[0], e.shape[1]).index_copy(0, geometry.edge_ids, e)
        return BackboneOutput(node=x, edge=edge, onsite=onsite, geometry=geometry)


__all__ = [
    "Backbone",
    "BackboneOutput",
    "CONVOLUTIONS",
    "CONV_OPTIONS",
    "Convolution",
    "EdgeGeometry",
    "GatedLinear",
    "InteractionLayer",
    "RadialBasis",
    "SO2Convolution",
    "TensorProductConvolution",
    "edge_slices",
    "edge_vectors",
    "make_convolution",
    "map_edge_chunks",
    "onsite_flags",
]
