"""The trainer: preflight checks, then step, evaluate, log, checkpoint, resume, and save on signals.

    from nanoseek.train.config import TrainConfig
    from nanoseek.train.loop import train
    summary = train(TrainConfig(model_config="configs/default.json", data="runs/data", out="runs/default"))
    summary = train(TrainConfig.load("runs/default").replace(resume=True, max_steps=4000))   # continue

    nanoseek train --model-config configs/default.json --data runs/data --out runs/default
    torchrun --nproc-per-node 2 -m nanoseek train ...        # data parallel (nanoseek.train.distributed)

Everything that can be checked without computing is checked first (`preflight`): the model config,
the data folder, tokenizer vocabulary vs the model's, sequence length vs positions, the run folder
and, on resume, the checkpoint and that the settings match the saved run. The run folder gets
train_config.json, metrics.jsonl (one JSON object per logged step or validation) and
checkpoints/step_NNNNNNN/ (see checkpoint.py). SIGINT/SIGTERM finish the current step, save a
checkpoint and return; a NaN/inf loss raises NonFiniteLoss naming the step, leaving the last
checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.info import count_params, matmul_flops
from nanoseek.io import atomic_write
from nanoseek.model.checkpoint import CheckpointError
from nanoseek.train import checkpoint as ckpt
from nanoseek.train.balance import resolve_devices
from nanoseek.train.config import TrainConfig
from nanoseek.train.step import (NonFiniteLoss, autocast_experts, balance_weights, evaluate, make_optimizer,
                                 train_step, unwrap)

METRICS = "metrics.jsonl"


class TrainError(ValueError):
    """Settings, data or checkpoints that training cannot start from; the message names which."""


class DivergedError(TrainError):
    """The loss went NaN/inf at `step`; the run folder keeps its last good checkpoint."""

    def __init__(self, msg: str, step: int):
        super().__init__(msg)
        self.step = step


@dataclass
class LocalContext:
    """The single-process stand-in for nanoseek.train.distributed's context."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True

    def barrier(self) -> None:
        pass

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t


@dataclass
class Plan:
    """What preflight established: everything train() needs before the first step."""

    model_cfg: ModelConfig
    meta: dict
    mtp_depth: int
    resume_from: Path | None
    device: torch.device


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device={name!r} but torch sees no CUDA device")
    return dev


def preflight(tcfg: TrainConfig) -> Plan:
    """Check everything that needs no compute; raise TrainError (or FileNotFoundError) naming the problem."""
    from nanoseek.data.shards import ShardError, read_meta

    tcfg.validate()
    run = Path(tcfg.out)
    found = ckpt.latest_checkpoint(run)
    resume_from = None
    if tcfg.resume:
        if found is None:
            raise TrainError(f"--resume: no checkpoint in {run / ckpt.CKPT_DIR}")
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
                device=_device(tcfg.device))


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward = 3 x forward FLOPs; causal attention sees (T+1)/2 keys on average."""
    return 3.0 * count_params(cfg).flops_per_token((seq_len + 1) / 2)


def _activation_checkpointing(model: torch.nn.Module) -> None:
    from torch.utils.checkpoint import checkpoint

    for block in unwrap(model).model.layers:
        inner = block.forward
        block.forward = lambda x, a, _f=inner: checkpoint(_f, x, a, use_reentrant=False)


class _Signals:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.caught: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.caught = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a killed run's steps that the resume will redo)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write(path, "".join(ln + "\n" for ln in keep))


def _context(tcfg: TrainConfig, plan: Plan):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from nanoseek.train.distributed import init_distributed

        return init_distributed()
    return LocalContext(device=plan.device)


def train(tcfg: TrainConfig) -> dict:
    """Run (or resume) training as `tcfg` says; returns a summary dict. See the module docstring."""
    from tqdm import tqdm

    from nanoseek.data.shards import ShardLoader
    from nanoseek.model.transformer import build_model
    from nanoseek.train.mtp import MTPHeads, load_mtp_state, mtp_hf_items

    plan = preflight(tcfg)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    ctx = _context(tcfg, plan)
    device = torch.device(ctx.device)
    data = Path(tcfg.data)
    train_loader = ShardLoader(data, "train", tcfg.batch_size, tcfg.seq_len, ctx.rank, ctx.world_size, tcfg.seed)
    val_loader = None
    if tcfg.eval_every:
        val_loader = ShardLoader(data, "val", tcfg.batch_size, tcfg.seq_len, ctx.rank, ctx.world_size, tcfg.seed)
    run = Path(tcfg.out)
    # ---- model, optimizer, state
    state = None
    if plan.resume_from is not None:
        model, state, mtp_tensors = ckpt.load_checkpoint(plan.resume_from, device=device)
    else:
        model = build_model(plan.model_cfg, dtype=torch.float32, device=device, seed=tcfg.seed).train()
    mtp = None
    if plan.mtp_depth:
        mtp = MTPHeads(model.config, plan.mtp_depth).init_weights(tcfg.seed).to(device).train()
        if state is not None:
            try:
                load_mtp_state(mtp, mtp_tensors)
            except ValueError as e:
                raise CheckpointError(f"{plan.resume_from}: {e}") from None
        model.config = model.config.replace(num_nextn_predict_layers=plan.mtp_depth)
    optimizer = make_optimizer(model, tcfg, extra=mtp)
    start = 0
    tokens_seen, flops_done = 0, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        train_loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        start, tokens_seen, flops_done = int(state["step"]), int(state["tokens"]), float(state["flops"])
    else:
        torch.manual_seed(tcfg.seed)
    if ctx.is_main:
        run.mkdir(parents=True, exist_ok=True)
        tcfg.save(run)
        if state is not None:
            _truncate_metrics(run / METRICS, start)
    wrapped, clip = model, None
    expert_parallel = ctx.world_size > 1 and tcfg.expert_parallel
    if expert_parallel and (state is not None or mtp is not None):
        # each rank's optimizer holds its own expert slice's moments, which one file does not keep
        raise TrainError("expert parallel runs cannot resume or train MTP modules yet; "
                         "use data parallel (--no-expert-parallel)")
    if ctx.world_size > 1:
        from nanoseek.train import distributed

        wrapped = distributed.prepare_model(model, ctx, tcfg.expert_parallel)
        if expert_parallel:
            clip = lambda max_norm: distributed.clip_grad_norm(wrapped, max_norm, ctx)  # noqa: E731
    if tcfg.activation_checkpointing:
        _activation_checkpointing(model)
    if tcfg.compile:
        wrapped = torch.compile(wrapped)
    use_bf16 = tcfg.autocast == "on" or (tcfg.autocast == "auto" and device.type == "cuda")
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    if autocast_dtype is not None:
        autocast_experts(model, mtp, dtype=autocast_dtype)
    flops_per_token = train_flops_per_token(model.config, tcfg.seq_len)
    peak = tcfg.peak_flops or (matmul_flops(1024, 3) if device.type == "cpu" else 0.0)
    extra_files = {"tokenizer.json": data / plan.meta.get("tokenizer", "tokenizer.json")}
    if (data / "tokenizer_config.json").is_file():
        extra_files["tokenizer_config.json"] = data / "tokenizer_config.json"
    reduce = ctx.all_reduce_mean if ctx.world_size > 1 else None

    def save(step: int) -> Path | None:
        path, whole = None, model
        if expert_parallel:  # collective: every rank sends its expert slice to rank 0
            from nanoseek.train.distributed import to_single_process

            whole = to_single_process(wrapped, ctx)
        if ctx.is_main:
            rng = {"torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            tstate = {"step": step, "optimizer": optimizer.state_dict(), "loader": train_loader.state_dict(),
                      "rng": rng, "tokens": tokens_seen, "flops": flops_done, "train_config": tcfg.to_dict()}
            path = ckpt.save_checkpoint(run, step, whole, tstate, extra_files=extra_files,
                                        mtp_items=list(mtp_hf_items(mtp, model)) if mtp is not None else None)
            ckpt.prune_checkpoints(run, tcfg.keep_checkpoints)
        ctx.barrier()
        return path

    def validate() -> float:
        n = min(tcfg.eval_batches, val_loader.batches_per_epoch)
        fresh = ShardLoader(data, "val", tcfg.batch_size, tcfg.seq_len, ctx.rank, ctx.world_size, tcfg.seed)
        batches = [tuple(t.to(device) for t in next(fresh)) for _ in range(n)]
        wrapped.eval()
        loss = evaluate(wrapped, batches, autocast_dtype)
        wrapped.train()
        if ctx.world_size > 1:
            loss = float(ctx.all_reduce_mean(torch.tensor(loss, device=device)))
        return loss

    metrics_file = open(run / METRICS, "a") if ctx.is_main else None

    def log(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    end = tcfg.max_steps if not tcfg.stop_after else min(tcfg.max_steps, tcfg.stop_after)
    bar = tqdm(total=tcfg.max_steps, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1,
               disable=not (tcfg.progress and ctx.is_main))

    def say(msg: str) -> None:
        if ctx.is_main:
            bar.write(msg, file=sys.stderr)

    summary = {"start_step": start, "interrupted": None, "val_loss": None, "checkpoint": None}
    last_loss, last_saved, tok_rate = None, start, None
    t_start = time.perf_counter()
    try:
        with _Signals() as signals:
            step = start
            while step < end:
                t0 = time.perf_counter()
                batches = [tuple(t.to(device, non_blocking=True) for t in next(train_loader))
                           for _ in range(tcfg.grad_accum)]
                m = train_step(wrapped, batches, optimizer, tcfg, step=step, mtp=mtp,
                               autocast_dtype=autocast_dtype, all_reduce_mean=reduce, clip_grad_norm=clip)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                step += 1
                tokens = m["tokens"] * ctx.world_size
                tokens_seen += tokens
                flops_done += tokens * flops_per_token
                rate = tokens / dt
                tok_rate = rate if tok_rate is None else 0.9 * tok_rate + 0.1 * rate
                mfu = rate * flops_per_token / (peak * ctx.world_size) if peak else None
                last_loss = m["loss"]
                m.update(kind="train", tokens=tokens_seen, flops=flops_done, tok_s=round(rate, 1),
                         mfu=round(mfu, 4) if mfu is not None else None, step_s=round(dt, 4),
                         elapsed=round(time.perf_counter() - t_start, 2))
                if step % tcfg.log_every == 0 or step == end:
                    log(m)
                post = {"loss": f"{last_loss:.3f}", "tok/s": f"{tok_rate:.0f}"}
                if mfu is not None:
                    post["mfu"] = f"{mfu:.1%}"
                if "load_max_mean" in m:
                    post["load"] = f"{max(m['load_max_mean']):.2f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
                if val_loader is not None and (step % tcfg.eval_every == 0 or step == end):
                    summary["val_loss"] = validate()
                    log({"kind": "val", "step": step, "val_loss": summary["val_loss"], "tokens": tokens_seen,
                         "flops": flops_done})
                    say(f"step {step}: val loss {summary['val_loss']:.4f}")
                if signals.caught or step == end or (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0):
                    summary["checkpoint"] = str(save(step))
                    last_saved = step
                if signals.caught:
                    summary["interrupted"] = signals.caught
                    say(f"{signals.caught}: saved step {step} to {summary['checkpoint']}; "
                              f"continue with --resume")
                    break
    except NonFiniteLoss as e:
        good = ckpt.latest_checkpoint(run)
        where = f"last good checkpoint: {good[1]}" if good else "no checkpoint was written yet"
        raise DivergedError(f"{e}; {where}", e.step) from None
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    summary.update(is_main=ctx.is_main, step=step, loss=last_loss, tokens=tokens_seen, flops=flops_done,
                   tokens_per_s=tok_rate, last_saved=last_saved, run=str(run))
    return summary
