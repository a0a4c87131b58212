"""H2O: a recent window + heavy hitters by accumulated attention, hand-checked."""

import pytest
import torch

from kvshrink.methods import SelectionInput, SpecError, parse
from kvshrink.methods.h2o import H2O


def inp(scores, valid=None):
    scores = torch.tensor(scores, dtype=torch.float32)
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else torch.tensor(valid)
    return SelectionInput(length=scores.shape[-1], layer=0, num_layers=1, valid=valid, scores=scores)


SCORES = [
    [
        [5, 1, 9, 2, 8, 3, 0.5, 0, 0, 0],  # KV head 0
        [0, 7, 1, 6, 2, 5, 4, 100, 100, 100],  # KV head 1: recent tokens' scores do not matter
    ]
]


def test_equal_split_heavy_hitters_and_recent():
    # budget 6, recent_ratio 0.5: recent {7, 8, 9}; heavy = top-3 of tokens 0..6 per KV head
    idx = H2O(budget_tokens=6).select(inp(SCORES), 6)
    assert idx.tolist() == [[[0, 2, 4, 7, 8, 9], [1, 3, 5, 7, 8, 9]]]


def test_recent_ratio():
    # budget 6, recent_ratio 0.25: recent = int(1.5) = 1 -> {9}; heavy = top-5 of tokens 0..8
    # (head 1: tokens 7 and 8 are now heavy-hitter candidates, and their 100s win)
    idx = H2O(budget_tokens=6, recent_ratio=0.25).select(inp(SCORES), 6)
    assert idx.tolist() == [[[0, 2, 3, 4, 5, 9], [1, 3, 5, 7, 8, 9]]]


def test_padding_never_beats_real_tokens():
    scores = [[[9, 9, 1, 2, 3, 4]]]
    valid = [[[False, False, True, True, True, True]]]
    idx = H2O(budget_tokens=3).select(inp(scores, valid), 3)
    assert idx.tolist() == [[[3, 4, 5]]]


def test_flags_and_specs():
    h = parse("h2o:budget=16").selector
    assert h.prefill_queries(100, 0, 2) == 100 and h.observes_decode() and h.recent(16) == 8
    with pytest.raises(SpecError, match="recent_ratio must be in"):
        parse("h2o:budget=16,recent_ratio=1.5")
    with pytest.raises(SpecError, match="either budget=N or ratio=r"):
        parse("h2o:budget=16,ratio=0.5")
