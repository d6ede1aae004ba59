"""What the gateway costs: added time to first token, and its own ceiling in requests/s.

    .venv/bin/python bench/gateway.py [--model DIR] [--requests 200] [--duration 20] [--clients 32]
    .ci/with-postgres .venv/bin/python bench/gateway.py      # adds the PostgreSQL ledger

1. Added TTFT: one `nanoseek serve --worker` (on --model, or a tiny random model built here) and one
   gateway in front of it; requests alternate between the worker directly and the gateway, one at
   a time, each a short chat streamed with max_tokens=4; TTFT runs to the first chunk after the
   role chunk. p50/p99 TTFT of both and the difference.
2. Ceiling: the gateway in front of a trivial backend (a raw asyncio server in this script that
   answers every request at once with one token and its usage), --clients concurrent clients for
   --duration seconds: requests/s of authenticate, limit, reserve, forward, settle — on SQLite and,
   when NANOSEEK_TEST_PG_URL (or --pg) names a server, on PostgreSQL.
Everything (clients, gateway, backend) shares this machine's cores; the load generator's own CPU
is part of the picture. Prints Markdown tables; --json writes the numbers.
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
from decimal import Decimal
from pathlib import Path

import httpx

from nanoseek.io import atomic_write
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported by path (tests)
from loopback import CORPUS, free_port, percentile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# ---------------------------------------------------------------------------- the trivial backend
TRIVIAL_CHUNK = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "trivial",
                 "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "length"}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11,
                           "prompt_tokens_details": {"cached_tokens": 0}}}
TRIVIAL_SSE = f"data: {json.dumps(TRIVIAL_CHUNK)}\n\ndata: [DONE]\n\n".encode()


def _http(body: bytes, content_type: str) -> bytes:
    return (f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
            "connection: keep-alive\r\n\r\n").encode() + body


async def _trivial_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    answers = {"/health": _http(b'{"status":"ok"}', "application/json"),
               "/v1/models": _http(b'{"object":"list","data":[{"id":"trivial","object":"model"}]}',
                                   "application/json")}
    sse = _http(TRIVIAL_SSE, "text/event-stream")
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = next((int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:")), 0)
            if length:
                await reader.readexactly(length)
            writer.write(answers.get(path, sse))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def run_trivial_backend(port: int) -> None:
    async def main():
        server = await asyncio.start_server(_trivial_conn, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------------------- processes
def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_up(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up in {timeout} s")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def tiny_model(folder: Path) -> Path:
    from nanoseek.config import ModelConfig
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model.checkpoint import save_model
    from nanoseek.model.transformer import build_model

    tok = train_tokenizer(CORPUS, vocab_size=300, out_dir=folder)
    cfg = ModelConfig(model_type="deepseek_v2", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                      n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=32,
                      first_k_dense_replace=1, max_position_embeddings=256, topk_method="greedy",
                      bos_token_id=tok.bos_id, eos_token_id=None)
    save_model(build_model(cfg, seed=7), folder,
               extra_files={f: folder / f for f in os.listdir(folder) if f.startswith("tokenizer")})
    return folder


def gateway(tmp: Path, backend: str, db: str, name: str) -> tuple[subprocess.Popen, str, str]:
    """A gateway process on `db` with a key of a large balance and no per-key limits."""
    from nanoseek.serve.accounts import Accounts
    from nanoseek.serve.pricing import Throughput, derive_price_sheet

    prices = derive_price_sheet(Throughput(2000, 20000, 100), "3.6").save(tmp / "prices.json")
    acc = Accounts(db)
    _, secret = acc.create_key(f"bench-{time.time_ns()}", Decimal("1000000"))
    acc.close()
    port = free_port()
    proc = spawn("-m", "nanoseek", "serve", "--backend", backend, "--db", db, "--prices", str(prices),
                 "--port", str(port), "--model-name", name, "--rpm", "0", "--tpm", "0", "--max-concurrent", "0",
                 "--max-queue", "4096")
    url = f"http://127.0.0.1:{port}"
    wait_up(proc, url)
    return proc, url, secret


# ---------------------------------------------------------------------------- 1: added TTFT
async def ttft_once(http: httpx.AsyncClient, url: str, key: str, model: str, i: int) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": f"question {i}: def add(a, b):"}],
            "max_tokens": 4, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    async with http.stream("POST", url + "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {key}"}) as resp:
        resp.raise_for_status()
        lines = []
        async for line in resp.aiter_lines():
            # the first chunk after the role chunk: the first token's text (or its finish, when a
            # random model's token decodes to nothing)
            if line.startswith("data: {") and '"role":"assistant"' not in line:
                return time.perf_counter() - t0
            lines.append(line)
    raise RuntimeError(f"{url}: no content in the stream: {lines[-4:]}")


async def added_ttft(worker: str, gw: str, key: str, model: str, n: int) -> dict:
    direct, through = [], []
    async with httpx.AsyncClient(timeout=60) as http:
        for i in range(5):  # warm both paths (connections, the engine's first step)
            await ttft_once(http, worker, "-", model, i)
            await ttft_once(http, gw, key, model, i)
        for i in range(n):  # interleaved, so drifting load hits both alike
            direct.append(await ttft_once(http, worker, "-", model, 1000 + i))
            through.append(await ttft_once(http, gw, key, model, 1000 + i))
    ms = lambda xs, q: round(percentile(xs, q) * 1000, 2)  # noqa: E731
    return {"requests": n, "direct_p50_ms": ms(direct, 50), "direct_p99_ms": ms(direct, 99),
            "gateway_p50_ms": ms(through, 50), "gateway_p99_ms": ms(through, 99),
            "added_p50_ms": round(ms(through, 50) - ms(direct, 50), 2),
            "added_p99_ms": round(ms(through, 99) - ms(direct, 99), 2)}


# ---------------------------------------------------------------------------- 2: the ceiling
async def ceiling(gw: str, key: str, clients: int, duration: float, pid: int) -> dict:
    body = {"model": "trivial", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {key}"}
    done, errors = [], 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        async def client(stop_at: float, record: bool) -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                r = await http.post(gw + "/v1/chat/completions", json=body, headers=headers)
                if r.status_code != 200:
                    errors += record
                elif record:
                    done.append(time.perf_counter() - t0)

        await asyncio.gather(*(client(time.perf_counter() + 2, False) for _ in range(clients)))  # warm-up
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(client(t0 + duration, True) for _ in range(clients)))
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    cpu_ms = cpu / max(len(done), 1) * 1000
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(done), "errors": errors,
            "requests_per_s": round(len(done) / elapsed, 1),
            # the gateway process's own CPU per request, and what one such process could do if it
            # had a core to itself (its GIL-bound loop and threads use about one)
            "gateway_cpu_ms_per_request": round(cpu_ms, 2),
            "one_core_ceiling_per_s": round(1000 / cpu_ms, 1) if done else 0.0,
            "latency_p50_ms": round(percentile(done, 50) * 1000, 1),
            "latency_p99_ms": round(percentile(done, 99) * 1000, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder for the worker (default: a tiny random model)")
    p.add_argument("--requests", type=int, default=200, help="TTFT samples per path (default 200)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients for the ceiling (default 32)")
    p.add_argument("--duration", type=float, default=20, help="seconds per ceiling run (default 20)")
    p.add_argument("--pg", default=os.environ.get("NANOSEEK_TEST_PG_URL"), help="PostgreSQL URL (default: "
                   "$NANOSEEK_TEST_PG_URL); the bench drops and recreates its tables")
    p.add_argument("--skip-ttft", action="store_true")
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--trivial-backend", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trivial_backend:
        run_trivial_backend(args.trivial_backend)
        return 0

    out = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_ttft:
            model = Path(args.model) if args.model else tiny_model(tmp / "model")
            wport = free_port()
            worker = spawn("-m", "nanoseek", "serve", "--model", str(model), "--worker", "--port", str(wport))
            wurl = f"http://127.0.0.1:{wport}"
            gw = None
            try:
                wait_up(worker, wurl)
                name = httpx.get(wurl + "/v1/models").json()["data"][0]["id"]
                gw, gurl, key = gateway(tmp, wurl, f"sqlite:///{tmp / 'ttft.db'}", name)
                out["ttft"] = asyncio.run(added_ttft(wurl, gurl, key, name, args.requests))
            finally:
                stop(*[x for x in (gw, worker) if x is not None])
            print(f"TTFT ({args.requests} sequential requests per path, max_tokens=4, TTFT = first token's chunk):")
            print("| path | p50 ms | p99 ms |\n|---|---|---|")
            t = out["ttft"]
            print(f"| direct to the worker | {t['direct_p50_ms']} | {t['direct_p99_ms']} |")
            print(f"| through the gateway | {t['gateway_p50_ms']} | {t['gateway_p99_ms']} |")
            print(f"| added | {t['added_p50_ms']} | {t['added_p99_ms']} |")
        bport = free_port()
        backend = spawn(__file__, "--trivial-backend", str(bport))
        try:
            wait_up(backend, f"http://127.0.0.1:{bport}")
            dbs = {"sqlite": f"sqlite:///{tmp / 'ceiling.db'}"}
            if args.pg:
                from nanoseek.serve.db import metadata, open_engine

                engine = open_engine(args.pg, create=False)
                metadata.drop_all(engine)
                engine.dispose()
                dbs["postgresql"] = args.pg
            out["ceiling"] = {}
            for name, db in dbs.items():
                gw, gurl, key = gateway(tmp, f"http://127.0.0.1:{bport}", db, "trivial")
                try:
                    out["ceiling"][name] = asyncio.run(ceiling(gurl, key, args.clients, args.duration, gw.pid))
                finally:
                    stop(gw)
        finally:
            stop(backend)
    out["load_after"] = os.getloadavg()
    print(f"\nceiling (trivial backend, {args.clients} clients, {args.duration:g} s):")
    print("| ledger | requests/s | p50 ms | p99 ms | errors | gateway CPU ms/request | 1000 / that |\n"
          "|---|---|---|---|---|---|---|")
    for name, c in out["ceiling"].items():
        print(f"| {name} | {c['requests_per_s']} | {c['latency_p50_ms']} | {c['latency_p99_ms']} | {c['errors']} "
              f"| {c['gateway_cpu_ms_per_request']} | {c['one_core_ceiling_per_s']} |")
    print(f"\nload average before {out['load_before']}, after {out['load_after']}")
    if args.json:
        atomic_write(args.json, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
