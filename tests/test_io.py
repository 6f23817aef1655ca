"""moe_gguf._io: atomic saves and JSONL reading (pure Python)."""

from __future__ import annotations

import os

import pytest

from moe_gguf._io import atomic_path, atomic_write, read_jsonl
from moe_gguf.errors import FileWriteError


def test_atomic_path_never_closes_a_descriptor_twice(tmp_path):
    """atomic_path closes its temp file's fd before the body; a file the body opens may get that number and
    must still be open afterwards (a second close would close it, losing its buffered data)."""
    target = tmp_path / "x.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        other = open(tmp_path / "other", "wb")  # noqa: SIM115 (kept open past the block on purpose)
    other.write(b"still open")
    other.close()  # EBADF if atomic_path closed the reused fd number
    assert target.read_bytes() == b"new" and (tmp_path / "other").read_bytes() == b"still open"


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.bin"
    atomic_write(target, b"old")

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]
    with pytest.raises(FileWriteError, match="does the directory exist"):
        atomic_write(tmp_path / "missing" / "x.bin", b"x")


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    rows = read_jsonl(path)
    assert next(rows) == (1, {"a": 1})
    with pytest.raises(ValueError, match=r"d\.jsonl:3: not valid JSON"):
        next(rows)
