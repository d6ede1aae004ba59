"""nanoseek.io: the one atomic-write helper. A failed write leaves the old file (or folder) whole and
no temporary behind; a finished one is in place with the permissions asked for."""

import os
import pathlib
import stat

import pytest

from nanoseek.config import ModelConfig
from nanoseek.io import atomic_dir, atomic_path, atomic_write


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(target) == 0o666 & ~umask  # what open() would have given, not mkstemp's 0600
    atomic_write(target, "secret", mode=0o600, fsync=True)
    assert _mode(target) == 0o600 and target.read_text() == "secret"


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            assert tmp.name.startswith(".a.txt.") and tmp.name.endswith(".tmp")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_replaces_the_folder_or_nothing(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "y").write_text("2")
            raise KeyboardInterrupt
    assert [p.name for p in target.iterdir()] == ["x"]
    with atomic_dir(target) as tmp:
        (tmp / "z").write_text("3")
    assert [p.name for p in target.iterdir()] == ["z"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_model_config_to_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    cfg = ModelConfig()
    cfg.to_json(path)
    before = path.read_text()

    def half_write(self, data, *args, **kwargs):  # the disk fills up midway through the write
        with open(self, "w") as f:
            f.write(data[:10])
        raise OSError("no space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", half_write)
    with pytest.raises(OSError):
        cfg.replace(hidden_size=cfg.hidden_size * 2).to_json(path)
    assert path.read_text() == before
