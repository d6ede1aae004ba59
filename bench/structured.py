"""Cost of grammar-constrained decoding per decode step, at B=1 and B=8, side by side in one run.

    .venv/bin/python bench/structured.py                 # a few minutes on 2 idle cores
    .venv/bin/python bench/structured.py --grammar-only  # the grammar's own cost, no model (~30 s)
    .venv/bin/python bench/structured.py --compare-xgrammar   # also time xgrammar's mask (if installed)

Model: configs/bench-v2-small.json (8,192-token vocabulary) with random weights. Tokenizer: a byte-level
BPE trained here to 8,192 tokens on the Python standard library's source (no download). Grammar: a
JSON schema whose strings are unbounded, so no sequence ends early. Decode time per step is
(time to generate 65 tokens - time to generate 1) / 64 on fresh prompts, with and without the grammar;
the grammar's own share (mask fill + apply, measured alone on the same states) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.engine.llm import LLMEngine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.structured import Grammars, StructuredOutputs, apply_token_bitmask, fill_bitmask
from nanoseek.model.transformer import build_model

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "count": {"type": "integer"}}, "required": ["title", "tags", "count"]}
PROMPT_LEN, STEPS = 64, 64


def corpus(limit_bytes: int = 4_000_000) -> list[str]:
    texts, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        t = p.read_text(errors="ignore")
        texts.append(t)
        total += len(t)
        if total > limit_bytes:
            break
    return texts


def timed_generate(engine, prompts, params, tag) -> float:
    reqs = [engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    assert all(len(o.token_ids) == params.max_tokens for r in reqs for o in r.outputs), \
        "a sequence ended early; the per-step numbers would be off"
    return time.perf_counter() - t


def prompts_for(tok, B, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(300, tok.vocab_size, (PROMPT_LEN,), generator=g).tolist() for _ in range(B)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare-xgrammar", action="store_true")
    ap.add_argument("--grammar-only", action="store_true", help="only the grammar's own cost (no model)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t = time.perf_counter()
    tok = train_tokenizer(corpus(), vocab_size=8192)
    print(f"tokenizer: {tok.vocab_size} tokens, trained in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    cfg = ModelConfig.from_json(ROOT / "configs/bench-v2-small.json").replace(eos_token_id=None)
    model = build_model(cfg, seed=0).eval()
    spec = StructuredOutputs(json=SCHEMA)
    t = time.perf_counter()
    grammars = Grammars(tok, cfg.vocab_size, [tok.eos_id])
    grammars.check(spec)
    setup = time.perf_counter() - t
    print(f"\nhost: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"llguidance tokenizer + first compile {setup * 1e3:.0f} ms")
    text_ids = tok.encode(json.dumps({"title": "x" * 40, "tags": ["a" * 30] * 8, "count": 3}))
    alone = {}
    for B in (1, 8):  # the grammar's own work per step: fill B masks, apply them, advance B states
        states = [grammars.start(spec) for _ in range(B)]
        logits = torch.randn(B, cfg.vocab_size)
        t = time.perf_counter()
        for tid in text_ids[:STEPS]:
            apply_token_bitmask(logits, fill_bitmask(states, cfg.vocab_size))
            for s in states:
                s.advance(tid)
        alone[B] = (time.perf_counter() - t) / min(STEPS, len(text_ids)) * 1e3
    print("\n| batch | grammar alone ms/step (fill + apply + advance) |\n|---:|---:|")
    for B in (1, 8):
        print(f"| {B} | {alone[B]:.3f} |", flush=True)
    if args.grammar_only:
        return
    print("\n| batch | decode ms/step, free | decode ms/step, JSON schema | difference ms | grammar share of step |")
    print("|---:|---:|---:|---:|---:|")
    for B in (1, 8):
        row = {}
        for name, so in (("free", None), ("json", spec)):
            e = LLMEngine(model, tok, block_size=16, num_blocks=16 * B, max_num_seqs=B)
            e._grammars = grammars
            p = SamplingParams(temperature=1.0, seed=1, max_tokens=1, structured_outputs=so, ignore_eos=True)
            timed_generate(e, prompts_for(tok, B, 9), p, "warm")
            t1 = timed_generate(e, prompts_for(tok, B, 1), p, f"a{name}")
            p65 = SamplingParams(temperature=1.0, seed=1, max_tokens=STEPS + 1, structured_outputs=so, ignore_eos=True)
            t65 = timed_generate(e, prompts_for(tok, B, 2), p65, f"b{name}")
            row[name] = (t65 - t1) / STEPS * 1e3
        print(f"| {B} | {row['free']:.2f} | {row['json']:.2f} | {row['json'] - row['free']:+.2f} | "
              f"{alone[B] / row['json']:.1%} |", flush=True)
    if args.compare_xgrammar:
        compare_xgrammar(tok, cfg.vocab_size, text_ids)


def compare_xgrammar(tok, V, text_ids) -> None:
    """Mask time per token of both libraries on the same tokenizer and text (B=1)."""
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token=tok.eos_token)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V)
    m = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA)))
    bm = xgr.allocate_token_bitmask(1, V)
    t = time.perf_counter()
    for tid in text_ids[:STEPS]:
        m.fill_next_token_bitmask(bm)
        m.accept_token(tid)
    xg = (time.perf_counter() - t) / STEPS * 1e3
    s = Grammars(tok, V, [tok.eos_id]).start(StructuredOutputs(json=SCHEMA))
    row = torch.full((1, (V + 31) // 32), -1, dtype=torch.int32)
    t = time.perf_counter()
    for tid in text_ids[:STEPS]:
        s.fill(row[0])
        s.advance(tid)
    ll = (time.perf_counter() - t) / STEPS * 1e3
    print(f"\n| library | mask + advance ms/token (B=1, V={V}) |\n|---|---:|\n| llguidance | {ll:.3f} |\n| xgrammar | {xg:.3f} |")


if __name__ == "__main__":
    main()
