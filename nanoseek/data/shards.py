"""Packed token shards on disk, and the deterministic, resumable, rank-aware loader over them.

    loader = ShardLoader("runs/data", split="train", batch_size=8, seq_len=512, rank=0, world_size=1)
    x, y = next(loader)              # (B, T) int64 each; y[:, t] == x[:, t + 1] in the token stream
    state = loader.state_dict()      # small JSON-able dict: save it with the checkpoint
    loader.load_state_dict(state)    # a new loader then yields exactly the batches the old one would

Layout of a data dir (written by `nanoseek.data.prepare`):
    meta.json                     the index: dtype, vocab size, special ids, per split its shards and
                                  token counts. Written last, atomically: no meta.json, no dataset.
    train_00000.bin, ...          raw little-endian uint16 (vocab <= 65536) or uint32 token ids:
                                  documents back to back, each followed by EOS
    tokenizer.json, tokenizer_config.json

The loader cuts each shard into windows of T+1 tokens (x is the first T, y the last T), shuffles
window ids once per epoch with a generator seeded by (seed, epoch), and deals the shuffled list
round-robin to the ranks after truncating it to a multiple of world_size: ranks see disjoint
windows and the same number of batches. A resumed loader needs only (epoch, batch), so every rank's
state is the same and rank 0's may be saved for all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from nanoseek.io import atomic_write

FORMAT = "nanoseek-shards/1"
META = "meta.json"
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A data dir that is not a whole, finished `nanoseek data prepare` output."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


# ---------------------------------------------------------------------- writing
class ShardWriter:
    """Appends token arrays to `<split>_NNNNN.bin.tmp` files of `shard_tokens` tokens each.

    `finish()` renames them to their final names and returns the index entries; until then nothing
    carries a final name, so an interrupted write leaves only .tmp files that no loader reads.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, dtype: np.dtype, shard_tokens: int = 1 << 24):
        if shard_tokens < 2:
            raise ValueError(f"shard_tokens={shard_tokens} must be >= 2")
        self.out_dir, self.split, self.dtype = Path(out_dir), split, np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"} of the shards written so far
        self._file = None
        self._in_shard = 0
        self.tokens = 0
        self.docs = 0

    def _tmp(self, index: int) -> Path:
        return self.out_dir / (shard_name(self.split, index) + ".tmp")

    def add(self, tokens: np.ndarray, docs: int = 1) -> None:
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise ShardError(f"token id {int(tokens.max())} does not fit shard dtype {self.dtype}")
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.docs += docs
        while tokens.size:
            if self._file is None:
                self.shards.append({"file": shard_name(self.split, len(self.shards)), "tokens": 0})
                self._file = open(self._tmp(len(self.shards) - 1), "wb")
                self._in_shard = 0
            take = min(tokens.size, self.shard_tokens - self._in_shard)
            self._file.write(tokens[:take].astype("<" + self.dtype.str[1:], copy=False).tobytes())
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            self.tokens += take
            tokens = tokens[take:]
            if self._in_shard == self.shard_tokens:
                self._file.close()
                self._file = None

    def finish(self) -> dict:
        """Rename the shards to their final names; the split's index entry for meta.json."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for i, shard in enumerate(self.shards):
            os.replace(self._tmp(i), self.out_dir / shard["file"])
        return {"tokens": self.tokens, "docs": self.docs, "shards": self.shards}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for i in range(len(self.shards)):
            self._tmp(i).unlink(missing_ok=True)


def write_meta(out_dir: str | os.PathLike, meta: dict) -> None:
    """Write meta.json atomically: the last step of a prepare, which makes the dataset whole."""
    out = Path(out_dir)
    atomic_write(out / META, json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")


def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a finished data dir, after checking that every shard it lists is whole."""
    data_dir = Path(data_dir)
    path = data_dir / META
    if not path.is_file():
        raise ShardError(f"no {META} in {data_dir}: not a finished `nanoseek data prepare` output "
                         "(an interrupted prepare leaves none)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise ShardError(f"{path}: format={meta.get('format')!r}, expected {FORMAT!r}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, entry in meta["splits"].items():
        for shard in entry["shards"]:
            f = data_dir / shard["file"]
            want = shard["tokens"] * itemsize
            got = f.stat().st_size if f.is_file() else None
            if got != want:
                raise ShardError(f"shard {f} of split {split!r} has {got} bytes, expected {want} "
                                 f"({shard['tokens']} tokens of {meta['dtype']})")
    return meta


# ---------------------------------------------------------------------- loading
def rank_windows(n_windows: int, world_size: int, rank: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's window ids for `epoch`, in order: a seeded shuffle dealt round-robin to the ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    usable = n_windows // world_size * world_size  # equal shares: DDP ranks must step together
    return order[:usable][rank::world_size]


class ShardLoader:
    """Endless (x, y) batches of shape (B, T) from one split of a data dir; see the module docstring."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", batch_size: int = 8,
                 seq_len: int = 256, rank: int = 0, world_size: int = 1, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; expected one of {SPLITS}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        self.split, self.B, self.T = split, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        entry = self.meta["splits"].get(split, {"tokens": 0, "shards": []})
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.shards = [np.memmap(self.data_dir / s["file"], dtype=dtype, mode="r")
                       for s in entry["shards"] if s["tokens"] > 0]
        # windows of T+1 tokens never straddle shards: x and y come from one contiguous slice
        per_shard = [(len(s) - 1) // seq_len for s in self.shards]
        self._first_window = np.cumsum([0] + per_shard)  # (S + 1,)
        self.n_windows = int(self._first_window[-1])
        self.batches_per_epoch = self.n_windows // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ShardError(
                f"split {split!r} of {self.data_dir} has {entry['tokens']} tokens = {self.n_windows} windows "
                f"of seq_len+1={seq_len + 1}; one batch on each of world_size={world_size} ranks needs "
                f"batch_size*world_size={batch_size * world_size} windows: lower batch_size or seq_len, "
                "or prepare more data")
        self.epoch, self.batch = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokens(self) -> int:
        return int(self.meta["splits"][self.split]["tokens"])

    def __iter__(self) -> "ShardLoader":
        return self

    def _window(self, w: int) -> np.ndarray:
        s = int(np.searchsorted(self._first_window, w, side="right")) - 1
        start = (w - int(self._first_window[s])) * self.T
        return self.shards[s][start: start + self.T + 1]  # (T + 1,)

    def __next__(self):
        import torch

        if self._order_epoch != self.epoch:
            self._order = rank_windows(self.n_windows, self.world_size, self.rank, self.seed, self.epoch)
            self._order_epoch = self.epoch
        ids = self._order[self.batch * self.B: (self.batch + 1) * self.B]
        buf = np.stack([self._window(int(w)) for w in ids]).astype(np.int64)  # (B, T + 1)
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        buf = torch.from_numpy(buf)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # x (B, T), y (B, T)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "split": self.split,
                "batch_size": self.B, "seq_len": self.T, "world_size": self.world_size,
                "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`; refuses a state from a loader that would cut or deal the data differently."""
        mine = self.state_dict()
        for key in ("seed", "split", "batch_size", "seq_len", "world_size", "n_windows"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has "
                                 f"{key}={mine[key]!r}; resuming would not replay the same batches")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"loader state epoch={epoch}, batch={batch} is out of range "
                             f"(batches_per_epoch={self.batches_per_epoch})")
        self.epoch, self.batch = epoch, batch
