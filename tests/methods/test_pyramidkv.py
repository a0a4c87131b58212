"""PyramidKV: KVCache-Factory's per-layer budget schedule, and SnapKV's selection."""

import pytest
import torch

from kvshrink.methods import SelectionInput, SpecError, parse
from kvshrink.methods.pyramidkv import PyramidKV
from kvshrink.methods.snapkv import SnapKV


def test_schedule_hand_computed():
    # C=64, W=8, beta=20, L=4, T=1000: min=(56)//20=2, max=112-2=110, step=(110-2)//3=36
    p = PyramidKV(budget_tokens=64)
    assert [p.budget(1000, layer, 4) for layer in range(4)] == [8 + 110, 8 + 74, 8 + 38, 8 + 2]
    assert sum(p.budget(1000, layer, 4) for layer in range(4)) == 4 * 64


def test_schedule_capped_by_prompt():
    # T=115 >= 2(C-W)=112; max=110 >= T-W=107 -> max=107, min=112-107=5, step=(107-5)//3=34
    p = PyramidKV(budget_tokens=64)
    assert [p.budget(115, layer, 4) for layer in range(4)] == [115, 81, 47, 13]


def test_short_prompt_is_uniform_and_no_budget_when_it_fits():
    p = PyramidKV(budget_tokens=64)
    assert [p.budget(100, layer, 4) for layer in range(4)] == [64] * 4  # 100 < 2(C-W)
    assert p.budget(64, 0, 4) is None
    assert p.budget(1000, 0, 1) == 64  # one layer: nothing to shape


def test_beta_and_ratio():
    p = PyramidKV(budget_tokens=64, beta=4)  # min=14, max=98, step=28
    assert [p.budget(1000, layer, 4) for layer in range(4)] == [106, 78, 50, 22]
    r = PyramidKV(ratio=0.75)  # C = ceil(200 * 0.25) = 50 -> min=2, max=82, step=(80)//1=80
    assert [r.budget(200, layer, 2) for layer in range(2)] == [90, 10]


def test_selection_is_snapkv():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 2, 30, generator=g)
    x = SelectionInput(
        length=30, layer=1, num_layers=4, valid=torch.ones(2, 2, 30, dtype=torch.bool), scores=scores
    )
    p = PyramidKV(budget_tokens=12)
    s = SnapKV(window=8, kernel=7, pool="max", budget_tokens=12)
    assert torch.equal(p.select(x, 11), s.select(x, 11))
    # hand pattern: window 2, kernel 1: votes 0..5, keep top-2 + window
    y = SelectionInput(
        length=8,
        layer=0,
        num_layers=2,
        valid=torch.ones(1, 1, 8, dtype=torch.bool),
        scores=torch.tensor([[[0.1, 0.9, 0.2, 0.8, 0.3, 0.4, 0.0, 0.0]]]),
    )
    assert PyramidKV(window=2, kernel=1, budget_tokens=4).select(y, 4).tolist() == [[[1, 3, 6, 7]]]


def test_defaults_and_specs():
    p = parse("pyramidkv:budget=32").selector
    assert (p.window, p.kernel, p.pool, p.beta) == (8, 7, "max", 20) and p.observed_queries(100) == 8
    with pytest.raises(SpecError, match="budget < window"):
        parse("pyramidkv:budget=8")
    with pytest.raises(SpecError, match="beta must be"):
        parse("pyramidkv:budget=32,beta=0")
