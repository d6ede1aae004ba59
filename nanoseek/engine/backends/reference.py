"""The reference paged backend: gather every key a row sees slot by slot, then SDPA. The oracle the
other backends are tested against, and the path every prefill over cached keys takes.

Notation: B rows, T new tokens per row, S keys, H heads, D cached width (L + R for MLA).
"""

from __future__ import annotations

import torch

from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.model.backend import AttentionMetadata, causal_mask, sdpa_latent


def slot_grid(block_tables: torch.Tensor, block_size: int, max_seq_len: int) -> torch.Tensor:
    """[B, S] flat pool slot of key j of each row: block_tables[b, j // bs] * bs + j % bs."""
    j = torch.arange(max_seq_len, device=block_tables.device)
    return block_tables[:, j // block_size] * block_size + j % block_size


class ReferenceBackend:
    name = "reference"

    def __init__(self, cache: PagedKVCache):
        self.cache = cache

    def reads_only_valid_keys(self, dtype: torch.dtype) -> bool:
        """Whether decode with queries of this dtype reads only each row's seq_lens keys, so that the
        width of the block tables costs nothing (then a compiled step needs one context bucket).
        Not here: the gather reads every slot of the tables."""
        return False

    def store(self, layer_idx: int, new: torch.Tensor, meta: AttentionMetadata) -> None:
        pool = self.cache.pools[layer_idx].view(-1, self.cache.dim)  # [blocks * block_size, D]
        pool.index_copy_(0, meta.slot_mapping, new.reshape(-1, new.shape[-1]).to(pool.dtype))

    def keys(self, layer_idx: int, new: torch.Tensor, meta: AttentionMetadata):
        if meta.keys_are_new:  # a prompt from position 0: its own keys, plain causal
            return new, None
        pool = self.cache.pools[layer_idx].view(-1, self.cache.dim)
        slots = slot_grid(meta.block_tables, self.cache.block_size, meta.max_seq_len)  # [B, S]
        return pool[slots].to(new.dtype), causal_mask(meta.seq_lens, meta.num_new, meta.max_seq_len)

    def latent_attention(self, layer_idx, q, new, meta, scale: float, value_dim: int) -> torch.Tensor:
        kv, mask = self.keys(layer_idx, new, meta)
        return sdpa_latent(q, kv, mask, scale, value_dim)
