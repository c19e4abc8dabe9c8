"""The universal equivariant Hamiltonian model: backbone + named heads (DESIGN.md §5)."""

from foundation.model.universal import UniversalHamiltonianModel, build_model, count_parameters

__all__ = ["UniversalHamiltonianModel", "build_model", "count_parameters"]
