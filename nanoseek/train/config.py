"""TrainConfig: every training knob in one dataclass; argparse flags are generated from its fields.

    cfg = TrainConfig(model_config="configs/default.json", data="runs/data", out="runs/default")
    add_arguments(parser)                      # --model-config, --batch-size, ... one flag per field
    cfg = from_args(parser.parse_args())
    cfg.save(run_dir)                          # run_dir/train_config.json (atomic)
    cfg = TrainConfig.load(run_dir)

Fields are grouped (the `group` metadata) only for --help. Validation that needs no files lives in
`validate()`; checks against the data and the model config live in the trainer's preflight.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.io import atomic_write
from nanoseek.train.schedule import SCHEDULES

# the papers' balance settings (see balance.py): DeepSeek-V2 Sec. 3.1.2, DeepSeek-V3 Sec. 4.2
V2_EXPERT_ALPHA, V2_DEVICE_ALPHA, V2_COMM_ALPHA = 0.003, 0.05, 0.02
V3_SEQ_ALPHA, V3_BIAS_GAMMA = 0.0001, 0.001

CONFIG_FILE = "train_config.json"
# knobs that may change when a run is resumed; any other difference is refused
RESUMABLE_CHANGES = ("resume", "max_steps", "eval_every", "eval_batches", "checkpoint_every",
                     "keep_checkpoints", "progress", "threads", "log_every", "peak_flops", "stop_after",
                     "compile", "activation_checkpointing")
# paths: compared resolved on resume (runs/x, runs/x/ and ./runs/x are one folder); `out` is not
# compared at all: a run is wherever its folder is now (moved or copied runs resume there)
PATH_FIELDS = ("model_config", "data")


def knob(default, help: str, group: str = "training", **kw):
    return field(default=default, metadata={"help": help, "group": group, **kw})


@dataclass
class TrainConfig:
    # io
    model_config: str = knob("", "model config.json (HF layout)", "run", required=True)
    data: str = knob("", "data dir written by `nanoseek data prepare`", "run", required=True)
    out: str = knob("", "run folder: train_config.json, metrics.jsonl, checkpoints/", "run", required=True)
    resume: bool = knob(False, "continue from the latest checkpoint in --out", "run")
    seed: int = knob(0, "seed of the weights, the data order and everything random", "run")
    # batch and length
    batch_size: int = knob(8, "sequences per micro-batch (per process)")
    seq_len: int = knob(256, "tokens per sequence")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    max_steps: int = knob(1000, "optimizer steps of the whole run")
    stop_after: int = knob(0, "stop (with a checkpoint) after this step although max_steps is later; 0: off")
    # optimizer and schedule
    lr: float = knob(3e-4, "peak learning rate", "optimizer")
    min_lr_ratio: float = knob(0.1, "final lr / peak lr", "optimizer")
    warmup_steps: int = knob(100, "linear warmup steps", "optimizer")
    schedule: str = knob("cosine", "lr schedule", "optimizer", choices=SCHEDULES)
    decay_fraction: float = knob(0.2, "wsd: share of the steps spent decaying", "optimizer")
    weight_decay: float = knob(0.1, "AdamW weight decay (matrices only)", "optimizer")
    beta1: float = knob(0.9, "AdamW beta1", "optimizer")
    beta2: float = knob(0.95, "AdamW beta2", "optimizer")
    eps: float = knob(1e-8, "AdamW epsilon", "optimizer")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this; 0: off", "optimizer")
    fused_adamw: str = knob("auto", "fused AdamW kernel", "optimizer", choices=("auto", "on", "off"))
    # MoE balance
    expert_balance_alpha: float = knob(V2_EXPERT_ALPHA, "V2 expert-level balance weight a1", "moe")
    device_balance_alpha: float = knob(V2_DEVICE_ALPHA, "V2 device-level balance weight a2", "moe")
    comm_balance_alpha: float = knob(V2_COMM_ALPHA, "V2 communication balance weight a3", "moe")
    balance_devices: int = knob(0, "D for the device/comm losses; 0: the model's n_group", "moe")
    balance_max_devices: int = knob(0, "M for the comm loss; 0: the model's topk_group", "moe")
    bias_update_speed: float = knob(V3_BIAS_GAMMA, "V3 aux-loss-free bias speed gamma", "moe")
    seq_balance_alpha: float = knob(V3_SEQ_ALPHA, "V3 sequence-wise balance weight", "moe")
    # multi-token prediction
    mtp_depth: int = knob(-1, "V3 MTP modules; -1: the model config's num_nextn_predict_layers", "mtp")
    mtp_lambda: float = knob(0.3, "weight of the mean MTP loss", "mtp")
    # precision and speed
    device: str = knob("auto", "cpu, cuda, cuda:N or auto", "speed")
    autocast: str = knob("auto", "bf16 autocast: auto (on for GPU), on, off", "speed", choices=("auto", "on", "off"))
    activation_checkpointing: bool = knob(False, "recompute each block in the backward pass", "speed")
    compile: bool = knob(False, "torch.compile the model", "speed")
    threads: int = knob(0, "torch CPU threads; 0: torch's default", "speed")
    expert_parallel: bool = knob(False, "with torchrun: split experts across ranks", "speed")
    # eval, logging, checkpoints
    eval_every: int = knob(100, "validation every N steps (and at the end); 0: off", "logging")
    eval_batches: int = knob(8, "validation micro-batches", "logging")
    log_every: int = knob(1, "write a metrics line every N steps", "logging")
    checkpoint_every: int = knob(200, "checkpoint every N steps (and at the end)", "logging")
    keep_checkpoints: int = knob(3, "keep the last K checkpoints", "logging")
    peak_flops: float = knob(0.0, "peak FLOP/s for MFU; 0: measure the fp32 matmul rate (CPU)", "logging")
    progress: bool = knob(True, "show a progress bar", "logging")

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("model_config", "data", "out"):
            need(bool(getattr(self, name)), f"{name} is required (--{name.replace('_', '-')})")
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "log_every", "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "stop_after", "threads"):
            need(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        need(self.warmup_steps <= self.max_steps,
             f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}")
        need(self.lr > 0, f"lr={self.lr} must be > 0")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        need(0.0 < self.decay_fraction <= 1.0, f"decay_fraction={self.decay_fraction} must be in (0, 1]")
        need(self.schedule in SCHEDULES, f"schedule={self.schedule!r}; expected one of {SCHEDULES}")
        need(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0,
             f"beta1={self.beta1}, beta2={self.beta2} must be in [0, 1)")
        need(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0: off)")
        need(self.mtp_depth >= -1, f"mtp_depth={self.mtp_depth} must be >= 0, or -1 for the model config's")
        need(self.eval_every == 0 or self.eval_batches >= 1,
             f"eval_batches={self.eval_batches} must be >= 1 when eval_every={self.eval_every}")
        for name in ("expert_balance_alpha", "device_balance_alpha", "comm_balance_alpha",
                     "bias_update_speed", "seq_balance_alpha", "mtp_lambda", "peak_flops", "weight_decay"):
            need(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def save(self, run_dir: str | os.PathLike) -> Path:
        path = Path(run_dir) / CONFIG_FILE
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**d)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "TrainConfig":
        """The saved settings of the run in `run_dir`, with out = run_dir (where the run is now)."""
        path = Path(run_dir) / CONFIG_FILE
        try:
            return cls.from_dict({**json.loads(path.read_text()), "out": str(run_dir)})
        except FileNotFoundError:
            raise FileNotFoundError(f"no {CONFIG_FILE} in {run_dir}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None

    def resume_differences(self, saved: "TrainConfig") -> list[str]:
        """Fields that differ from the saved run's and may not change on resume (paths compared resolved)."""
        def same(k, a, b) -> bool:
            return Path(a).resolve() == Path(b).resolve() if k in PATH_FIELDS and a and b else a == b

        return [f"{k}: saved {v!r}, now {getattr(self, k)!r}" for k, v in saved.to_dict().items()
                if k not in RESUMABLE_CHANGES and k != "out" and not same(k, getattr(self, k), v)]


# ---------------------------------------------------------------------- argparse
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, grouped; bools get --flag / --no-flag. Flags left out stay
    out of the namespace (SUPPRESS), so that a resumed run keeps its saved values for them."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        g = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        shown = "required unless --resume" if meta.get("required") else f"default: {f.default}"
        help_ = f"{meta['help']} ({shown})"
        if f.type in (bool, "bool"):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
            continue
        kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        extra = {"choices": meta["choices"]} if "choices" in meta else {}
        g.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_, **extra)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """The config the flags ask for: with --resume, the run's saved config with the given flags applied."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if given.get("resume") and given.get("out"):
        if not (Path(given["out"]) / CONFIG_FILE).is_file():
            raise ValueError(f"--resume: no run/checkpoint in {given['out']} (no {CONFIG_FILE}); "
                             "start a run there without --resume")
        base = TrainConfig.load(given["out"]).to_dict()
    else:
        base = TrainConfig().to_dict()
    cfg = TrainConfig.from_dict({**base, **given})
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("required") and not getattr(cfg, f.name):
            raise ValueError(f"--{f.name.replace('_', '-')} is required")
    return cfg
