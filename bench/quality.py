"""Quality of weight-only int8 / int4 against the unquantised model on the val split: greedy
next-token agreement and val loss, over the same positions for every scheme, in one run.

    .venv/bin/python bench/quality.py --model runs/default --data runs/data --group-size 64
    .venv/bin/python bench/quality.py --model runs/small --data runs/data --positions 4096

--model: a model folder or a training run folder (its latest checkpoint). Windows of --seq-len
tokens are taken evenly from the val shards; every position of every window is scored.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanoseek.data.shards import read_meta, token_dtype
from nanoseek.model.checkpoint import load_model
from nanoseek.serve.cli import resolve_model_dir

TARGETS = {"int8": (0.99, 0.005), "int4": (0.95, 0.03)}  # (agreement >=, loss rise <=)


def val_windows(data: Path, positions: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len + 1] token windows spread evenly over the val split (n * seq_len >= positions)."""
    meta = read_meta(data)
    dtype = token_dtype(meta["vocab_size"])
    toks = np.concatenate([np.fromfile(data / s["file"], dtype=dtype) for s in meta["splits"]["val"]["shards"]])
    n = -(-positions // seq_len)
    if len(toks) < n * (seq_len + 1):
        raise SystemExit(f"val split has {len(toks)} tokens; {n} windows of {seq_len + 1} need more")
    starts = np.linspace(0, len(toks) - seq_len - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([toks[s:s + seq_len + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def score(model, windows: torch.Tensor, batch: int = 4) -> tuple[torch.Tensor, float]:
    """(greedy next tokens [n, T], mean cross-entropy) over all positions."""
    preds, losses = [], []
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = model.compute_logits(model(w[:, :-1])).float()
        preds.append(logits.argmax(-1))
        losses.append(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="none"))
    return torch.cat(preds), torch.cat(losses).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="runs/data")
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--schemes", default="int8,int4,int4-asym")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = resolve_model_dir(args.model)
    windows = val_windows(Path(args.data), args.positions, args.seq_len)
    ref = load_model(model_dir)
    t = time.perf_counter()
    ref_pred, ref_loss = score(ref, windows)
    rows = [{"scheme": "unquantised", "positions": ref_pred.numel(), "agreement": 1.0, "val_loss": ref_loss,
             "loss_rise": 0.0, "s": time.perf_counter() - t}]
    for name in args.schemes.split(","):
        scheme, _, asym = name.partition("-")
        q = load_model(model_dir, quantization=scheme, group_size=args.group_size, symmetric=not asym)
        t = time.perf_counter()
        pred, loss = score(q, windows)
        rows.append({"scheme": name, "positions": pred.numel(), "agreement": (pred == ref_pred).float().mean().item(),
                     "val_loss": loss, "loss_rise": (loss - ref_loss) / ref_loss, "s": time.perf_counter() - t})
        del q
    print(f"# {model_dir} ({ref.config.num_hidden_layers} layers, hidden {ref.config.hidden_size}), "
          f"{rows[0]['positions']} val positions, int4 group {args.group_size}; host {platform.processor() or platform.machine()}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| scheme | greedy agreement | val loss | loss rise | target (agreement / rise) |")
    print("|---|---|---|---|---|")
    for r in rows:
        tgt = TARGETS.get(r["scheme"].split("-")[0])
        ok = "" if tgt is None else (f"≥ {tgt[0]:.0%} / ≤ {tgt[1]:.1%}: "
                                     f"{'met' if r['agreement'] >= tgt[0] and r['loss_rise'] <= tgt[1] else 'MISSED'}")
        print(f"| {r['scheme']} | {r['agreement']:.2%} | {r['val_loss']:.4f} | {r['loss_rise']:+.2%} | {ok} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
