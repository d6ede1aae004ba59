import pytest
import torch

from nanoseek.engine.backends.reference import ReferenceBackend
from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.model.backend import causal_mask
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
    backend = ReferenceBackend(cache)
    table = [5, 2]  # positions 0-3 in block 5, 4-7 in block 2
    meta = cache.metadata(backend, [(table, 0)], num_new=6, absorb=False)
    new = torch.randn(1, 6, cfg.kv_cache_dim)
    backend.store(1, new, meta)
    keys, mask = backend.keys(1, new, meta)
    assert keys is new and mask is None  # a prompt from 0 attends its own keys
    assert torch.equal(cache.pools[1][5], new[0, :4]) and torch.equal(cache.pools[1][2, :2], new[0, 4:])
    # a decode row then sees all 7 keys through the same table
    dec = cache.metadata(backend, [(table, 6)], num_new=1, absorb=True)
    step = torch.randn(1, 1, cfg.kv_cache_dim)
    backend.store(1, step, dec)
    keys, mask = backend.keys(1, step, dec)
    assert keys.shape == (1, 7, cfg.kv_cache_dim) and torch.equal(keys[0, 6], step[0, 0])
    assert torch.equal(keys[0, :6], new[0])
    assert mask.shape == (1, 1, 7) and dec.positions().tolist() == [[6]] and dec.kind == "decode"


def test_padded_decode_rows_mask_their_padding_and_padding_rows_write_aside():
    cfg = tiny_v2()
    cache = PagedKVCache(cfg, num_blocks=6, block_size=4)
    meta = cache.metadata(ReferenceBackend(cache), [([0, 1], 5), ([2], 1)], num_new=1, absorb=True,
                          max_seq_len=8, num_rows=4)
    mask = causal_mask(meta.seq_lens, 1, meta.max_seq_len)
    assert mask[0, 0].tolist() == [True] * 6 + [False] * 2
    assert mask[1, 0].tolist() == [True, True] + [False] * 6
    assert meta.slot_mapping.tolist()[2:] == [cache.pad_slot] * 2  # the reserved block, no real row's
    assert meta.block_tables[2:].eq(cache.num_blocks).all() and meta.seq_lens.tolist() == [6, 2, 1, 1]
    with pytest.raises(ValueError, match="max_seq_len=4 is below the longest row"):
        cache.metadata(ReferenceBackend(cache), [([0, 1], 5)], num_new=1, absorb=True, max_seq_len=4)


def test_block_io_checks_shapes():
    cfg = tiny_v2()
    cache = PagedKVCache(cfg, num_blocks=3, block_size=4)
    data = torch.randn(cfg.num_hidden_layers, 4, cfg.kv_cache_dim)
    cache.write_block(2, data)
    assert torch.equal(cache.read_block(2), data)
    with pytest.raises(ValueError, match="expected"):
        cache.write_block(1, data[:, :3])
