"""The universal model: species embedding → interactions → named heads.

    features = backbone(batch)          # embedding, radial basis, spherical harmonics,
                                        # interaction layers (backbone.py)
    output   = {name: head(features, batch) for name, head in heads.items()}   # heads.py

Each output is (E, n_uni, n_uni) padded blocks in the universal basis of ``basis``
(eV for H, dimensionless for S), exactly hermitian and exactly zero outside BLOCK_MASK.
A head with a ``base`` adds its base head's output to its own (H_HSE = H_PBE + ΔH).
`predict_chunks` yields the same blocks for consecutive runs of edges, with the per-edge work
of backbone and heads chunked: inference memory linear in the number of edges.
Build from a config with `build_model` (conf/model/{tiny,base,large}.yaml).
"""

from __future__ import annotations

import copy
import difflib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from ase.data import chemical_symbols
from torch import nn

from foundation import keys
from foundation.basis import BasisSet
from foundation.model.backbone import (
    CONV_OPTIONS,
    CONVOLUTIONS,
    Backbone,
    BackboneOutput,
    edge_slices,
)
from foundation.model.derived import exclude_derived_buffers
from foundation.model.heads import HEADS
from foundation.model.lora import LORA_KEYS, add_lora


class UniversalHamiltonianModel(nn.Module):
    """Backbone shared by all targets + a dict of heads, for the elements of ``basis``.

    Attributes: ``basis`` (BasisSet), ``universal`` (its padded basis), ``elements``
    (symbols), ``cutoff_A`` (Å; the longest edge it predicts blocks for), ``backbone``,
    ``heads``, ``bases`` (head name → the head whose output it adds to), ``config`` (the
    resolved config it was built from, or None).
    """

    def __init__(
        self,
        basis: BasisSet,
        backbone: Backbone,
        heads: Mapping[str, nn.Module],
        config: Mapping[str, Any] | None = None,
        bases: Mapping[str, str] | None = None,
    ):
        super().__init__()
        self.basis = basis
        self.universal = basis.universal
        self.elements = list(basis.elements)
        if sorted(backbone.elements) != sorted(basis.atomic_numbers):
            raise ValueError(
                f"Backbone embeds elements {backbone.elements} but the basis {basis.name!r} has "
                f"{basis.atomic_numbers}; build both from the same basis."
            )
        self.backbone = backbone
        self.heads = nn.ModuleDict()
        self.bases: dict[str, str] = {}
        self.config = None if config is None else dict(config)
        for name, head in heads.items():
            self.add_head(name, head, (bases or {}).get(name))
        exclude_derived_buffers(self)  # Wigner-3j etc. are rebuilt, never loaded

    @property
    def cutoff_A(self) -> float:
        """Longest edge (Å) with predicted blocks: the backbone's cutoff, or a head's own
        longer one (`heads.PairBlockHead`). Graphs for the model use it."""
        return max(
            [self.backbone.cutoff_A] + [getattr(h, "cutoff_A", 0.0) for h in self.heads.values()]
        )

    def add_head(self, name: str, head: nn.Module, base: str | None = None) -> None:
        """Attach (or replace) a head: a module (BackboneOutput, batch) → (E, n_uni, n_uni);
        with ``base``, the output is base's output + this head's. The config is not changed
        (use `new_head` for a head that an exported checkpoint can rebuild)."""
        if base is not None and (base not in self.heads or base == name):
            raise ValueError(
                f"Head {name!r}: base head {base!r} must be one of the heads added before it "
                f"({', '.join(self.heads) or 'none'})."
            )
        self.heads[name] = head
        self.bases.pop(name, None)
        if base is not None:
            self.bases[name] = base

    def new_head(self, name: str, spec: Mapping[str, Any]) -> nn.Module:
        """Build a head from a config entry (``{type, base, scale, …}``, as under ``heads:``)
        with this model's irreps, device and dtype, attach it and record it in ``config``;
        returns the head."""
        if self.config is None:
            raise ValueError("new_head needs a model built from a config (build_model).")
        spec = dict(spec)
        check_head_spec(name, spec, [*self.heads, name])
        like = next(self.backbone.parameters())
        head = make_head(spec, self.config, self.basis).to(device=like.device, dtype=like.dtype)
        self.add_head(name, head, spec.get("base"))
        self.config["heads"] = dict(self.config["heads"]) | {name: spec}
        return head

    def check_elements(self, numbers: torch.Tensor) -> None:
        unknown = torch.unique(numbers[self.backbone.species_index[numbers] < 0])
        if unknown.numel():
            names = ", ".join(chemical_symbols[int(z)] for z in unknown)
            raise ValueError(
                f"Element(s) {names} unknown to this model; it knows {', '.join(self.elements)} "
                f"(basis {self.basis.name!r})."
            )

    def features(
        self, batch: dict[str, torch.Tensor], edge_chunk: int | None = None
    ) -> BackboneOutput:
        """Backbone features; ``edge_chunk`` as in `Backbone.forward`."""
        self.check_elements(batch[keys.NUMBERS])
        return self.backbone(batch, edge_chunk)

    def _run_heads(
        self,
        features: BackboneOutput,
        batch: dict[str, torch.Tensor],
        names: Sequence[str],
        edges: slice | None = None,
    ) -> dict[str, torch.Tensor]:
        """Outputs of the heads ``names`` and of the bases they add to, in head order."""
        needed = set(names)
        for name in reversed(list(self.heads)):  # bases come before the heads that use them
            if name in needed and name in self.bases:
                needed.add(self.bases[name])
        out: dict[str, torch.Tensor] = {}
        for name, head in self.heads.items():
            if name in needed:
                y = head(features, batch) if edges is None else head(features, batch, edges)
                out[name] = y + out[self.bases[name]] if name in self.bases else y
        return {name: out[name] for name in names}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._run_heads(self.features(batch), batch, list(self.heads))

    @torch.no_grad()
    def predict_chunks(
        self,
        batch: dict[str, torch.Tensor],
        edge_chunk: int,
        names: Sequence[str] | None = None,
    ) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
        """Inference on a large cell with a bounded working set: yields (edges, {name: blocks
        of those edges}) for consecutive runs of at most ``edge_chunk`` graph edges.

        The backbone runs its per-edge work in chunks too, so besides the node and edge
        features (linear in the cell) at most one chunk of intermediates is alive; the blocks
        equal those of `forward` up to the order of float additions. ``names``: heads to run
        (default all). No autograd graph is kept.
        """
        features = self.features(batch, edge_chunk)
        names = list(names or self.heads)
        for edges in edge_slices(features.onsite.shape[0], edge_chunk):
            yield edges, self._run_heads(features, batch, names, edges)


# ----------------------------------------------------------------------------- config
DEFAULTS: dict[str, Any] = {
    "name": "custom",
    "cutoff_A": 6.0,
    "num_layers": 3,
    "irreps_node": "32x0e+32x0o+16x1o+16x1e+8x2e+8x2o+4x3o+4x3e+4x4e+4x4o",
    "irreps_edge": None,
    "sh_lmax": 4,
    "num_radial": 8,
    "radial_hidden": 64,
    "radial_layers": 2,
    "envelope_p": 6,
    "avg_num_neighbors": 20.0,
    "conv": "tensor_product",
    "mmax": None,
    "optimize_einsums": True,
    "heads": {keys.H: {"type": "block", "scale": 1.0}, keys.S: {"type": "block", "scale": 1.0}},
    "lora": None,
    "standardize": True,
    "standardize_length": False,
    "overlap_head": "auto",
}
"""Every key a model config may hold (plus ``_target_`` and ``basis``), with defaults.
``heads``: name → ``{type, base, …}`` (`head_keys`); ``lora``: null or ``{rank: r}``
(`foundation.model.lora`); ``standardize``: foundation-train fits the heads' per-species
target statistics (`foundation.model.standardize`) on the training split before a fresh
model trains (false: identity statistics, heads predict target units directly);
``standardize_length``: off-site scales also decay with the edge length (measured on
pbe_mini at 600 steps: worse block MAE, e.g. 9.75 vs 7.34 meV val, so off by default; it is
what ``task.normalize_loss`` needs to weigh long edges); ``overlap_head`` (read by
foundation-train for pretraining, `foundation.train.config.resolve_overlap_head`): ``auto``
trains the ``s`` head only for a basis whose overlap cannot be computed exactly, ``true`` /
``false`` keep / drop it."""

_IGNORED = {"_target_", "basis"}


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid keys: {', '.join(valid)})"


def _plain(cfg: Any) -> dict[str, Any]:
    """A plain dict from None, a Mapping or an OmegaConf DictConfig (interpolations resolved)."""
    if cfg is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"Model config must be a mapping, got {type(cfg).__name__}.")
    return dict(cfg)


def resolve_config(cfg: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Defaults ← cfg ← overrides as a plain dict; an unknown key raises naming the closest."""
    cfg = _plain(cfg)
    merged = cfg | overrides
    if hasattr(merged.get("heads"), "items"):
        merged["heads"] = {k: dict(v) for k, v in merged["heads"].items()}
    for key in merged:
        if key not in DEFAULTS and key not in _IGNORED:
            raise ValueError(f"Unknown model config key {key!r}{_closest(key, list(DEFAULTS))}.")
    resolved = copy.deepcopy(DEFAULTS) | {k: v for k, v in merged.items() if k not in _IGNORED}
    if resolved["conv"] not in CONVOLUTIONS:
        raise ValueError(
            f"Unknown convolution {resolved['conv']!r}; known: {', '.join(CONVOLUTIONS)}."
        )
    for option, takers in _conv_option_takers().items():
        if resolved[option] is not None and resolved["conv"] not in takers:
            raise ValueError(
                f"Model config key {option!r} applies to conv {' / '.join(takers)} only, but "
                f"conv is {resolved['conv']!r}; set {option}: null or change conv."
            )
    names = list(resolved["heads"])
    for k, (name, spec) in enumerate(resolved["heads"].items()):
        check_head_spec(name, spec, names[: k + 1])
    lora = resolved["lora"]
    if lora is not None:
        if not isinstance(lora, Mapping) or set(lora) - set(LORA_KEYS) or "rank" not in lora:
            raise ValueError(f"lora must be null or {{rank: r}}, got {lora!r}.")
    return resolved


def _conv_option_takers() -> dict[str, list[str]]:
    """Convolution-specific config key → the convolutions that take it."""
    takers: dict[str, list[str]] = {}
    for name, options in CONV_OPTIONS.items():
        for option in options:
            takers.setdefault(option, []).append(name)
    return takers


def head_keys(head_type: str) -> list[str]:
    """Config keys of a head of ``head_type``: ``type``, ``base`` and the head class's
    keyword arguments after ``universal`` (e.g. ``scale``, ``cutoff_A``)."""
    params = list(inspect.signature(HEADS[head_type].__init__).parameters)
    return ["type", "base", *params[params.index("universal") + 1 :]]


def check_head_spec(name: str, spec: Mapping[str, Any], before: Sequence[str]) -> None:
    """Raise naming the head and the fix if ``spec`` has an unknown type or key, or a
    ``base`` that is not one of the heads ``before`` it (``before`` ends with ``name``)."""
    head_type = spec.get("type", "block")
    if head_type not in HEADS:
        raise ValueError(
            f"Head {name!r}: unknown type {head_type!r}{_closest(head_type, list(HEADS))}."
        )
    allowed = head_keys(head_type)
    extra = sorted(set(spec) - set(allowed))
    if extra:
        raise ValueError(
            f"Head {name!r}: unknown key(s) {extra}{_closest(extra[0], allowed)}; allowed for "
            f"type {head_type!r}: {', '.join(allowed)}."
        )
    base = spec.get("base")
    if base is not None and (base == name or base not in before):
        raise ValueError(
            f"Head {name!r}: base {base!r} must be a head listed before it "
            f"({', '.join(b for b in before if b != name) or 'none'})."
        )


def make_head(spec: Mapping[str, Any], config: Mapping[str, Any], basis: BasisSet) -> nn.Module:
    """A head from its config entry, on the node/edge irreps of the model ``config``."""
    kwargs = {k: v for k, v in spec.items() if k not in ("type", "base")}
    return HEADS[spec.get("type", "block")](
        config["irreps_node"],
        config["irreps_edge"] or config["irreps_node"],
        basis.universal,
        **kwargs,
    )


def build_model(
    cfg: Mapping[str, Any] | None = None,
    *,
    basis: BasisSet | Mapping | None = None,
    **overrides: Any,
) -> UniversalHamiltonianModel:
    """Build the model from a config (plain dict / OmegaConf, e.g. conf/model/tiny.yaml).

    ``basis`` (a BasisSet or its ``to_dict()``, e.g. the dataset manifest's ``basis``) is
    required, either as argument or as ``cfg["basis"]``. Works both as
    ``build_model(cfg.model, basis=manifest["basis"])`` and through Hydra's
    ``instantiate(cfg.model, basis=...)`` (keys arrive as keyword overrides).
    """
    cfg = _plain(cfg)
    if basis is None:
        basis = cfg.get("basis")
    if basis is None:
        raise ValueError(
            "build_model needs the orbital basis: pass basis=BasisSet or the dataset "
            "manifest's 'basis' dict."
        )
    if not isinstance(basis, BasisSet):
        basis = BasisSet.from_dict(basis)
    config = resolve_config(cfg, **overrides)
    irreps_edge = config["irreps_edge"] or config["irreps_node"]
    # heads first: they check that the irreps can express every block of the basis
    heads = {name: make_head(spec, config, basis) for name, spec in config["heads"].items()}
    bases = {name: spec["base"] for name, spec in config["heads"].items() if spec.get("base")}
    backbone = Backbone(
        elements=basis.atomic_numbers,
        cutoff_A=config["cutoff_A"],
        irreps_node=config["irreps_node"],
        irreps_edge=irreps_edge,
        num_layers=config["num_layers"],
        sh_lmax=config["sh_lmax"],
        num_radial=config["num_radial"],
        radial_hidden=config["radial_hidden"],
        radial_layers=config["radial_layers"],
        envelope_p=config["envelope_p"],
        avg_num_neighbors=config["avg_num_neighbors"],
        conv=config["conv"],
        optimize_einsums=config["optimize_einsums"],
        conv_options={k: config[k] for k in CONV_OPTIONS[config["conv"]] if config[k] is not None},
    )
    model = UniversalHamiltonianModel(
        basis, backbone, heads, config=config | {"basis": basis.to_dict()}, bases=bases
    )
    if config["lora"] is not None:
        add_lora(model, **config["lora"])
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "DEFAULTS",
    "UniversalHamiltonianModel",
    "build_model",
    "check_head_spec",
    "count_parameters",
    "head_keys",
    "make_head",
    "resolve_config",
]
