"""The on-disk context cache keeps what tenants sent private to the server's user."""

from __future__ import annotations

import stat

import torch

from nanoseek.engine.disk_cache import DiskCache, model_fingerprint


def test_cache_folder_and_block_files_are_private(tmp_path):
    disk = DiskCache(tmp_path / "runs" / "kv", fingerprint="f", block_shape=(2, 4, 8), dtype=torch.float32)
    disk.save("ab" * 16, torch.ones(2, 4, 8))
    assert stat.S_IMODE((tmp_path / "runs" / "kv").stat().st_mode) == 0o700
    (block,) = (tmp_path / "runs" / "kv").glob("*.safetensors")
    assert stat.S_IMODE(block.stat().st_mode) == 0o600
    assert disk.stage("ab" * 16) and torch.equal(disk.take("ab" * 16), torch.ones(2, 4, 8))


def test_the_fingerprint_covers_the_rope_frequencies():
    """inv_freq is not saved with the weights, yet every cached key was roped with it: keys written
    under other frequencies (e.g. bf16-rounded ones, before they were kept in fp32) must not match."""
    from nanoseek.model.transformer import build_model
    from tests.conftest import tiny_v2

    model = build_model(tiny_v2(), seed=0)
    before = model_fingerprint(model)
    assert model_fingerprint(build_model(tiny_v2(), seed=0)) == before
    model.inv_freq.copy_(model.inv_freq.to(torch.bfloat16).float())
    assert model_fingerprint(model) != before
