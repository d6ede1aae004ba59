"""The CUDA decode backend: FlashMLA over the block tables where it is installed and applies, else
the block-wise latent attention of the CPU backend (batched matmuls over the rows' blocks), which
runs as it is on CUDA. Prefill over cached keys takes the reference gather + SDPA (flash kernels).

UNTESTED HERE: the project's CI and this session had no GPU. The FlashMLA call follows its README
(`get_mla_metadata`, `flash_mla_with_kvcache(q, kcache, block_table, cache_seqlens, dv, ...)`): bf16
or fp16, block size 64, one latent head of width 576 (L = 512, R = 64, the published V2/V3 shapes).
Any other case takes the fallback; tests on a GPU must compare both against the reference.
"""

from __future__ import annotations

import torch

from nanoseek.engine.backends.cpu import block_latent_attention
from nanoseek.engine.backends.reference import ReferenceBackend

FLASH_MLA_BLOCK, FLASH_MLA_DIM = 64, 576


def _flash_mla():
    try:
        import flash_mla  # noqa: PLC0415 (optional, GPU only)
    except ImportError:
        return None
    return flash_mla


class CUDABackend(ReferenceBackend):
    name = "cuda"

    def __init__(self, cache):
        super().__init__(cache)
        if cache.device.type != "cuda":
            raise ValueError(f"the CUDA backend needs a CUDA cache, this one is on {cache.device}")
        self.flash_mla = _flash_mla()

    def uses_flash_mla(self, q: torch.Tensor) -> bool:
        return (self.flash_mla is not None and q.dtype in (torch.bfloat16, torch.float16)
                and self.cache.block_size == FLASH_MLA_BLOCK and self.cache.dim == FLASH_MLA_DIM)

    def latent_attention(self, layer_idx, q, new, meta, scale: float, value_dim: int) -> torch.Tensor:
        if meta.num_new != 1 or meta.keys_are_new:
            return super().latent_attention(layer_idx, q, new, meta, scale, value_dim)
        B, T, H, D = q.shape
        pool = self.cache.pools[layer_idx]  # [blocks, 64, 576]
        if self.uses_flash_mla(q):
            lens = meta.seq_lens.to(torch.int32)
            tiles, splits = self.flash_mla.get_mla_metadata(lens, T * H, 1)
            o, _ = self.flash_mla.flash_mla_with_kvcache(
                q, pool.view(pool.shape[0], pool.shape[1], 1, D), meta.block_tables.to(torch.int32), lens,
                value_dim, tiles, splits, softmax_scale=scale, causal=True)
            return o  # [B, T, H, value_dim]
        o = block_latent_attention(pool, q.view(B, H, D), meta.block_tables, meta.seq_lens, scale, value_dim)
        return o.view(B, 1, H, value_dim)
