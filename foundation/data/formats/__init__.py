"""Readers and writers of other codes' Hamiltonian folders → `HamiltonianRecord` and back.

Each format module states its file layout, units, index base and orbital convention in its
docstring; the shared machinery (h5 blocks, orbital conversion, atomic writes, error
messages) lives in `common`.
"""

from foundation.data.formats.common import FormatError
from foundation.data.formats.deeph import is_deeph_folder, read_deeph, write_deeph
from foundation.data.formats.deeptb import is_deeptb_folder, read_deeptb, write_deeptb

FORMATS = {
    "deeph": (is_deeph_folder, read_deeph, write_deeph),
    "deeptb": (is_deeptb_folder, read_deeptb, write_deeptb),
}
"""name → (is_folder(path), read(path, **kw) -> record, write(record, path, **kw) -> path)."""

__all__ = [
    "FORMATS",
    "FormatError",
    "is_deeph_folder",
    "is_deeptb_folder",
    "read_deeph",
    "read_deeptb",
    "write_deeph",
    "write_deeptb",
]
