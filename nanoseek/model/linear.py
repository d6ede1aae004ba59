"""The one dispatch point for every projection: y = x @ W^T (+ b), with the kernel chosen per host.

    y = linear(x, weight, bias)           # x [..., in], weight [out, in] (or a quantised weight)
    report = tune(model, max_rows=16)     # time every kernel on the model's shapes, keep the fastest
    print(format_report(report))

A weight is a plain tensor (kind "dense") or an object with a `kind` attribute (e.g. "int8"); each
kind registers its kernels in KERNELS[kind] = {name: fn(x2 [rows, in], weight, bias) -> [rows, out]},
the first one being the reference that is used wherever nothing was measured. For few rows (decode)
the fastest kernel depends on the host: on one CPU computing (W @ x^T)^T streamed W 3.5x faster
than F.linear, on another it was 3.5x slower. So nothing is assumed: `tune` times each kernel on
the actual shapes and row counts at engine start, caches the choice per host (CPU model, flags,
torch version, threads) on disk, and `linear` looks it up in a table keyed by
(kind, rows class, out, in). Training (grad enabled), non-CPU devices and more than MAX_ROWS rows
always take the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.io import atomic_write
from nanoseek.model import cpu_kernels, quant

MAX_ROWS = 16  # above this many rows dense weights take F.linear (BLAS GEMM), untimed
# quantised kinds above MAX_ROWS (prefill): rows up to 64 take the choice measured at 64, more take the
# one measured at 256 (on an AVX2 host the fused bf16 ops win at 64 rows, dequantise + fp32 GEMM at 256)
MANY_CLASSES = (64, 256)
# kernels that dequantise the whole weight per call are not candidates above this many weights: a
# V2-Lite lm_head (210M) would need 0.8 GB of fp32 per call, and it never wins there anyway
DEQUANT_MAX_NUMEL = 1 << 26
ROW_CLASSES = (1, 2, 4, 8, 16)  # rows are rounded up to one of these to look a choice up
ROUNDS = 4  # timing rounds per shape, kernels interleaved; the best of all rounds counts
ROW_MAJOR_KERNELS = ("gemv",)  # dense kernels that need row-major weights (others take either layout)

Kernel = Callable[[torch.Tensor, object, "torch.Tensor | None"], torch.Tensor]


def _dense_reference(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x2, weight, bias)


def _dense_small_rows(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(W @ x^T)^T: streams W row-major (a GEMM with N = rows). One row is padded to two, because the
    one-column product takes the same GEMV path as F.linear."""
    rows = x2.shape[0]
    if rows == 1:
        x2 = torch.cat([x2, x2.new_zeros(1, x2.shape[1])])
    y = (weight @ x2.t()).t()[:rows]  # [rows, out]
    return y if bias is None else y + bias


# kind -> {kernel name: fn}; the first entry of each kind is its reference. "gemv" (nanoseek's C++
# kernel, cpu_kernels.gemv) joins the dense kernels in `tune` where it builds on this host.
KERNELS: dict[str, dict[str, Kernel]] = {
    "dense": {"F.linear": _dense_reference, "small_rows": _dense_small_rows},
    # weight-only quantised (quant.QuantWeight): "auto" (first, so it also serves > MAX_ROWS rows) is
    # torch's fused op where one exists for the device, dtype and layout, else "dequant", the
    # reference (dequantise the weight, then F.linear); tune measures all of them.
    "int8": {"auto": quant.auto_linear, "dequant": quant.dequant_linear, "int8pack": quant.int8pack_linear,
             "dequant_f32": quant.dequant_f32_linear},
    "int4": {"auto": quant.auto_linear, "dequant": quant.dequant_linear, "int4pack": quant.int4pack_linear,
             "dequant_f32": quant.dequant_f32_linear},
}


def register_cpu_kernels() -> bool:
    """Make nanoseek's C++ kernels candidates where they build on this host (cpu_kernels.load:
    compiled on first use); False where they cannot, and only torch's kernels remain."""
    if not cpu_kernels.load():
        return False
    KERNELS["dense"].setdefault("gemv", cpu_kernels.gemv)
    return True


# (kind, rows class, out, in) -> kernel name: filled by `tune` (or `set_choices`), read by `linear`.
_CHOICES: dict[tuple[str, int, int, int], str] = {}


def weight_kind(weight) -> str:
    return "dense" if isinstance(weight, torch.Tensor) else weight.kind


def activation_dtype(weight) -> torch.dtype:
    """The dtype of the x a weight multiplies: its own for a tensor, `compute_dtype` for other kinds."""
    return weight.dtype if isinstance(weight, torch.Tensor) else getattr(weight, "compute_dtype", torch.float32)


def row_class(rows: int) -> int:
    for c in ROW_CLASSES:
        if rows <= c:
            return c
    return ROW_CLASSES[-1]


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., in] and weight [out, in], through the chosen kernel."""
    kind = weight_kind(weight)
    kernels = KERNELS[kind]
    out_f, in_f = weight.shape
    rows = x.numel() // in_f if in_f else 0
    name = None
    if rows > 0 and x.device.type == "cpu" and not torch.is_grad_enabled():
        if rows <= MAX_ROWS:
            name = _CHOICES.get((kind, row_class(rows), out_f, in_f))
        elif kind != "dense":  # prefill through a quantised weight
            name = _CHOICES.get((kind, MANY_CLASSES[rows > MANY_CLASSES[0]], out_f, in_f))
    fn = kernels[name] if name is not None else next(iter(kernels.values()))
    if x.dim() == 2:
        return fn(x, weight, bias)  # [rows, out]
    y = fn(x.reshape(-1, in_f), weight, bias)  # [rows, out]
    return y.reshape(*x.shape[:-1], out_f)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) that goes through `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------- measuring
def host_key() -> str:
    """What a kernel choice depends on: CPU model and flags, torch version, thread count."""
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), "x86_64"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    digest = hashlib.sha1(f"{cpu}|{flags}".encode()).hexdigest()[:12]
    return f"{cpu} [{digest}] torch {torch.__version__} threads {torch.get_num_threads()}"


def cache_path() -> Path:
    root = os.environ.get("NANOSEEK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanoseek")
    return Path(root) / "kernels.json"


def time_kernel(fn: Kernel, x2: torch.Tensor, weight, repeats: int = 8, budget_s: float = 0.05) -> float:
    """Best seconds of fn(x2, weight, None) over up to `repeats` calls (at least two; no more once
    they have taken budget_s) after a warm-up. The minimum, not the median: on a shared machine other
    processes only ever add time, never remove it."""
    with torch.inference_mode():
        t = time.perf_counter()
        fn(x2, weight, None)
        if time.perf_counter() - t < budget_s:  # a slow kernel needs no second warm-up
            fn(x2, weight, None)
        ts: list[float] = []
        while len(ts) < repeats and (len(ts) < 2 or sum(ts) < budget_s):
            t = time.perf_counter()
            fn(x2, weight, None)
            ts.append(time.perf_counter() - t)
    return min(ts)


def pick(timings: dict[str, float], kernels: dict[str, Kernel]) -> str:
    """The fastest kernel by time; the reference (first) wins ties."""
    names = list(kernels)
    return min(names, key=lambda n: (timings.get(n, float("inf")), names.index(n)))


def model_weights(model: nn.Module) -> dict[tuple[str, int, int], object]:
    """Every distinct (kind, out, in) a model's projections use, with one weight of that shape.

    Linear modules give their weight; stacked experts (3-D parameters [E, out, in]) give expert 0."""
    found: dict[tuple[str, int, int], object] = {}
    for m in model.modules():
        ws = []
        if isinstance(m, nn.Linear):
            ws.append(m.weight)
        for w in getattr(m, "dispatch_weights", lambda: [])():
            ws.append(w)
        for w in ws:
            if isinstance(w, torch.Tensor) and w.dim() != 2:
                continue
            found.setdefault((weight_kind(w), *w.shape), w)
    return found


PREFILL_ROWS = 256  # the rows a layout change must not slow down (prefill chunks)
LAYOUT_GAIN = 0.95  # column-major only where it is at least 5% faster on the decode rows


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t [..., out, in] stored "row"-major (as loaded) or "col"-major (each matrix's transpose
    contiguous): the same values, another memory order. F.linear on a column-major W multiplies by
    a contiguous W^T, which BLAS streams differently: faster for few rows on some hosts."""
    if layout == "col":
        return t if layout_of(t) == "col" else t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.contiguous()


def layout_of(t: torch.Tensor) -> str:
    return "col" if t.dim() >= 2 and t.shape[-2] > 1 and t.stride(-2) == 1 else "row"


def layout_targets(model: nn.Module):
    """(module, attribute, matrix shape) of every dense projection weight a layout applies to: Linear
    weights and stacked experts (modules listing `stacked_weight_names`, 3-D [E, out, in])."""
    for m in model.modules():
        names = ["weight"] if isinstance(m, nn.Linear) else list(getattr(m, "stacked_weight_names", ()))
        for name in names:
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor) and t.dim() in (2, 3) and not t.is_meta:
                yield m, name, tuple(t.shape[-2:])


def apply_layouts(model: nn.Module, layouts: dict[tuple[int, int], str]) -> None:
    """Lay out every dense projection weight of shape (out, in) as layouts[(out, in)] (in place)."""
    with torch.no_grad():
        for m, name, shape in layout_targets(model):
            layout = layouts.get(shape)
            p = getattr(m, name)
            if layout is not None and layout_of(p if p.dim() == 2 else p[0]) != layout:
                p.data = to_layout(p.data, layout)


def _layout_key(out_f: int, in_f: int, classes, row_kernels: dict) -> str:
    return f"dense-layout|{out_f}|{in_f}|{','.join(map(str, classes))}" + "".join(f"|{n}" for n in row_kernels)


def _choose_layout(w: torch.Tensor, out_f: int, in_f: int, classes, timer, cached: dict,
                   row_kernels: dict[str, Kernel] | None = None) -> tuple[dict, bool]:
    """Time F.linear with w row- and column-major on the decode rows classes and PREFILL_ROWS rows:
    "col" where it wins the decode rows by LAYOUT_GAIN without losing prefill. (entry, measured).
    row_kernels: kernels that need row-major weights (cpu_kernels.gemv); on the decode rows, row-major
    counts with the best of F.linear and these."""
    row_kernels = row_kernels or {}
    key = _layout_key(out_f, in_f, classes, row_kernels)
    if key in cached:
        return cached[key], False
    ref = KERNELS["dense"]["F.linear"]
    ws = {lay: to_layout(w, lay) for lay in ("row", "col")}
    us: dict[str, float] = {}
    for rows in (*classes, PREFILL_ROWS):
        x2 = torch.randn(rows, in_f).to(w.dtype)
        for lay in ws:
            us[f"{lay}@{rows}"] = min(timer(ref, x2, ws[lay]) for _ in range(ROUNDS)) * 1e6
        for name, fn in row_kernels.items() if rows != PREFILL_ROWS else ():
            us[f"{name}@{rows}"] = min(timer(fn, x2, ws["row"]) for _ in range(ROUNDS)) * 1e6
    decode = {lay: sum(min([us[f"{lay}@{r}"]] + [us[f"{n}@{r}"] for n in row_kernels if lay == "row"])
                       for r in classes) for lay in ws}
    col = (decode["col"] < LAYOUT_GAIN * decode["row"]
           and us[f"col@{PREFILL_ROWS}"] <= us[f"row@{PREFILL_ROWS}"] / LAYOUT_GAIN)
    return {"layout": "col" if col else "row", "us": us}, True


def tune(model: nn.Module, max_rows: int = MAX_ROWS, timer: Callable | None = None,
         use_cache: bool = True, layouts: bool = True) -> list[dict]:
    """Time every kernel of every weight kind on the model's shapes for each rows class up to
    max_rows, install the fastest in the dispatch table, and return one report row per choice.
    Dense weights are first laid out row- or column-major, whichever F.linear runs faster on the
    decode rows (without slowing PREFILL_ROWS rows); the model's weights are changed in place.

    Choices already cached for this host are reused (use_cache=False re-measures). `timer` is
    fn(kernel, x2, weight) -> seconds (tests inject timings through it; default time_kernel)."""
    timer = timer or time_kernel
    cached = load_host_cache() if use_cache else {}
    report, fresh = [], False
    classes = ROW_CLASSES[: ROW_CLASSES.index(row_class(max(1, max_rows))) + 1]
    chosen_layouts: dict[tuple[int, int], str] = {}
    weights = model_weights(model)
    if any(k == "dense" and getattr(w, "dtype", None) == torch.float32 for (k, _, _), w in weights.items()):
        register_cpu_kernels()
    for (kind, out_f, in_f), w in weights.items():
        kernels = KERNELS[kind]
        if isinstance(w, torch.Tensor) and w.is_meta:  # shapes only (`nanoseek info --kernels`)
            w = torch.randn(w.shape, dtype=w.dtype)
        if len(kernels) < 2 or getattr(w, "device", torch.device("cpu")).type != "cpu":
            continue
        row_only = {n: kernels[n] for n in ROW_MAJOR_KERNELS if n in kernels}
        if kind == "dense" and w.dtype != torch.float32:  # the C++ kernel is fp32 only
            kernels = {n: fn for n, fn in kernels.items() if n not in row_only}
            row_only = {}
        layout, suffix = "row", ""
        if kind == "dense" and layouts:
            entry, measured = _choose_layout(w, out_f, in_f, classes, timer, cached, row_only)
            cached[_layout_key(out_f, in_f, classes, row_only)] = entry
            fresh |= measured
            layout = chosen_layouts[(out_f, in_f)] = entry["layout"]
            w = to_layout(w, layout)
            suffix = "|col" if layout == "col" else ""
            if layout == "col":  # these need row-major weights
                kernels = {n: fn for n, fn in kernels.items() if n not in row_only}
        if kind != "dense" and out_f * in_f > DEQUANT_MAX_NUMEL:
            kernels = {n: fn for n, fn in kernels.items() if not n.startswith("dequant")}
        for rc in classes + (MANY_CLASSES if kind != "dense" else ()):
            key = f"{kind}|{rc}|{out_f}|{in_f}{suffix}"
            entry = cached.get(key)
            if entry is None or set(entry.get("us", {})) != set(kernels):  # new or changed candidates
                x2 = torch.randn(rc, in_f).to(activation_dtype(w))
                timings = {n: float("inf") for n in kernels}
                alive = dict(kernels)
                for _ in range(ROUNDS):  # interleaved, so a burst of load hits every kernel alike
                    for n, fn in alive.items():
                        timings[n] = min(timings[n], timer(fn, x2, w))
                    # a kernel 3x slower than the best after a round cannot win: stop timing it
                    alive = {n: fn for n, fn in alive.items() if timings[n] <= 3 * min(timings.values())}
                entry = {"kernel": pick(timings, kernels), "us": {n: t * 1e6 for n, t in timings.items()}}
                cached[key], fresh = entry, True
            _CHOICES[(kind, rc, out_f, in_f)] = entry["kernel"]
            report.append({"kind": kind, "rows": rc, "out": out_f, "in": in_f, **entry,
                           **({"layout": layout} if kind == "dense" else {})})
    apply_layouts(model, chosen_layouts)
    if fresh:  # re-measured choices replace the cached ones
        save_host_cache(cached)
    return report


def load_host_cache() -> dict:
    """This host's cached choices {key: {"kernel": name, "us": {name: microseconds}}} ({} if none)."""
    path = cache_path()
    try:
        return json.loads(path.read_text()).get(host_key(), {}) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def save_host_cache(entries: dict) -> None:
    """Merge entries into this host's cached choices (atomic write; a read-only home is not an error)."""
    path, host = cache_path(), host_key()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data[host] = {**data.get(host, {}), **entries}
    try:
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError:  # a read-only home only costs re-measuring next time
        pass


def set_choices(choices: dict[tuple[str, int, int, int], str]) -> None:
    """Install choices directly (tests; a caller that measured elsewhere)."""
    for key, name in choices.items():
        if name not in KERNELS[key[0]]:
            raise ValueError(f"unknown kernel {name!r} for kind {key[0]!r}; have {list(KERNELS[key[0]])}")
        _CHOICES[key] = name


def clear_choices() -> None:
    _CHOICES.clear()


def format_report(report: list[dict]) -> str:
    lines = [f"kernels on {host_key()}:",
             f"  {'kind':<7} {'rows':>4} {'weight [out, in]':>18} {'layout':>6}  chosen        timings (us)"]
    for r in report:
        times = "  ".join(f"{n} {t:.1f}" for n, t in r.get("us", {}).items())
        lines.append(f"  {r['kind']:<7} {r['rows']:>4} {str([r['out'], r['in']]):>18} {r.get('layout', ''):>6}  "
                     f"{r['kernel']:<12}  {times}")
    return "\n".join(lines)
