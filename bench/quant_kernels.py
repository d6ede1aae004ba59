"""Quantised projection kernels on this host, side by side: every kernel linear.py may choose for
int8 / int4 (and dense F.linear for comparison) on V2-Lite shapes, at 1 to 512 rows, bf16 and fp32;
and the cost of dequantising kv_b_proj per step (what absorbed MLA would pay without its cached copy).

    .venv/bin/python bench/quant_kernels.py
"""

from __future__ import annotations

import os
import platform
import time

import torch
import torch.nn.functional as F

from nanoseek.model.linear import KERNELS
from nanoseek.model.quant import QuantScheme, QuantWeight

SHAPES = {"expert gate_up [2816, 2048]": (2816, 2048), "kv_b_proj [4096, 512]": (4096, 512)}


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    print("| weight | dtype | rows | F.linear dense | " + " | ".join(
        f"{k} {n}" for k in ("int8", "int4") for n in KERNELS[k]) + " |")
    print("|---" * (4 + sum(len(KERNELS[k]) for k in ("int8", "int4"))) + "|")
    for label, (N, K) in SHAPES.items():
        w = torch.randn(N, K) * 0.02
        for dtype in (torch.bfloat16, torch.float32):
            qws = {}
            for kind in ("int8", "int4"):
                qw = QuantWeight((N, K), QuantScheme.parse(kind, 128), dtype)
                qw.quantize_into((), w)
                qws[kind] = qw.to_kernel_layout()
            wd = w.to(dtype)
            for rows in (1, 4, 64, 512):
                x = torch.randn(rows, K, dtype=dtype)
                cells = [best_ms(lambda: F.linear(x, wd))]
                for kind, qw in qws.items():
                    cells += [best_ms(lambda fn=fn: fn(x, qw, None)) for fn in KERNELS[kind].values()]
                print(f"| {label} | {str(dtype)[6:]} | {rows} | " + " | ".join(f"{c:.2f}" for c in cells) + " |",
                      flush=True)
    qw = QuantWeight((4096, 512), QuantScheme.parse("int8"), torch.bfloat16)
    qw.quantize_into((), torch.randn(4096, 512))
    ms = best_ms(qw.dequantize)
    print(f"\ndequantising a V2-Lite kv_b_proj (int8, bf16): {ms:.2f} ms per layer, x27 layers = "
          f"{27 * ms:.0f} ms per decode step; a cached dequantised copy costs 27 x 4 MB = 113 MB")


if __name__ == "__main__":
    main()
