"""Tiny synthetic data folders and run configs for the training tests (no downloads, no BPE training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tokenizers

from nanoseek.data.shards import ShardWriter, write_meta
from nanoseek.train.config import TrainConfig


def make_data(root: Path, vocab_size: int = 64, train_tokens: int = 40_000, val_tokens: int = 4_000,
              seed: int = 0) -> Path:
    """A data folder as `nanoseek data prepare` writes it: a word-level tokenizer of `vocab_size`
    tokens and shards of a noisy cyclic sequence (learnable, so losses fall)."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        steps = np.where(rng.random(n) < 0.8, 1, rng.integers(1, vocab_size, n))
        ids = (np.cumsum(steps) % (vocab_size - 2) + 2).astype(np.uint16)  # ids 0/1 stay BOS/EOS
        w = ShardWriter(root, split, np.uint16, shard_tokens=max(2, n // 2 + 1))
        w.add(ids, docs=1)
        splits[split] = w.finish()
    write_meta(root, {"dtype": "uint16", "vocab_size": vocab_size, "bos_id": 0, "eos_id": 1, "pad_id": None,
                      "tokenizer": "tokenizer.json", "splits": splits})
    return root


def write_model_config(cfg, path: Path) -> Path:
    cfg.to_json(path)
    return path


def run_config(tmp: Path, model_cfg, data: Path, **kw) -> TrainConfig:
    """A fast TrainConfig for a tiny model: fp32, 1 thread, no progress bar."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg_path = write_model_config(model_cfg, tmp / "model.json")
    base = dict(model_config=str(cfg_path), data=str(data), out=str(tmp / "run"), batch_size=4, seq_len=32,
                max_steps=8, warmup_steps=2, lr=3e-3, eval_every=4, eval_batches=2, checkpoint_every=4,
                keep_checkpoints=2, threads=1, progress=False, peak_flops=1e11)
    return TrainConfig(**{**base, **kw})


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss from metrics.jsonl."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out
