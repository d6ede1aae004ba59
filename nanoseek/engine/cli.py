"""`nanoseek generate --model DIR --prompt TEXT`: stream a completion to the terminal.

    nanoseek generate --model runs/default/model --prompt "def fibonacci(n):" --max-tokens 64
    nanoseek generate --model DIR --prompt "Hi" --chat --temperature 0.7 --seed 1
"""

from __future__ import annotations

import argparse
import sys


def run(args) -> int:
    import torch

    from nanoseek.engine.llm import LLM
    from nanoseek.engine.sampling import SamplingParams

    dtype = getattr(torch, args.dtype) if args.dtype else None
    llm = LLM(args.model, dtype=dtype, device=args.device, quantization=args.quantization,
              group_size=args.group_size, cache_dir=args.cache_dir, enforce_eager=args.enforce_eager,
              decode_kernel=args.decode_kernel)
    engine = llm.engine
    if engine.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json; nanoseek generate needs one to read text")
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop or [])
    engine.add_request("cli", prompt, params)
    sys.stdout.write(args.prompt if not args.chat else "")
    while engine.has_unfinished_requests():
        for req in engine.step():
            sys.stdout.write(req.outputs[0].delta_text)
            sys.stdout.flush()
            if req.finished:
                out = req.outputs[0]
                print(f"\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}, "
                      f"cached prompt tokens={req.num_cached_tokens}]", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion from a model folder",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model folder with tokenizer.json")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    e = p.add_argument_group("engine")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    e.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="weight-only quantisation while loading (a folder saved quantised needs none)")
    e.add_argument("--group-size", type=int, default=128, help="int4: input channels per scale (default 128)")
    e.add_argument("--cache-dir", default=None, help="disk context cache folder")
    e.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="run decode eagerly (default); --no-enforce-eager compiles the decode step")
    e.add_argument("--decode-kernel", choices=["auto", "fused", "model"], default="auto",
                   help="the uncompiled decode step: fused (one C++ op per token: fp32 MLA on a CPU), model (the model's forward), auto (default: the faster, timed at start)")
    p.set_defaults(func=run)
