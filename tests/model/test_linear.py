"""The projection dispatch: every kernel equals F.linear, and the measured faster kernel is the one used."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model import linear as lin


@pytest.fixture(autouse=True)
def fresh_table(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path / "cache"))
    lin.clear_choices()
    yield
    lin.clear_choices()


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 40])
@pytest.mark.parametrize("name", list(lin.KERNELS["dense"]))
def test_every_dense_kernel_equals_f_linear(name, rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 48, generator=g), torch.randn(24, 48, generator=g), torch.randn(24, generator=g)
    for key in [("dense", lin.row_class(rows), 24, 48)]:
        lin.set_choices({key: name})
    with torch.inference_mode():
        got = lin.linear(x.view(1, rows, 48), w, b)
        direct = lin.KERNELS["dense"][name](x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b).view(1, rows, 24), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(direct, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


class ProbeWeight:
    """A non-tensor weight kind, as a quantised weight would be: shape, kind, and its own kernels."""

    kind = "probe"

    def __init__(self, w):
        self.w, self.shape = w, w.shape


def _calls_recorder(calls, name):
    def fn(x2, weight, bias):
        calls.append(name)
        return F.linear(x2, weight.w, bias)
    return fn


def test_injected_timings_the_slower_kernel_is_never_taken(monkeypatch):
    calls = []
    monkeypatch.setitem(lin.KERNELS, "probe", {"ref": _calls_recorder(calls, "ref"),
                                               "fast": _calls_recorder(calls, "fast")})

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 16)  # dense: small_rows made slower at every row class
            self.b = nn.Linear(16, 64)  # dense: small_rows faster only for rows <= 2
            self.p = ProbeWeight(torch.randn(8, 32))

        def dispatch_weights(self):
            return [self.p]

    def timer(fn, x2, w):  # injected "measurements" (seconds)
        rows, shape = x2.shape[0], tuple(w.shape)
        if fn is lin.KERNELS["dense"]["small_rows"]:
            return 1.0 if shape == (16, 32) else (0.1 if rows <= 2 else 3.0)
        if fn is lin.KERNELS["probe"]["fast"]:
            return 0.5 if rows in (4, lin.MANY_CLASSES[1]) else 2.0
        return 1.5 if shape != (16, 32) else 2.0  # the references

    report = lin.tune(M(), max_rows=4, timer=timer)
    chosen = {(r["kind"], r["rows"], r["out"], r["in"]): r["kernel"] for r in report}
    assert chosen[("dense", 1, 16, 32)] == "small_rows"  # 1.0 < 2.0: the faster one
    # where the reference was faster, it is kept; where small_rows was, small_rows is taken
    assert [chosen[("dense", r, 64, 16)] for r in (1, 2, 4)] == ["small_rows", "small_rows", "F.linear"]
    assert [chosen[("probe", r, 8, 32)] for r in (1, 2, 4)] == ["ref", "ref", "fast"]
    # a non-dense (quantised) kind is also measured at MANY_CLASSES, for the calls above MAX_ROWS
    assert [chosen[("probe", r, 8, 32)] for r in lin.MANY_CLASSES] == ["ref", "fast"]
    assert {r["rows"] for r in report if r["kind"] == "dense"} == {1, 2, 4}
    assert {r["rows"] for r in report if r["kind"] == "probe"} == {1, 2, 4, *lin.MANY_CLASSES}
    for r in report:  # never the slower one
        assert r["us"][r["kernel"]] == min(r["us"].values())

    # and `linear` calls exactly the chosen kernel for each row count
    p = ProbeWeight(torch.randn(8, 32))
    with torch.inference_mode():
        for rows, want in ((1, "ref"), (3, "fast"), (4, "fast"), (20, "ref"), (64, "ref"), (65, "fast"), (300, "fast")):
            calls.clear()
            y = lin.linear(torch.randn(rows, 32), p)
            assert calls == [want] and y.shape == (rows, 8)
    calls.clear()
    lin.linear(torch.randn(3, 32), p)  # grad enabled (training): always the reference
    assert calls == ["ref"]


def test_choices_are_cached_per_host_and_reused(tmp_path):
    model = nn.Sequential(nn.Linear(32, 16))
    first = lin.tune(model, max_rows=2, timer=lambda fn, x2, w: 1.0 if fn is lin._dense_reference else 0.5)
    data = json.loads(lin.cache_path().read_text())
    assert list(data) == [lin.host_key()]
    lin.clear_choices()

    def must_not_time(fn, x2, w):
        raise AssertionError("a cached choice was measured again")

    again = lin.tune(model, max_rows=2, timer=must_not_time)
    assert [r["kernel"] for r in again] == [r["kernel"] for r in first] == ["small_rows", "small_rows"]
    assert "small_rows" in lin.format_report(again)


def test_unknown_kernel_is_rejected():
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        lin.set_choices({("dense", 1, 4, 4): "nope"})


def test_weights_are_laid_out_column_major_only_where_that_measures_faster():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 64))
    x = torch.randn(3, 32)
    with torch.inference_mode():
        want = model(x)

    def timer(fn, x2, w):  # col-major: faster for few rows on both; slower prefill for [64, 16] only
        col = lin.layout_of(w) == "col"
        if x2.shape[0] == lin.PREFILL_ROWS:
            return 2.0 if col and tuple(w.shape) == (64, 16) else 1.0
        return 0.5 if col else 1.0

    report = lin.tune(model, max_rows=4, timer=timer)
    layouts = {(r["out"], r["in"]): r["layout"] for r in report}
    assert layouts == {(16, 32): "col", (64, 16): "row"}
    assert lin.layout_of(model[0].weight) == "col" and lin.layout_of(model[1].weight) == "row"
    assert model[0].weight.is_contiguous() is False and model[0].weight.t().is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    assert "col" in lin.format_report(report)


def test_stacked_expert_weights_take_the_layout_of_their_matrices():
    from nanoseek.model.moe import Experts

    ex = Experts(4, 8, 6)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(4, 12, 8))
    before = ex.gate_up_proj.detach().clone()
    lin.apply_layouts(ex, {(12, 8): "col"})
    assert lin.layout_of(ex.gate_up_proj[2]) == "col"
    assert torch.equal(ex.gate_up_proj.detach(), before)  # the same values
    lin.apply_layouts(ex, {(12, 8): "row"})
    assert ex.gate_up_proj.is_contiguous()
