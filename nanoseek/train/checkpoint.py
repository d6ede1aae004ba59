"""Run checkpoints: an HF model folder (save_model) plus the trainer's state, written atomically.

    path = save_checkpoint(run_dir, step, model, trainer_state, mtp=mtp, extra_files={...})
    prune_checkpoints(run_dir, keep=3)
    step, path = latest_checkpoint(run_dir)             # None when the run has none
    model, state, mtp_tensors = load_checkpoint(path)

Layout: RUN/checkpoints/step_0000200/ holds config.json + model safetensors (loadable by
`load_model`, `transformers` and the engine), the V3 MTP layers in their own shard listed in the
safetensors index (skipped by load_model), trainer_state.pt (optimizer, step, loader position, RNG)
and any extra files (tokenizer). Everything is written into a hidden temporary folder and renamed
into place last, so a crash leaves either the whole checkpoint or none.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.io import atomic_dir
from nanoseek.model.checkpoint import CheckpointError, load_model, save_model

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
MTP_FILE = "model-mtp.safetensors"
INDEX = "model.safetensors.index.json"
_STEP = re.compile(r"^step_(\d+)$")


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of the finished checkpoints, oldest first (temporary folders are hidden: skipped)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _add_mtp_shard(folder: Path, items: list[tuple[str, torch.Tensor]]) -> None:
    """Write the MTP tensors as one more shard and list them in the safetensors index."""
    save_file({n: t.detach().contiguous().cpu().clone() for n, t in items}, str(folder / MTP_FILE),
              metadata={"format": "pt"})
    index_path = folder / INDEX
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:  # save_model wrote one file: index it so that readers find both
        with safe_open(str(folder / "model.safetensors"), framework="pt") as sf:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in sf.keys()}}
    index["weight_map"].update({n: MTP_FILE for n, _ in items})
    index["metadata"]["total_size"] = sum((folder / f).stat().st_size for f in set(index["weight_map"].values()))
    index_path.write_text(json.dumps(index, indent=2))


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, trainer_state: dict, *,
                    mtp_items: list[tuple[str, torch.Tensor]] | None = None,
                    extra_files: dict[str, str | os.PathLike] | None = None) -> Path:
    """Write checkpoint `step` atomically (replacing one of the same step); returns its folder."""
    final = step_dir(run_dir, step)
    with atomic_dir(final) as folder:
        save_model(model, folder, extra_files=extra_files)
        if mtp_items:
            _add_mtp_shard(folder, mtp_items)
        torch.save(trainer_state, folder / STATE_FILE)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns the deleted folders."""
    found = list_checkpoints(run_dir)
    gone = [p for _, p in found[:-keep]] if keep > 0 else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def read_trainer_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    f = path / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {STATE_FILE}; not a training checkpoint (or an incomplete one)")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated pickle raises several kinds
        raise CheckpointError(f"{f}: cannot read the trainer state ({type(e).__name__}: {e}); "
                              "truncated or corrupt?") from None
    for key in ("step", "optimizer", "loader", "rng"):
        if key not in state:
            raise CheckpointError(f"{f}: trainer state lacks {key!r}")
    return state


def read_mtp_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    f = Path(path) / MTP_FILE
    if not f.exists():
        return {}
    try:
        with safe_open(str(f), framework="pt") as sf:
            return {k: sf.get_tensor(k) for k in sf.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{f}: not a valid safetensors file ({e}); truncated or corrupt?") from None


def load_checkpoint(path: str | os.PathLike, device=None):
    """(model in train mode, trainer state, MTP tensors) of a checkpoint folder; errors name the file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    state = read_trainer_state(path)  # first: cheap, and catches the most common damage
    model = load_model(path, dtype=torch.float32, device=device).train()
    return model, state, read_mtp_tensors(path)
