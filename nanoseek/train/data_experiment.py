"""Data efficiency: the same model, steps and seeds on a raw code corpus and on it curated, judged on clean code.

    from nanoseek.train.data_experiment import DataExperimentConfig, data_experiment
    result = data_experiment(DataExperimentConfig(data="runs/data", out="runs/compare/data"))
    result["rows"]["raw"]["loss_gap"]        # raw's final val loss - curated's, mean ± sd over seeds

    nanoseek compare --experiment data --data runs/data --out runs/compare     # see compare_cli.py

The raw corpus is every `.py` file under this Python's site-packages: real, messy, duplicated
(vendored copies, generated code) and written by nobody for us. It is sampled by whole top-level
package, in an order fixed by a hash of the name, up to `corpus_mb` (so a package's own duplicates
stay together). `nanoseek data prepare` turns it into four datasets with the clean set's tokenizer:
raw (no curation), dedup only (exact + MinHash near-duplicates), quality only (the quality
filters), and curated (both, prepare's default). Each dataset's own val split is replaced by the
clean held-out set's (`data`, the standard library val split), so every run is judged on the same
tokens. The same model trains `steps` steps with each seed on each dataset; reported per variant:
the final val loss (mean ± sd), its gap to curated's at equal tokens, and the tokens it needed to
reach curated's final loss (interpolated; "not reached" when it never did).

Writes data.json, data.md and data.png into `out`; the datasets under out/datasets/, the runs
under out/runs/. A rerun reuses prepared datasets and finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

from nanoseek.io import atomic_path, atomic_write
from nanoseek.train.compare import flops_to_reach
from nanoseek.train.plot import save_png
from nanoseek.train.runs import curve_of, experiment_run, run_many

VARIANTS = ("raw", "dedup", "quality", "curated")  # curation stages on: (dedup, quality)
STAGES = {"raw": (False, False), "dedup": (True, False), "quality": (False, True), "curated": (True, True)}


@dataclass
class DataExperimentConfig:
    data: str = "runs/data"  # the clean held-out set (its val split) and the tokenizer every dataset uses
    out: str = "runs/compare/data"
    corpus: str = ""  # folder of the raw corpus; "": this Python's site-packages
    corpus_mb: float = 24.0
    model_config: str = "configs/compare-mla-moe.json"
    steps: int = 96
    seeds: int = 3
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    warmup_fraction: float = 0.1
    evals: int = 4
    eval_batches: int = 8
    threads: int = 0
    workers: int = 1  # runs trained at once, each in its own process (runs.run_many)
    peak_flops: float = 1e11
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "seeds", "batch_size", "seq_len", "evals", "eval_batches", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.corpus_mb <= 0:
            raise ValueError(f"corpus_mb={self.corpus_mb} must be > 0")


# ---------------------------------------------------------------------- the corpus and the datasets
def corpus_root(cfg: DataExperimentConfig) -> Path:
    root = Path(cfg.corpus) if cfg.corpus else Path(sysconfig.get_paths()["purelib"])
    if not root.is_dir():
        raise FileNotFoundError(f"raw corpus folder {root} does not exist")
    return root


def sample_py_files(root: Path, max_bytes: int) -> list[Path]:
    """The .py files of whole top-level entries of `root`, in an order fixed by a hash of each name,
    until max_bytes is reached (the entry that crosses it is left out unless it is the first)."""
    def order(p: Path) -> str:
        return hashlib.blake2b(p.name.encode(), digest_size=8).hexdigest()

    chosen, total = [], 0
    for entry in sorted(root.iterdir(), key=order):
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        files = sorted(p for p in ([entry] if entry.is_file() else entry.rglob("*.py"))
                       if p.suffix == ".py" and p.is_file() and "__pycache__" not in p.parts)
        size = sum(p.stat().st_size for p in files)
        if not files or (chosen and total + size > max_bytes):
            continue
        chosen += files
        total += size
        if total >= max_bytes:
            break
    if not chosen:
        raise ValueError(f"no .py files under {root}")
    return chosen


def write_corpus(files: list[Path], root: Path, path: Path) -> dict:
    """The sampled files as one JSONL corpus ({"text", "path"} per file; prepare reads it with unique
    record ids, which same-named files such as __init__.py would not have); files that are not
    UTF-8 are left out and counted."""
    lines, skipped, nbytes = [], 0, 0
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        nbytes += len(text.encode("utf-8"))
        lines.append(json.dumps({"text": text, "path": str(f.relative_to(root))}))
    atomic_write(path, "\n".join(lines) + "\n")
    return {"files": len(lines), "bytes": nbytes, "not_utf8": skipped}


def curation_for(dedup: bool, quality: bool):
    """prepare's CurationConfig with each stage on or off (off: every threshold that can never trigger)."""
    from nanoseek.data.curate import CurationConfig

    base = CurationConfig(exact_dedup=dedup, near_dedup=dedup)
    if quality:
        return base
    return CurationConfig(exact_dedup=dedup, near_dedup=dedup, min_chars=0, max_line_chars=1 << 30,
                          max_mean_line_chars=float("inf"), min_alnum_fraction=0.0,
                          max_dup_line_fraction=1.0, autogen_header_lines=0)


def use_clean_val(dataset: Path, clean: Path, source: str = "") -> None:
    """Replace `dataset`'s val split by `clean`'s (same tokenizer), so every run is judged on it;
    `source` (what the train split was made from) is recorded beside it in meta.json."""
    from nanoseek.data.shards import read_meta, write_meta

    meta, clean_meta = read_meta(dataset), read_meta(clean)
    if meta["vocab_size"] != clean_meta["vocab_size"] or meta["dtype"] != clean_meta["dtype"]:
        raise ValueError(f"{dataset} and {clean} do not share a tokenizer")
    for shard in meta["splits"]["val"]["shards"]:
        (dataset / shard["file"]).unlink(missing_ok=True)
    for shard in clean_meta["splits"]["val"]["shards"]:
        with atomic_path(dataset / shard["file"]) as tmp:
            shutil.copyfile(clean / shard["file"], tmp)
    meta["splits"]["val"] = clean_meta["splits"]["val"]
    meta["val_source"], meta["train_source"] = str(clean), source
    write_meta(dataset, {k: v for k, v in meta.items() if k != "format"})


def prepare_datasets(cfg: DataExperimentConfig) -> dict[str, dict]:
    """The four datasets (prepared once; a finished one is reused); {variant: prepare's curation report}."""
    from nanoseek.data.prepare import prepare
    from nanoseek.data.shards import ShardError, read_meta

    clean = Path(cfg.data)
    read_meta(clean)  # a missing or broken clean set fails before any work
    root = corpus_root(cfg)
    files = sample_py_files(root, int(cfg.corpus_mb * 2 ** 20))
    corpus = Path(cfg.out) / "corpus.jsonl"
    facts = write_corpus(files, root, corpus)  # rewritten each time: cheap, and the same files give the same bytes
    reports = {}
    for variant in VARIANTS:
        out = Path(cfg.out) / "datasets" / variant
        source = f"{root}: {facts['files']} files, {facts['bytes']} bytes, {variant}"
        try:
            meta = read_meta(out)
            if (meta.get("val_source"), meta.get("train_source")) == (str(clean), source):
                reports[variant] = json.loads((out / "report.json").read_text())["curation"]
                continue
        except (ShardError, FileNotFoundError, KeyError):
            pass
        report = prepare([str(corpus)], out, tokenizer=clean / "tokenizer.json",
                         curation=curation_for(*STAGES[variant]), progress=cfg.progress)
        use_clean_val(out, clean, source)
        reports[variant] = report["curation"]
    return {"root": str(root), **facts, "reports": reports}


# ---------------------------------------------------------------------- pure pieces
def _mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(curves: dict[str, list[list[tuple[int, float]]]]) -> dict:
    """curves[variant][seed] = [(tokens, val loss)] -> per variant: final loss, gap to curated at
    equal tokens, tokens to reach curated's final loss (per seed, then mean ± sd). Pure."""
    rows = {}
    for variant, runs in curves.items():
        finals = [c[-1][1] for c in runs]
        gaps = [c[-1][1] - curves["curated"][s][-1][1] for s, c in enumerate(runs)]
        reach = [flops_to_reach(c, curves["curated"][s][-1][1]) for s, c in enumerate(runs)]
        got = [r / curves["curated"][s][-1][0] for s, r in enumerate(reach) if r is not None]
        rows[variant] = {"final_loss": _mean_sd(finals), "finals": finals, "loss_gap": _mean_sd(gaps),
                         "tokens_to_reach_curated": reach, "tokens_ratio": _mean_sd(got),
                         "reached_in": len(got), "seeds": len(runs)}
    return {"rows": rows}


def markdown(result: dict) -> str:
    cols = ["training data", "docs kept", "MB kept", "final val loss (stdlib)",
            "gap to curated", "tokens to reach curated's final loss"]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for variant, r in result["rows"].items():
        kept = result["datasets"]["reports"][variant]["kept"]
        m, sd = r["final_loss"]
        g, gsd = r["loss_gap"]
        t, tsd = r["tokens_ratio"]
        reach = f"{t:.2f}x ± {tsd:.2f} ({r['reached_in']}/{r['seeds']} seeds)" if t is not None else "not reached"
        lines.append(f"| {variant} | {kept['docs']:,} | {kept['bytes'] / 2 ** 20:.1f} | {m:.3f} ± {sd:.3f} | "
                     f"{g:+.3f} ± {gsd:.3f} | {reach} |")
    c = result["config"]
    lines += ["", f"{c['steps']} steps of {c['batch_size']} x {c['seq_len']} tokens per run, {c['seeds']} seeds, "
                  f"model {c['model_config']}; raw corpus: {result['datasets']['files']:,} .py files, "
                  f"{result['datasets']['bytes'] / 2 ** 20:.1f} MB from {result['datasets']['root']}; "
                  f"val: the clean set's val split ({c['data']})."]
    return "\n".join(lines) + "\n"


def plot(result: dict, curves: dict[str, list[list[tuple[int, float]]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {"raw": "tab:red", "dedup": "tab:orange", "quality": "tab:purple", "curated": "tab:green"}
    for variant, runs in curves.items():
        r = result["rows"][variant]
        label = f"{variant}: final {r['final_loss'][0]:.3f} ± {r['final_loss'][1]:.3f}"
        for i, c in enumerate(runs):
            ax.plot(*zip(*c), "o-", ms=3, lw=1, alpha=0.7, color=colors.get(variant), label=label if i == 0 else None)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val cross-entropy on the stdlib val split (nats/token)")
    ax.set_title("the same model and steps on site-packages code: raw vs each curation stage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return save_png(fig, path)


# ---------------------------------------------------------------------- the runs
def train_configs(cfg: DataExperimentConfig) -> dict:
    runs = {}
    for seed in range(cfg.seeds):  # seed-major, as in sweep.py
        for variant in VARIANTS:
            runs[(variant, seed)] = experiment_run(
                cfg, model_config=cfg.model_config, data=Path(cfg.out) / "datasets" / variant,
                out=Path(cfg.out) / "runs" / f"{variant}-s{seed}", seed=seed, steps=cfg.steps,
                warmup_steps=round(cfg.warmup_fraction * cfg.steps))
    return runs


def data_experiment(cfg: DataExperimentConfig) -> dict:
    """Prepare the datasets, train every run (or reuse it), write data.{json,md,png}; returns the result."""
    cfg.validate()
    if not Path(cfg.model_config).is_file():
        raise FileNotFoundError(f"model config {cfg.model_config} does not exist")
    datasets = prepare_datasets(cfg)
    runs = train_configs(cfg)
    wall = run_many(runs, progress=cfg.progress, workers=cfg.workers, desc="data")
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    for (variant, _), tcfg in sorted(runs.items(), key=lambda kv: (VARIANTS.index(kv[0][0]), kv[0][1])):
        curves.setdefault(variant, []).append([(t, v) for _, t, v in curve_of(tcfg.out)])
    result = summarize(curves)
    result.update(config=asdict(cfg), datasets=datasets, wall_s=wall, curves=curves)
    out = Path(cfg.out)
    atomic_write(out / "data.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / "data.md", markdown(result))
    plot(result, curves, out / "data.png")
    return result
