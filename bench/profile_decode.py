"""Where a decode step goes: wall time per step, the model's forward vs the engine's Python around it,
time in matmuls vs everything else, and ops per layer, by module (torch.profiler).

    .venv/bin/python bench/profile_decode.py                    # B=1 and B=8, bench-v2-small, eager
    .venv/bin/python bench/profile_decode.py --batch 1 --steps 64
    .venv/bin/python bench/profile_decode.py --compiled         # the compiled decode step (slow warm-up)

Method: B requests with 512-token random prompts decode greedily in one LLMEngine; after the prompts
and a few warm-up steps,
1. wall: the median ms of `engine.step()` over --steps steps, no profiler attached;
2. phases (no profiler): the same steps split into the scheduler, the model forward + logits, the
   sampler, and the rest of `step()` (outputs, detokenizing), timed by wrapping the engine's bound
   methods in this script only;
3. profile (torch.profiler, which adds its own per-op cost): self time of the matmul kernels vs the
   rest, aten ops per step and per decoder layer, and each module kind's share (forward hooks push a
   profiler label per module).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from engine import PROMPT_LEN, random_prompts  # noqa: E402  (bench/engine.py)

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.engine.llm import LLMEngine  # noqa: E402
from nanoseek.engine.sampling import SamplingParams  # noqa: E402
from nanoseek.model.checkpoint import load_model, save_model  # noqa: E402
from nanoseek.model.linear import host_key  # noqa: E402
from nanoseek.model.transformer import build_model  # noqa: E402

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul_out",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_weight_int8pack_mm",
              "aten::_weight_int4pack_mm_for_cpu", "aten::_grouped_mm",
              "nanoseek::gemv", "nanoseek::moe_experts",  # nanoseek's C++ CPU kernels (model/csrc)
              "nanoseek::paged_latent_decode", "aoti_torch_cpu_mm_out", "aoti_torch_cpu_bmm_out",  # compiled steps
              "nanoseek::mla_decode_step"}  # the fused step: the whole token's layers (engine/fused_decode.py)
# module classes labelled in the profile (the innermost label owns an op)
LABELLED = ("MLA", "GQA", "Router", "Experts", "MLP", "RMSNorm", "Embedding")


def decoding_engine(model, cfg, batch: int, compiled: bool) -> LLMEngine:
    e = LLMEngine(model, num_blocks=40 * batch + 8, max_num_seqs=max(batch, 1), enforce_eager=not compiled)
    params = SamplingParams(temperature=0, max_tokens=2048, ignore_eos=True)
    for i, p in enumerate(random_prompts(batch, PROMPT_LEN, cfg.vocab_size, 3)):
        e.add_request(f"p{i}", {"prompt_token_ids": p}, params)
    t = time.perf_counter()
    while any(not s.seq.output_token_ids for _, s in e._children.values()):  # every prompt prefilled
        e.step()
    for _ in range(4):
        e.step()
    print(f"prefill + warm-up: {time.perf_counter() - t:.1f} s")
    return e


def wall_ms(e: LLMEngine, steps: int) -> list[float]:
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        e.step()
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


class PhaseTimer:
    """Wraps bound methods of one engine (instance attributes, this script only) to time them."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, obj, attr: str, name: str):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[name] += time.perf_counter() - t

        setattr(obj, attr, timed)
        return fn

    @staticmethod
    def unwrap(obj, attr: str):
        obj.__dict__.pop(attr, None)


def phases(e: LLMEngine, steps: int) -> dict[str, float]:
    pt = PhaseTimer()
    r, s = e.runner, e.scheduler
    wrapped = [(s, "schedule", "scheduler.schedule"), (s, "update", "scheduler.update"),
               (r, "_forward", "runner forward + logits"), (r, "_sample", "runner sample + read back")]
    if r.decode_step is not None:
        wrapped[2] = (r, "_forward", "runner forward + logits (compiled)")
    for obj, attr, name in wrapped:
        pt.wrap(obj, attr, name)
    t = time.perf_counter()
    for _ in range(steps):
        e.step()
    wall = time.perf_counter() - t
    for obj, attr, _ in wrapped:
        pt.unwrap(obj, attr)
    out = {k: v / steps * 1e3 for k, v in pt.total.items()}
    out["rest of step() (outputs, bookkeeping)"] = wall / steps * 1e3 - sum(out.values())
    out["step() total"] = wall / steps * 1e3
    return out


def label_modules(model) -> list:
    handles = []
    for name, m in model.named_modules():
        kind = type(m).__name__
        if kind not in LABELLED and name != "lm_head":
            continue
        label = "lm_head" if name == "lm_head" else kind
        stack: list = []

        def pre(mod, args, label=label, stack=stack):
            rf = record_function(f"## {label}")
            rf.__enter__()
            stack.append(rf)

        def post(mod, args, out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def profiled(e: LLMEngine, steps: int, layers: int) -> None:
    handles = label_modules(e.model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("## step"):
                e.step()
    for h in handles:
        h.remove()
    events = prof.events()
    by_id = {id(ev): ev for ev in events}
    mm_us, other_us, n_ops = 0.0, 0.0, 0
    per_label = defaultdict(lambda: [0.0, 0.0, 0])  # label -> [self us of its ops, of which matmul, ops]
    top = defaultdict(lambda: [0.0, 0])

    def owner(ev) -> str:
        p = ev.cpu_parent
        while p is not None:
            if p.name.startswith("## ") and p.name != "## step":
                return p.name[3:]
            p = p.cpu_parent
        return "outside modules (lm_head's caller, metadata, sampling)"

    for ev in events:
        if not ev.name.startswith("aten::"):
            continue
        self_us = ev.self_cpu_time_total
        is_mm = ev.name in MATMUL_OPS
        top[ev.name][0] += self_us
        top[ev.name][1] += 1
        lab = per_label[owner(ev)]
        lab[0] += self_us
        lab[1] += self_us if is_mm else 0.0
        parent = ev.cpu_parent
        top_level = parent is None or not parent.name.startswith("aten::")
        lab[2] += top_level
        n_ops += top_level
        if is_mm:
            mm_us += self_us
        else:
            other_us += self_us
    del by_id
    print(f"\nprofiled {steps} steps (the profiler adds per-op cost; shares matter, not totals):")
    print(f"  aten ops per step (outermost calls): {n_ops / steps:.0f}; per decoder layer ~{n_ops / steps / layers:.0f}")
    print(f"  aten self time per step: matmuls {mm_us / steps / 1e3:.2f} ms, other ops {other_us / steps / 1e3:.2f} ms")
    print("\n| module kind | ms / step (self time of its aten ops) | of which matmul ms | aten ops / step |")
    print("|---|---:|---:|---:|")
    for lab, (us, mm, n) in sorted(per_label.items(), key=lambda kv: -kv[1][0]):
        print(f"| {lab} | {us / steps / 1e3:.3f} | {mm / steps / 1e3:.3f} | {n / steps:.0f} |")
    print("\ntop aten ops by self time per step:")
    for k, (us, n) in sorted(top.items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"    {k:<52} {us / steps / 1e3:6.3f} ms  x{n / steps:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/bench-v2-small.json"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--compiled", action="store_true", help="profile the compiled decode step")
    ap.add_argument("--no-profile", action="store_true", help="wall and phases only")
    args = ap.parse_args()
    cfg = ModelConfig.from_json(args.config).replace(eos_token_id=None)
    print(f"# decode profile — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {host_key()}, "
          f"{Path(args.config).name}, load {'%.2f %.2f %.2f' % os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(cfg, seed=0), Path(tmp) / "ck")
        model = load_model(Path(tmp) / "ck", dtype=torch.float32)
    for B in args.batch:
        print(f"\n## B={B} ({'compiled' if args.compiled else 'eager'})")
        e = decoding_engine(model, cfg, B, args.compiled)
        ts = wall_ms(e, args.steps)
        med = statistics.median(ts)
        print(f"wall per step: median {med:.2f} ms, min {min(ts):.2f} ms -> {B * 1e3 / med:.1f} tok/s "
              f"(median), {B * 1e3 / min(ts):.1f} (best step)")
        if e.decode_threads is not None:
            print(f"decode threads (median ms of the recent steps per batch bucket and count): "
                  f"{e.decode_threads.summary()}")
        print("\n| phase (no profiler) | ms / step |\n|---|---:|")
        for k, v in phases(e, args.steps).items():
            print(f"| {k} | {v:.2f} |")
        if not args.no_profile:
            profiled(e, min(args.steps, 24), cfg.num_hidden_layers)
    print(f"\n# done — load {'%.2f %.2f %.2f' % os.getloadavg()}")


if __name__ == "__main__":
    main()
