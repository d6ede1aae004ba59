"""`nanoseek serve`, `nanoseek price calibrate` and `nanoseek run` (what `make run` calls).

    nanoseek price calibrate --model runs/default --hardware-cost-per-hour 0.05 [--margin 0.10]
    nanoseek serve --model runs/default [--host 127.0.0.1] [--port 8000] [--db URL] [--cache-dir DIR]
    nanoseek serve --model runs/default --worker --port 8001        # unauthenticated, for a gateway
    nanoseek serve --backend http://10.0.0.2:8001 --backend http://10.0.0.3:8001   # the gateway
    nanoseek run                  # data and model if missing, prices, a demo key, then serve

--model takes a model folder (config.json + weights + tokenizer.json) or a training run folder,
whose latest checkpoint is served.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nanoseek.io import atomic_write

DEFAULT_PRICES = "runs/prices.json"
DEFAULT_HARDWARE_COST = "0.05"   # USD/hour: about what a small 2-core cloud VM costs
DEMO_KEY_FILE = "runs/demo_key.txt"


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model folder, or the latest checkpoint of a training run folder."""
    from nanoseek.train.checkpoint import latest_checkpoint

    folder = Path(path)
    if (folder / "config.json").is_file():
        return folder
    found = latest_checkpoint(folder) if folder.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"--model {folder}: neither a model folder (config.json) nor a training run "
                                "with checkpoints; train one with `nanoseek train` or `make run`")
    return found[1]


def _engine_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", required=model_required, metavar="DIR",
                   help="model folder or training run folder" + ("" if model_required else " (not with --backend)"))
    g.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens (default 16)")
    g.add_argument("--max-num-seqs", type=int, default=16, help="sequences per batch (default 16)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (default 2048)")
    g.add_argument("--max-model-len", type=int, default=None, help="context (default: the model's)")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="run decode eagerly (default); --no-enforce-eager compiles a decode step per batch "
                        "bucket (minutes of warm-up on 2 cores, see bench/RESULTS.md)")
    g.add_argument("--decode-kernel", choices=["auto", "fused", "model"], default="auto",
                   help="the uncompiled decode step: fused (one C++ op per token: fp32 MLA on a CPU), model (the model's forward), auto (default: the faster, timed at start)")
    g.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="weight-only quantisation while loading (a folder saved quantised needs none)")
    g.add_argument("--group-size", type=int, default=128, help="int4: input channels per scale (default 128)")
    g.add_argument("--prices", default=DEFAULT_PRICES, help=f"price sheet (default {DEFAULT_PRICES})")


def _serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--db", default=None, metavar="URL",
                   help="accounts database: sqlite:///FILE or postgresql+psycopg://... "
                        "(default: $NANOSEEK_DB or sqlite:///runs/nanoseek.db)")
    g.add_argument("--cache-dir", default=None, help="on-disk context cache folder (default: none)")
    g.add_argument("--model-name", default="", help="the model id clients send (default: the folder's name)")
    g.add_argument("--lease-ttl", type=float, default=30.0, metavar="SECONDS",
                   help="this server's lease on the database lives this long after each renewal (every "
                        "third of it); holds of a server whose lease expired are settled by the others "
                        "(default 30)")
    g.add_argument("--record-every-tokens", type=int, default=32, metavar="K",
                   help="write a request's usage so far onto its hold every K output tokens (default 32)")
    g.add_argument("--record-every-s", type=float, default=2.0, metavar="S",
                   help="... or every S seconds, whichever comes first (default 2)")
    g.add_argument("--keepalive", type=float, default=5.0, metavar="S",
                   help="streams: a keep-alive comment (Anthropic: ping) after S seconds without output (default 5)")
    g.add_argument("--whole-keepalive", type=float, default=5.0, metavar="S",
                   help="non-streamed requests not answered within S seconds get status 200 at once and a blank "
                        "line every S seconds before their JSON, so proxies keep them open; an error found after "
                        "that is sent as the JSON body (default 5; 0 = off)")
    g.add_argument("--stale-hold-age", type=float, default=None, help=argparse.SUPPRESS)  # deprecated
    g.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                   help="largest request body read (413 beyond; default 1 MiB + 32 bytes per context token)")
    g.add_argument("--shared-prefix-cache", action="store_true",
                   help="let all keys share cached prompt prefixes (default: each key's own; only for "
                        "single-tenant deployments, as cache hits show another tenant's prompts)")
    lim = p.add_argument_group("limits (per key; 0 = unlimited)")
    lim.add_argument("--rpm", type=float, default=600, help="requests per minute (default 600)")
    lim.add_argument("--tpm", type=float, default=1_000_000, help="tokens per minute (default 1e6)")
    lim.add_argument("--max-concurrent", type=int, default=16, help="requests in flight (default 16)")
    lim.add_argument("--max-queue", type=int, default=256, help="requests in flight, all keys (default 256)")


def register(subparsers) -> None:
    from .keys_cli import price_commands

    p = subparsers.add_parser("serve", help="the OpenAI/DeepSeek-compatible HTTP API",
                              description="Serve a model over HTTP with keys, balances, limits and "
                                          "cost-plus prices; or be the gateway in front of OpenAI-compatible "
                                          "workers (--backend), or one such worker (--worker).")
    _engine_args(p, model_required=False)
    _serve_args(p)
    s = p.add_argument_group("scale-out")
    s.add_argument("--backend", action="append", default=[], metavar="URL",
                   help="be a gateway: forward generation to this OpenAI-compatible server (repeatable); "
                        "keys, limits, holds and the ledger stay here; no model is loaded")
    s.add_argument("--health-interval", type=float, default=2.0, metavar="SECONDS",
                   help="gateway: seconds between backend health checks (failures back off to 30 s)")
    s.add_argument("--worker", action="store_true",
                   help="be a gateway's worker: the local engine, OpenAI API without keys or billing, "
                        "on a loopback or private interface only")
    s.add_argument("--allow-public", action="store_true", help="let a --worker bind a public interface")
    p.set_defaults(func=cmd_serve)

    c = price_commands(subparsers).add_parser(
        "calibrate", help="measure this machine's throughput and derive the prices from it",
        description="Measures prefill, cached-prefix and decode throughput at the engine's batch sizes, "
                    "then prices = cost x (1 + margin), saved to --prices.")
    _engine_args(c)
    c.add_argument("--hardware-cost-per-hour", required=True, help="what this machine costs per hour")
    c.add_argument("--margin", default="0.10", help="price = cost x (1 + margin) (default 0.10)")
    c.add_argument("--currency", default="USD")
    c.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per request (default 512)")
    c.add_argument("--decode-tokens", type=int, default=32, help="output tokens per request (default 32)")
    c.set_defaults(func=cmd_calibrate)

    r = subparsers.add_parser("run", help="`make run`: data, model, prices and a demo key if missing, "
                                          "then serve on 127.0.0.1:8000")
    r.add_argument("--data", default="runs/data", help="data folder (default runs/data)")
    r.add_argument("--run-dir", default="runs/default", help="training run folder (default runs/default)")
    r.add_argument("--model-config", default="configs/default.json")
    r.add_argument("--max-steps", type=int, default=None, help="training steps (default: 900, the measured recipe)")
    r.add_argument("--hardware-cost-per-hour", default=DEFAULT_HARDWARE_COST,
                   help=f"for the price calibration (default {DEFAULT_HARDWARE_COST})")
    r.add_argument("--demo-balance", default="10", help="balance of the demo key (default 10)")
    r.add_argument("--prices", default=DEFAULT_PRICES)
    r.add_argument("--demo-key-file", default=DEMO_KEY_FILE, help=f"where the demo key is kept ({DEMO_KEY_FILE})")
    r.add_argument("--no-serve", action="store_true", help="prepare everything, print the key, do not serve")
    _serve_args(r)
    r.set_defaults(func=cmd_run)


def _load_engine(args, model_dir: Path):
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.engine.llm import LLMEngine
    from nanoseek.model.checkpoint import load_model

    tokenizer = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    model = load_model(str(model_dir), quantization=getattr(args, "quantization", None),
                       group_size=getattr(args, "group_size", 128))
    return LLMEngine(model, tokenizer, block_size=args.block_size,
                     max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                     max_model_len=args.max_model_len)


def calibrate(args, model_dir: Path, name: str):
    from .calibrate import measure_throughput
    from .pricing import Throughput, derive_price_sheet

    # bad money arguments fail before minutes of measuring, not after
    derive_price_sheet(Throughput(1, 1, 1), args.hardware_cost_per_hour, args.margin)
    engine = _load_engine(args, model_dir)
    t = measure_throughput(engine, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens)
    sheet = derive_price_sheet(t, args.hardware_cost_per_hour, args.margin, currency=args.currency,
                               model=name,
                               notes=f"measured by `nanoseek price calibrate` on {os.cpu_count()} CPUs"
                                     + (" + CUDA" if next(engine.model.parameters()).is_cuda else ""))
    sheet.save(args.prices)
    return sheet


def cmd_calibrate(args) -> int:
    from .keys_cli import _print_sheet

    sheet = calibrate(args, resolve_model_dir(args.model), Path(args.model).resolve().name)
    _print_sheet(sheet)
    print(f"saved {args.prices}")
    return 0


def _serve_config(args, model_dir: Path, name: str):
    from .app import ServeConfig

    if args.stale_hold_age is not None:
        print("warning: --stale-hold-age is deprecated and ignored: holds now belong to a server's lease "
              "and are settled once it expires (see --lease-ttl)", file=sys.stderr, flush=True)
    for flag, value in (("--lease-ttl", args.lease_ttl), ("--record-every-tokens", args.record_every_tokens),
                        ("--record-every-s", args.record_every_s), ("--keepalive", args.keepalive)):
        if not value > 0:
            raise SystemExit(f"error: {flag}={value} must be > 0")
    if not args.whole_keepalive >= 0:
        raise SystemExit(f"error: --whole-keepalive={args.whole_keepalive} must be >= 0 (0 = off)")

    def lim(v):
        return v or None

    return ServeConfig(model_dir=str(model_dir), model_name=args.model_name or name, db=args.db or "",
                       prices=args.prices, cache_dir=args.cache_dir,
                       block_size=getattr(args, "block_size", 16), max_num_seqs=getattr(args, "max_num_seqs", 16),
                       max_num_batched_tokens=getattr(args, "max_num_batched_tokens", 2048),
                       max_model_len=getattr(args, "max_model_len", None), requests_per_minute=lim(args.rpm),
                       tokens_per_minute=lim(args.tpm), max_concurrent=lim(args.max_concurrent),
                       max_queue=lim(args.max_queue), lease_ttl_s=args.lease_ttl,
                       record_every_tokens=args.record_every_tokens, record_every_s=args.record_every_s,
                       keepalive_s=args.keepalive, whole_keepalive_s=args.whole_keepalive or None,
                       max_body_bytes=getattr(args, "max_body_bytes", None),
                       shared_prefix_cache=getattr(args, "shared_prefix_cache", False),
                       enforce_eager=getattr(args, "enforce_eager", True),
                       decode_kernel=getattr(args, "decode_kernel", "auto"))


def serve(config, host: str, port: int) -> None:
    import uvicorn

    from .app import build_app

    app = build_app(config)
    print(f"serving {app.state.serve.model_name} on http://{host}:{port}/v1; web console at "
          f"http://{host}:{port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


def cmd_serve(args) -> int:
    if args.backend:
        if args.model or args.worker:
            raise ValueError("--backend makes a gateway, which loads no model: drop --model and --worker")
        return serve_gateway(args)
    if not args.model:
        raise ValueError("--model is required (or --backend URL to forward to other servers)")
    if args.worker:
        from .worker import check_worker_host

        check_worker_host(args.host, args.allow_public)  # before minutes of loading a model
    name = Path(args.model).resolve().name  # a run folder's name, not its checkpoint's step_NNN
    config = _serve_config(args, resolve_model_dir(args.model), name)
    if args.worker:
        return serve_worker(args, config)
    serve(config, args.host, args.port)
    return 0


def serve_worker(args, config) -> int:
    import uvicorn

    from .app import create_app, load_state
    from .pricing import PriceSheet, Throughput, derive_price_sheet
    from .worker import NoKeyAdmin, Unmetered

    # the gateway limits each key; a worker only bounds its queue
    config.requests_per_minute = config.tokens_per_minute = config.max_concurrent = None
    sheet = (PriceSheet.load(config.prices) if Path(config.prices).is_file()
             else derive_price_sheet(Throughput(1, 1, 1), "0", notes="a worker bills nothing"))
    app = create_app(load_state(config, accounts=Unmetered(), sheet=sheet, key_admin=NoKeyAdmin()), console=False)
    print(f"worker {app.state.serve.model_name} on http://{args.host}:{args.port}/v1 (no keys: for a gateway)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _backend_model(urls: list[str]) -> str:
    """The model id the first reachable backend serves (GET /v1/models)."""
    import httpx

    for url in urls:
        try:
            data = httpx.get(url.rstrip("/").removesuffix("/v1") + "/v1/models", timeout=5).json()["data"]
            return data[0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            continue
    raise ValueError(f"--backend: none of {urls} answered GET /v1/models; start them first or pass --model-name")


def serve_gateway(args) -> int:
    import uvicorn

    from .app import create_app, gateway_state
    from .gateway import RemotePool

    config = _serve_config(args, Path(""), "")
    config.model_dir = ""
    config.model_name = args.model_name or _backend_model(args.backend)
    pool = RemotePool(args.backend, health_interval_s=args.health_interval)
    app = create_app(gateway_state(config, pool))
    print(f"gateway for {config.model_name} on http://{args.host}:{args.port}/v1 -> {', '.join(args.backend)}",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


# ---------------------------------------------------------------------------- make run
def demo_key(db_url: str, balance: str, key_file: str = DEMO_KEY_FILE) -> tuple[str, bool]:
    """The demo key's secret (created on first use, kept in key_file, mode 600) and whether it is new."""
    from .accounts import Accounts

    acc = Accounts(db_url)
    try:
        path = Path(key_file)
        if path.is_file():
            secret = path.read_text().strip()
            if acc.authenticate(secret) is not None:
                return secret, False
        names = {k.name for k in acc.list_keys()}
        name = next(n for n in ["demo"] + [f"demo-{i}" for i in range(2, 10_000)] if n not in names)
        from .key_admin import KeyAdmin

        # an admin key: whoever runs `make run` owns this server, and the console's admin page is theirs
        _, secret = KeyAdmin(acc).create_key(name, balance, admin=True, note="make run demo key")
        atomic_write(path, secret + "\n", mode=0o600)
        return secret, True
    finally:
        acc.close()


DEFAULT_TRAIN_RECIPE = ["--max-steps", "900", "--batch-size", "16", "--seq-len", "128", "--lr", "3e-3",
                        "--warmup-steps", "30", "--eval-every", "150", "--eval-batches", "16",
                        "--checkpoint-every", "150"]


def _planned_steps(run_dir: str) -> int | None:
    """max_steps recorded by the trainer in the run folder, if a run was started there."""
    import json

    path = Path(run_dir) / "train_config.json"
    try:
        return int(json.loads(path.read_text())["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cmd_run(args) -> int:
    from nanoseek.data.prepare import ensure_prepared
    from nanoseek.train.checkpoint import latest_checkpoint

    from .app import DEFAULT_DB_URL

    say = lambda msg: print(f"[nanoseek run] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"data: {args.data}")
    ensure_prepared(args.data)
    found = latest_checkpoint(args.run_dir)
    target = args.max_steps or _planned_steps(args.run_dir)
    if found is None or (target is not None and found[0] < target):
        from nanoseek.cli import main as nanoseek_main

        resume = found is not None  # an interrupted run continues from its last checkpoint
        say(f"training {args.model_config} into {args.run_dir}"
            + (f" (resuming at step {found[0]} of {target})" if resume else ""))
        # through `nanoseek train`, so that a resumed run keeps its saved settings
        argv = ["train", "--model-config", args.model_config, "--data", args.data, "--out", args.run_dir]
        if resume:
            argv.append("--resume")
        else:  # the recipe measured for configs/default.json (bench/RESULTS.md, Training: ~5 min on 2 cores)
            argv += DEFAULT_TRAIN_RECIPE
        if args.max_steps is not None:
            argv += ["--max-steps", str(args.max_steps)]
            if not resume:
                argv += ["--warmup-steps", str(min(30, args.max_steps))]
        rc = nanoseek_main(argv)
        if rc != 0:
            say(f"training stopped (exit {rc}); `make run` again resumes it")
            return rc
    model_dir = resolve_model_dir(args.run_dir)
    say(f"model: {model_dir}")
    engine_defaults = dict(block_size=16, max_num_seqs=16, max_num_batched_tokens=2048, max_model_len=None)
    for k, v in engine_defaults.items():
        setattr(args, k, v)
    if not Path(args.prices).is_file():
        say(f"pricing: measuring this machine at {args.hardware_cost_per_hour} USD/hour")
        args.margin, args.currency, args.prompt_len, args.decode_tokens = "0.10", "USD", 256, 32
        calibrate(args, model_dir, Path(args.run_dir).resolve().name)
    db = args.db or os.environ.get("NANOSEEK_DB") or DEFAULT_DB_URL
    secret, new = demo_key(db, args.demo_balance, args.demo_key_file)
    say(("created" if new else "reusing") + f" the demo key (kept in {args.demo_key_file}):")
    print(secret, flush=True)
    print(f"export OPENAI_BASE_URL=http://{args.host}:{args.port}/v1 OPENAI_API_KEY={secret}", flush=True)
    print(f"console: http://{args.host}:{args.port}/  (sign in with the key above)", flush=True)
    if args.no_serve:
        return 0
    serve(_serve_config(args, model_dir, Path(args.run_dir).resolve().name), args.host, args.port)
    return 0
