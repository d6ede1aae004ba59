"""/health latency while abusive requests arrive, for one or more checkouts side by side.

    .venv/bin/python bench/abuse.py                                   # this checkout, 20 s
    .venv/bin/python bench/abuse.py --tree before=/tmp/main-checkout --tree after=. --duration 20

Builds once: a tiny model with a 32k context (so large prompts pass the length pre-check and have
to be tokenized), a price sheet, and a database with one funded key and one with zero balance. For
each tree it starts `python -m nanoseek serve` from that checkout (cwd and PYTHONPATH) with no rate
limits (the abuse must reach the expensive paths), then runs `--clients` abusive clients for
`--duration` seconds while one prober GETs /health every 50 ms. The abusive mix, round robin:
  oversized   a 3 MB body (declared length)            huge_int   top_k = 2**63 (killed the engine)
  bad_json    invalid JSON / JSON nested 5,000 deep      big_prompt 400k characters (must be tokenized)
  broke       a 1 MB prompt from a zero-balance key      disconnect a stream closed after its first chunk
  valid       a short chat request, 8 tokens
Prints, per tree, requests by kind and status and /health latency (p50, p99, max) with its status
codes; --json writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import httpx
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported by path (tests)
from loopback import CORPUS, free_port, percentile  # noqa: E402

KINDS = ("oversized", "huge_int", "bad_json", "big_prompt", "broke", "disconnect", "valid")
def prepare(folder: Path) -> tuple[Path, Path, str, str, str]:
    """Model folder, price sheet, database URL, funded secret, broke secret."""
    from nanoseek.config import ModelConfig
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model.checkpoint import save_model
    from nanoseek.model.transformer import build_model
    from nanoseek.serve.accounts import Accounts
    from nanoseek.serve.pricing import Throughput, derive_price_sheet

    model = folder / "model"
    tok = train_tokenizer(CORPUS, vocab_size=300, out_dir=model)
    cfg = ModelConfig(model_type="deepseek_v2", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                      n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                      first_k_dense_replace=1, max_position_embeddings=32768, topk_method="greedy",
                      bos_token_id=tok.bos_id, eos_token_id=None)
    save_model(build_model(cfg, seed=1), model,
               extra_files={f: model / f for f in os.listdir(model) if f.startswith("tokenizer")})
    prices = folder / "prices.json"
    derive_price_sheet(Throughput(1000, 10000, 500, 8), hardware_cost_per_hour="3.6", margin="0.10").save(prices)
    db = f"sqlite:///{folder / 'accounts.db'}"
    acc = Accounts(db)
    _, funded = acc.create_key("funded", Decimal("1000"))
    _, broke = acc.create_key("broke", Decimal("0"))
    acc.close()
    return model, prices, db, funded, broke


def start(tree: Path, model: Path, prices: Path, db: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(model), "--port", str(port),
                             "--db", db, "--prices", str(prices), "--max-num-seqs", "4", "--rpm", "0",
                             "--tpm", "0", "--max-concurrent", "0", "--max-queue", "0"],
                            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server of {tree} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server of {tree} did not come up in 300 s")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def bodies(funded: str, broke: str) -> dict[str, tuple[str, bytes]]:
    def chat(content: str, **kw) -> bytes:
        return json.dumps({"model": "model", "messages": [{"role": "user", "content": content}], **kw}).encode()

    words = "alpha beta gamma delta return class def "
    return {
        "oversized": (funded, chat(words * (3_000_000 // len(words)), max_tokens=4)),
        "huge_int": (funded, chat("hi", top_k=2 ** 63, temperature=1, max_tokens=4)),
        "bad_json": (funded, b'{"model": "model", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        "big_prompt": (funded, chat(words * (400_000 // len(words)))),
        "broke": (broke, chat(words * (1_000_000 // len(words)), max_tokens=4)),
        "disconnect": (funded, chat("tell me more", max_tokens=64, stream=True)),
        "valid": (funded, chat("def add(a, b):", max_tokens=8)),
    }


async def abuse(url: str, payloads, clients: int, duration: float) -> dict:
    stop = time.monotonic() + duration
    codes: Counter = Counter()
    health: list[float] = []
    health_codes: Counter = Counter()

    async def client(i: int, http: httpx.AsyncClient) -> None:
        n = i
        while time.monotonic() < stop:
            kind = KINDS[n % len(KINDS)]
            n += 1
            secret, body = payloads[kind]
            headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
            try:
                if kind == "disconnect":
                    async with http.stream("POST", url + "/v1/chat/completions", content=body,
                                           headers=headers) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                break
                        codes[kind, r.status_code] += 1
                else:
                    r = await http.post(url + "/v1/chat/completions", content=body, headers=headers)
                    codes[kind, r.status_code] += 1
            except httpx.HTTPError as e:
                codes[kind, type(e).__name__] += 1

    async def prober(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                r = await http.get(url + "/health")
                health_codes[r.status_code] += 1
            except httpx.HTTPError as e:
                health_codes[type(e).__name__] += 1
            health.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http, \
            httpx.AsyncClient(timeout=120) as probe_http:
        await asyncio.gather(prober(probe_http), *(client(i, http) for i in range(clients)))
    return {"requests": {f"{k} {c}": n for (k, c), n in sorted(codes.items(), key=str)},
            "health": {"n": len(health), "p50_s": percentile(health, 50), "p99_s": percentile(health, 99),
                       "max_s": max(health) if health else float("nan"),
                       "codes": {str(k): v for k, v in health_codes.items()}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="a checkout to serve from (repeatable; default: this one)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["this", str(Path(__file__).resolve().parents[1])]]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, prices, db, funded, broke = prepare(Path(tmp))
        payloads = bodies(funded, broke)
        for name, tree in trees:
            port = free_port()
            proc = start(Path(tree).resolve(), model, prices, db, port)
            try:
                results[name] = asyncio.run(abuse(f"http://127.0.0.1:{port}", payloads, args.clients, args.duration))
            finally:
                proc.terminate()
                proc.wait(30)
    print(f"{args.clients} abusive clients for {args.duration:g} s, load {os.getloadavg()[0]:.1f}\n")
    print("| tree | /health n | p50 s | p99 s | max s | /health codes | requests (kind status: count) |")
    print("|---|---:|---:|---:|---:|---|---|")
    for name, r in results.items():
        h = r["health"]
        reqs = ", ".join(f"{k}: {v}" for k, v in r["requests"].items())
        print(f"| {name} | {h['n']} | {h['p50_s']:.3f} | {h['p99_s']:.3f} | {h['max_s']:.3f} | {h['codes']} | {reqs} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
