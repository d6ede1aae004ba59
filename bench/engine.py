"""Engine benchmarks: decode vs transformers, KV bytes per token, time to first token on cache
hits, and continuous batching — side by side in one run on one checkpoint.

    .venv/bin/python bench/engine.py                 # all four tables (a few minutes on 2 cores)
    .venv/bin/python bench/engine.py --only decode
    .venv/bin/python bench/engine.py --only profile  # where a B=1 decode token goes: matmuls vs the rest
    .venv/bin/python bench/engine.py --only profile --compiled   # ... and the compiled step's token
    .venv/bin/python bench/engine.py --only decode --compiled   # + the compiled decode step (warm-up!)

Model: configs/bench-v2-small.json with random weights, saved once and loaded by both engines.
Decode throughput excludes prefill: nanoseek's B x 64 tokens over the time from the last request's
first token to the end of the run, transformers' (time to generate 65 tokens - time to generate 1);
fresh random prompts each time, so no cache helps either side. With llama-cpp-python and gguf
installed (`.venv/bin/pip install llama-cpp-python gguf`, a 10-20 min build), the decode table adds
llama.cpp with its defaults on the same weights, exported by bench/llamacpp.py, same prompts, same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import llamacpp  # bench/llamacpp.py: the llama.cpp anchor, when llama-cpp-python is installed
from nanoseek.config import ModelConfig
from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.engine.llm import LLMEngine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.checkpoint import load_model, save_model
from nanoseek.model.linear import format_report, host_key
from nanoseek.model.transformer import build_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN = 512


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for _ in range(n)]


def run_engine(engine: LLMEngine, prompts, max_tokens: int, tag: str):
    """Generate greedily for all prompts at once; returns (seconds, token lists, outputs)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t, [r.outputs[0].token_ids for r in reqs], reqs


def decode_seconds(reqs) -> float:
    """Seconds from the last request's first token (every prompt prefilled) to the end of the run
    just finished: the decode of the other max_tokens - 1 tokens of each request. One run, so a
    swing of the load between two runs cannot make it negative (t65 - t1 could, on a busy host)."""
    return time.monotonic() - max(r.first_token_time for r in reqs)


def hf_generate(model, prompts, max_tokens: int):
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()


def load() -> str:
    return "load %.1f %.1f %.1f" % os.getloadavg()


def bench_decode(ours, theirs, cfg, seed=0, compiled=False, gguf_path: Path | None = None):
    print(f"\n## Decode: nanoseek LLMEngine vs transformers generate (greedy, 512-token prompts) — {load()}\n")
    warm = LLMEngine(ours, num_blocks=200, max_num_seqs=8)
    print(f"attention backend: {warm.backend.name} "
          f"({', '.join(f'{k} {v * 1e6:.0f} us' for k, v in warm.backend_timings.items())})")
    print(f"decode step: {'fused' if warm.decode_step is not None else 'model'} "
          f"({', '.join(f'{k} {v * 1e6:.0f} us' for k, v in warm.decode_timings.items())} per step at batch 1 + 8)")
    print("```\n" + format_report(warm.kernel_report) + "\n```\n")
    lcpp = None
    if gguf_path is not None:  # llama.cpp with its defaults (flash attention, f16 KV cache): bench/llamacpp.py
        from llamacpp import LlamaCpp, decode_tps, parity

        lcpp = LlamaCpp(gguf_path, flash_attn=True)
        diff, same = parity(lcpp, ours, random_prompts(1, 64, cfg.vocab_size, 1)[0])
        print(f"llama.cpp {lcpp.version} on the same weights: max logit diff {diff:.1e}, same argmax {same}")
    print("| batch | transformers decode tok/s | nanoseek decode tok/s | speedup | transformers end-to-end s "
          "| nanoseek end-to-end s | same greedy tokens | nanoseek fraction of 250 tok/s bandwidth cap "
          "| llama.cpp decode tok/s | nanoseek / llama.cpp | nanoseek model step (eager) tok/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    plotted: dict[int, dict[str, float]] = {}
    for B in (1, 8):
        p1, p65, p65b = (random_prompts(B, PROMPT_LEN, cfg.vocab_size, seed + k) for k in (1, 2, 3))
        run_engine(LLMEngine(ours, num_blocks=200), random_prompts(B, PROMPT_LEN, cfg.vocab_size, 99), 2, "w")
        e = LLMEngine(ours, num_blocks=20 * B)
        t65, toks, reqs = run_engine(e, p65, 65, f"b{B}")
        ours_tps = B * 64 / decode_seconds(reqs)
        m = LLMEngine(ours, num_blocks=20 * B, decode_kernel="model")  # the model's own step, for reference
        _, mtoks, mreqs = run_engine(m, p65, 65, f"m{B}")
        model_tps = B * 64 / decode_seconds(mreqs)
        if mtoks != toks:
            print(f"B={B}: the model step's greedy tokens differ from the engine's in "
                  f"{sum(a != b for a, b in zip(mtoks, toks))} of {B} rows")
        if e.decode_threads is not None:
            print(f"B={B} decode threads, median ms of the recent steps: {e.decode_threads.summary()}")
        if compiled:
            c = LLMEngine(ours, num_blocks=20 * B, enforce_eager=False)
            tw = time.perf_counter()
            tf, _, _ = run_engine(c, random_prompts(B, PROMPT_LEN, cfg.vocab_size, 97), 65, f"cw{B}")
            print(f"compiled B={B}: first request (warm-up included) {tf:.1f} s; compile per bucket "
                  f"{ {k: round(v, 1) for k, v in c.decode_step.compile_seconds.items()} } s")
            c65, ctoks, creqs = run_engine(c, p65, 65, f"cb{B}")
            print(f"compiled B={B}: {B * 64 / decode_seconds(creqs):.1f} tok/s (eager {ours_tps:.1f}); same greedy tokens "
                  f"{sum(a == b for a, b in zip(toks, ctoks))}/{B}; warm-up + first request {time.perf_counter() - tw:.1f} s")
        hf_generate(theirs, random_prompts(B, 16, cfg.vocab_size, 98), 2)  # warm-up
        h1, _ = hf_generate(theirs, p1, 1)
        h65, htoks = hf_generate(theirs, p65, 65)
        theirs_tps = B * 64 / (h65 - h1)
        same = sum(a == b for a, b in zip(toks, htoks))
        cap = f"{ours_tps / B / 250:.0%} per sequence" if B > 1 else f"{ours_tps / 250:.0%}"
        anchor = "| - | -"
        if lcpp is not None:
            lc_tps = decode_tps(lcpp, p65)
            anchor = f"| {lc_tps:.1f} | {ours_tps / lc_tps:.2f}x"
        print(f"| {B} | {theirs_tps:.1f} | {ours_tps:.1f} | {ours_tps / theirs_tps:.1f}x | {h65:.2f} | {t65:.2f} | "
              f"{same}/{B} | {cap} {anchor} | {model_tps:.1f} |")
        plotted[B] = {"transformers": theirs_tps, "nanoseek, model step": model_tps,
                      f"nanoseek, {'fused' if warm.decode_step is not None else 'model'} step (engine's choice)": ours_tps,
                      **({"llama.cpp": lc_tps} if lcpp is not None else {})}
    if lcpp is not None:
        lcpp.close()
    plot_decode(plotted, ROOT / "bench" / "engine-decode.png")


def plot_decode(rows: dict[int, dict[str, float]], path: Path) -> None:
    """Decode tok/s per batch size, one bar per engine (the table above, as a picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for r in rows.values() for n in r))
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.6))
    for ax, (B, r) in zip(axes if len(rows) > 1 else [axes], rows.items()):
        vals = [r.get(n, 0.0) for n in names]
        bars = ax.bar(range(len(names)), vals, color=["#999999", "#8fb3d9", "#1f5fa8", "#d98f3a"][: len(names)])
        ax.bar_label(bars, fmt="%.0f")
        ax.margins(y=0.15)
        ax.set_xticks(range(len(names)), [n.replace(", ", "\n").replace(" (", "\n(") for n in names], fontsize=8)
        ax.set_title(f"batch {B}")
        ax.set_ylabel("decode tok/s")
    fig.suptitle(f"bench-v2-small fp32 decode, {host_key()} — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nplot: {path}")


def bench_kv_bytes(ours, theirs, cfg):
    print("\n## KV-cache bytes per token (fp32, all layers)\n")
    ids = torch.tensor(random_prompts(1, 64, cfg.vocab_size, 5))
    with torch.inference_mode():
        cache = theirs(ids, use_cache=True).past_key_values
    hf_bytes = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                hf_bytes += t.numel() * t.element_size()
    llama = ModelConfig(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=2)
    print("| model | bytes / token | vs nanoseek MLA |")
    print("|---|---:|---:|")
    mine = PagedKVCache.bytes_per_token(cfg, torch.float32)
    rows = [("nanoseek MLA latent cache (L + R) x layers x 4", mine),
            ("transformers DeepseekV2 cache (measured)", hf_bytes / ids.shape[1]),
            ("Llama GQA baseline, 2 KV heads x 64 (same hidden, layers)", PagedKVCache.bytes_per_token(llama, torch.float32)),
            ("the same model with MHA (2 x heads x 64)", 2 * cfg.num_attention_heads * 64 * cfg.num_hidden_layers * 4)]
    for name, b in rows:
        print(f"| {name} | {b:,.0f} | {b / mine:.2f}x |")


def bench_ttft(ours, cfg, tmp: Path):
    print("\n## Time to first token with a 2,048-token shared prefix (+16 new tokens)\n")
    prefix = random_prompts(1, 2048, cfg.vocab_size, 7)[0]
    suffixes = random_prompts(4, 16, cfg.vocab_size, 8)
    kw = dict(num_blocks=80, max_num_batched_tokens=4096)
    run_engine(LLMEngine(ours, **kw), [random_prompts(1, 2064, cfg.vocab_size, 9)[0]], 1, "warm")
    e = LLMEngine(ours, cache_dir=tmp / "kv", **kw)
    miss, _, r0 = run_engine(e, [prefix + suffixes[0]], 1, "miss")
    mem, _, r1 = run_engine(e, [prefix + suffixes[1]], 1, "mem")
    e2 = LLMEngine(ours, cache_dir=tmp / "kv", **kw)  # a restart: only the disk cache survives
    disk, _, r2 = run_engine(e2, [prefix + suffixes[2]], 1, "disk")
    print("| case | cached prompt tokens | TTFT s | vs miss |")
    print("|---|---:|---:|---:|")
    for name, t, r in (("miss", miss, r0), ("memory hit", mem, r1), ("disk hit after restart", disk, r2)):
        print(f"| {name} | {r[0].num_cached_tokens} | {t:.3f} | {t / miss:.2f} |")


def bench_batching(ours, cfg):
    print("\n## Continuous batching: 16 requests (128-token prompts, 64 new tokens)\n")
    prompts = random_prompts(16, 128, cfg.vocab_size, 11)
    e = LLMEngine(ours, num_blocks=64)
    t_seq = 0.0
    for i, p in enumerate(prompts):
        t, _, _ = run_engine(e, [p], 64, f"one{i}")
        t_seq += t
    e = LLMEngine(ours, num_blocks=64, max_num_seqs=16)
    t_all, _, _ = run_engine(e, random_prompts(16, 128, cfg.vocab_size, 12), 64, "all")
    print("| mode | seconds | output tok/s |")
    print("|---|---:|---:|")
    print(f"| one at a time | {t_seq:.2f} | {16 * 64 / t_seq:.0f} |")
    print(f"| 16 concurrent | {t_all:.2f} | {16 * 64 / t_all:.0f} ({t_seq / t_all:.1f}x) |")


def bench_profile(ours, cfg, steps: int = 32, compiled: bool = False, kernel: str = "auto"):
    """Where a B=1 decode token goes: torch.profiler self time of the matmul ops vs everything else
    (compiled: the compiled step's, whose generated C++ kernels count as "outside"; the fused step: its
    one op holds all the layers' matmuls and attention, and "outside" is the engine around it)."""
    from torch.profiler import ProfilerActivity, profile

    e = LLMEngine(ours, num_blocks=48, max_num_seqs=1, enforce_eager=not compiled, decode_kernel=kernel)
    step = "compiled" if compiled else ("fused" if e.decode_step is not None else "model (eager)")
    print(f"\n## Profile of a B=1 decode token, {step} step (bench-v2-small, 512-token prompt) — {load()}\n")
    params = SamplingParams(temperature=0, max_tokens=2 * steps + 8, ignore_eos=True)
    e.add_request("p", {"prompt_token_ids": random_prompts(1, PROMPT_LEN, cfg.vocab_size, 3)[0]}, params)
    for _ in range(4):  # prefill, and the compiled step's warm-up
        e.step()
    t = time.perf_counter()
    for _ in range(steps):
        e.step()
    print(f"unprofiled: {(time.perf_counter() - t) / steps * 1e3:.2f} ms per token")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            e.step()
        wall = (time.perf_counter() - t) / steps
    e.abort("p")
    from profile_decode import MATMUL_OPS as mm
    rows = [(ev.key, ev.self_cpu_time_total / steps, ev.count / steps) for ev in prof.key_averages()]
    in_mm = sum(t for k, t, _ in rows if k in mm) / 1e3
    ops = sum(c for k, _, c in rows if k.startswith("aten::"))
    print(f"| wall ms / token (profiled) | matmul and attention ms (mm, addmm, bmm, baddbmm, SDPA, nanoseek::gemv, "
          f"nanoseek::moe_experts, nanoseek::paged_latent_decode, nanoseek::mla_decode_step) | outside them ms "
          f"| aten ops / token |")
    print("|---:|---:|---:|---:|")
    print(f"| {wall * 1e3:.2f} | {in_mm:.2f} | {wall * 1e3 - in_mm:.2f} | {ops:.0f} |")
    print("\ntop self-time ops per token:\n")
    for k, t, c in sorted(rows, key=lambda r: -r[1])[:12]:
        print(f"    {k:<48} {t / 1e3:6.3f} ms  x{c:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench-v2-small.json"))
    ap.add_argument("--only", choices=["decode", "kv", "ttft", "batching", "profile"])
    ap.add_argument("--compiled", action="store_true", help="also decode with the compiled step (slow warm-up)")
    ap.add_argument("--no-llama-cpp", action="store_true",
                    help="skip the llama.cpp column even when llama-cpp-python and gguf are installed")
    args = ap.parse_args()
    import transformers

    cfg = ModelConfig.from_json(args.config).replace(eos_token_id=None)
    print(f"# engine benchmark — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {host_key()}, "
          f"{platform.machine()}, transformers {transformers.__version__}, {Path(args.config).name}, {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model(build_model(cfg, seed=0), tmp / "ck")
        ours = load_model(tmp / "ck", dtype=torch.float32)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp / "ck", dtype=torch.float32).eval()
        if args.only in (None, "decode"):
            gguf_path = None
            if not args.no_llama_cpp and llamacpp.available():
                gguf_path = llamacpp.export_gguf(tmp / "ck", tmp / "ck.gguf")
            bench_decode(ours, theirs, cfg, compiled=args.compiled, gguf_path=gguf_path)
        if args.only in (None, "profile"):
            bench_profile(ours, cfg)  # the engine's choice (the fused step where it wins)
            bench_profile(ours, cfg, kernel="model")
            if args.compiled:
                bench_profile(ours, cfg, compiled=True)
        if args.only in (None, "kv"):
            bench_kv_bytes(ours, theirs, cfg)
        if args.only in (None, "ttft"):
            bench_ttft(ours, cfg, tmp)
        if args.only in (None, "batching"):
            bench_batching(ours, cfg)
    print(f"\n# done — {load()}")


if __name__ == "__main__":
    main()
