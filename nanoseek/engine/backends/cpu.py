"""A decode backend for CPUs over the latent paged pool.

Decode attention (one new token per row, absorbed MLA) reads whole blocks: one index_select of the
rows' blocks ([B, nb, block_size, D], contiguous block_size * D copies instead of a gather per key),
then scores = q @ kvᵀ with the padding masked by an additive bias, softmax, and probs @ kv[..., :L],
as two batched matmuls ([B, H, D] x [B, D, S]), where the reference builds a [B, T*H, S] boolean mask
for SDPA. Everything else (prefill, GQA, naive MLA) is the reference's.

CPUKernelBackend ("cpu-kernel") does the same decode attention as one C++ op over the pool
(nanoseek::paged_latent_decode, nanoseek/model/csrc/cpu_attention.cpp): each row's keys are read from
their blocks in place, so neither the gathered copy nor the padding bias exists. A candidate where
nanoseek's CPU kernels build (nanoseek.model.cpu_kernels); the engine measures it like the others.

Notation: B rows, H heads, S keys (nb blocks * block_size), D = L + R cached width.
"""

from __future__ import annotations

import torch

from nanoseek.engine.backends.reference import ReferenceBackend


def padding_bias(seq_lens: torch.Tensor, num_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, S] additive bias: 0 for the first seq_lens[b] keys of row b, -inf past them."""
    valid = torch.arange(num_keys, device=seq_lens.device)[None, :] < seq_lens[:, None]  # [B, S]
    bias = torch.zeros(valid.shape, dtype=dtype, device=seq_lens.device).masked_fill_(~valid, float("-inf"))
    return bias[:, None, :]


def block_latent_attention(pool: torch.Tensor, q: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, value_dim: int,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per row: q [B, H, D] over the blocks of pool [blocks, bs, D] listed in
    block_tables [B, nb], the first seq_lens[b] keys of row b valid -> [B, H, value_dim].
    bias: padding_bias(seq_lens, nb * bs, q.dtype), when the caller already has it."""
    B, H, D = q.shape
    nb, bs = block_tables.shape[1], pool.shape[1]
    kv = pool.index_select(0, block_tables.reshape(-1)).view(B, nb * bs, D)  # [B, S, D]
    if kv.dtype != q.dtype:
        kv = kv.to(q.dtype)
    if bias is None:
        bias = padding_bias(seq_lens, nb * bs, q.dtype)
    scores = torch.baddbmm(bias, q, kv.transpose(1, 2), alpha=scale)  # [B, H, S]
    return torch.bmm(scores.softmax(dim=-1), kv[..., :value_dim])  # [B, H, value_dim]


class CPUDecodeBackend(ReferenceBackend):
    name = "cpu"

    def latent_attention(self, layer_idx, q, new, meta, scale: float, value_dim: int) -> torch.Tensor:
        if meta.num_new != 1 or meta.keys_are_new:
            return super().latent_attention(layer_idx, q, new, meta, scale, value_dim)
        B, _, H, D = q.shape
        bias = meta.per_step.get("cpu_decode_bias")  # the same for every layer of the step
        if bias is None:
            S = meta.block_tables.shape[1] * self.cache.block_size
            bias = meta.per_step["cpu_decode_bias"] = padding_bias(meta.seq_lens, S, q.dtype)
        o = block_latent_attention(self.cache.pools[layer_idx], q.view(B, H, D), meta.block_tables,
                                   meta.seq_lens, scale, value_dim, bias)
        return o.view(B, 1, H, value_dim)


class CPUKernelBackend(CPUDecodeBackend):
    name = "cpu-kernel"

    def reads_only_valid_keys(self, dtype: torch.dtype) -> bool:
        return dtype == self.cache.dtype == torch.float32  # the C++ op (fp32) reads each row's keys in place

    def latent_attention(self, layer_idx, q, new, meta, scale: float, value_dim: int) -> torch.Tensor:
        pool = self.cache.pools[layer_idx]
        if meta.num_new != 1 or meta.keys_are_new or pool.dtype != torch.float32 or q.dtype != torch.float32:
            return super().latent_attention(layer_idx, q, new, meta, scale, value_dim)
        B, _, H, D = q.shape
        o = torch.ops.nanoseek.paged_latent_decode(pool, q.reshape(B, H, D), meta.block_tables, meta.seq_lens,
                                                   scale, value_dim)  # [B, H, value_dim]
        return o.view(B, 1, H, value_dim)
