"""Prefill throughput: nanoseek vs transformers' DeepseekV2ForCausalLM on the same checkpoint.

    .venv/bin/python bench/forward.py                       # configs/bench-v2-small.json, 512 and 2048 tokens
    .venv/bin/python bench/forward.py --lengths 512 --repeats 5

Both models load one random checkpoint written by nanoseek (fp32), run under the same thread
count, and are timed in one process, alternating, after a warm-up. The ceiling is this machine's
fp32 matmul rate (measured here) divided by the model's forward FLOPs per token.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.info import count_params, matmul_flops
from nanoseek.model.checkpoint import load_model, save_model
from nanoseek.model.transformer import build_model

ROOT = Path(__file__).resolve().parents[1]


def time_forward(fn, ids: torch.Tensor, repeats: int) -> float:
    """Median seconds of fn(ids) after one warm-up call."""
    with torch.inference_mode():
        fn(ids)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(ids)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench-v2-small.json"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cfg = ModelConfig.from_json(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(cfg, seed=0), Path(tmp) / "ck")
        ours = load_model(Path(tmp) / "ck", dtype=torch.float32)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "ck", dtype=torch.float32).eval()
    peak = matmul_flops() / 1e9
    counts = count_params(cfg)
    print(f"# forward (prefill) benchmark — {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"# config {Path(args.config).name}: {counts.total / 1e6:.1f}M params, {counts.active / 1e6:.1f}M active; "
          f"fp32 matmul rate {peak:.0f} GFLOP/s (2048^3)")
    print("| tokens | transformers tok/s | nanoseek tok/s | speedup | max abs logit diff | "
          "nanoseek GFLOP/s | fraction of matmul rate |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for T in args.lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        t_theirs = time_forward(lambda x: theirs(x).logits, ids, args.repeats)
        t_ours = time_forward(lambda x: ours.compute_logits(ours(x)), ids, args.repeats)
        with torch.inference_mode():
            diff = (ours.compute_logits(ours(ids)) - theirs(ids).logits).abs().max().item()
        flops_per_token = counts.flops_per_token(T // 2)  # causal: a token sees T/2 keys on average
        gflops = flops_per_token * T / t_ours / 1e9
        print(f"| {T} | {T / t_theirs:.0f} | {T / t_ours:.0f} | {t_theirs / t_ours:.2f}x | {diff:.1e} | "
              f"{gflops:.0f} | {gflops / peak:.0%} |")


if __name__ == "__main__":
    main()
