"""`nanoseek quantize --model DIR --out DIR --bits 8|4`: a weight-only int8 / int4 checkpoint in the
compressed-tensors layout (vLLM and SGLang load it as W8A16 / W4A16; nanoseek loads it as saved).

    nanoseek quantize --model runs/default/model --out runs/default-int4 --bits 4 --group-size 64

The source is read one tensor at a time and quantised as it is read (peak memory: the quantised
model plus one tensor); shards are written as they fill, into a temporary folder renamed into place
at the end, so a failure leaves no partial --out folder.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def run(args) -> int:
    import torch

    from nanoseek.config import ModelConfig
    from nanoseek.model.checkpoint import load_model, save_model, saved_scheme
    from nanoseek.model.quant import QuantError, QuantScheme

    scheme = QuantScheme.parse(args.bits, args.group_size, not args.asymmetric)  # bad bits: before any work
    src, out = Path(args.model), Path(args.out)
    cfg = ModelConfig.from_json(src / "config.json")
    already = saved_scheme(cfg, str(src / "config.json"))
    if already is not None:
        raise QuantError(f"{src} is already quantised ({already.name}); quantize reads a full-precision "
                         f"checkpoint")
    if src.resolve() == out.resolve():
        raise ValueError(f"--out {out} is the source folder; write the quantised model elsewhere")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_model(src, dtype=dtype, quantization=scheme.name, group_size=args.group_size,
                       symmetric=not args.asymmetric)
    extra = {f: src / f for f in TOKENIZER_FILES if (src / f).is_file()}
    save_model(model, out, max_shard_size=args.max_shard_size, extra_files=extra)
    n = sum(os.path.getsize(f) for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {out} ({scheme.name}{'' if scheme.group_size is None else f', group {scheme.group_size}'}"
          f"{'' if scheme.symmetric else ', asymmetric'}): {n / 1e9:.3f} GB of safetensors")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="write a weight-only int8 / int4 checkpoint (compressed-tensors)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="full-precision HF model folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the quantised folder to write")
    p.add_argument("--bits", type=int, required=True, help="8 (per-channel scales) or 4 (group scales)")
    p.add_argument("--group-size", type=int, default=128, help="int4: input channels per scale (default 128)")
    p.add_argument("--asymmetric", action="store_true", help="int4 with a zero point per group")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the scales and the unquantised tensors (default: the config's)")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.set_defaults(func=run)
