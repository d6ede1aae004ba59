"""HF safetensors checkpoints <-> nanoseek models, with the published tensor names.

    model = load_model("path/to/DeepSeek-V2-Lite", dtype=torch.bfloat16)
    save_model(model, "runs/ckpt", max_shard_size="2GB")

Loading reads config.json and model.safetensors (or the shards of model.safetensors.index.json)
one tensor at a time into a model allocated once, so peak memory stays near the model's size.
One table, `_EXPERT`, maps the per-expert checkpoint tensors onto our stacked expert weights; all
other names are the same on both sides. FP8 checkpoints (DeepSeek-V3's 128x128 block scales,
`weight_scale_inv`) are dequantised on the fly. V3's multi-token-prediction layers
(model.layers.{num_hidden_layers}...) are skipped with a warning. Saving writes into a temporary
folder and renames it into place, so a reader never sees half a checkpoint.
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
from nanoseek.model.rope import rope_inv_freq
from nanoseek.model.transformer import CausalLM

log = logging.getLogger("nanoseek")

# checkpoint: model.layers.{i}.mlp.experts.{e}.{gate|up|down}_proj.weight
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
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


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> CausalLM:
    """Load an HF model folder (config.json + safetensors) into a nanoseek CausalLM in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    try:
        cfg = ModelConfig.from_json(path / "config.json")
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None
    files = checkpoint_files(path)
    dtype = dtype or _default_dtype(cfg)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    inv_freq, _ = rope_inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
    model.inv_freq.copy_(inv_freq)  # a non-persistent buffer: to_empty left it uninitialised
    _fill(model, cfg, files)
    return model.eval()


def _fill(model: CausalLM, cfg: ModelConfig, files: list[Path]) -> None:
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers())
    targets.pop("inv_freq", None)
    tied = cfg.tie_word_embeddings
    filled: dict[str, set] = defaultdict(set)  # local name -> filled slots
    need_slots = {n: ({("e", e, p) for e in range(t.shape[0]) for p in ("gate_proj", "up_proj")}
                      if n.endswith("experts.gate_up_proj") else
                      {("e", e, "down_proj") for e in range(t.shape[0])} if n.endswith("experts.down_proj")
                      else {"all"}) for n, t in targets.items()}
    pending_fp8: dict[str, torch.Tensor] = {}  # weight or scale waiting for its partner
    skipped_mtp, unexpected = [], []
    n_layers = cfg.num_hidden_layers

    def put(name: str, t: torch.Tensor, where: Path) -> None:
        m = _EXPERT.match(name)
        local, slot = (f"{m.group(1)}.{'down_proj' if m.group(3) == 'down_proj' else 'gate_up_proj'}",
                       ("e", int(m.group(2)), m.group(3))) if m else (name, "all")
        if local not in targets:
            unexpected.append(name)
            return
        dst = targets[local]
        if slot != "all":
            _, e, part = slot
            if e >= dst.shape[0]:
                unexpected.append(name)
                return
            inter = dst.shape[1] // 2
            dst = dst[e] if part == "down_proj" else dst[e, :inter] if part == "gate_proj" else dst[e, inter:]
        if tuple(t.shape) != tuple(dst.shape):
            raise CheckpointError(f"{where.name}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"the config expects {tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(t)
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
        put(name, t, f)

    if pending_fp8:
        raise CheckpointError(f"FP8 tensors without their block scales (or scales without weights): "
                              f"{sorted(pending_fp8)[:5]}")
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
    """Yield (checkpoint name, tensor) in the published layout: routed experts one by one."""
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name == "inv_freq" or id(t) in seen:
            continue
        seen.add(id(t))
        t = t.detach()
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


def save_model(model: CausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB",
               extra_files: dict[str, str | os.PathLike] | None = None) -> Path:
    """Write config.json + safetensors (sharded above max_shard_size) atomically; returns the folder.

    extra_files: {name in the folder: source path}, e.g. the tokenizer files, copied along."""
    path = Path(path)
    limit = _parse_size(max_shard_size)
    with atomic_dir(path) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in hf_state_items(model):
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous().cpu()
            size += nbytes
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                       for i in range(n)]
        for fname, shard in zip(names, shards):
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        if n > 1:
            total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        dtype = next(model.parameters()).dtype
        model.config.replace(torch_dtype=str(dtype).removeprefix("torch.")).to_json(tmp / "config.json")
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return path
