"""ucdseg.io: atomic writes that honour the umask, one-line errors naming the file."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from ucdseg import io


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_permissions_the_umask_allows(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        io.write_json(tmp_path / "r.json", {"a": 1})
        io.save_checkpoint(tmp_path / "c.pt", {"model": {}})
    finally:
        os.umask(previous)
    for name in ("r.json", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "step0.pt"
    io.save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):  # what torch raises when the device is full
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(io.FileError) as info:
        io.save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    assert str(info.value) == f"cannot write checkpoint {path}: the write failed (is the disk full?)"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["step0.pt"]


def test_a_file_where_a_folder_should_be_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("a file")
    with pytest.raises(io.FileError) as info:
        io.write_text(tmp_path / "runs" / "x" / "config.yaml", "a: 1\n")
    assert str(tmp_path / "runs") in str(info.value) and "\n" not in str(info.value)


def test_read_json_names_the_file_and_what_is_wrong(tmp_path):
    with pytest.raises(io.FileError, match=r"results file .*missing.json does not exist"):
        io.read_json(tmp_path / "missing.json", "results file")
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": [1, 2')
    with pytest.raises(io.FileError) as info:
        io.read_json(bad, "results file")
    assert f"results file {bad} is corrupt" in str(info.value) and "truncated" in str(info.value)


def test_load_checkpoint_refuses_folders_garbage_and_foreign_pickles(tmp_path):
    with pytest.raises(io.FileError, match="is a folder"):
        io.load_checkpoint(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(io.FileError, match="could not be read as a ucdseg checkpoint"):
        io.load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(io.FileError, match="has no 'model' entry"):
        io.load_checkpoint(other)


def test_remove_orphans_takes_only_the_atomic_writers_temporaries(tmp_path):
    orphan = tmp_path / ".results.json.q1w2e3r4.tmp"
    keep = [tmp_path / "results.tmp", tmp_path / ".hidden", tmp_path / ".results.json"]
    for path in [orphan, *keep]:
        path.write_text("x")
    assert io.remove_orphans(tmp_path) == [orphan]
    assert all(p.exists() for p in keep)
