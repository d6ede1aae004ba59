"""The on-disk context cache keeps what tenants sent private to the server's user."""

from __future__ import annotations

import stat

import torch

from nanoseek.engine.disk_cache import DiskCache


def test_cache_folder_and_block_files_are_private(tmp_path):
    disk = DiskCache(tmp_path / "runs" / "kv", fingerprint="f", block_shape=(2, 4, 8), dtype=torch.float32)
    disk.save("ab" * 16, torch.ones(2, 4, 8))
    assert stat.S_IMODE((tmp_path / "runs" / "kv").stat().st_mode) == 0o700
    (block,) = (tmp_path / "runs" / "kv").glob("*.safetensors")
    assert stat.S_IMODE(block.stat().st_mode) == 0o600
    assert disk.stage("ab" * 16) and torch.equal(disk.take("ab" * 16), torch.ones(2, 4, 8))
