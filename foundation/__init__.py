"""foundation: universal equivariant models of DFT Hamiltonians H(R) and overlaps S(R).

Units everywhere: Å for lengths, eV for energies. See DESIGN.md for conventions.
"""

__version__ = "0.1.0"
