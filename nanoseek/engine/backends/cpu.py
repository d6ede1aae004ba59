"""A decode backend for CPUs over the latent paged pool.

Decode attention (one new token per row, absorbed MLA) reads whole blocks: one index_select of the
rows' blocks ([B, nb, block_size, D], contiguous block_size * D copies instead of a gather per key),
then scores = q @ kvᵀ with the padding masked by an additive bias, softmax, and probs @ kv[..., :L],
as two batched matmuls ([B, H, D] x [B, D, S]), where the reference builds a [B, T*H, S] boolean mask
for SDPA. Everything else (prefill, GQA, naive MLA) is the reference's.

Notation: B rows, H heads, S keys (nb blocks * block_size), D = L + R cached width.
"""

from __future__ import annotations

import torch

from nanoseek.engine.backends.reference import ReferenceBackend


def block_latent_attention(pool: torch.Tensor, q: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, value_dim: int) -> torch.Tensor:
    """One query token per row: q [B, H, D] over the blocks of pool [blocks, bs, D] listed in
    block_tables [B, nb], the first seq_lens[b] keys of row b valid -> [B, H, value_dim]."""
    B, H, D = q.shape
    nb, bs = block_tables.shape[1], pool.shape[1]
    kv = pool.index_select(0, block_tables.reshape(-1)).view(B, nb * bs, D).to(q.dtype)  # [B, S, D]
    valid = torch.arange(nb * bs, device=q.device)[None, :] < seq_lens[:, None]  # [B, S]
    bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
    scores = torch.baddbmm(bias[:, None, :], q, kv.transpose(1, 2), alpha=scale)  # [B, H, S]
    return torch.bmm(scores.softmax(dim=-1), kv[..., :value_dim])  # [B, H, value_dim]


class CPUDecodeBackend(ReferenceBackend):
    name = "cpu"

    def latent_attention(self, layer_idx, q, new, meta, scale: float, value_dim: int) -> torch.Tensor:
        if meta.num_new != 1 or meta.keys_are_new:
            return super().latent_attention(layer_idx, q, new, meta, scale, value_dim)
        B, _, H, D = q.shape
        o = block_latent_attention(self.cache.pools[layer_idx], q.view(B, H, D), meta.block_tables,
                                   meta.seq_lens, scale, value_dim)
        return o.view(B, 1, H, value_dim)
