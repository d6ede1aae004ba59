"""The trainer: preflight checks, then step, evaluate, log, checkpoint, resume, and save on signals.

    from nanoseek.train.config import TrainConfig
    from nanoseek.train.loop import train
    summary = train(TrainConfig(model_config="configs/default.json", data="runs/data", out="runs/default"))
    summary = train(TrainConfig.load("runs/default").replace(resume=True, max_steps=4000))   # continue

    nanoseek train --model-config configs/default.json --data runs/data --out runs/default
    torchrun --nproc-per-node 2 -m nanoseek train ...        # data parallel (nanoseek.train.distributed)

Everything that can be checked without computing is checked first (preflight.py). Then `Trainer`
builds the run's state once: the model (fresh or from the checkpoint), the MTP heads, the
optimizer, the loaders, and the wrappers nanoseek.train.parallelize applies (expert and data
parallel, activation checkpointing, compile). `Trainer.run` steps, validates, logs and saves.

The run folder gets train_config.json, metrics.jsonl (one JSON object per logged step or
validation) and checkpoints/step_NNNNNNN/ (see checkpoint.py). SIGINT/SIGTERM finish the current
step, save a checkpoint and return; a NaN/inf loss raises DivergedError naming the step, leaving
the last checkpoint as it was.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.info import count_params, matmul_flops
from nanoseek.io import atomic_write
from nanoseek.model.checkpoint import CheckpointError
from nanoseek.train import checkpoint as ckpt
from nanoseek.train.config import TrainConfig
from nanoseek.train.parallelize import parallelize
from nanoseek.train.preflight import Plan, TrainError, preflight
from nanoseek.train.step import NonFiniteLoss, evaluate, make_optimizer, train_step

__all__ = ["DivergedError", "TrainError", "Trainer", "preflight", "train", "train_flops_per_token"]

METRICS = "metrics.jsonl"


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


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward = 3 x forward FLOPs; causal attention sees (T+1)/2 keys on average."""
    return 3.0 * count_params(cfg).flops_per_token((seq_len + 1) / 2)


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


def _context(plan: Plan):
    if plan.world_size > 1:
        from nanoseek.train.distributed import init_distributed

        return init_distributed()
    return LocalContext(device=plan.device)


class Trainer:
    """One run's state between steps, built once from a preflight Plan and a process context."""

    def __init__(self, tcfg: TrainConfig, plan: Plan, ctx):
        from nanoseek.data.shards import ShardLoader

        self.tcfg, self.plan, self.ctx = tcfg, plan, ctx
        self.device = device = torch.device(ctx.device)
        self.run_dir, self.data = Path(tcfg.out), Path(tcfg.data)
        self.train_loader = ShardLoader(self.data, "train", tcfg.batch_size, tcfg.seq_len, ctx.rank,
                                        ctx.world_size, tcfg.seed)
        self.val_batches = 0  # batches in one epoch of the val split; checked now, not at the first eval
        if tcfg.eval_every:
            self.val_batches = ShardLoader(self.data, "val", tcfg.batch_size, tcfg.seq_len, ctx.rank,
                                           ctx.world_size, tcfg.seed).batches_per_epoch
        self.step, self.tokens_seen, self.flops_done = 0, 0, 0.0
        state = self._build_model()
        self.optimizer = make_optimizer(self.model, tcfg, extra=self.mtp)
        if state is not None:
            self._restore(state)
        else:
            torch.manual_seed(tcfg.seed)
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tcfg.save(self.run_dir)
            if state is not None:
                _truncate_metrics(self.run_dir / METRICS, self.step)
        # the optimizer exists first: expert parallel cuts the Parameters it already holds
        self.expert_parallel = ctx.world_size > 1 and tcfg.expert_parallel
        self.wrapped = parallelize(self.model, ctx, expert_parallel=self.expert_parallel,
                                   activation_checkpointing=tcfg.activation_checkpointing, compile=tcfg.compile)
        use_bf16 = tcfg.autocast == "on" or (tcfg.autocast == "auto" and device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.flops_per_token = train_flops_per_token(self.model.config, tcfg.seq_len)
        self.peak = tcfg.peak_flops or (matmul_flops(1024, 3) if device.type == "cpu" else 0.0)
        meta = plan.meta
        self.extra_files = {"tokenizer.json": self.data / meta.get("tokenizer", "tokenizer.json")}
        if (self.data / "tokenizer_config.json").is_file():
            self.extra_files["tokenizer_config.json"] = self.data / "tokenizer_config.json"
        self.metrics_file = open(self.run_dir / METRICS, "a") if ctx.is_main else None

    def _build_model(self) -> dict | None:
        """self.model (and self.mtp); the trainer state to restore, None for a fresh run."""
        from nanoseek.model.transformer import build_model
        from nanoseek.train.mtp import MTPHeads, load_mtp_state

        tcfg, plan = self.tcfg, self.plan
        state = None
        if plan.resume_from is not None:
            self.model, state, mtp_tensors = ckpt.load_checkpoint(plan.resume_from, device=self.device)
        else:
            self.model = build_model(plan.model_cfg, dtype=torch.float32, device=self.device,
                                     seed=tcfg.seed).train()
        self.mtp = None
        if plan.mtp_depth:
            self.mtp = MTPHeads(self.model.config, plan.mtp_depth).init_weights(tcfg.seed).to(self.device).train()
            if state is not None:
                try:
                    load_mtp_state(self.mtp, mtp_tensors)
                except ValueError as e:
                    raise CheckpointError(f"{plan.resume_from}: {e}") from None
            self.model.config = self.model.config.replace(num_nextn_predict_layers=plan.mtp_depth)
        return state

    def _restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step, self.tokens_seen, self.flops_done = int(state["step"]), int(state["tokens"]), float(state["flops"])

    # ------------------------------------------------------------------ what a step, a log line, a save is
    def train_one_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; the step's metrics record."""
        tcfg, ctx, device = self.tcfg, self.ctx, self.device
        t0 = time.perf_counter()
        batches = [tuple(t.to(device, non_blocking=True) for t in next(self.train_loader))
                   for _ in range(tcfg.grad_accum)]
        m = train_step(self.wrapped, batches, self.optimizer, tcfg, step=self.step, mtp=self.mtp,
                       autocast_dtype=self.autocast_dtype,
                       all_reduce_mean=ctx.all_reduce_mean if ctx.world_size > 1 else None,
                       clip_grad_norm=self._clip_expert_parallel if self.expert_parallel else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        self.step += 1
        tokens = m["tokens"] * ctx.world_size
        self.tokens_seen += tokens
        self.flops_done += tokens * self.flops_per_token
        rate = tokens / dt
        mfu = rate * self.flops_per_token / (self.peak * ctx.world_size) if self.peak else None
        m.update(kind="train", tokens=self.tokens_seen, flops=self.flops_done, tok_s=round(rate, 1),
                 mfu=round(mfu, 4) if mfu is not None else None, step_s=round(dt, 4))
        return m

    def _clip_expert_parallel(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm over every rank's expert slice (torch's clipping sees only this rank's)."""
        from nanoseek.train.distributed import clip_grad_norm

        return clip_grad_norm(self.wrapped, max_norm, self.ctx)

    def validate(self) -> float:
        """Mean val loss over the first eval_batches batches of the val split (the same every time)."""
        from nanoseek.data.shards import ShardLoader

        tcfg, ctx = self.tcfg, self.ctx
        fresh = ShardLoader(self.data, "val", tcfg.batch_size, tcfg.seq_len, ctx.rank, ctx.world_size, tcfg.seed)
        n = min(tcfg.eval_batches, self.val_batches)
        batches = [tuple(t.to(self.device) for t in next(fresh)) for _ in range(n)]
        self.wrapped.eval()
        loss = evaluate(self.wrapped, batches, self.autocast_dtype)
        self.wrapped.train()
        if ctx.world_size > 1:
            loss = float(ctx.all_reduce_mean(torch.tensor(loss, device=self.device)))
        return loss

    def save(self) -> Path | None:
        """Checkpoint the current step (a collective under expert parallel); its folder on rank 0."""
        from nanoseek.train.mtp import mtp_hf_items

        ctx, path, whole = self.ctx, None, self.model
        if self.expert_parallel:  # every rank sends its expert slice to rank 0
            from nanoseek.train.distributed import to_single_process

            whole = to_single_process(self.wrapped, ctx)
        if ctx.is_main:
            rng = {"torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
            tstate = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                      "loader": self.train_loader.state_dict(), "rng": rng, "tokens": self.tokens_seen,
                      "flops": self.flops_done, "train_config": self.tcfg.to_dict()}
            mtp_items = list(mtp_hf_items(self.mtp, self.model)) if self.mtp is not None else None
            path = ckpt.save_checkpoint(self.run_dir, self.step, whole, tstate, extra_files=self.extra_files,
                                        mtp_items=mtp_items)
            ckpt.prune_checkpoints(self.run_dir, self.tcfg.keep_checkpoints)
        ctx.barrier()
        return path

    def log(self, record: dict) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Train up to max_steps (or stop_after); returns the summary. See the module docstring."""
        from tqdm import tqdm

        tcfg, ctx = self.tcfg, self.ctx
        start = self.step
        end = tcfg.max_steps if not tcfg.stop_after else min(tcfg.max_steps, tcfg.stop_after)
        bar = tqdm(total=tcfg.max_steps, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1,
                   disable=not (tcfg.progress and ctx.is_main))
        summary = {"start_step": start, "interrupted": None, "val_loss": None, "checkpoint": None}
        last_loss, last_saved, tok_rate = None, start, None
        t_start = time.perf_counter()
        try:
            with _Signals() as signals:
                while self.step < end:
                    m = self.train_one_step()
                    step = self.step
                    last_loss = m["loss"]
                    tok_rate = m["tok_s"] if tok_rate is None else 0.9 * tok_rate + 0.1 * m["tok_s"]
                    m["elapsed"] = round(time.perf_counter() - t_start, 2)
                    if step % tcfg.log_every == 0 or step == end:
                        self.log(m)
                    bar.set_postfix(_postfix(m, tok_rate), refresh=False)
                    bar.update(1)
                    if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == end):
                        summary["val_loss"] = self.validate()
                        self.log({"kind": "val", "step": step, "val_loss": summary["val_loss"],
                                  "tokens": self.tokens_seen, "flops": self.flops_done})
                        if ctx.is_main:
                            bar.write(f"step {step}: val loss {summary['val_loss']:.4f}", file=sys.stderr)
                    if signals.caught or step == end or (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0):
                        summary["checkpoint"] = str(self.save())
                        last_saved = step
                    if signals.caught:
                        summary["interrupted"] = signals.caught
                        if ctx.is_main:
                            bar.write(f"{signals.caught}: saved step {step} to {summary['checkpoint']}; "
                                      "continue with --resume", file=sys.stderr)
                        break
        except NonFiniteLoss as e:
            good = ckpt.latest_checkpoint(self.run_dir)
            where = f"last good checkpoint: {good[1]}" if good else "no checkpoint was written yet"
            raise DivergedError(f"{e}; {where}", e.step) from None
        finally:
            bar.close()
            self.close()
        summary.update(is_main=ctx.is_main, step=self.step, loss=last_loss, tokens=self.tokens_seen,
                       flops=self.flops_done, tokens_per_s=tok_rate, last_saved=last_saved, run=str(self.run_dir))
        return summary


def _postfix(m: dict, tok_rate: float) -> dict:
    post = {"loss": f"{m['loss']:.3f}", "tok/s": f"{tok_rate:.0f}"}
    if m.get("mfu") is not None:
        post["mfu"] = f"{m['mfu']:.1%}"
    if "load_max_mean" in m:
        post["load"] = f"{max(m['load_max_mean']):.2f}"
    return post


def train(tcfg: TrainConfig) -> dict:
    """Run (or resume) training as `tcfg` says; returns a summary dict. See the module docstring."""
    plan = preflight(tcfg)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    trainer = Trainer(tcfg, plan, _context(plan))
    return trainer.run()
