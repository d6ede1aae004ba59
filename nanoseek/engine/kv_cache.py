"""The paged KV cache: per layer one pool [num_blocks, block_size, kv_cache_dim].

For MLA, kv_cache_dim = kv_lora_rank + qk_rope_head_dim: the latent, so a token costs
(L + R) * layers * dtype bytes, whatever the number of heads. For the Llama baseline it is
2 * kv_heads * head_dim (K and V side by side). Blocks are addressed through each sequence's block
table: token position p of a sequence lives in slot block_table[p // block_size] * block_size
+ p % block_size of every layer's pool.

    cache = PagedKVCache(cfg, num_blocks=256, block_size=64)
    view = cache.batch(rows, packed)   # rows: [(block_table, start, num_new)], one per model row
    logits = model(ids, positions=view.positions, mask=view.mask, cache=view, ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.config import ModelConfig


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        self.dim, self.dtype, self.device = cfg.kv_cache_dim, dtype, torch.device(device)
        self.pools = [torch.zeros(num_blocks, block_size, self.dim, dtype=dtype, device=self.device)
                      for _ in range(cfg.num_hidden_layers)]

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        return cfg.kv_cache_dim * cfg.num_hidden_layers * dtype_size(dtype)

    @classmethod
    def blocks_for_bytes(cls, cfg: ModelConfig, nbytes: int, block_size: int, dtype: torch.dtype) -> int:
        return int(nbytes // (cls.bytes_per_token(cfg, dtype) * block_size))

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.pools)

    def batch(self, rows: list[tuple[list[int], int, int]], packed: bool) -> "BatchView":
        """Slots, positions and mask for one forward.

        rows: (block_table, start, num_new) per model row: num_new tokens at positions start...
        packed=True: one sequence, any number of new tokens (causal; None mask when start == 0).
        packed=False: one new token per row (decode), keys padded to the longest row.
        """
        bs, dev = self.block_size, self.device

        def slots(table: list[int], lo: int, hi: int) -> torch.Tensor:
            p = torch.arange(lo, hi)
            return torch.tensor(table, dtype=torch.long)[p // bs] * bs + p % bs

        if packed:
            assert len(rows) == 1, "the packed layout holds one sequence"
            table, s, n = rows[0]
            write, read = slots(table, s, s + n), slots(table, 0, s + n)[None]  # [T], [1, S]
            positions = torch.arange(s, s + n)[None]
            mask = None if s == 0 else torch.ones(n, s + n, dtype=torch.bool).tril(s)[None]  # [1, T, S]
        else:
            assert all(n == 1 for _, _, n in rows), "the padded layout is for one new token per row"
            S = max(s + 1 for _, s, _ in rows)
            read = torch.zeros(len(rows), S, dtype=torch.long)
            mask = torch.zeros(len(rows), 1, S, dtype=torch.bool)
            for i, (table, s, _) in enumerate(rows):
                read[i, : s + 1] = slots(table, 0, s + 1)
                mask[i, 0, : s + 1] = True
            write = torch.cat([slots(t, s, s + 1) for t, s, _ in rows])
            positions = torch.tensor([[s] for _, s, _ in rows])
        return BatchView(self, write.to(dev), read.to(dev), positions.to(dev),
                         None if mask is None else mask.to(dev))

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


@dataclass
class BatchView:
    """The cache as one forward sees it (implements the model's KVCache protocol)."""

    cache: PagedKVCache
    write_slots: torch.Tensor  # [sum num_new] flat pool slots of the new tokens, in model order
    read_slots: torch.Tensor  # [B, S] flat pool slots of every key each row sees (padding: 0)
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, T, S]; None: causal over one whole prompt

    def update(self, layer_idx: int, new: torch.Tensor) -> torch.Tensor:
        pool = self.cache.pools[layer_idx].view(-1, self.cache.dim)  # [blocks * block_size, D]
        pool.index_copy_(0, self.write_slots, new.reshape(-1, new.shape[-1]).to(pool.dtype))
        return pool[self.read_slots].to(new.dtype)  # [B, S, D]
