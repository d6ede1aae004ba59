"""One decode step without the engine: the fused C++ step against the model's own step, the fused
step with its weights packed (one buffer, 2 MiB pages) against the same weights left where the model
had them, and its two row kernels ("stream": one weight row at a time; "blocks": 4 side by side) —
interleaved rounds in one process, so that the host's drift hits every candidate alike.

    .venv/bin/python bench/decode_step.py                       # bench-v2-small, B = 1 and 8, 512 keys
    .venv/bin/python bench/decode_step.py --batch 1 --context 2048

Each row of the step reads `context` cached keys; the weights are random (configs/bench-v2-small.json).
The model step runs with the projection kernels and expert dispatch this host's engine would choose
(linear.tune, moe.tune_dispatch) and the C++ attention backend.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.engine.backends.cpu import CPUKernelBackend
from nanoseek.engine.fused_decode import FusedDecode, unsupported
from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.model.linear import host_key, tune
from nanoseek.model.moe import tune_dispatch
from nanoseek.model.transformer import build_model

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn, calls: int) -> float:
    fn()
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench-v2-small.json"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=15, help="timed calls per candidate per round")
    args = ap.parse_args()
    cfg = ModelConfig.from_json(args.config)
    print(f"# decode step — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {host_key()}, "
          f"{Path(args.config).name}, {args.context} keys per row\n")
    print("| batch | model step ms | fused, weights where the model had them ms | fused, blocks ms | fused ms "
          "| fused tok/s | fused / model | packed / unpacked | stream / blocks |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for B in args.batch:
        model = build_model(cfg, seed=0).eval()
        tune(model, max_rows=B)  # the model step with the kernels an engine would choose on this host
        tune_dispatch(model, max_rows=B)
        nb = -(-(args.context + 1) // 64)
        cache = PagedKVCache(cfg, num_blocks=nb * B, block_size=64)
        why = unsupported(model, cache)
        if why is not None:
            raise SystemExit(f"the fused step does not apply: {why}")
        loose = FusedDecode(model, cache, pack=False)  # the weights in the model's own tensors
        packed = FusedDecode(model, cache)  # moves the model's weights into one buffer (loose keeps the old)
        blocks = FusedDecode(model, cache, row_kernel="blocks")  # the same buffer (packed already)
        rows = [(list(range(b * nb, (b + 1) * nb)), args.context) for b in range(B)]
        backend = CPUKernelBackend(cache)
        meta = cache.metadata(backend, rows, num_new=1, absorb=True)
        ids = torch.randint(0, cfg.vocab_size, (B,), generator=torch.Generator().manual_seed(B))
        args_ = (ids, meta.seq_lens, meta.slot_mapping, meta.block_tables)

        def model_step():
            return model.compute_logits(model(ids[:, None], attn_metadata=meta)[:, 0])

        candidates = {"model": model_step, "loose": lambda: loose.run(*args_), "blocks": lambda: blocks.run(*args_),
                      "packed": lambda: packed.run(*args_)}
        got = {k: [] for k in candidates}
        with torch.inference_mode():
            torch.testing.assert_close(loose.run(*args_), packed.run(*args_), atol=0, rtol=0)
            torch.testing.assert_close(blocks.run(*args_), packed.run(*args_), atol=1e-4, rtol=1e-4)
            for _ in range(args.rounds):
                for k, fn in candidates.items():
                    got[k].append(median_ms(fn, args.calls))
        m, lo, bl, pk = (statistics.median(got[k]) for k in ("model", "loose", "blocks", "packed"))
        print(f"| {B} | {m:.2f} | {lo:.2f} | {bl:.2f} | {pk:.2f} | {B / pk * 1e3:.1f} | {m / pk:.2f}x "
              f"| {lo / pk:.2f}x | {bl / pk:.2f}x |")


if __name__ == "__main__":
    main()
