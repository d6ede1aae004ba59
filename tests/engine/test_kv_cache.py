import pytest
import torch

from nanoseek.engine.kv_cache import PagedKVCache
from tests.conftest import tiny_llama, tiny_v2


def test_bytes_per_token_is_latent_for_mla_and_kv_for_gqa():
    v2, llama = tiny_v2(), tiny_llama()
    assert PagedKVCache.bytes_per_token(v2, torch.bfloat16) == (32 + 8) * 3 * 2
    assert PagedKVCache.bytes_per_token(llama, torch.float32) == 2 * 2 * 16 * 2 * 4
    cache = PagedKVCache(v2, num_blocks=5, block_size=4)
    assert cache.nbytes == 5 * 4 * PagedKVCache.bytes_per_token(v2, torch.float32)


def test_writes_land_in_block_table_slots_and_read_back():
    cfg = tiny_v2()
    cache = PagedKVCache(cfg, num_blocks=6, block_size=4)
    table = [5, 2]  # positions 0-3 in block 5, 4-7 in block 2
    view = cache.batch([(table, 0, 6)], packed=True)
    new = torch.randn(1, 6, cfg.kv_cache_dim)
    got = view.update(1, new)
    assert torch.equal(got, new)
    assert torch.equal(cache.pools[1][5], new[0, :4]) and torch.equal(cache.pools[1][2, :2], new[0, 4:])
    # a decode row then sees all 7 keys through the same table
    dec = cache.batch([(table, 6, 1)], packed=False)
    step = torch.randn(1, 1, cfg.kv_cache_dim)
    keys = dec.update(1, step)
    assert keys.shape == (1, 7, cfg.kv_cache_dim) and torch.equal(keys[0, 6], step[0, 0])
    assert dec.mask.shape == (1, 1, 7) and dec.positions.tolist() == [[6]]


def test_padded_decode_rows_mask_their_padding():
    cfg = tiny_v2()
    cache = PagedKVCache(cfg, num_blocks=6, block_size=4)
    view = cache.batch([([0, 1], 5, 1), ([2], 1, 1)], packed=False)
    assert view.mask[0, 0].tolist() == [True] * 6
    assert view.mask[1, 0].tolist() == [True, True] + [False] * 4


def test_block_io_checks_shapes():
    cfg = tiny_v2()
    cache = PagedKVCache(cfg, num_blocks=3, block_size=4)
    data = torch.randn(cfg.num_hidden_layers, 4, cfg.kv_cache_dim)
    cache.write_block(2, data)
    assert torch.equal(cache.read_block(2), data)
    with pytest.raises(ValueError, match="expected"):
        cache.write_block(1, data[:, :3])
