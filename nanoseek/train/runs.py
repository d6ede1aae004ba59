"""Many trainer runs as one resumable job, for the comparison experiments (sweep.py, data_experiment.py).

    tcfg = experiment_run(cfg, model_config=..., data=..., out=..., seed=0, steps=96, warmup_steps=10)
    wall = run_many({key: TrainConfig, ...}, progress=True, desc="compute")   # trains what is missing
    curve = curve_of(run_dir)          # [(flops, tokens, val loss)] of one run's validations

A run that finished (its metrics end with the validation of its last step) is reused; its
checkpoints are deleted once it finishes (a sweep writes dozens of runs; the metrics are what it
reads). A run interrupted by SIGINT/SIGTERM resumes from the checkpoint the trainer saved (exact
resume); one killed before any checkpoint starts over. A folder that holds a different run is an
error naming it. Every run to do is preflighted before the first one trains, so a bad setting fails
in seconds, not an hour in.

workers > 1 trains that many runs at once, each in its own (spawned) process with cpu_count // workers
threads unless the runs set theirs: on a small CPU, independent single-thread runs side by side beat
one run on all cores, whose every op waits at a thread barrier. Ctrl-C (SIGINT to the process group)
reaches every worker's trainer, which saves its checkpoint; runs not yet started are cancelled.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def experiment_run(cfg, *, model_config: str | Path, data: str | Path, out: str | Path, seed: int, steps: int,
                   warmup_steps: int):
    """The TrainConfig of one experiment run: `cfg` (an experiment's config) gives the batch, sequence
    length, learning rate, evaluations, threads and peak FLOP/s; a run keeps one checkpoint (for resume),
    no MTP, and shows no progress bar of its own (run_many shows the experiment's)."""
    from nanoseek.train.config import TrainConfig

    return TrainConfig(model_config=str(model_config), data=str(data), out=str(out), seed=seed,
                       batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_steps=steps, lr=cfg.lr,
                       warmup_steps=warmup_steps, eval_every=max(1, steps // cfg.evals),
                       eval_batches=cfg.eval_batches, checkpoint_every=0, keep_checkpoints=1, threads=cfg.threads,
                       peak_flops=cfg.peak_flops, progress=False, mtp_depth=0)


def curve_of(run_dir: str | Path) -> list[tuple[float, int, float]]:
    """(training FLOPs, tokens, val loss) at each validation of a run, in order."""
    from nanoseek.train.plot import read_metrics

    _, val = read_metrics(run_dir)
    if not val:
        raise ValueError(f"{run_dir}/metrics.jsonl has no validation records")
    return [(float(v["flops"]), int(v["tokens"]), float(v["val_loss"])) for v in val]


def run_state(tcfg) -> str:
    """'new'; 'finished'; 'partial' (this run, resumable from its checkpoint); 'killed' (this run,
    stopped before any checkpoint: start over); 'other' (a different run lives there)."""
    from nanoseek.train import checkpoint as ckpt
    from nanoseek.train.config import TrainConfig

    run = Path(tcfg.out)
    if not run.is_dir() or not any(run.iterdir()):
        return "new"
    try:
        same = not tcfg.resume_differences(TrainConfig.load(run))
    except (FileNotFoundError, ValueError):
        same = False
    if not same:
        return "other"
    if _last_val_step(run) == tcfg.max_steps:
        return "finished"
    return "partial" if ckpt.latest_checkpoint(run) is not None else "killed"


def _last_val_step(run: Path) -> int | None:
    from nanoseek.train.plot import read_metrics

    if not (run / "metrics.jsonl").is_file():
        return None
    _, val = read_metrics(run)
    return int(val[-1]["step"]) if val else None


def run_many(runs: dict, progress: bool = True, desc: str = "runs", workers: int = 1) -> dict[str, float]:
    """Train every TrainConfig in `runs` that has not finished, `workers` at a time; returns
    {out: wall seconds} of those trained."""
    from tqdm import tqdm

    from nanoseek.train.loop import preflight

    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    todo = []
    for tcfg in runs.values():
        state = run_state(tcfg)
        if state == "finished":
            continue
        if state == "other":
            raise ValueError(f"{tcfg.out} holds a different run (or one without a checkpoint); remove it or "
                             "choose another --out")
        if state == "killed":  # this run, killed before its first checkpoint: start it over
            shutil.rmtree(tcfg.out)
        tcfg = tcfg.replace(resume=state == "partial")
        if workers > 1 and tcfg.threads == 0:
            tcfg = tcfg.replace(threads=max(1, (os.cpu_count() or 1) // workers))
        preflight(tcfg)
        todo.append(tcfg)
    wall: dict[str, float] = {}
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=desc, unit="run", disable=not progress,
               dynamic_ncols=True)
    try:
        if workers == 1 or len(todo) <= 1:
            for tcfg in todo:
                bar.set_postfix_str(Path(tcfg.out).name)
                _finish(train_one(tcfg), wall, bar)
        else:
            _train_parallel(todo, workers, wall, bar)
    finally:
        bar.close()
    return wall


def train_one(tcfg) -> tuple[str, float, str | None]:
    """Train one run; once it finished, delete its checkpoints. (out, wall seconds, the signal that
    interrupted it or None). A worker process's entry point, hence module level."""
    from nanoseek.train import checkpoint as ckpt
    from nanoseek.train.loop import train

    t0 = time.perf_counter()
    summary = train(tcfg)
    if not summary["interrupted"]:
        shutil.rmtree(Path(tcfg.out) / ckpt.CKPT_DIR, ignore_errors=True)
    return tcfg.out, round(time.perf_counter() - t0, 1), summary["interrupted"]


def _finish(result: tuple[str, float, str | None], wall: dict, bar) -> None:
    out, seconds, interrupted = result
    wall[out] = seconds
    if interrupted:  # the trainer saved a checkpoint; a rerun resumes from it
        raise KeyboardInterrupt(f"{interrupted} while training {out}; rerun to resume")
    bar.update(1)


def _train_parallel(todo: list, workers: int, wall: dict, bar) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"))
    pending = {pool.submit(train_one, tcfg) for tcfg in todo}
    bar.set_postfix_str(f"{workers} at a time")  # (a future counts as running once queued: no names)
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                pending.discard(f)
                _finish(f.result(), wall, bar)
    finally:  # an interrupted or failed run: cancel what has not started, let the running ones save
        pool.shutdown(wait=True, cancel_futures=True)
