"""Soak test of `nanoseek serve`: many clients, abusive requests, a SIGKILL midway, a ledger audit.

    .venv/bin/python bench/soak.py                       # 60 s, 64 clients, tiny model built here
    .venv/bin/python bench/soak.py --duration 15 --json soak.json

Starts `nanoseek serve` as a subprocess on loopback over a tiny model it builds (a few seconds),
an SQLite accounts database and an on-disk context cache in a temporary folder. 64 clients each
loop over a random mix of valid requests (chat streamed with per-token logprobs, so delivered
tokens are counted exactly; chat and completions not streamed) and abusive ones (a 2 MB body,
integers past 2**63, bad JSON, JSON nested 100,000 deep, disconnects after the first chunk, a
key with zero balance). A poller reads /health every 100 ms. Halfway through, the server is
SIGKILLed and restarted on the same database and cache folder; the traffic then runs for the
other half (the restart itself does not count). At the end it is stopped with
SIGTERM and the ledger is audited:
  - every key's charges (ledger rows) equal its balance delta, and `Accounts.audit()` is clean;
  - nothing is held;
  - unbilled delivered tokens: per streamed request, tokens the client received minus the
    output tokens billed; must be 0 for requests the kill did not interrupt, and at most
    K - 1 (K = --record-every-tokens) for those it did (the bound documented in README, Serve).
Reports requests by kind and status, 5xx outside the kill window (must be 0), /health latency
p50/p99 outside the kill window and the server's RSS at start and end. Exit status 1 when an
expectation fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path

import httpx
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported by path (tests)
from loopback import CORPUS, free_port, percentile  # noqa: E402

WORDS = "alpha beta gamma delta stack queue tree graph node edge list dict return yield class".split()
MODEL = "soak"
FUNDED_KEYS, FUNDED_BALANCE = 8, Decimal("1000")


def build_tiny_model(folder: Path) -> Path:
    """Tokenizer + tiny DeepSeek-V2 in HF layout; no EOS, so every request runs to max_tokens."""
    from nanoseek.config import ModelConfig
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model.checkpoint import save_model
    from nanoseek.model.transformer import build_model

    tok = train_tokenizer(CORPUS, vocab_size=300, out_dir=folder)
    cfg = ModelConfig(model_type="deepseek_v2", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                      n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                      max_position_embeddings=256, topk_method="greedy", bos_token_id=tok.bos_id, eos_token_id=None)
    save_model(build_model(cfg, seed=7), folder,
               extra_files={f: folder / f for f in os.listdir(folder) if f.startswith("tokenizer")})
    return folder


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return round(kb / 1024, 1)


class Server:
    """`nanoseek serve` as a subprocess; start() waits for /health 200."""

    def __init__(self, argv: list[str], url: str, log: Path):
        self.argv, self.url, self.log = argv, url, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nanoseek serve exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nanoseek serve did not come up in {timeout} s")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


@dataclass
class Outcome:
    kind: str
    status: str                  # an HTTP status; "conn": no answer; "cut": a 200 stream broken off;
    #                              "event-error": an error event inside a 200 stream
    t0: float
    t1: float
    request_id: str = ""
    delivered: int = 0           # output tokens the client received (streams: per-token logprobs)
    complete: bool = False       # a stream that ended with usage and [DONE]


class Soak:
    def __init__(self, url: str, funded: list[str], broke: str, rng: random.Random, stop_at: float):
        self.url, self.funded, self.broke, self.rng, self.stop_at = url, funded, broke, rng, stop_at
        self.outcomes: list[Outcome] = []
        self.health: list[tuple[float, float, str]] = []   # (t, latency, status)

    def text(self, n: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def chat(self, **kw) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": self.text(self.rng.randint(3, 30))}],
                "max_tokens": self.rng.randint(4, 48), **kw}

    async def post(self, http, kind: str, key: str, body=None, content: bytes | None = None) -> None:
        t0 = time.monotonic()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        path = "/v1/completions" if kind.startswith("completion") or kind == "huge-token-id" else "/v1/chat/completions"
        try:
            r = await http.post(self.url + path, headers=headers, content=content if content is not None
                                else json.dumps(body).encode())
            out = Outcome(kind, str(r.status_code), t0, time.monotonic(), r.headers.get("x-request-id", ""))
            if r.status_code == 200:
                out.delivered = r.json()["usage"]["completion_tokens"]
                out.request_id = r.json()["id"]
                out.complete = True
        except httpx.HTTPError:
            out = Outcome(kind, "conn", t0, time.monotonic())
        self.outcomes.append(out)

    async def stream(self, http, kind: str, key: str, stop_after: int | None = None) -> None:
        body = self.chat(stream=True, logprobs=True, top_logprobs=0, stream_options={"include_usage": True})
        out = Outcome(kind, "conn", time.monotonic(), 0.0)
        try:
            async with http.stream("POST", self.url + "/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as r:
                out.status, out.request_id = str(r.status_code), r.headers.get("x-request-id", "")
                if r.status_code == 200:
                    usage = False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            out.complete = usage
                            break
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            out.status = "event-error"
                            break
                        usage = usage or bool(chunk.get("usage"))
                        for c in chunk.get("choices", []):
                            out.delivered += len((c.get("logprobs") or {}).get("content") or [])
                        if stop_after is not None and out.delivered >= stop_after:
                            break  # the client goes away mid-stream
                else:
                    await r.aread()
        except httpx.HTTPError:  # "conn" when it never answered, "cut" when a stream broke off
            out.status = "cut" if out.status == "200" else out.status
        out.t1 = time.monotonic()
        self.outcomes.append(out)

    async def one(self, http) -> None:
        rng, key = self.rng, self.rng.choice(self.funded)
        kind = rng.choices(["stream", "chat", "completion", "disconnect", "zero-balance", "oversized",
                            "huge-int", "huge-token-id", "bad-json", "nested-json", "bool-int"],
                           weights=[30, 15, 10, 8, 6, 3, 5, 5, 6, 3, 3])[0]
        if kind == "stream":
            await self.stream(http, kind, key)
        elif kind == "disconnect":
            await self.stream(http, kind, key, stop_after=1)
        elif kind == "chat":
            await self.post(http, kind, key, self.chat())
        elif kind == "completion":
            await self.post(http, kind, key, {"model": MODEL, "prompt": self.text(10), "max_tokens": rng.randint(1, 32)})
        elif kind == "zero-balance":
            await self.post(http, kind, self.broke, self.chat())
        elif kind == "oversized":
            await self.post(http, kind, key, {"model": MODEL, "messages": [{"role": "user", "content": "x " * 1_000_000}]})
        elif kind == "huge-int":
            await self.post(http, kind, key, self.chat(top_k=2 ** 63, temperature=0.7, seed=2 ** 64))
        elif kind == "huge-token-id":
            await self.post(http, kind, key, {"model": MODEL, "prompt": [5, 2 ** 63], "max_tokens": 4})
        elif kind == "bad-json":
            await self.post(http, kind, key, content=b'{"model": "soak", "messages": [')
        elif kind == "nested-json":
            await self.post(http, kind, key, content=b"[" * 100_000 + b"]" * 100_000)
        elif kind == "bool-int":
            await self.post(http, kind, key, self.chat(max_tokens=True))

    async def client(self) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            while time.monotonic() < self.stop_at:
                await self.one(http)
                if self.outcomes[-1].status == "conn":
                    await asyncio.sleep(0.2)  # the server is down: do not spin on refused connections

    async def poll_health(self) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            while time.monotonic() < self.stop_at:
                t0 = time.monotonic()
                try:
                    status = str((await http.get(self.url + "/health")).status_code)
                except httpx.HTTPError:
                    status = "conn"
                self.health.append((t0, time.monotonic() - t0, status))
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))


def audit(db: str, initial: dict[str, Decimal], outcomes: list[Outcome], window: tuple[float, float],
          bound: int) -> dict:
    from nanoseek.serve.accounts import Accounts

    acc = Accounts(db)
    try:
        problems = acc.audit()
        keys = {k.name: k for k in acc.list_keys()}
        ledger = acc.ledger()
        for name, start in initial.items():
            charged = sum((r.amount for r in ledger if r.key_id == keys[name].id), Decimal(0))
            if start - keys[name].balance != charged:
                problems.append(f"key {name}: balance delta {start - keys[name].balance} != charges {charged}")
        held = sum((k.held for k in keys.values()), Decimal(0))
        billed = {r.request_id: r.output_tokens for r in ledger}
    finally:
        acc.close()
    worst_killed = worst_other = unbilled_total = 0
    interrupted = 0
    for o in outcomes:
        if o.status not in ("200", "cut") or not o.request_id or o.kind == "disconnect":
            continue  # a disconnect pays for what was produced, which is at least what was delivered
        gap = max(0, o.delivered - billed.get(o.request_id, 0))
        unbilled_total += gap
        if o.t0 < window[1] and o.t1 > window[0] and not o.complete:
            interrupted += 1
            worst_killed = max(worst_killed, gap)
        else:
            worst_other = max(worst_other, gap)
    if worst_other:
        problems.append(f"a request the kill did not interrupt left {worst_other} delivered tokens unbilled")
    if worst_killed > bound:
        problems.append(f"an interrupted stream left {worst_killed} delivered tokens unbilled (> bound {bound})")
    if held:
        problems.append(f"{held} still held after the end")
    return {"problems": problems, "ledger_rows": len(ledger),
            "held_after_end": "0" if held == 0 else str(held),
            "streams_interrupted_by_kill": interrupted, "unbilled_tokens_interrupted_max": worst_killed,
            "unbilled_tokens_total": unbilled_total, "bound": bound}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default 60)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--kill-at", type=float, default=0.5, help="SIGKILL at this fraction of the run")
    ap.add_argument("--record-every-tokens", type=int, default=8, help="the server's K (default 8)")
    ap.add_argument("--lease-ttl", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the model, database and logs here")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    from nanoseek.serve.accounts import Accounts
    from nanoseek.serve.pricing import Throughput, derive_price_sheet

    tmp_ctx = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").is_file():
        build_tiny_model(model)
    derive_price_sheet(Throughput(1000, 100000, 100, 16), "1").save(work / "prices.json")
    db = f"sqlite:///{work / 'soak.db'}"
    acc = Accounts(db)
    stamp = int(time.time())
    funded = [acc.create_key(f"soak-{stamp}-{i}", FUNDED_BALANCE)[1] for i in range(FUNDED_KEYS)]
    broke = acc.create_key(f"broke-{stamp}", 0)[1]
    initial = {k.name: k.balance for k in acc.list_keys()}
    acc.close()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Server([sys.executable, "-m", "nanoseek", "serve", "--model", str(model), "--model-name", MODEL,
                     "--port", str(port), "--db", db, "--prices", str(work / "prices.json"),
                     "--cache-dir", str(work / "kv-cache"), "--rpm", "0", "--tpm", "0", "--max-concurrent", "0",
                     "--lease-ttl", str(args.lease_ttl), "--record-every-tokens", str(args.record_every_tokens),
                     "--record-every-s", "1"], url, work / "serve.log")
    server.start()
    rss = {"first server at start": rss_mb(server.proc.pid)}
    t_start = time.monotonic()
    soak = Soak(url, funded, broke, random.Random(args.seed), t_start + args.duration + 3600)
    window = [0.0, 0.0]

    async def run() -> None:
        async def killer() -> None:  # also ends the run: stop_at is set once the restart is up
            await asyncio.sleep(args.duration * args.kill_at)
            rss["first server at kill"] = rss_mb(server.proc.pid)
            window[0] = time.monotonic()
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            window[1] = time.monotonic()
            soak.stop_at = window[1] + args.duration * (1 - args.kill_at)  # the restart time does not count
            rss["restarted server at start"] = rss_mb(server.proc.pid)

        tasks = [asyncio.create_task(soak.client()) for _ in range(args.clients)]
        await asyncio.gather(killer(), soak.poll_health(), *tasks)

    print(f"soak: {args.clients} clients for {args.duration:.0f} s against {url} (work: {work})",
          file=sys.stderr, flush=True)
    asyncio.run(run())
    rss["restarted server at end"] = rss_mb(server.proc.pid)
    server.stop()

    def in_window(t0: float, t1: float) -> bool:
        return t0 < window[1] and t1 > window[0]

    by_kind: dict[str, dict[str, int]] = {}
    for o in soak.outcomes:
        by_kind.setdefault(o.kind, {}).setdefault(o.status, 0)
        by_kind[o.kind][o.status] += 1
    bad = [o for o in soak.outcomes if (o.status.startswith("5") or o.status in ("conn", "cut", "event-error"))
           and not in_window(o.t0, o.t1)]
    health_ok = [lat for t, lat, s in soak.health if s == "200" and not in_window(t, t + lat)]
    health_bad = [s for t, lat, s in soak.health if s != "200" and not in_window(t, t + lat)]
    result = {
        "duration_s": args.duration, "clients": args.clients, "requests": len(soak.outcomes),
        "kill_window_s": round(window[1] - window[0], 2), "by_kind": by_kind,
        "unexpected_5xx": sum(o.status.startswith("5") for o in bad),
        "unexpected_failures": {s: sum(o.status == s for o in bad) for s in sorted({o.status for o in bad})},
        "unexpected_failures_by_kind": sorted({f"{o.kind}:{o.status}" for o in bad}),
        "health_p50_ms": round(1000 * percentile(health_ok, 50), 1),
        "health_p99_ms": round(1000 * percentile(health_ok, 99), 1),
        "health_checks": len(soak.health), "health_not_ok_outside_kill": len(health_bad), "rss_mb": rss,
        "audit": audit(db, initial, soak.outcomes, tuple(window), args.record_every_tokens - 1),
    }
    result["clean"] = not bad and not health_bad and not result["audit"]["problems"]
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if tmp_ctx is not None:
        tmp_ctx.cleanup()
    return 0 if result["clean"] else 1


def render(r: dict) -> str:
    statuses = sorted({s for row in r["by_kind"].values() for s in row})
    lines = [f"| kind | {' | '.join(statuses)} |", "|---|" + "---:|" * len(statuses)]
    for kind, row in sorted(r["by_kind"].items()):
        lines.append(f"| {kind} | " + " | ".join(str(row.get(s, "")) for s in statuses) + " |")
    a = r["audit"]
    lines += ["", "| check | value |", "|---|---|",
              f"| requests | {r['requests']} in {r['duration_s']:.0f} s, {r['clients']} clients |",
              f"| kill window (SIGKILL to /health 200 again) | {r['kill_window_s']} s |",
              f"| 5xx outside the kill window | {r['unexpected_5xx']} |",
              f"| other failures outside the kill window | {r['unexpected_failures_by_kind'] or 0} |",
              f"| /health p50 / p99 (outside the kill window) | {r['health_p50_ms']} / {r['health_p99_ms']} ms "
              f"({r['health_checks']} checks, {r['health_not_ok_outside_kill']} not 200) |",
              f"| audit: charges = balance deltas, top-ups - ledger = balance | "
              f"{'clean' if not a['problems'] else '; '.join(a['problems'])} |",
              f"| held after the end | {a['held_after_end']} |",
              f"| streams interrupted by the kill | {a['streams_interrupted_by_kill']} |",
              f"| unbilled delivered tokens, worst interrupted stream (bound K-1) | "
              f"{a['unbilled_tokens_interrupted_max']} (bound {a['bound']}) |",
              f"| unbilled delivered tokens, all requests | {a['unbilled_tokens_total']} |",
              "| server RSS | " + ", ".join(f"{k}: {v} MB" for k, v in r["rss_mb"].items()) + " |"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
