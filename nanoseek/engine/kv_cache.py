"""The paged KV cache: per layer one pool [num_blocks, block_size, kv_cache_dim].

For MLA, kv_cache_dim = kv_lora_rank + qk_rope_head_dim: the latent, so a token costs
(L + R) * layers * dtype bytes, whatever the number of heads. For the Llama baseline it is
2 * kv_heads * head_dim (K and V side by side). Blocks are addressed through each sequence's block
table: token position p of a sequence lives in slot block_table[p // block_size] * block_size
+ p % block_size of every layer's pool.

    cache = PagedKVCache(cfg, num_blocks=256, block_size=64)
    meta = cache.metadata(backend, [(block_table, start), ...], num_new=1, absorb=True)
    hidden = model(ids, attn_metadata=meta)     # the backend (nanoseek.engine.backends) stores and reads

One extra block past num_blocks is allocated and never handed out: padding rows of a bucketed batch
write there, so they can never overwrite a real sequence's keys.
"""

from __future__ import annotations

import torch

from nanoseek.config import ModelConfig
from nanoseek.model.backend import AttentionMetadata


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        self.dim, self.dtype, self.device = cfg.kv_cache_dim, dtype, torch.device(device)
        # block num_blocks is the padding block (never in a block table)
        self.pools = [torch.zeros(num_blocks + 1, block_size, self.dim, dtype=dtype, device=self.device)
                      for _ in range(cfg.num_hidden_layers)]
        self.pad_slot = num_blocks * block_size

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        return cfg.kv_cache_dim * cfg.num_hidden_layers * dtype_size(dtype)

    @classmethod
    def blocks_for_bytes(cls, cfg: ModelConfig, nbytes: int, block_size: int, dtype: torch.dtype) -> int:
        return int(nbytes // (cls.bytes_per_token(cfg, dtype) * block_size))

    @property
    def nbytes(self) -> int:
        """Bytes of the usable blocks (the padding block not counted)."""
        return sum(p[: self.num_blocks].numel() * p.element_size() for p in self.pools)

    def metadata(self, backend, rows: list[tuple[list[int], int]], num_new: int, absorb: bool,
                 max_seq_len: int | None = None, num_rows: int | None = None) -> AttentionMetadata:
        """The step's AttentionMetadata for rows [(block_table, start)], each with num_new new tokens at
        positions start.. (built on the host, moved to the device in one go per tensor).

        max_seq_len / num_rows: pad the key length and the batch to a bucket (compiled decode). Padding
        rows have num_new keys, all in the pool's reserved padding block (`pad_slot`), which no real
        row's table holds; padding past a row's own blocks points at block 0 and is masked."""
        bs = self.block_size
        lens = [start + num_new for _, start in rows]
        S = max(lens) if max_seq_len is None else max_seq_len
        if S < max(lens):
            raise ValueError(f"max_seq_len={S} is below the longest row ({max(lens)} keys)")
        nb = -(-S // bs)
        B = len(rows) if num_rows is None else num_rows
        pad = B - len(rows)
        # built as host lists, one tensor each: a handful of ops per step whatever B is
        tables = [list(t[:nb]) + [0] * max(0, nb - len(t)) for t, _ in rows] + [[self.num_blocks] * nb] * pad
        slots = [table[p // bs] * bs + p % bs for table, start in rows for p in range(start, start + num_new)]
        slots += [self.pad_slot] * (pad * num_new)
        dev = self.device
        return AttentionMetadata(backend, torch.tensor(lens + [num_new] * pad, device=dev), S, num_new,
                                 slot_mapping=torch.tensor(slots, device=dev),
                                 block_tables=torch.tensor(tables, device=dev),
                                 keys_are_new=all(s == 0 for _, s in rows), absorb=absorb)

    # ---------------------------------------------------------------- whole blocks (disk cache)
    def read_block(self, block_id: int) -> torch.Tensor:
        """[layers, block_size, D]: one block of every layer."""
        return torch.stack([p[block_id] for p in self.pools])

    def write_block(self, block_id: int, data: torch.Tensor) -> None:
        expect = (len(self.pools), self.block_size, self.dim)
        if tuple(data.shape) != expect:
            raise ValueError(f"block data has shape {tuple(data.shape)}, expected {expect}")
        for pool, layer in zip(self.pools, data):
            pool[block_id].copy_(layer)
