"""nanoseek on a CUDA GPU: decode throughput eager vs compiled (CUDA graphs) vs transformers, prefill,
and decode on DeepSeek-V2-Lite's published shape (random weights), in one run. bench/gpu.sh runs it
after the CUDA tests.

    python bench/gpu.py                       # bench-v2-small in fp32 and bf16 at B=1, 8; V2-Lite at B=1
    python bench/gpu.py --lite-batches 1 8    # V2-Lite at B=8 too (+2 min)
    python bench/gpu.py --lite-batches        # no V2-Lite

Decode throughput excludes prefill (bench/engine.py's definition): B x 64 tokens over the time from the
last request's first token to the end; transformers' is (generate 65 tokens - generate 1) on the same
prompts. V2-Lite (15.7B parameters, 31 GB in bf16) is built on the GPU with random weights: nothing
is downloaded, and its numbers are speed only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from engine import decode_seconds, random_prompts, run_engine  # bench/engine.py
from nanoseek.config import ModelConfig
from nanoseek.engine.llm import LLMEngine
from nanoseek.model.checkpoint import load_model, save_model
from nanoseek.model.rope import rope_inv_freq
from nanoseek.model.transformer import CausalLM, build_model

ROOT = Path(__file__).resolve().parents[1]
DEV = torch.device("cuda")
PROMPT = 512


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def hf_decode_tps(model, prompts, max_tokens: int = 65) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts, device=DEV)
    times, out = [], None
    with torch.inference_mode():
        for n in (1, max_tokens):
            t = sync_time()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
            times.append(sync_time() - t)
    return len(prompts) * (max_tokens - 1) / (times[1] - times[0]), out[:, ids.shape[1]:].tolist()


def nanoseek_decode(model, prompts, compiled: bool, num_blocks: int) -> tuple[float, list, dict]:
    """(decode tok/s, greedy tokens, info) of one engine; the compiled one is warmed up first."""
    B = len(prompts)
    e = LLMEngine(model, num_blocks=num_blocks, max_num_seqs=max(B, 1), enforce_eager=not compiled)
    vocab = model.config.vocab_size
    t = time.perf_counter()
    run_engine(e, random_prompts(B, PROMPT, vocab, 97), 65, "warm")  # compiles the buckets it meets
    info = {"backend": e.backend.name, "warm_s": time.perf_counter() - t,
            "timings_us": {k: round(v * 1e6) for k, v in e.backend_timings.items()}}
    if compiled:
        info["compile_s"] = {k: round(v, 1) for k, v in e.decode_step.compile_seconds.items()}
    torch.cuda.synchronize()
    _, toks, reqs = run_engine(e, prompts, 65, "b")
    return B * 64 / decode_seconds(reqs), toks, info


def agreement(got: list[list[int]], want: list[list[int]]) -> str:
    """"rows equal/B, first k tokens equal in every row" (bf16 greedy runs part ways at near-ties)."""
    same = sum(a == b for a, b in zip(got, want))
    prefix = min(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(got, want))
    return f"{same}/{len(got)} rows, first {prefix}"


def decode_table(ours, theirs, cfg, batches, dtype_name: str) -> None:
    print(f"\n## Decode, {dtype_name}: nanoseek eager / compiled (CUDA graphs) / transformers, "
          f"{PROMPT}-token prompts, 64 new tokens\n")
    print("| batch | transformers tok/s | nanoseek eager tok/s | nanoseek compiled tok/s | compiled / transformers "
          "| greedy tokens equal (eager; compiled, vs transformers) | backend | first request incl. compile s |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for B in batches:
        prompts = random_prompts(B, PROMPT, cfg.vocab_size, B)
        blocks = B * 12 + 8
        eager, etoks, einfo = nanoseek_decode(ours, prompts, False, blocks)
        comp, ctoks, cinfo = nanoseek_decode(ours, prompts, True, blocks)
        hf, htoks = hf_decode_tps(theirs, prompts) if theirs is not None else (float("nan"), None)
        same = "-" if htoks is None else f"{agreement(etoks, htoks)}; {agreement(ctoks, htoks)}"
        print(f"| {B} | {hf:.1f} | {eager:.1f} | {comp:.1f} | {comp / hf:.2f}x | {same} | {einfo['backend']} "
              f"{einfo['timings_us']} | {cinfo['warm_s']:.1f} {cinfo.get('compile_s')} |", flush=True)


def prefill_table(ours, theirs, lengths, dtype_name: str) -> None:
    print(f"\n## Prefill ({dtype_name}): one prompt's forward, median of 5\n")
    print("| tokens | transformers tok/s | nanoseek tok/s | nanoseek / transformers |")
    print("|---:|---:|---:|---:|")
    for n in lengths:
        ids = torch.randint(2, ours.config.vocab_size, (1, n), device=DEV)
        res = []
        for fn in (lambda: theirs(ids).logits[:, -1], lambda: ours.compute_logits(ours(ids)[:, -1])):
            with torch.inference_mode():
                fn()
                times = []
                for _ in range(5):
                    t = sync_time()
                    fn()
                    times.append(sync_time() - t)
            res.append(n / sorted(times)[2])
        print(f"| {n} | {res[0]:,.0f} | {res[1]:,.0f} | {res[1] / res[0]:.2f}x |", flush=True)


def random_on_gpu(cfg: ModelConfig, dtype: torch.dtype, std: float = 0.02) -> CausalLM:
    """A model of cfg's shape with N(0, std) weights made on the GPU (no CPU copy of 15B parameters)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to(dtype).to_empty(device=DEV)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, std)
        model.inv_freq.copy_(rope_inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)[0])
    return model.eval()


def lite(batches) -> None:
    cfg = ModelConfig.from_json(ROOT / "configs/deepseek-v2-lite.json").replace(eos_token_id=None)
    t = time.perf_counter()
    model = random_on_gpu(cfg, torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    print(f"\n## DeepSeek-V2-Lite shape, bf16, random weights ({n / 1e9:.1f}B parameters, "
          f"{n * 2 / 2**30:.1f} GiB, built in {time.perf_counter() - t:.0f} s)\n")
    print("| batch | eager tok/s | compiled tok/s | greedy tokens equal (compiled vs eager) | backend |")
    print("|---:|---:|---:|---:|---|")
    for B in batches:
        prompts = random_prompts(B, PROMPT, cfg.vocab_size, B)
        eager, etoks, einfo = nanoseek_decode(model, prompts, False, B * 12 + 8)
        comp, ctoks, cinfo = nanoseek_decode(model, prompts, True, B * 12 + 8)
        print(f"| {B} | {eager:.1f} | {comp:.1f} | {agreement(ctoks, etoks)} | "
              f"{einfo['backend']} {einfo['timings_us']}; compile {cinfo.get('compile_s')} s |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench-v2-small.json"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--lite-batches", type=int, nargs="*", default=[1],
                    help="batch sizes of the V2-Lite-shaped decode (31 GB of weights); none: skip it")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device")
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, on both sides
    p = torch.cuda.get_device_properties(DEV)
    print(f"# GPU benchmark — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {p.name} "
          f"({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, transformers {transformers.__version__}, {os.cpu_count()} CPUs")
    cfg = ModelConfig.from_json(args.config).replace(eos_token_id=None)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(cfg, seed=0), Path(tmp) / "ck")
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            ours = load_model(Path(tmp) / "ck", dtype=dtype, device=DEV)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "ck", dtype=dtype).to(DEV).eval()
            decode_table(ours, theirs, cfg, args.batches, name)
            prefill_table(ours, theirs, [512, 2048], name)
            del ours, theirs
            torch.cuda.empty_cache()
    if args.lite_batches:
        lite(args.lite_batches)


if __name__ == "__main__":
    main()
