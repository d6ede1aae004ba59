"""Load benchmark of `nanoseek serve`: N concurrent streaming clients for a fixed time, on loopback.

    .venv/bin/python bench/serve.py --model runs/default --clients 8 --duration 30
    .venv/bin/python bench/serve.py --url http://127.0.0.1:8000 --key sk-... --model-name default

Without --url it starts `nanoseek serve` itself on a free port with a throwaway database, a key
with a large balance and a fixed price sheet (prices do not change the load; calibrate for real
ones). Two scenarios run one after the other:
  distinct   every request a short prompt of its own (no cache hits beyond the chat template)
  shared     the same long system prompt (1,024 tokens, or what the context leaves) before each
             short user message: after the first request, its full blocks are prefix-cache hits
Per scenario: requests/s, output tokens/s, time to first token and time per output token (p50,
p99), cache-hit share of prompt tokens, errors. Prints a Markdown table and, with --json, writes
the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import httpx

from nanoseek.io import atomic_write

WORDS = ("alpha beta gamma delta epsilon stack queue tree graph node edge list dict set tuple "
         "return yield class def import lambda async await").split()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(http: httpx.AsyncClient, url: str, key: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first = last = None
    usage = None
    async with http.stream("POST", url + "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {key}"}) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return {"error": f"{resp.status_code}"}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    if usage is None:
        return {"error": "no usage chunk"}
    if first is None:  # a sampled end-of-sequence first: a valid reply, but no token to time
        return {"error": "empty completion" if usage["completion_tokens"] <= 1 else "no content"}
    n = usage["completion_tokens"]
    return {"ttft": first - t0, "tpot": (last - first) / (n - 1) if n > 1 else None, "output": n,
            "prompt": usage["prompt_tokens"], "hit": usage["prompt_cache_hit_tokens"],
            "latency": time.perf_counter() - t0}


async def run_load(url: str, key: str, model: str, clients: int, duration: float, max_tokens: int,
                   system: str | None, seed: int) -> dict:
    rng = random.Random(seed)
    results: list[dict] = []
    stop_at = time.perf_counter() + duration

    async def client(i: int) -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            while time.perf_counter() < stop_at:
                user = " ".join(rng.choice(WORDS) for _ in range(12)) + f" #{i}-{len(results)}"
                messages = ([{"role": "system", "content": system}] if system else []) + \
                           [{"role": "user", "content": user}]
                body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.7,
                        "stream": True, "stream_options": {"include_usage": True}}
                try:
                    results.append(await one_request(http, url, key, body))
                except httpx.HTTPError as e:
                    results.append({"error": type(e).__name__})

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    prompt = sum(r["prompt"] for r in ok)
    return {"requests": len(ok), "errors": len(results) - len(ok),
            "error_kinds": dict(Counter(r["error"] for r in results if "error" in r)), "wall_s": round(wall, 1),
            "req_per_s": round(len(ok) / wall, 2), "output_tok_per_s": round(sum(r["output"] for r in ok) / wall, 1),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p99_s": round(percentile(ttft, 99), 3),
            "tpot_p50_ms": round(1000 * percentile(tpot, 50), 1), "tpot_p99_ms": round(1000 * percentile(tpot, 99), 1),
            "prompt_tokens_per_request": round(prompt / max(1, len(ok))),
            "cache_hit_share": round(sum(r["hit"] for r in ok) / max(1, prompt), 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_code() -> str:
    """The nanoseek that `python -m nanoseek` imports here (this interpreter, directory and PYTHONPATH),
    with its git commit: a before/after comparison must name the code each side served. (The current
    directory comes first on sys.path: run from another checkout's root to serve its code.)"""
    where = subprocess.run([sys.executable, "-c", "import os, nanoseek; print(os.path.dirname(nanoseek.__file__))"],
                           capture_output=True, text=True).stdout.strip()
    sha = subprocess.run(["git", "-C", where or ".", "log", "-1", "--format=%h %s"], capture_output=True,
                         text=True).stdout.strip()
    return f"{where} ({sha or 'not a git checkout'})"


def start_server(model: str, tmp: Path, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    from nanoseek.serve.accounts import Accounts
    from nanoseek.serve.pricing import Throughput, derive_price_sheet

    derive_price_sheet(Throughput(1000, 100000, 100, 16), "1").save(tmp / "prices.json")
    db = f"sqlite:///{tmp / 'bench.db'}"
    acc = Accounts(db)
    _, key = acc.create_key("bench", Decimal("1000000"))
    acc.close()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", model, "--port", str(port),
                             "--db", db, "--prices", str(tmp / "prices.json"), "--rpm", "0", "--tpm", "0",
                             "--max-concurrent", "0", *extra],
                            stdout=open(tmp / "serve.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait = 900 if "--no-enforce-eager" in extra else 120  # a compiling server warms up before it listens
    deadline = time.monotonic() + wait
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nanoseek serve exited: {(tmp / 'serve.log').read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nanoseek serve did not come up in {wait} s")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url, key
        except httpx.TransportError:
            time.sleep(0.2)


def shared_system_prompt(url: str, key: str, model: str, tokens: int) -> str:
    """A system prompt of about `tokens` tokens of the served tokenizer, sized by asking the server."""
    def text(n: int) -> str:
        return " ".join(WORDS[i % len(WORDS)] + str(i % 7) for i in range(n))

    def measure(n: int) -> int:
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=600,
                       json={"model": model, "max_tokens": 1, "messages": [{"role": "system", "content": text(n)}]})
        r.raise_for_status()
        return r.json()["usage"]["prompt_tokens"]

    n = max(1, tokens // 3)
    n = max(1, int(n * tokens / measure(n)))
    while n > 1 and measure(n) > tokens:
        n = int(n * 0.97)
    return text(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/default", help="model or run folder (when starting a server)")
    ap.add_argument("--url", default=None, help="an already running server (then --key is needed)")
    ap.add_argument("--key", default=None)
    ap.add_argument("--model-name", default=None, help="the model id (default: asked from /v1/models)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per scenario")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--shared-tokens", type=int, default=1024, help="length of the shared system prompt")
    ap.add_argument("--serve-args", default="", help="extra flags for nanoseek serve, e.g. '--max-num-seqs 8'")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            if not args.key:
                ap.error("--url needs --key")
            url, key = args.url.rstrip("/"), args.key
        else:
            code = served_code()
            print(f"serving {code}", file=sys.stderr, flush=True)
            proc, url, key = start_server(args.model, Path(tmp), args.serve_args.split())
        try:
            card = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"][0]
            context = card.get("max_model_len")  # None from a server that does not say (a gateway)
            model = args.model_name or card["id"]
            # the shared prompt must leave room for the user message and max_tokens in the context
            shared = args.shared_tokens if context is None else min(args.shared_tokens, context - args.max_tokens - 64)
            rows = {}
            for name, system in (("distinct", None), (f"shared {shared}-token prefix",
                                                      shared_system_prompt(url, key, model, shared))):
                print(f"{name}: {args.clients} clients for {args.duration:.0f} s ...", file=sys.stderr, flush=True)
                rows[name] = asyncio.run(run_load(url, key, model, args.clients, args.duration, args.max_tokens,
                                                  system, seed=len(rows)))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    load = os.getloadavg()[0]
    if not args.url:
        print(f"\nserved code: {code}")
    print(f"\n{args.clients} streaming clients, max_tokens={args.max_tokens}, {args.duration:.0f} s per scenario, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}\n")
    cols = ["requests", "errors", "req_per_s", "output_tok_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms",
            "tpot_p99_ms", "prompt_tokens_per_request", "cache_hit_share"]
    print("| scenario | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(str(r[c]) for c in cols) + " |")
    for name, r in rows.items():
        if r["error_kinds"]:
            print(f"\n{name} errors: {r['error_kinds']}")
    if args.json:
        atomic_write(args.json, json.dumps({"clients": args.clients, "max_tokens": args.max_tokens,
                                               "duration_s": args.duration, "served_code": None if args.url else code,
                                               "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
