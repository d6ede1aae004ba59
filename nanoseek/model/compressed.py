"""The compressed-tensors layout of weight-only int8 / int4 checkpoints (what vLLM and SGLang load
as W8A16 / W4A16): "pack-quantized" tensors per linear layer plus a `quantization_config`.

    x.weight_packed      int32 [N, ceil(K * bits / 32)]  values + 2^(bits-1), element i at bit
                         (i * bits) % 32 of word (i * bits) // 32 (little-endian: byte-wise for 8
                         and 4 bits, so our int4 plain layout is the same bytes)
    x.weight_scale       [N, K // group] in the model dtype (int8: group = K, so [N, 1])
    x.weight_shape       int64 [2] = (N, K)
    x.weight_zero_point  asymmetric only: int32, packed like the weights but along dim 0,
                         [ceil(N * bits / 32), K // group]

tests/model/test_quant.py checks all of this against the `compressed-tensors` package itself.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from nanoseek.model.quant import QuantError, QuantScheme, pack_int4, unpack_int4

PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
FORMAT = "pack-quantized"


def quantization_config(s: QuantScheme, ignore: list[str]) -> dict:
    """config.json's `quantization_config` for scheme s; `ignore`: modules kept in full precision."""
    weights = {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric,
               "strategy": "channel" if s.group_size is None else "group", "group_size": s.group_size,
               "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": FORMAT}},
            "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}


def scheme_from_config(qc: dict, where: str = "config.json") -> QuantScheme:
    """The QuantScheme of a compressed-tensors `quantization_config`; an error names what we do not run."""
    method, fmt = qc.get("quant_method"), qc.get("format")
    groups = qc.get("config_groups") or {}
    if method != "compressed-tensors" or len(groups) != 1:
        raise QuantError(f"{where}: quantization_config with quant_method={method!r} and {len(groups)} "
                         f"config group(s) is not supported; expected compressed-tensors with one group")
    group = next(iter(groups.values()))
    w = group.get("weights") or {}
    fmt = group.get("format") or fmt
    if fmt != FORMAT or w.get("type", "int") != "int" or group.get("input_activations"):
        raise QuantError(f"{where}: quantization_config format={fmt!r}, weights type={w.get('type')!r}, "
                         f"input_activations={group.get('input_activations')!r}: only weight-only "
                         f"int '{FORMAT}' is supported")
    bits, strategy, gs = w.get("num_bits"), w.get("strategy"), w.get("group_size")
    if bits == 8 and strategy == "channel" and w.get("symmetric", True):
        return QuantScheme.parse("int8")
    if bits == 4 and strategy == "group":
        return QuantScheme.parse("int4", gs, bool(w.get("symmetric", True)))
    raise QuantError(f"{where}: num_bits={bits!r} with strategy={strategy!r} is not supported; expected "
                     f"8 bits per channel (symmetric) or 4 bits per group")


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 [R, C] (signed values) -> int32 [R, ceil(C * bits / 32)], packed along the last dim."""
    if sys.byteorder != "little":
        raise QuantError("the compressed-tensors byte layout is written on little-endian hosts only")
    per_word = 32 // bits
    pad = -q.shape[-1] % per_word
    q = F.pad(q, (0, pad), value=-(1 << (bits - 1)))  # pads become 0 once offset, as the library pads
    u = (q.to(torch.int16) + 128).to(torch.uint8) if bits == 8 else pack_int4(q)
    return u.contiguous().view(torch.int32)


def _unpack(p: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    u = p.contiguous().view(torch.uint8)
    q = (u.to(torch.int16) - 128).to(torch.int8) if bits == 8 else unpack_int4(u)
    return q[..., :cols]


def to_compressed(name: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  s: QuantScheme):
    """Yield (checkpoint name, tensor) for weight `name` (ending in .weight), q int8 [N, K]."""
    base = name.removesuffix("weight")
    N, K = q.shape
    yield base + "weight_packed", _pack(q, s.bits)
    yield base + "weight_scale", scale.contiguous()
    yield base + "weight_shape", torch.tensor([N, K], dtype=torch.int64)
    if zero is not None:
        yield base + "weight_zero_point", _pack(zero.t(), s.bits).t().contiguous()


def from_compressed(name: str, parts: dict[str, torch.Tensor], s: QuantScheme, shape: tuple[int, int],
                    scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """parts {suffix: tensor} of weight `name` -> (q int8 [N, K], scale [N, G], zero or None),
    checked against the shape the model expects; errors name the tensor."""
    base = name.removesuffix("weight")
    N, K = shape
    G = K // s.group(K)
    need = ["weight_packed", "weight_scale"] + ([] if s.symmetric else ["weight_zero_point"])
    for part in need:
        if part not in parts:
            raise QuantError(f"{base}{part} is missing from the checkpoint (needed by {base}weight_packed)")
    expect = {"weight_packed": (N, -(-K * s.bits // 32)), "weight_scale": (N, G),
              "weight_zero_point": (-(-N * s.bits // 32), G)}
    for part, t in parts.items():
        if part == "weight_shape":
            if t.tolist() != [N, K]:
                raise QuantError(f"{base}weight_shape is {t.tolist()}, the config expects {[N, K]}")
            continue
        if part in expect and tuple(t.shape) != expect[part]:
            raise QuantError(f"{base}{part} has shape {tuple(t.shape)}, expected {expect[part]} for a "
                             f"{s.name} weight of shape {(N, K)}")
        if part in ("weight_packed", "weight_zero_point") and t.dtype != torch.int32:
            raise QuantError(f"{base}{part} has dtype {t.dtype}, expected torch.int32")
    q = _unpack(parts["weight_packed"], s.bits, K)
    zero = None if s.symmetric else _unpack(parts["weight_zero_point"].t(), s.bits, N).t()
    return q, parts["weight_scale"].to(scale_dtype), zero
