"""One vocabulary for every field that flows through records, shards, batches and models.

Import names from here instead of spelling strings by hand, so a field has one name
everywhere (shard member suffixes, batch dict keys, model outputs, metric names).
"""

# --- structure (units: Å) -------------------------------------------------------------
NUMBERS = "numbers"  # (N,) atomic numbers
POSITIONS = "positions"  # (N, 3) Cartesian positions, Å
CELL = "cell"  # (3, 3) lattice vectors as rows, Å (per structure; (B, 3, 3) in a batch)
PBC = "pbc"  # (3,) periodic flags

# --- graph ----------------------------------------------------------------------------
EDGES = "edges"  # (E, 5) int32 rows (i, j, Rx, Ry, Rz) as stored in records/shards
EDGE_INDEX = "edge_index"  # (2, E) int64 (i, j), batch-global atom indices
EDGE_SHIFT = "edge_shift"  # (E, 3) integer lattice translation R of the j-side atom
EDGE_VECTOR = "edge_vector"  # (E, 3) r_ij = τ_j + R·cell − τ_i, Å
EDGE_REVERSE = "edge_reverse"  # (E,) index of the edge (j, i, −R)
BATCH = "batch"  # (N,) structure index of each atom
EDGE_BATCH = "edge_batch"  # (E,) structure index of each edge
N_ATOMS = "n_atoms"  # (B,) atoms per structure
N_EDGES = "n_edges"  # (B,) edges per structure

# --- targets (units: eV for H, dimensionless for S) -----------------------------------
H = "h"  # Hamiltonian blocks H − μS
S = "s"  # overlap blocks
H_HSE = "h_hse"  # hybrid-functional Hamiltonian blocks (fine-tuning)
DH = "dh"  # d h / du_κα, one row per Cartesian displacement (e-ph), eV/Å; layout: record.py
DS = "ds"  # d s / du_κα, one row per Cartesian displacement (e-ph), 1/Å
BLOCK_MASK = "block_mask"  # (E, n_uni, n_uni) bool: which padded entries are real orbitals
PRESENT_SUFFIX = "_present"  # f"{target}_present": (E,) bool, the edge's structure has the target
ONSITE = "onsite"  # (E,) bool: i == j and R == 0

# --- metadata -------------------------------------------------------------------------
KEY = "key"  # unique structure id (also the webdataset sample key)
SPLIT_GROUP = "split_group"  # (B,) long: index into SPLIT_GROUPS of each evaluated structure
SPLIT_GROUPS = ("seen", "unseen_composition", "unseen_element")
"""What an evaluated structure measures (manifest ``split_policy``, `data.shards.split_group`):
``seen`` — its composition also occurs in training; ``unseen_composition`` — a held-out
composition whose elements all train; ``unseen_element`` — it contains an element held out of
training on purpose (zero-shot element transfer)."""
META = "meta"
ENERGY_ZERO = "energy_zero_eV"  # μ = ⟨H,S⟩/⟨S,S⟩ subtracted from the stored H (eV)
ENERGY_ZERO_HSE = "energy_zero_hse_eV"  # the same for the hybrid-functional target h_hse
ENERGY_ZERO_OF = {H: ENERGY_ZERO, H_HSE: ENERGY_ZERO_HSE}  # Hamiltonian target → its μ key
N_ELECTRONS = "n_electrons"  # valence electrons (from the pseudopotential)
FUNCTIONAL = "functional"
SOURCE = "source"
BASIS_NAME = "basis"


def present(target: str) -> str:
    """Batch key of a target's presence flags, e.g. ``present("h_hse") == "h_hse_present"``.

    Batches that mix structures with and without an optional target (fine-tuning with replay
    of pretraining data) carry these (E,) bool flags; losses and metrics count an edge's
    entries only where its flag is set. A batch without the key has the target everywhere.
    """
    return f"{target}{PRESENT_SUFFIX}"
