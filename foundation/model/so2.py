"""SO(2) convolution (eSCN idea): rotate each edge onto the polar axis, mix per |m|, rotate back.

A tensor product of features with the spherical harmonics of the edge direction r̂ becomes
simple in the frame where r̂ lies on the polar axis: there Y_l(r̂) is non-zero only at m = 0,
so the product couples input and output components of the *same* |m| only, through 2×2
blocks [[a, −b], [b, a]] on the (+m, −m) pair (the most general linear map that commutes
with rotations about the axis). Three small named pieces implement it:

* `edge_wigner` — per-edge Wigner-D matrices D_l(R_e), R_e ŷ = r̂ (e3nn's polar axis is y),
  for l = 0 … lmax, packed in one tensor; computed once per forward pass by the backbone and
  shared by every layer (`EdgeGeometry.wigner`).
* `MMajorLayout` — index tables that gather the rotated components of an irreps vector
  m-major ([m=0 | +1 | −1 | +2 | −2 | …], channels of every l ≥ m inside each), so each |m|
  is one dense matmul.
* `SO2Convolution` — rotate in, per-|m| linear maps with radial-MLP weights, rotate out.

Parity (O(3) equivariance, not only SO(3)): a mirror plane containing the edge acts on the
(+m, −m) pair of an irrep (l, p) as ±diag(1, −1) times s = p·(−1)^l, so the symmetric part
``a`` may only connect channels of equal s and the antisymmetric part ``b`` only channels of
opposite s; at m = 0 only ``a`` exists. This reproduces exactly the parity selection of the
Clebsch–Gordan paths x_{l_i} ⊗ Y_{l_f} → l_o (a: l_i + l_f + l_o even, b: odd).

The frame R_e is not unique (any rotation about r̂ may follow it); the convolution's result
does not depend on that choice, so it is exactly equivariant. Every smooth choice of R_e has
a singular direction (hairy ball); a fixed generic pre-rotation puts it away from lattice
directions, so autograd (forces, e-ph dH/du) stays finite on real crystals.
"""

from __future__ import annotations

import torch
from e3nn import nn as enn
from e3nn import o3
from torch import nn

from foundation.rotations import double_precision

# A fixed, generic rotation (Euler angles, rad): the packing's singular direction is
# Q0ᵀ(±ŷ) instead of ŷ, i.e. no lattice direction of any ordinary crystal.
_GENERIC_ANGLES = (0.7853981, 1.1071487, 0.4636476)


def wigner_size(lmax: int) -> int:
    """Entries of the packed per-edge Wigner-D tensor for l = 0 … lmax: Σ (2l+1)²."""
    return sum((2 * l + 1) ** 2 for l in range(lmax + 1))


def _y_rotation(l: int, angle: torch.Tensor) -> torch.Tensor:
    """(E, 2l+1, 2l+1) D_l of a rotation by ``angle`` about e3nn's polar axis y: in e3nn's real
    basis it is cos(mθ) on the diagonal and −sin(mθ) at (l+m, l−m) (checked in tests)."""
    m = torch.arange(-l, l + 1, dtype=angle.dtype, device=angle.device)
    phase = angle[:, None] * m
    return torch.diag_embed(torch.cos(phase)) - torch.diag_embed(torch.sin(phase)).flip(-1)


class EdgeFrames(nn.Module):
    """Per-edge D_l(R_e) with R_e ŷ = r̂_e, l = 0 … lmax (e3nn frame, e3nn's real basis).

    R_e = Q0ᵀ R_y(α) R_x(β) with (α, β) the e3nn angles of Q0 r̂ and R_x(β) = P R_y(β) Pᵀ
    (P: ŷ → x̂), so D_l(R_e) = D_l(Q0)ᵀ Y_l(α) J_l Y_l(β) J_lᵀ with J_l = D_l(P): cosines and
    sines of the two angles and constant matrices, no matrix exponentials.
    """

    def __init__(self, lmax: int):
        super().__init__()
        self.lmax = int(lmax)
        with double_precision():
            q0 = o3.angles_to_matrix(*(torch.tensor(a) for a in _GENERIC_ANGLES))
            p = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # ŷ → x̂
            for l in range(self.lmax + 1):
                ir = o3.Irrep(l, 1)
                self.register_buffer(
                    f"q0_{l}", ir.D_from_matrix(q0).T.contiguous(), persistent=False
                )
                self.register_buffer(f"j_{l}", ir.D_from_matrix(p).contiguous(), persistent=False)
        self.register_buffer("q0", q0, persistent=False)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """(E, 3) edge vectors (e3nn frame, any length > 0) → (E, Σ(2l+1)²) packed D_l(R_e)."""
        dtype = vectors.dtype
        v = vectors @ self.q0.to(dtype).T
        v = v / torch.linalg.norm(v, dim=-1, keepdim=True)
        alpha = torch.atan2(v[:, 0], v[:, 2])
        beta = torch.acos(v[:, 1].clamp(-1.0, 1.0))
        parts = []
        for l in range(self.lmax + 1):
            j = getattr(self, f"j_{l}").to(dtype)
            d = getattr(self, f"q0_{l}").to(dtype) @ _y_rotation(l, alpha) @ j
            d = d @ _y_rotation(l, beta) @ j.T
            parts.append(d.reshape(len(v), -1))
        return torch.cat(parts, dim=1)


def unpack_wigner(packed: torch.Tensor, l: int) -> torch.Tensor:
    """(E, 2l+1, 2l+1) view of D_l inside a packed `EdgeFrames` output."""
    start = wigner_size(l - 1) if l > 0 else 0
    d = 2 * l + 1
    return packed[:, start : start + d * d].view(-1, d, d)


class MMajorLayout:
    """Index tables between an e3nn irreps vector and its m-major form in the edge frame.

    ``lmajor``: e3nn layout → per-l blocks (C_l channels of both parities, 2l+1), concatenated
    over l; ``mmajor``: that rotated l-major vector → [m=0 | +1 | −1 | … | +mmax | −mmax],
    each part listing (l ≥ m, channel) in l-major order; ``sign[m]``: s = p·(−1)^l of each
    channel of part m (the parity class that selects ``a`` or ``b`` couplings).
    """

    def __init__(self, irreps: o3.Irreps, mmax: int):
        self.irreps = o3.Irreps(irreps)
        self.ls = sorted({ir.l for _, ir in self.irreps})
        self.mmax = min(int(mmax), max(self.ls))
        channels: dict[int, list[tuple[int, int]]] = {l: [] for l in self.ls}  # (offset, s)
        offset = 0
        for mul, ir in self.irreps:
            for u in range(mul):
                channels[ir.l].append((offset + u * ir.dim, ir.p * (-1) ** ir.l))
            offset += mul * ir.dim
        self.channels = {l: len(c) for l, c in channels.items()}
        lmajor, start = [], {}
        for l in self.ls:
            start[l] = len(lmajor)
            for off, _ in channels[l]:
                lmajor.extend(range(off, off + 2 * l + 1))
        self.lmajor = torch.tensor(lmajor)
        self.lmajor_start = start
        mmajor: list[int] = []
        self.counts: list[int] = []  # channels in part m (each of ±m for m > 0)
        self.sign: list[torch.Tensor] = []
        for m in range(self.mmax + 1):
            members = [(l, c, s) for l in self.ls if l >= m for c, (_, s) in enumerate(channels[l])]
            for sgn in (1, -1) if m > 0 else (1,):
                mmajor.extend(start[l] + c * (2 * l + 1) + l + sgn * m for l, c, _ in members)
            self.counts.append(len(members))
            self.sign.append(torch.tensor([s for _, _, s in members], dtype=torch.long))
        self.mmajor = torch.tensor(mmajor)
        self.dim = self.irreps.dim

    def mmajor_to_lmajor(self) -> torch.Tensor:
        """Index into [m-major vector | 0] that rebuilds the l-major vector, with the zero
        column (last) wherever |m| > mmax."""
        inverse = torch.full((len(self.lmajor),), len(self.mmajor), dtype=torch.long)
        inverse[self.mmajor] = torch.arange(len(self.mmajor))
        return inverse


class SO2Convolution(nn.Module):
    """Equivariant convolution x ⊗ r̂ → irreps_out by per-|m| linear maps in the edge frame.

    out = D(R_e) · W_m(r) · D(R_e)ᵀ x, where in the edge frame the m = 0 part is y₀ = W₀ x₀
    and each m > 0 pair is y₊ = A x₊ − B x₋, y₋ = B x₊ + A x₋ (A, B: the parity-allowed
    entries of one shared matrix W_m), and the radial weights w(r) (bias-free MLP of the
    Bessel×envelope features, one per input (m, l, channel)) scale x before the maps: the
    output is zero wherever the radial features are, hence smooth at the cutoff.
    ``mmax`` truncates |m| (None: all m ≤ lmax). irreps_in → irreps_out (any parities).
    Needs ``geometry.wigner`` (`EdgeFrames` up to the larger lmax of in/out irreps).
    """

    needs_wigner = True

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_sh: o3.Irreps | None,
        irreps_out: o3.Irreps,
        num_radial: int,
        radial_hidden: int = 64,
        radial_layers: int = 2,
        optimize_einsums: bool = True,
        mmax: int | None = None,
    ):
        super().__init__()
        del irreps_sh, optimize_einsums  # interface of `Convolution`; unused here
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        self.lmax = max(ir.l for _, ir in self.irreps_in + self.irreps_out)
        self.mmax = self.lmax if mmax is None else min(int(mmax), self.lmax)
        self.lin = MMajorLayout(self.irreps_in, self.mmax)
        self.lout = MMajorLayout(self.irreps_out, self.mmax)
        n_m = min(self.lin.mmax, self.lout.mmax) + 1  # parts that can couple at all
        self.part_widths_in = [
            c * (1 if m == 0 else 2) for m, c in enumerate(self.lin.counts[:n_m])
        ]
        n_out = sum(c * (1 if m == 0 else 2) for m, c in enumerate(self.lout.counts[:n_m]))
        self.register_buffer("in_lmajor", self.lin.lmajor, persistent=False)
        self.register_buffer(
            "in_used", self.lin.mmajor[: sum(self.part_widths_in)], persistent=False
        )
        # [produced m-major output | 0] → l-major output; parts with m ≥ n_m read the zero
        out_index = self.lout.mmajor_to_lmajor()
        self.register_buffer(
            "out_index", torch.where(out_index < n_out, out_index, n_out), persistent=False
        )
        self.register_buffer("out_to_e3nn", torch.argsort(self.lout.lmajor), persistent=False)
        self.weights = nn.ParameterList()
        for m in range(n_m):
            s_in, s_out = self.lin.sign[m], self.lout.sign[m]
            same = (s_in[:, None] == s_out[None, :]).double()
            self.register_buffer(f"same_{m}", same, persistent=False)
            # m = 0: only the parity-allowed ``a`` entries are used (fan-in = their count);
            # m > 0: every (in, out) pair is either ``a`` (from x₊) or ``b`` (from x₋).
            fan_in = same.sum(0) if m == 0 else torch.full((len(s_out),), float(len(s_in)))
            self.register_buffer(f"norm_{m}", fan_in.clamp_min(1.0).rsqrt(), persistent=False)
            self.weights.append(nn.Parameter(torch.randn(len(s_in), len(s_out))))
        # one radial weight per input (m, l, channel), shared by +m and −m
        expand, base = [], 0
        for m, c in enumerate(self.lin.counts[:n_m]):
            expand.extend(list(range(base, base + c)) * (1 if m == 0 else 2))
            base += c
        self.register_buffer("radial_expand", torch.tensor(expand), persistent=False)
        self.radial = enn.FullyConnectedNet(
            [num_radial] + [radial_hidden] * radial_layers + [base], torch.nn.functional.silu
        )

    def _rotate(
        self, x: torch.Tensor, wigner: torch.Tensor, layout: MMajorLayout, inverse: bool
    ) -> torch.Tensor:
        """Per l: (E, C_l, 2l+1) rows times D_l (into the edge frame: D_lᵀ x) or D_lᵀ (back).
        Splits rather than slices: their backward concatenates instead of zero-filling."""
        e = x.shape[0]
        widths = [layout.channels[l] * (2 * l + 1) for l in layout.ls]
        parts = []
        for l, block in zip(layout.ls, torch.split(x, widths, dim=1), strict=True):
            d = unpack_wigner(wigner, l)
            block = block.reshape(e, layout.channels[l], 2 * l + 1)
            parts.append(torch.bmm(block, d.transpose(1, 2) if inverse else d).reshape(e, -1))
        return torch.cat(parts, dim=1)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        """Per-|m| linear maps on the m-major vector (E, Σ input parts) → (E, Σ output parts)."""
        outs = []
        parts = torch.split(x, self.part_widths_in, dim=1)
        for m, (w, part) in enumerate(zip(self.weights, parts, strict=True)):
            same = getattr(self, f"same_{m}").to(w.dtype)
            w = w * getattr(self, f"norm_{m}").to(w.dtype)
            if m == 0:
                outs.append(part @ (w * same))
                continue
            a, b = w * same, w * (1 - same)
            outs.append(part @ torch.cat([torch.cat([a, b], 1), torch.cat([-b, a], 1)], 0))
        return torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor, geometry) -> torch.Tensor:
        wigner = geometry.wigner
        x = self._rotate(x.index_select(1, self.in_lmajor), wigner, self.lin, inverse=False)
        x = x.index_select(1, self.in_used)
        x = x * self.radial(geometry.radial).index_select(1, self.radial_expand)
        y = self._mix(x)
        y = torch.cat([y, y.new_zeros(len(y), 1)], dim=1).index_select(1, self.out_index)
        y = self._rotate(y, wigner, self.lout, inverse=True)
        return y.index_select(1, self.out_to_e3nn)


__all__ = ["EdgeFrames", "MMajorLayout", "SO2Convolution", "unpack_wigner", "wigner_size"]
