"""Training throughput: nanoseek vs transformers' DeepseekV2ForCausalLM, same weights, same threads.

    .venv/bin/python bench/train.py                          # configs/bench-v2-small.json, batch 8 x 256
    .venv/bin/python bench/train.py --steps 6 --warmup 2 --rounds 2

One step = forward + backward + AdamW update on one batch. Both models load one random
checkpoint written by nanoseek (fp32) and train on the same fixed batch with the same optimizer
settings; nanoseek runs its trainer's `train_step` (cross-entropy + V2 expert-balance loss, fused
AdamW where torch has it), transformers runs `model(ids, labels=...)` + the same AdamW. After
`--warmup` untimed steps each, the two alternate step by step for `--rounds` x `--steps` timed
steps each (so a busy machine slows both alike); the median step time gives tokens/s. MFU = tokens/s x training FLOPs per token / the fp32 matmul
rate measured here (2048^3), with training FLOPs = 3 x forward (nanoseek.info's count; causal
attention over (T+1)/2 keys on average).
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
from nanoseek.info import count_params
from nanoseek.model.checkpoint import load_model, save_model
from nanoseek.info import matmul_flops
from nanoseek.model.transformer import build_model
from nanoseek.train.config import TrainConfig
from nanoseek.train.loop import train_flops_per_token
from nanoseek.train.step import make_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench-v2-small.json"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per model per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cfg = ModelConfig.from_json(args.config)
    tcfg = TrainConfig(model_config=args.config, data="-", out="-", batch_size=args.batch_size, seq_len=args.seq_len,
                       warmup_steps=0, lr=1e-4, max_steps=10_000)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(cfg, seed=0), Path(tmp) / "ck")
        ours = load_model(Path(tmp) / "ck", dtype=torch.float32).train()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "ck", dtype=torch.float32).train()
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(2, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
    x, y = stream[:, :-1].contiguous(), stream[:, 1:].contiguous()
    opt_ours = make_optimizer(ours, tcfg)
    fused = bool(opt_ours.defaults.get("fused"))
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps,
                                   weight_decay=tcfg.weight_decay, fused=fused or None)
    step_no = {"ours": 0}

    def step_ours() -> float:
        m = train_step(ours, [(x, y)], opt_ours, tcfg, step=step_no["ours"])
        step_no["ours"] += 1
        return m["loss"]

    def step_theirs() -> float:
        opt_theirs.zero_grad(set_to_none=True)
        # transformers shifts labels itself: pass the window's inputs as labels of the T+1 stream's prefix
        out = theirs(input_ids=x, labels=stream[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), tcfg.grad_clip)
        opt_theirs.step()
        return float(out.loss.detach())

    first = {"nanoseek": step_ours(), "transformers": step_theirs()}
    for _ in range(args.warmup - 1):
        step_ours()
        step_theirs()
    times = {"nanoseek": [], "transformers": []}
    for _ in range(args.rounds * args.steps):  # one step each in turn: both see the same machine load
        for name, fn in (("transformers", step_theirs), ("nanoseek", step_ours)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    peak = matmul_flops()
    tokens = args.batch_size * args.seq_len
    fpt = train_flops_per_token(cfg, args.seq_len)
    counts = count_params(cfg)
    print(f"# training benchmark — {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"# config {Path(args.config).name}: {counts.total / 1e6:.1f}M params, {counts.active / 1e6:.1f}M active; "
          f"batch {args.batch_size} x {args.seq_len}; {fpt / 1e6:.0f} MFLOP per trained token; "
          f"fp32 matmul rate {peak / 1e9:.0f} GFLOP/s (2048^3) -> ceiling {peak / fpt:.0f} tok/s; "
          f"AdamW fused={fused}")
    print(f"# first-step loss: nanoseek {first['nanoseek']:.4f} (CE), transformers {first['transformers']:.4f}")
    print("| stack | median step s | tokens/s | MFU | speedup |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(times["transformers"])
    for name in ("transformers", "nanoseek"):
        med = statistics.median(times[name])
        print(f"| {name} | {med:.3f} | {tokens / med:.0f} | {tokens / med * fpt / peak:.1%} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
