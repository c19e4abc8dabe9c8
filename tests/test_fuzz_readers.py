"""Property-based fuzzing of every reader of untrusted files (hypothesis): DeepH and DeePTB
folders and shard samples with truncated, overwritten or random bytes in any one file must
either read into a valid record or stop with the reader's own error (FormatError /
ShardError, naming the file) — never another exception."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foundation.data.formats import FormatError, read_deeph, read_deeptb, write_deeph, write_deeptb
from foundation.data.shards import ShardError, decode_sample
from foundation.data.synthetic import random_record

RECORD = random_record("fuzz_0", ["Ga", "As", "Si"], seed=1, cutoff_A=4.0)
FOLDERS = {"deeph": (write_deeph, read_deeph), "deeptb": (write_deeptb, read_deeptb)}
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def damage(draw, size: int) -> tuple[str, int, bytes]:
    """(how, where, bytes): truncate at a position, overwrite a run, or replace the file."""
    how = draw(st.sampled_from(["truncate", "overwrite", "replace"]))
    where = draw(st.integers(0, max(size - 1, 0)))
    data = draw(st.binary(min_size=1, max_size=64))
    return how, where, data


def _damaged(original: bytes, how: str, where: int, data: bytes) -> bytes:
    if how == "truncate":
        return original[:where]
    if how == "overwrite":
        return original[:where] + data + original[where + len(data) :]
    return data


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def folder(request, tmp_path_factory):
    write, read = FOLDERS[request.param]
    path = write(RECORD, tmp_path_factory.mktemp(request.param) / "s0")
    return path, read


@FUZZ
@given(data=st.data())
def test_damaged_folder_reads_or_raises_format_error(folder, data):
    path, read = folder
    files = sorted(p.name for p in path.iterdir())
    name = data.draw(st.sampled_from(files))
    original = (path / name).read_bytes()
    how, where, payload = data.draw(damage(len(original)))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copytree(path, copy)
        (copy / name).write_bytes(_damaged(original, how, where, payload))
        try:
            read(copy).validate()
        except FormatError as exc:
            assert str(copy) in str(exc)


@FUZZ
@given(data=st.data())
def test_damaged_shard_sample_decodes_or_raises_shard_error(data):
    members = RECORD.to_files()
    name = data.draw(st.sampled_from(sorted(members)))
    how, where, payload = data.draw(damage(len(members[name])))
    sample = {"__key__": RECORD.key, **members, name: _damaged(members[name], how, where, payload)}
    try:
        decode_sample(sample, "/data/x/train/shard-000000.tar")  # (sha256 catches the rest)
    except ShardError as exc:
        assert "shard-000000.tar" in str(exc) and RECORD.key in str(exc)
