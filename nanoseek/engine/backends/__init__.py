"""Paged attention backends (nanoseek.model.backend's protocol over PagedKVCache), chosen once per engine.

    backend, report = choose_backend(cache, cfg, "auto", max_num_seqs=16)

- reference: gather + SDPA, the oracle;
- cpu: block-wise decode over the latent pool (cpu.py);
- cpu-kernel: the same as one C++ op reading the blocks in place (cpu.py; where nanoseek's CPU
  kernels build, nanoseek.model.cpu_kernels);
- cuda: FlashMLA where installed, else the block-wise decode (cuda.py; untested without a GPU).
"auto" times the candidates for this device on a decode step of the engine's shapes and takes the
faster (measured, not assumed: which wins depends on the host).
"""

from __future__ import annotations

import time

import torch

from nanoseek.engine.backends.cpu import CPUDecodeBackend, CPUKernelBackend
from nanoseek.engine.backends.cuda import CUDABackend
from nanoseek.engine.backends.reference import ReferenceBackend
from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.model import cpu_kernels

BACKENDS = {"reference": ReferenceBackend, "cpu": CPUDecodeBackend, "cpu-kernel": CPUKernelBackend,
            "cuda": CUDABackend}


def candidates(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["reference", "cuda"]
    return ["reference", "cpu"] + (["cpu-kernel"] if cpu_kernels.load() else [])


def time_decode(backend, cfg, batch: int, context: int, repeats: int = 10) -> float:
    """Best seconds of one layer's absorbed decode attention: batch rows over `context` keys each."""
    cache = backend.cache
    bs = cache.block_size
    context = max(1, min(context, cache.num_blocks * bs // batch - 1))  # what the pool holds
    per_row = -(-(context + 1) // bs)
    usable = max(1, min(batch, cache.num_blocks // per_row))
    rows = [(list(range(i * per_row, (i + 1) * per_row)), context) for i in range(usable)]
    meta = cache.metadata(backend, rows, num_new=1, absorb=True)
    H, D = cfg.num_attention_heads, cache.dim
    q = torch.randn(usable, 1, H, D, device=cache.device, dtype=cache.dtype)
    new = torch.randn(usable, 1, D, device=cache.device, dtype=cache.dtype)
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 2):
            if cache.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            backend.latent_attention(0, q, new, meta, cfg.softmax_scale, cfg.kv_lora_rank)
            if cache.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                best = min(best, time.perf_counter() - t)
    return best


def choose_backend(cache: PagedKVCache, cfg, name: str = "auto", max_num_seqs: int = 8,
                   context: int = 512, timer=time_decode) -> tuple[object, dict[str, float]]:
    """(backend, {candidate: seconds}) — `name` forces one; "auto" measures (MLA only; GQA and
    anything without a latent decode path take the reference)."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose from {['auto', *BACKENDS]}")
        if name == "cpu-kernel" and not cpu_kernels.load():
            raise ValueError(f"attention backend 'cpu-kernel' needs nanoseek's CPU kernels: "
                             f"{cpu_kernels.why_unavailable()}")
        return BACKENDS[name](cache), {}
    if not cfg.is_mla:
        return ReferenceBackend(cache), {}
    made = {n: BACKENDS[n](cache) for n in candidates(cache.device)}
    timings = {n: sum(timer(b, cfg, B, context) for B in sorted({1, max_num_seqs})) for n, b in made.items()}
    best = min(made, key=lambda n: (timings[n], list(made).index(n)))
    return made[best], timings
