"""SamplingParams (vLLM's names) and sampling as pure functions over a batch of logits [B, V].

    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, seed=1)
    gens = [make_generator(p.seed) for p in batch_params]       # one per request, kept across steps
    out = sample(logits, batch_params, prompt_ids, output_ids, gens, eos_token_ids=[2])
    out.token_ids                                               # [B] next tokens

Each row has its own params. The pipeline, row by row: min_tokens (EOS and stop ids masked while too
few tokens), repetition/frequency/presence penalties, then greedy argmax when temperature == 0, else
temperature, top_k, top_p, min_p and a draw. A seeded request draws from its own torch.Generator and
only for its own row, so its tokens do not depend on which other requests share the batch.

Logprobs follow vLLM's default and OpenAI: the log-softmax of the model's raw logits, before
penalties, temperature and filters, so they describe the model and not the sampling settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from nanoseek.engine.structured import StructuredOutputs

MAX_LOGPROBS = 20       # OpenAI's cap on top_logprobs
GREEDY_BELOW = 1e-5     # temperatures under this are greedy: dividing by them overflows
TOP_P_CANDIDATES = 256  # top_p looks at this many best tokens first, sorting all only if needed


class SamplingParamsError(ValueError):
    """A sampling value outside its allowed range; `param` names the field (e.g. "top_p")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1              # -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # number of top logprobs per token; 0: only the chosen token's
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None   # a grammar the output must follow

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, param: str, msg: str) -> None:
            if not ok:
                raise SamplingParamsError(msg, param)

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        need(is_int(self.n) and self.n >= 1, "n", f"n={self.n!r} must be an integer >= 1")
        need(is_real(self.temperature) and self.temperature >= 0,
             "temperature", f"temperature={self.temperature!r} must be a finite number >= 0 (0 is greedy)")
        need(is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", f"top_p={self.top_p!r} must be in (0, 1]")
        need(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
             "top_k", f"top_k={self.top_k!r} must be -1 (off) or an integer >= 1")
        need(is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"min_p={self.min_p!r} must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            need(is_real(v) and -2 <= v <= 2, name, f"{name}={v!r} must be in [-2, 2]")
        need(is_real(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty", f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1 is off)")
        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
             "max_tokens", f"max_tokens={self.max_tokens!r} must be an integer >= 1 or None")
        need(is_int(self.min_tokens) and self.min_tokens >= 0,
             "min_tokens", f"min_tokens={self.min_tokens!r} must be an integer >= 0")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "min_tokens", f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        need(all(isinstance(s, str) and s for s in self.stop),
             "stop", f"stop={self.stop!r} must be a list of non-empty strings")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids", f"stop_token_ids={self.stop_token_ids!r} must be a list of token ids >= 0")
        need(self.seed is None or (is_int(self.seed) and -2 ** 63 <= self.seed < 2 ** 64), "seed",
             f"seed={self.seed!r} must be an integer in [-2**63, 2**64) (a torch.Generator seed) or None")
        need(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
             "structured_outputs", f"structured_outputs={self.structured_outputs!r} must be a "
             "StructuredOutputs or None")
        need(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             "logprobs", f"logprobs={self.logprobs!r} must be None or an integer in [0, {MAX_LOGPROBS}]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing to apply before the choice (penalties, a grammar) and nothing to return
        but the token (no logprobs): the argmax of the raw logits, once min_tokens is met."""
        return (self.temperature < GREEDY_BELOW and self.logprobs is None and self.structured_outputs is None
                and not self.presence_penalty and not self.frequency_penalty and self.repetition_penalty == 1.0)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                    # [B] long
    logprobs: torch.Tensor | None = None       # [B] raw logprob of each chosen token
    top_token_ids: torch.Tensor | None = None  # [B, k] k = the largest `logprobs` asked in the batch
    top_logprobs: torch.Tensor | None = None   # [B, k]


def make_generator(seed: int | None) -> torch.Generator | None:
    """A request's own random stream; None uses torch's global one."""
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------------- pure building blocks
def apply_penalties(logits: torch.Tensor, prompt_ids: Sequence[Sequence[int]],
                    output_ids: Sequence[Sequence[int]], presence: Sequence[float],
                    frequency: Sequence[float], repetition: Sequence[float]) -> torch.Tensor:
    """logits [B, V]; per row: its prompt and output token ids and three penalties.

    Repetition (CTRL/HF): tokens seen in prompt or output are made less likely, dividing a positive
    logit and multiplying a negative one. Frequency and presence (OpenAI): subtract
    frequency * count + presence from each token of the output (prompt tokens are not counted).
    Only the columns of tokens that occur are touched: the cost follows the tokens seen, not V.
    """
    logits = logits.clone()
    dev = logits.device
    for row in range(logits.shape[0]):
        p, f, r = float(presence[row]), float(frequency[row]), float(repetition[row])
        out = torch.as_tensor(list(output_ids[row]), dtype=torch.long).to(dev)
        if r != 1.0:
            seen = torch.cat([torch.as_tensor(list(prompt_ids[row]), dtype=torch.long).to(dev), out]).unique()
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / r, vals * r)
        if (p or f) and len(out):
            ids, counts = out.unique(return_counts=True)
            logits[row, ids] -= f * counts.to(logits.dtype) + p
    return logits


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits [B, V] / temperature [B]; greedy rows (below GREEDY_BELOW) are left as they are."""
    t = torch.where(temperature < GREEDY_BELOW, torch.ones_like(temperature), temperature)
    return logits / t[:, None]


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k [B] logits (-1 or >= V: all); ties at the k-th value are kept."""
    V = logits.shape[-1]
    active = (top_k >= 1) & (top_k < V)
    if not bool(active.any()):
        return logits
    k = torch.where(active, top_k, torch.ones_like(top_k))
    k_max = int(k.max())
    top_vals = logits.topk(k_max, dim=-1).values                 # [B, k_max], descending
    kth = top_vals.gather(1, (k - 1)[:, None])                   # [B, 1]
    kth = torch.where(active[:, None], kth, torch.full_like(kth, -math.inf))
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p [B] (nucleus)."""
    active = top_p < 1
    if not bool(active.any()):
        return logits
    probs = logits.softmax(dim=-1)
    V = probs.shape[-1]
    # A nucleus is usually a few tokens: if the top TOP_P_CANDIDATES already reach top_p in every
    # row, the answer lies among them and a full sort of the vocabulary is not needed.
    vals, order = probs.topk(min(V, TOP_P_CANDIDATES), dim=-1)          # [B, k] descending
    if vals.shape[-1] < V and not bool((vals.sum(dim=-1) >= top_p)[active].all()):
        vals, order = probs.sort(dim=-1, descending=True)               # [B, V]
    mass_before = vals.cumsum(dim=-1) - vals
    keep_sorted = (mass_before < top_p[:, None]) | ~active[:, None]     # the top token always stays
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, keep_sorted)
    keep |= ~active[:, None]
    return logits.masked_fill(~keep, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p [B] times the row's most likely token."""
    active = min_p > 0
    if not bool(active.any()):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill((probs < threshold) & active[:, None], -math.inf)


def random_sample(probs: torch.Tensor,
                  generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Draw one token per row of probs [B, V] by inverting its CDF at one uniform number.

    A seeded row takes its uniform from its own generator only (one number per step), so its draws
    do not depend on the other rows. probs need not be normalised; zero entries are never drawn.
    """
    B, V = probs.shape
    u = torch.empty(B, 1, dtype=torch.float64)                        # [B, 1], drawn on the host
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), 1, dtype=torch.float64)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, generator=g, dtype=torch.float64)
    u = u.to(probs.device)
    cdf = probs.to(torch.float64).cumsum(dim=-1)                       # [B, V]
    total = cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=V - 1)


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Structured output: logits [B, V] set to -inf where allowed [B, V] (bool) is False."""
    if allowed is None:
        return logits
    if allowed.shape != logits.shape:
        raise ValueError(f"allowed-token mask has shape {tuple(allowed.shape)}, logits {tuple(logits.shape)}")
    return logits.masked_fill(~allowed.to(logits.device), -math.inf)


def mask_tokens(logits: torch.Tensor, rows_to_ids: dict[int, list[int]]) -> torch.Tensor:
    """Set logits[row, ids] to -inf for each row in rows_to_ids."""
    if not rows_to_ids:
        return logits
    logits = logits.clone()
    V = logits.shape[-1]
    for row, ids in rows_to_ids.items():
        ids = [t for t in ids if 0 <= t < V]
        if ids:
            logits[row, ids] = -math.inf
    return logits


# ---------------------------------------------------------------------- the batch sampler
def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
           generators: Sequence[torch.Generator | None] | None = None,
           eos_token_ids: Sequence[int] = (), allowed: torch.Tensor | None = None) -> SamplerOutput:
    """Next token for each row of logits [B, V] under that row's params, on the logits' device.

    prompt_ids / output_ids: each row's prompt and generated tokens (for penalties and min_tokens).
    generators: one per row (None for unseeded rows); the caller keeps each request's generator
    across steps so a seeded request continues its own stream.
    allowed [B, V] bool: the tokens each row may take (structured output's token bitmask, applied
    after penalties, just before the choice); None: every token.
    """
    B, V = logits.shape
    for name, xs in (("params", params), ("prompt_ids", prompt_ids), ("output_ids", output_ids)):
        if len(xs) != B:
            raise ValueError(f"{name} has {len(xs)} rows, logits have {B}")
    generators = list(generators) if generators is not None else [None] * B
    if len(generators) != B:
        raise ValueError(f"generators has {len(generators)} rows, logits have {B}")
    raw = logits.float()
    x = raw

    banned = {}  # min_tokens: neither EOS nor stop ids may end the output too early
    for i, p in enumerate(params):
        if len(output_ids[i]) < p.min_tokens:
            banned[i] = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
    unbanned = x
    x = mask_tokens(x, banned)

    if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
        x = apply_penalties(x, prompt_ids, output_ids, [p.presence_penalty for p in params],
                            [p.frequency_penalty for p in params],
                            [p.repetition_penalty for p in params])

    if allowed is not None:
        y = apply_allowed(x, allowed)
        if banned:  # the grammar outranks min_tokens: a row it leaves no token keeps its grammar's
            empty = torch.isneginf(y).all(dim=-1)
            y[empty] = apply_allowed(unbanned, allowed)[empty]
        x = y
    token_ids = x.argmax(dim=-1)
    rand_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if rand_rows:
        sub = [params[i] for i in rand_rows]
        y = x[rand_rows]                                                   # [b, V]
        dev = y.device
        y = apply_temperature(y, torch.tensor([float(p.temperature) for p in sub], device=dev))
        y = apply_top_k(y, torch.tensor([p.top_k for p in sub], device=dev))
        y = apply_top_p(y, torch.tensor([float(p.top_p) for p in sub], device=dev))
        y = apply_min_p(y, torch.tensor([float(p.min_p) for p in sub], device=dev))
        token_ids[rand_rows] = random_sample(y.softmax(dim=-1), [generators[i] for i in rand_rows])

    out = SamplerOutput(token_ids=token_ids)
    asked = [p.logprobs for p in params if p.logprobs is not None]
    if asked:
        logp = raw.log_softmax(dim=-1)                                     # [B, V]
        out.logprobs = logp.gather(1, token_ids[:, None]).squeeze(1)
        k = max(asked)
        if k > 0:
            out.top_logprobs, out.top_token_ids = logp.topk(min(k, V), dim=-1)
    return out
