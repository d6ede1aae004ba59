"""HF safetensors checkpoints <-> nanoseek models, with the published tensor names.

    model = load_model("path/to/DeepSeek-V2-Lite", dtype=torch.bfloat16)
    model = load_model("path/to/DeepSeek-V2-Lite", dtype=torch.bfloat16, quantization="int4")
    save_model(model, "runs/ckpt", max_shard_size="2GB")   # quantised: the compressed-tensors layout

Loading reads config.json and model.safetensors (or the shards of model.safetensors.index.json)
one tensor at a time into a model allocated once, so peak memory stays near the model's size.
One table, `_EXPERT`, maps the per-expert checkpoint tensors onto our stacked expert weights; all
other names are the same on both sides. FP8 checkpoints (DeepSeek-V3's 128x128 block scales,
`weight_scale_inv`) are dequantised on the fly. V3's multi-token-prediction layers
(model.layers.{num_hidden_layers}...) are skipped with a warning. Saving writes into a temporary
folder and renames it into place, so a reader never sees half a checkpoint.

With `quantization` ("int8" | "int4"), every projection (see `quantize_modules`) is allocated
quantised and each tensor is quantised as it is read, so peak memory is the quantised model plus
one tensor; FP8 tensors take the same path (dequantise the block-scaled tensor, then quantise).
A folder whose config.json carries a compressed-tensors `quantization_config` is read back as it
is stored, without requantising (compressed.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.io import atomic_dir
from nanoseek.model.compressed import PARTS, from_compressed, quantization_config, scheme_from_config, \
    to_compressed
from nanoseek.model.attention import MLA
from nanoseek.model.linear import Linear
from nanoseek.model.moe import Experts
from nanoseek.model.quant import QuantError, QuantScheme, QuantWeight, check_kernel, dequantize
from nanoseek.model.rope import rope_inv_freq
from nanoseek.model.transformer import CausalLM

log = logging.getLogger("nanoseek")

# checkpoint: model.layers.{i}.mlp.experts.{e}.{gate|up|down}_proj.weight
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_PART = re.compile(r"^(.*\.)(" + "|".join(PARTS) + r")$")
FP8_BLOCK = 128


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or is damaged; the message names the tensor or file."""


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '2GB'")
    unit = (m.group(2) or "B").replace("IB", "B")
    return int(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}[unit])


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of an HF model folder, in index order."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: listed in the index but missing")
    return files


def _iter_tensors(files: list[Path]):
    """Yield (file, name, tensor) one tensor at a time."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    yield f, name, sf.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a valid safetensors file ({e}); truncated or corrupt?") from None


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Block-wise FP8 (one scale per 128x128 block, as DeepSeek-V3 ships) -> fp32."""
    rows, cols = w.shape
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return w.float() * s


def _default_dtype(cfg: ModelConfig) -> torch.dtype:
    name = cfg.torch_dtype or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def saved_scheme(cfg: ModelConfig, where: str = "config.json") -> QuantScheme | None:
    """The scheme a quantised checkpoint was saved with (its quantization_config), or None."""
    qc = cfg.extra.get("quantization_config")
    return None if qc is None else scheme_from_config(qc, where)


def quantize_modules(model: CausalLM, scheme: QuantScheme) -> list[QuantWeight]:
    """Replace every projection weight (attention, MLPs, shared and routed experts, an untied lm_head)
    by an empty QuantWeight of the same name; the router, norms and embedding stay as they are.
    Run on a meta model, this allocates nothing."""
    tied = model.config.tie_word_embeddings
    out = []
    for mname, m in list(model.named_modules()):
        attrs = (["gate_up_proj", "down_proj"] if isinstance(m, Experts) else
                 ["weight"] if isinstance(m, Linear) and not (tied and mname == "lm_head") else [])
        for attr in attrs:
            p = getattr(m, attr)
            scheme.check(tuple(p.shape), f"{mname}.{attr}")
            qw = QuantWeight(tuple(p.shape), scheme, p.dtype, p.device)
            delattr(m, attr)
            setattr(m, attr, qw)
            out.append(qw)
    return out


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, quantization: str | None = None,
               group_size: int = 128, symmetric: bool = True) -> CausalLM:
    """Load an HF model folder (config.json + safetensors) into a nanoseek CausalLM in eval mode.

    quantization: "int8" | "int4" (group_size input channels per scale, symmetric or not) quantises
    while reading; a folder saved quantised loads quantised whatever this says (a different scheme
    is an error)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    try:
        cfg = ModelConfig.from_json(path / "config.json")
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None
    files = checkpoint_files(path)
    saved = saved_scheme(cfg, str(path / "config.json"))
    scheme = QuantScheme.parse(quantization, group_size, symmetric) if quantization else None
    if saved is not None and scheme is not None and scheme.name != saved.name:
        raise QuantError(f"{path} is saved quantised as {saved.name}; quantization={quantization!r} "
                         f"would requantise it (load it with quantization=None or {saved.name!r})")
    scheme = saved or scheme
    dtype = dtype or _default_dtype(cfg)
    device = torch.device(device or "cpu")
    if scheme is not None:
        check_kernel(scheme.name, device, dtype)
    with torch.device("meta"):
        model = CausalLM(cfg)
    quantised = quantize_modules(model, scheme) if scheme is not None else []
    model = model.to(dtype).to_empty(device=device)  # dtype first: only the kept tensors are allocated
    inv_freq, _ = rope_inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
    model.inv_freq.copy_(inv_freq)  # a non-persistent buffer: to_empty left it uninitialised
    _fill(model, cfg, files, saved)
    for qw in quantised:
        qw.to_kernel_layout()
    # absorbed decode reads kv_b_proj per head: dequantise it once, in fp32 on CPU, where bf16 batched
    # matmuls of its shape ran 11-23x slower than fp32 on an AVX2 host (bench/RESULTS.md, issue 9)
    absorb_dtype = torch.float32 if device.type == "cpu" else dtype
    for m in model.modules():
        if isinstance(m, MLA) and isinstance(m.kv_b_proj.weight, QuantWeight):
            m.kv_b_proj.weight.cache_dense(absorb_dtype)
    return model.eval()


def _targets(model: CausalLM) -> dict[str, torch.Tensor | QuantWeight]:
    """Local name -> what a checkpoint tensor fills: a parameter or buffer, or a whole QuantWeight."""
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantWeight)}
    targets: dict = dict(quant)
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if n.rpartition(".")[0] not in quant:
            targets[n] = t
    targets.pop("inv_freq", None)
    return targets


def _fill(model: CausalLM, cfg: ModelConfig, files: list[Path], saved: QuantScheme | None) -> None:
    targets = _targets(model)
    tied = cfg.tie_word_embeddings
    filled: dict[str, set] = defaultdict(set)  # local name -> filled slots
    need_slots = {n: ({("e", e, p) for e in range(t.shape[0]) for p in ("gate_proj", "up_proj")}
                      if n.endswith("experts.gate_up_proj") else
                      {("e", e, "down_proj") for e in range(t.shape[0])} if n.endswith("experts.down_proj")
                      else {"all"}) for n, t in targets.items()}
    pending_fp8: dict[str, torch.Tensor] = {}  # weight or scale waiting for its partner
    pending_q: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # weight name -> compressed parts
    skipped_mtp, unexpected = [], []
    n_layers = cfg.num_hidden_layers

    def put(name: str, t: torch.Tensor | None, where: Path, parts: dict | None = None) -> None:
        """Fill target `name` from a float tensor t, or from the compressed-tensors parts of it."""
        m = _EXPERT.match(name)
        local, slot = (f"{m.group(1)}.{'down_proj' if m.group(3) == 'down_proj' else 'gate_up_proj'}",
                       ("e", int(m.group(2)), m.group(3))) if m else (name, "all")
        if local not in targets:
            unexpected.append(name)
            return
        dst = targets[local]
        shape, index = tuple(dst.shape), ()
        if slot != "all":
            _, e, part = slot
            if e >= shape[0]:
                unexpected.append(name)
                return
            inter = shape[1] // 2
            index = (e,) if part == "down_proj" else (e, slice(0, inter)) if part == "gate_proj" else \
                (e, slice(inter, None))
            shape = shape[1:] if part == "down_proj" else (inter, shape[2])
        if parts is not None:
            q, scale, zero = from_compressed(name, parts, saved, shape, torch.float32)
            if isinstance(dst, QuantWeight):
                dst.store(index, q, scale, zero)
                filled[local].add(slot)
                return
            t = dequantize(q, scale, zero, saved)  # quantised in the file, full precision here
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{where.name}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"the config expects {shape}")
        with torch.no_grad():
            if isinstance(dst, QuantWeight):
                dst.quantize_into(index, t)
            else:
                dst[index].copy_(t)
        filled[local].add(slot)

    for f, name, t in _iter_tensors(files):
        lm = _LAYER.match(name)
        if lm and int(lm.group(1)) >= n_layers:
            skipped_mtp.append(name)
            continue
        if name.endswith(".weight_scale_inv") or t.dtype == getattr(torch, "float8_e4m3fn", None):
            base = name.removesuffix("_scale_inv")
            partner = pending_fp8.pop(base + ("" if name.endswith("_scale_inv") else "_scale_inv"), None)
            if partner is None:
                pending_fp8[name] = t
                continue
            w, s = (partner, t) if name.endswith("_scale_inv") else (t, partner)
            put(base, _dequant_fp8(w, s), f)
            continue
        mq = _PART.match(name) if saved is not None else None
        if mq:
            weight = mq.group(1) + "weight"
            pending_q[weight][mq.group(2)] = t
            need = 4 if not saved.symmetric else 3
            if len(pending_q[weight]) == need:
                put(weight, None, f, pending_q.pop(weight))
            continue
        put(name, t, f)

    if pending_fp8:
        raise CheckpointError(f"FP8 tensors without their block scales (or scales without weights): "
                              f"{sorted(pending_fp8)[:5]}")
    for weight, parts in pending_q.items():  # incomplete: from_compressed names the missing part
        put(weight, None, files[-1], parts)
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensor(s) for this config, e.g. "
                              f"{unexpected[:5]}")
    missing = [n for n, slots in need_slots.items() if not slots <= filled[n]
               and not (tied and n == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:5]}")
    if skipped_mtp:
        log.warning("skipped %d tensors of layers >= num_hidden_layers=%d (V3 multi-token prediction, "
                    "num_nextn_predict_layers=%d): loaded the main model only",
                    len(skipped_mtp), n_layers, cfg.num_nextn_predict_layers)


def hf_state_items(model: CausalLM):
    """Yield (checkpoint name, tensor) in the published layout: routed experts one by one; quantised
    weights in the compressed-tensors layout (name.weight_packed, .weight_scale, ...)."""
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantWeight)}
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name == "inv_freq" or id(t) in seen or name.rpartition(".")[0] in quant:
            continue
        seen.add(id(t))
        yield from _split_experts(name, t.detach())
    for name, qw in quant.items():
        s = qw.scheme
        if len(qw.shape) == 2:
            yield from to_compressed(name, *qw.plain(), s)
            continue
        for e in range(qw.shape[0]):  # one expert at a time: unpacking copies at most one
            q, scale, zero = qw.plain(e)
            rows = {"gate_proj": slice(0, q.shape[0] // 2), "up_proj": slice(q.shape[0] // 2, None)} \
                if name.endswith("gate_up_proj") else {"down_proj": slice(None)}
            prefix = name.rpartition(".")[0]
            for part, r in rows.items():
                yield from to_compressed(f"{prefix}.{e}.{part}.weight", q[r], scale[r],
                                         None if zero is None else zero[r], s)


def _split_experts(name: str, t: torch.Tensor):
    if name.endswith("experts.gate_up_proj"):
        prefix, inter = name.removesuffix(".gate_up_proj"), t.shape[1] // 2
        for e in range(t.shape[0]):
            yield f"{prefix}.{e}.gate_proj.weight", t[e, :inter]
            yield f"{prefix}.{e}.up_proj.weight", t[e, inter:]
    elif name.endswith("experts.down_proj"):
        prefix = name.removesuffix(".down_proj")
        for e in range(t.shape[0]):
            yield f"{prefix}.{e}.down_proj.weight", t[e]
    else:
        yield name, t


def model_scheme(model: CausalLM) -> QuantScheme | None:
    """The scheme of a quantised model (None: full precision)."""
    return next((m.scheme for m in model.modules() if isinstance(m, QuantWeight)), None)


def save_model(model: CausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB",
               extra_files: dict[str, str | os.PathLike] | None = None) -> Path:
    """Write config.json + safetensors (sharded above max_shard_size) atomically; returns the folder.

    extra_files: {name in the folder: source path}, e.g. the tokenizer files, copied along."""
    path = Path(path)
    limit = _parse_size(max_shard_size)
    with atomic_dir(path) as tmp:
        # a shard is written as soon as it is full: memory holds one shard, not the checkpoint
        shard: dict[str, torch.Tensor] = {}
        written: list[tuple[Path, list[str]]] = []
        size = total = 0

        def flush() -> None:
            f = tmp / f"shard-{len(written):05d}.safetensors"
            save_file(shard, str(f), metadata={"format": "pt"})
            written.append((f, list(shard)))
            shard.clear()

        for name, t in hf_state_items(model):
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > limit:
                flush()
                size = 0
            shard[name] = t.contiguous().cpu()
            size += nbytes
            total += nbytes
        if shard or not written:
            flush()
        n = len(written)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                       for i in range(n)]
        for (f, _), fname in zip(written, names):
            os.rename(f, tmp / fname)
        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: fname for (_, keys), fname in zip(written, names) for k in keys}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        dtype = next(model.parameters()).dtype
        cfg = model.config.replace(torch_dtype=str(dtype).removeprefix("torch."))
        scheme = model_scheme(model)
        if scheme is not None:
            ignore = ["re:.*mlp\\.gate$"] + (["lm_head"] if cfg.tie_word_embeddings else [])
            cfg = cfg.replace(extra={**cfg.extra, "quantization_config": quantization_config(scheme, ignore)})
        cfg.to_json(tmp / "config.json")
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return path
