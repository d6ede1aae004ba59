"""DeepSeek-V2-Lite's shape on this machine: a random-weight bf16 checkpoint with V2-Lite's config,
tensor names and shapes, loaded quantised (int8, int4) as a stream. Per scheme, in a fresh process:
load time, peak RSS (and peak anonymous RSS: file pages of the safetensors mmap are reclaimable),
prefill tok/s at 512 tokens, decode tok/s at B=1 and B=4 (prefill excluded), and the bandwidth limit
(bytes of weights read per decoded token / measured read bandwidth).

    .venv/bin/python bench/scale.py                        # writes runs/v2lite-bf16 (~31 GB) once
    .venv/bin/python bench/scale.py --schemes int4 --decode 8

The checkpoint is written one layer per shard (one layer in memory at a time), into a temporary
folder renamed into place; an existing complete one is reused; too little free disk is refused
before anything is written. Weights are slices of one random pool (random enough for throughput:
routing spreads over the experts), norms are ones. int4 uses groups of 64 by default: V2-Lite's
dense MLP has 10,944 input channels, which 128 does not divide.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.io import atomic_dir  # noqa: E402

CONFIG = ROOT / "configs" / "deepseek-v2-lite.json"
# available memory a load needs, as a fraction of the bf16 checkpoint + 2 GiB (V2-Lite: int8 ~18 GiB, int4 ~11)
NEED_FRACTION = {"int8": 0.55, "int4": 0.3}


def write_checkpoint(path: Path, config: Path = CONFIG) -> Path:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from nanoseek.model.checkpoint import hf_state_items
    from nanoseek.model.transformer import CausalLM

    if (path / "model.safetensors.index.json").exists():
        return path
    cfg = ModelConfig.from_json(config)
    with torch.device("meta"):
        meta = CausalLM(cfg).to(torch.bfloat16)
    groups: dict[str, list] = defaultdict(list)
    for name, t in hf_state_items(meta):
        parts = name.split(".")
        groups[".".join(parts[:3]) if parts[1] == "layers" else "rest"].append((name, tuple(t.shape)))
    total = sum(torch.Size(s).numel() * 2 for g in groups.values() for _, s in g)
    free = shutil.disk_usage(path.parent if path.parent.exists() else ROOT).free
    if free < total + (1 << 30):
        raise SystemExit(f"{path}: the bf16 checkpoint needs {total / 1e9:.1f} GB, the disk has "
                         f"{free / 1e9:.1f} GB free; nothing written")
    pool = (torch.randn(1 << 27) * 0.02).to(torch.bfloat16)  # 128M values, 256 MB
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as tmp:
        for i, (key, items) in enumerate(tqdm(list(groups.items()), desc=f"writing {path.name}")):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            shard = {}
            for name, shape in items:
                n = torch.Size(shape).numel()
                if name.endswith("norm.weight"):
                    shard[name] = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    off = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=gen)) if n < pool.numel() else 0
                    src = pool[off:off + n] if n <= pool.numel() else pool.repeat(-(-n // pool.numel()))[:n]
                    shard[name] = src.view(shape).clone()  # one layer in memory; no shared storage
                weight_map[name] = fname
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
        cfg.to_json(tmp / "config.json")
    return path


def read_bandwidth(gb: float = 1.0) -> float:
    """Bytes/s of summing a tensor much larger than the caches (best of 5): the decode ceiling."""
    x = torch.ones(int(gb * 1e9) // 2, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 2 / best


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(ckpt: Path, scheme: str, group_size: int, prompt: int, decode: int, bw: float) -> dict:
    """Runs in its own process (python bench/scale.py --child ...): one scheme, fresh memory. bw: the
    read bandwidth the parent measured (bytes/s), so its probe tensor is not in this process's peak."""
    from nanoseek.model.checkpoint import load_model
    from nanoseek.model.quant import QuantWeight
    from nanoseek.model.transformer import DenseCache

    peak_anon, done = [0], []

    def watch():
        while not done:
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t = time.perf_counter()
    model = load_model(ckpt, dtype=torch.bfloat16, quantization=scheme, group_size=group_size)
    load_s = time.perf_counter() - t
    loaded_anon = _status("RssAnon")
    from nanoseek.model.linear import format_report, tune

    t = time.perf_counter()  # what LLM does at start: measured kernel per shape and rows (cached per host)
    print(format_report(tune(model, max_rows=4)), file=sys.stderr)
    tune_s = time.perf_counter() - t
    cfg = model.config
    # bytes read per decoded token (B=1): everything but the routed experts, plus K of E of them
    per_tok = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantWeight):
            b = sum(x.numel() * x.element_size() for n, x in m.named_buffers() if n != "dense_cache")
            per_tok += b * cfg.num_experts_per_tok // cfg.n_routed_experts if ".experts." in name + "." else b
    per_tok += sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if "embed_tokens" not in n)
    g = torch.Generator().manual_seed(1)
    out = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None, "load_s": load_s,
           "loaded_anon_gb": loaded_anon / 1e9, "tune_s": tune_s, "load_avg_start": os.getloadavg()[0]}
    with torch.inference_mode():
        cache = DenseCache(cfg, 1, prompt + decode + 1, dtype=torch.bfloat16)
        ids = torch.randint(2, cfg.vocab_size, (1, prompt), generator=g)
        t = time.perf_counter()
        logits = model.compute_logits(model(ids, attn_metadata=cache.step(prompt))[:, -1:])
        out["prefill_tok_s"] = prompt / (time.perf_counter() - t)
        for B in (1, 4):
            cache = DenseCache(cfg, B, 64 + decode + 1, dtype=torch.bfloat16)
            ids = torch.randint(2, cfg.vocab_size, (B, 64), generator=g)
            logits = model.compute_logits(model(ids, attn_metadata=cache.step(64))[:, -1:])
            t = time.perf_counter()
            for _ in range(decode):
                logits = model.compute_logits(model(logits[:, -1].argmax(-1, keepdim=True),
                                                    attn_metadata=cache.step(1, absorb=True)))
            out[f"decode_b{B}_tok_s"] = B * decode / (time.perf_counter() - t)
    done.append(1)
    th.join()
    out["load_avg_end"] = os.getloadavg()[0]
    out.update(peak_rss_gb=_status("VmHWM") / 1e9, peak_anon_gb=max(peak_anon[0], _status("RssAnon")) / 1e9,
               bytes_per_token_gb=per_tok / 1e9, bandwidth_gb_s=bw / 1e9, limit_tok_s=bw / per_tok)
    out["of_limit"] = out["decode_b1_tok_s"] / out["limit_tok_s"]
    return out


def available_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=str(ROOT / "runs" / "v2lite-bf16"))
    ap.add_argument("--config", default=str(CONFIG), help="another shape (a quick check of this script)")
    ap.add_argument("--schemes", default="int4,int8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bandwidth", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        bw = args.bandwidth or read_bandwidth()
        print(json.dumps(measure(Path(args.ckpt), args.child, args.group_size, args.prompt, args.decode, bw)))
        return
    ckpt = write_checkpoint(Path(args.ckpt), Path(args.config))
    bw = read_bandwidth()  # here, not in the children: its 1 GB probe would count in their peak RSS
    rows = []
    size_gib = json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2**30
    for scheme in args.schemes.split(","):
        avail, need = available_gib(), size_gib * NEED_FRACTION[scheme] + 2
        if avail < need:
            print(f"{scheme}: skipped, {avail:.1f} GiB available < {need:.1f} GiB needed; retry when the "
                  f"machine is quieter", flush=True)
            continue
        r = subprocess.run([sys.executable, __file__, "--child", scheme, "--ckpt", str(ckpt), "--group-size",
                            str(args.group_size), "--prompt", str(args.prompt), "--decode", str(args.decode),
                            "--bandwidth", str(bw)],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"{scheme}: failed\n{r.stderr[-3000:]}", flush=True)
            continue
        print(r.stderr[-6000:], flush=True)  # the kernels chosen
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"# {Path(args.config).name} shape, random bf16 weights ({ckpt}); host {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    print(f"| scheme | load s | RSS after load GB (anon) | peak RSS GB (anon) | prefill tok/s @{args.prompt} | decode B=1 | decode B=4 (total) "
          "| GB read / token | read GB/s | limit tok/s | B=1 of limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']}{'' if r['group_size'] is None else ' g' + str(r['group_size'])} | {r['load_s']:.0f} "
              f"| {r['loaded_anon_gb']:.1f} | {r['peak_rss_gb']:.1f} ({r['peak_anon_gb']:.1f}) | {r['prefill_tok_s']:.1f} "
              f"| {r['decode_b1_tok_s']:.2f} | {r['decode_b4_tok_s']:.2f} | {r['bytes_per_token_gb']:.2f} "
              f"| {r['bandwidth_gb_s']:.1f} | {r['limit_tok_s']:.2f} | {r['of_limit']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
