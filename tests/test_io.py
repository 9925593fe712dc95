"""Atomic writes: the old file or the new one, never half of one."""

from __future__ import annotations

import json

import pytest

from brainseg_dist.io import atomic_write, atomic_write_bytes, atomic_write_json


class WriterFailedError(RuntimeError):
    pass


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old content")

    def partial(tmp):
        tmp.write_bytes(b"new but incomp")
        raise WriterFailedError("disk on fire")

    with pytest.raises(WriterFailedError, match="disk on fire"):
        atomic_write(path, partial)
    assert path.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_interrupted_write_also_cleans_up(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("{}")

    def interrupted(tmp):
        tmp.write_text('{"half":')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_first_write_creates_nothing(tmp_path):
    def fail(tmp):
        raise WriterFailedError

    with pytest.raises(WriterFailedError):
        atomic_write(tmp_path / "new.txt", fail)
    assert list(tmp_path.iterdir()) == []


def test_successful_write_replaces(tmp_path):
    path = tmp_path / "deep" / "dir" / "f.bin"
    assert atomic_write_bytes(path, b"one") == path
    assert atomic_write_bytes(path, b"two") == path
    assert path.read_bytes() == b"two"
    atomic_write_json(tmp_path / "x.json", {"a": [1, 2], "p": tmp_path})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2], "p": str(tmp_path)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "x.json"]
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]
