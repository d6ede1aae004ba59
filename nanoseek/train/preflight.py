"""Everything training can check before it computes anything, and before a process group exists.

    plan = preflight(tcfg)     # raises TrainError (or FileNotFoundError) naming the problem

The model config (or, on resume, the checkpoint's), the data folder and its tokenizer against the
model's vocabulary, the sequence length against the positions, MTP and MoE balance settings, the
run folder, on resume the checkpoint and that the settings match the saved run, and the parallel
settings that torchrun's WORLD_SIZE implies (checked here, so that a bad flag fails once, in
every rank, before any rank joins a process group).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.train import checkpoint as ckpt
from nanoseek.train.balance import resolve_devices
from nanoseek.train.config import TrainConfig
from nanoseek.train.step import balance_weights


class TrainError(ValueError):
    """Settings, data or checkpoints that training cannot start from; the message names which."""


@dataclass
class Plan:
    """What preflight established: everything train() needs before the first step."""

    model_cfg: ModelConfig
    meta: dict
    mtp_depth: int
    resume_from: Path | None
    device: torch.device
    world_size: int = 1


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device={name!r} but torch sees no CUDA device")
    return dev


def world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_parallel(tcfg: TrainConfig, model_cfg: ModelConfig, mtp_depth: int, resuming: bool, world: int) -> None:
    if world <= 1 or not tcfg.expert_parallel:
        return
    if not model_cfg.is_moe:
        raise TrainError(f"--expert-parallel needs MoE layers, but the model has none (model_type="
                         f"{model_cfg.model_type}, n_routed_experts={model_cfg.n_routed_experts})")
    if model_cfg.n_routed_experts % world:
        raise TrainError(f"--expert-parallel needs n_routed_experts={model_cfg.n_routed_experts} divisible by "
                         f"the number of processes, WORLD_SIZE={world}")
    # each rank's optimizer holds its own expert slice's moments, which one checkpoint file does not keep
    if resuming:
        raise TrainError("--expert-parallel runs cannot resume yet; resume with data parallel "
                         "(--no-expert-parallel)")
    if mtp_depth > 0:
        raise TrainError(f"--expert-parallel cannot train MTP modules yet (mtp_depth={mtp_depth}); "
                         "use --mtp-depth 0 or data parallel (--no-expert-parallel)")


def preflight(tcfg: TrainConfig) -> Plan:
    """Check everything that needs no compute; raise TrainError (or FileNotFoundError) naming the problem."""
    from nanoseek.data.shards import ShardError, read_meta

    tcfg.validate()
    run = Path(tcfg.out)
    found = ckpt.latest_checkpoint(run)
    resume_from = None
    if tcfg.resume:
        if found is None:
            raise TrainError(f"--resume: no run/checkpoint in {run} (no {ckpt.CKPT_DIR}/step_*)")
        resume_from = found[1]
        saved_path = run / "train_config.json"
        if saved_path.exists():
            diffs = tcfg.resume_differences(TrainConfig.load(run))
            if diffs:
                raise TrainError(f"--resume with settings that differ from the run's: {'; '.join(diffs)}")
        ckpt.read_trainer_state(resume_from)  # fail now, not after building everything
        model_cfg_path = resume_from / "config.json"
    else:
        if found is not None:
            raise TrainError(f"{run} already holds checkpoints (latest step {found[0]}): pass --resume "
                             "to continue it or choose another --out")
        model_cfg_path = Path(tcfg.model_config)
    try:
        model_cfg = ModelConfig.from_json(model_cfg_path)
    except ConfigError as e:
        raise TrainError(f"model config {model_cfg_path}: {e}") from None
    if tcfg.seq_len > model_cfg.max_position_embeddings:
        raise TrainError(f"seq_len={tcfg.seq_len} exceeds the model's max_position_embeddings="
                         f"{model_cfg.max_position_embeddings}")
    mtp_depth = model_cfg.num_nextn_predict_layers if tcfg.mtp_depth < 0 else tcfg.mtp_depth
    if mtp_depth > 0 and model_cfg.model_type != "deepseek_v3":
        raise TrainError(f"multi-token prediction (depth {mtp_depth}) is a deepseek_v3 feature; the model "
                         f"config has model_type={model_cfg.model_type!r} (set --mtp-depth 0)")
    if mtp_depth >= tcfg.seq_len:
        raise TrainError(f"mtp_depth={mtp_depth} needs seq_len > depth, got seq_len={tcfg.seq_len}")
    if model_cfg.is_moe:
        try:
            D, _ = resolve_devices(balance_weights(tcfg), model_cfg.n_group, model_cfg.topk_group)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if model_cfg.n_routed_experts % D:
            raise TrainError(f"balance_devices={D} does not divide n_routed_experts={model_cfg.n_routed_experts}")
    world = world_size()
    _check_parallel(tcfg, model_cfg, mtp_depth, resume_from is not None, world)
    data = Path(tcfg.data)
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist (run `nanoseek data prepare` first)")
    try:
        meta = read_meta(data)
    except (ShardError, KeyError, TypeError) as e:
        raise TrainError(f"data folder {data}: {e}") from None
    if not (data / meta.get("tokenizer", "tokenizer.json")).is_file():
        raise TrainError(f"data folder {data} has no {meta.get('tokenizer', 'tokenizer.json')}")
    if int(meta["vocab_size"]) > model_cfg.vocab_size:
        raise TrainError(f"the tokenizer of {data} has {meta['vocab_size']} tokens but the model's vocab_size is "
                         f"{model_cfg.vocab_size}: token ids would fall outside the embedding")
    return Plan(model_cfg=model_cfg, meta=meta, mtp_depth=mtp_depth, resume_from=resume_from,
                device=_device(tcfg.device), world_size=world)
