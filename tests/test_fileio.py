"""Atomic writes: the old file or the new one, never half of one, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from beit3cap.fileio import atomic_write, atomic_write_json, atomic_write_jsonl


def test_atomic_write_gives_the_permissions_of_an_ordinary_file(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write_json(tmp_path / "report.json", {"a": 1})
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_jsonl(tmp_path / "index.jsonl", [{"image_id": 1}])

    def broken(f):
        f.write('{"image_id": 2}\n')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == '{"image_id": 1}\n'
    assert os.listdir(tmp_path) == ["index.jsonl"]
