"""nanoseek's C++ CPU kernels against torch on this host, on the bench model's decode shapes
(configs/bench-v2-small.json), weights cold (each call reads weights that are not in any cache):

- `nanoseek::gemv` vs `F.linear` for 1, 2, 4 and 8 rows;
- `nanoseek::paged_latent_decode` vs the `cpu` backend's torch path (block_latent_attention);
- `nanoseek::moe_experts` with the shared MLP inside vs the same op plus the shared MLP through gemv.

    .venv/bin/python bench/cpu_kernels.py

Medians of calls that alternate between the two sides, so a change in the host's memory bandwidth
hits both alike. Choosing between them is the engine's job at start (linear.tune, tune_dispatch,
choose_backend); this shows what those choices are made of.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
import torch.nn.functional as F

from nanoseek.engine.backends.cpu import block_latent_attention
from nanoseek.model import cpu_kernels
from nanoseek.model.linear import host_key

COLD_BYTES = 64e6  # more distinct weights than the L3 caches of our hosts hold


def alternate(fns: dict, args_of, calls: int) -> dict[str, float]:
    """Median microseconds of each fn(*args_of(i)) over `calls` rounds, the order flipping each round."""
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(calls):
        for name in names if i % 2 else names[::-1]:
            args = args_of(i)
            t = time.perf_counter()
            fns[name](*args)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def bench_gemv() -> None:
    print("\n## nanoseek::gemv vs F.linear, weights cold (µs; GB/s of weights)\n")
    shapes = {"q_proj": (768, 512), "kv_a_proj": (160, 512), "o_proj": (512, 512), "dense gate+up": (2816, 512),
              "dense down": (512, 1408), "shared gate+up": (1024, 512), "lm_head": (8192, 512)}
    print("| weight | [out, in] | rows | F.linear | gemv | gemv GB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (O, I) in shapes.items():
        copies = max(2, int(COLD_BYTES // (O * I * 4)))
        ws = [torch.randn(O, I) for _ in range(copies)]
        for rows in (1, 2, 4, 8):
            x = torch.randn(rows, I)
            torch.testing.assert_close(torch.ops.nanoseek.gemv(x, ws[0]), F.linear(x, ws[0]), rtol=1e-4, atol=1e-3)
            us = alternate({"F.linear": F.linear, "gemv": torch.ops.nanoseek.gemv},
                           lambda i: (x, ws[i % copies]), 3 * copies)
            print(f"| {name} | [{O}, {I}] | {rows} | {us['F.linear']:.0f} | {us['gemv']:.0f} | "
                  f"{O * I * 4 / us['gemv'] / 1e3:.1f} |")


def bench_attention() -> None:
    print("\n## nanoseek::paged_latent_decode vs the cpu backend's torch path (µs per layer; 8 heads, "
          "latent 128 + rope 32, blocks of 16)\n")
    print("| rows | keys | cache | torch (gather, baddbmm, softmax, bmm) | paged_latent_decode |")
    print("|---:|---:|---|---:|---:|")
    bs, D, V, H = 16, 160, 128, 8
    for B, S in ((1, 512), (8, 512), (1, 2048)):
        nb = S // bs
        pools = [torch.randn(nb * B + 1, bs, D) for _ in range(max(2, int(COLD_BYTES // (nb * B * bs * D * 4))))]
        q, tables, lens = torch.randn(B, H, D), torch.arange(nb * B).view(B, nb), torch.full((B,), S)
        ops = {"torch": lambda p: block_latent_attention(p, q, tables, lens, 0.1, V),
               "kernel": lambda p: torch.ops.nanoseek.paged_latent_decode(p, q, tables, lens, 0.1, V)}
        torch.testing.assert_close(ops["kernel"](pools[0]), ops["torch"](pools[0]), rtol=1e-5, atol=1e-5)
        for cache, pick in (("hot", lambda i: (pools[0],)), ("cold", lambda i: (pools[i % len(pools)],))):
            us = alternate(ops, pick, 40)
            print(f"| {B} | {S} | {cache} | {us['torch']:.0f} | {us['kernel']:.0f} |")


def bench_moe() -> None:
    print("\n## nanoseek::moe_experts: the shared MLP inside the op vs after it through gemv (µs per layer; "
          "16 experts of 256, top-4, shared 512, C 512; weights cold)\n")
    print("| tokens | op + shared MLP apart | one op |")
    print("|---:|---:|---:|")
    E, C, I, K, Is = 16, 512, 256, 4, 512
    layers = max(2, int(COLD_BYTES // ((3 * E * I + 3 * Is) * C * 4)))
    Ws = [(torch.randn(E, 2 * I, C) * 0.05, torch.randn(E, C, I) * 0.05, torch.randn(Is, C) * 0.05,
           torch.randn(Is, C) * 0.05, torch.randn(C, Is) * 0.05) for _ in range(layers)]
    op, gemv = torch.ops.nanoseek.moe_experts, torch.ops.nanoseek.gemv

    def apart(x, idx, w, gu, dn, sg, su, sd):
        return op(x, idx, w, gu, dn) + gemv(F.silu(gemv(x, sg)) * gemv(x, su), sd)

    for N in (1, 2, 8):
        x, w = torch.randn(N, C), torch.rand(N, K)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
        torch.testing.assert_close(op(x, idx, w, *Ws[0]), apart(x, idx, w, *Ws[0]), rtol=1e-4, atol=1e-4)
        us = alternate({"apart": apart, "one op": op}, lambda i: (x, idx, w, *Ws[i % layers]), 6 * layers)
        print(f"| {N} | {us['apart']:.0f} | {us['one op']:.0f} |")


def main() -> None:
    if not cpu_kernels.load():
        raise SystemExit(f"nanoseek's CPU kernels are not available here: {cpu_kernels.why_unavailable()}")
    print(f"# nanoseek CPU kernels vs torch — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {host_key()}, "
          f"{platform.machine()}")
    with torch.inference_mode():
        bench_gemv()
        bench_attention()
        bench_moe()


if __name__ == "__main__":
    main()
