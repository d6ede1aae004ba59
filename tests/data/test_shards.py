from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nanoseek.data.shards import (ShardError, ShardLoader, ShardWriter, rank_windows, read_meta, token_dtype,
                                  write_meta)


def make_data_dir(path, train_tokens=10_000, val_tokens=500, shard_tokens=3000, dtype=np.uint16):
    """Token i of a split is i (mod dtype range): every window says where it came from."""
    path.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        w = ShardWriter(path, split, np.dtype(dtype), shard_tokens)
        ids = np.arange(n, dtype=np.int64) % np.iinfo(dtype).max
        for chunk in np.array_split(ids, 7):  # uneven appends across shard boundaries
            w.add(chunk, docs=1)
        splits[split] = w.finish()
    write_meta(path, {"dtype": np.dtype(dtype).name, "vocab_size": 50_000, "splits": splits})
    return path


def collect(loader, n):
    return [next(loader) for _ in range(n)]


def test_writer_rotates_shards_and_index_adds_up(tmp_path):
    d = make_data_dir(tmp_path / "d")
    meta = read_meta(d)
    shards = meta["splits"]["train"]["shards"]
    assert [s["tokens"] for s in shards] == [3000, 3000, 3000, 1000]
    assert meta["splits"]["train"]["tokens"] == 10_000 and meta["splits"]["train"]["docs"] == 7
    back = np.concatenate([np.fromfile(d / s["file"], dtype="<u2") for s in shards])
    assert np.array_equal(back, np.arange(10_000))
    assert not list(d.glob("*.tmp"))


def test_token_dtype_by_vocab():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    assert token_dtype(102400) == np.uint32


def test_uint32_shards_and_out_of_range_ids(tmp_path):
    d = make_data_dir(tmp_path / "d", dtype=np.uint32)
    x, y = next(ShardLoader(d, batch_size=2, seq_len=16))
    assert x.dtype == torch.int64
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint16))
    with pytest.raises(ShardError, match="token id 70000"):
        w.add(np.array([1, 70000]))
    w.abort()


def test_batches_are_shifted_windows(tmp_path):
    d = make_data_dir(tmp_path / "d")
    loader = ShardLoader(d, batch_size=4, seq_len=32)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # consecutive ids: never straddles a shard
    assert torch.all(x[:, 0] % 3000 % 32 == 0)  # windows start at multiples of T within their shard


def test_an_epoch_covers_each_window_once_and_epochs_reshuffle(tmp_path):
    d = make_data_dir(tmp_path / "d")
    loader = ShardLoader(d, batch_size=2, seq_len=32)
    assert loader.n_windows == 3 * (2999 // 32) + 999 // 32 == 310
    bpe = loader.batches_per_epoch
    first = torch.cat([x[:, 0] for x, _ in collect(loader, bpe)])
    second = torch.cat([x[:, 0] for x, _ in collect(loader, bpe)])
    assert loader.epoch == 2 and loader.batch == 0
    assert len(set(first.tolist())) == len(first) == 310
    assert sorted(first.tolist()) == sorted(second.tolist()) and not torch.equal(first, second)


def test_same_seed_same_batches_other_seed_other_order(tmp_path):
    d = make_data_dir(tmp_path / "d")
    a = collect(ShardLoader(d, batch_size=4, seq_len=32, seed=1), 5)
    b = collect(ShardLoader(d, batch_size=4, seq_len=32, seed=1), 5)
    c = collect(ShardLoader(d, batch_size=4, seq_len=32, seed=2), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


@pytest.mark.parametrize("stop_at", [0, 3, 18, 40])  # 18 batches per epoch: 18 and 40 resume after an epoch
def test_resume_replays_exactly(tmp_path, stop_at):
    d = make_data_dir(tmp_path / "d")
    kw = dict(batch_size=4, seq_len=128, seed=7)
    full = collect(ShardLoader(d, **kw), stop_at + 10)
    first = ShardLoader(d, **kw)
    collect(first, stop_at)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = ShardLoader(d, **kw)
    resumed.load_state_dict(state)
    for (x, y), (fx, fy) in zip(collect(resumed, 10), full[stop_at:]):
        assert torch.equal(x, fx) and torch.equal(y, fy)


def test_resume_rejects_a_different_cut(tmp_path):
    d = make_data_dir(tmp_path / "d")
    state = ShardLoader(d, batch_size=4, seq_len=32).state_dict()
    with pytest.raises(ValueError, match="seq_len=32"):
        ShardLoader(d, batch_size=4, seq_len=64).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        ShardLoader(d, batch_size=4, seq_len=32, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        ShardLoader(d, batch_size=4, seq_len=32).load_state_dict({**state, "batch": 10_000})


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_equal_shares(tmp_path, world_size):
    d = make_data_dir(tmp_path / "d")
    loaders = [ShardLoader(d, batch_size=2, seq_len=32, rank=r, world_size=world_size, seed=3)
               for r in range(world_size)]
    bpe = loaders[0].batches_per_epoch
    assert all(ld.batches_per_epoch == bpe for ld in loaders)
    seen = [set(torch.cat([x[:, 0] for x, _ in collect(ld, bpe)]).tolist()) for ld in loaders]
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not seen[i] & seen[j]
    assert sum(map(len, seen)) == bpe * 2 * world_size


def test_rank_windows_partition():
    parts = [rank_windows(103, 4, r, seed=0, epoch=5) for r in range(4)]
    allw = np.concatenate(parts)
    assert len(allw) == 100 and len(set(allw.tolist())) == 100
    with pytest.raises(ValueError, match="rank=4"):
        rank_windows(10, 4, 4, 0, 0)


def test_val_split_and_too_small_split(tmp_path):
    d = make_data_dir(tmp_path / "d")
    x, _ = next(ShardLoader(d, split="val", batch_size=2, seq_len=32))
    assert int(x.max()) < 500
    with pytest.raises(ShardError, match="split 'val'.*500 tokens"):
        ShardLoader(d, split="val", batch_size=8, seq_len=128)
    with pytest.raises(ValueError, match="split='test'"):
        ShardLoader(d, split="test")


def test_loader_refuses_unfinished_or_damaged_dirs(tmp_path):
    d = make_data_dir(tmp_path / "d")
    shard = d / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # a torn write
    with pytest.raises(ShardError, match="train_00001.bin.*5998 bytes, expected 6000"):
        ShardLoader(d)
    (d / "meta.json").unlink()
    with pytest.raises(ShardError, match="no meta.json"):
        ShardLoader(d)


def test_aborted_writer_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=100)
    w.add(np.arange(250))
    assert len(list(tmp_path.glob("*.tmp"))) == 3 and not list(tmp_path.glob("*.bin"))
    w.abort()
    assert not list(tmp_path.iterdir())
