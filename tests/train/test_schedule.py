import math

import pytest

from nanoseek.train.schedule import lr_at


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    kw = dict(max_lr=1.0, warmup=4, total=20, min_ratio=0.1)
    assert [lr_at(s, "cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, "cosine", **kw) == pytest.approx(1.0)
    assert lr_at(12, "cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_at(20, "cosine", **kw) == pytest.approx(0.1)
    assert lr_at(100, "cosine", **kw) == pytest.approx(0.1)
    after = [lr_at(s, "cosine", **kw) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_wsd_holds_then_decays_linearly_over_the_last_fraction():
    kw = dict(max_lr=2.0, warmup=2, total=10, min_ratio=0.0, decay_fraction=0.4)
    lrs = [lr_at(s, "wsd", **kw) for s in range(11)]
    assert lrs[:2] == [1.0, 2.0]
    assert lrs[2:6] == [2.0] * 4  # stable until step 6 = 10 - 0.4 * 10
    assert lrs[6:] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])


def test_constant_and_errors():
    assert lr_at(50, "constant", max_lr=0.3, warmup=10, total=20) == 0.3
    with pytest.raises(ValueError, match="schedule='linear'"):
        lr_at(0, "linear", max_lr=1.0, warmup=0, total=10)
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, "cosine", max_lr=1.0, warmup=0, total=10)
    assert math.isclose(lr_at(0, "cosine", max_lr=1.0, warmup=0, total=10), 1.0)
