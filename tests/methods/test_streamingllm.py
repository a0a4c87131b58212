"""StreamingLLM: the first real tokens (sinks) + the most recent tokens, hand-checked."""

import pytest
import torch

from kvshrink.methods import SelectionInput, SpecError, parse
from kvshrink.methods.streamingllm import StreamingLLM


def inp(valid):
    valid = torch.tensor(valid, dtype=torch.bool)
    return SelectionInput(length=valid.shape[-1], layer=0, num_layers=1, valid=valid)


def test_sinks_then_recent_window():
    # row 0: no padding; row 1: two padding tokens on the left (sinks are its first *real* tokens)
    valid = [[[True] * 10], [[False, False] + [True] * 8]]
    idx = StreamingLLM(sinks=2, budget_tokens=5).select(inp(valid), 5)
    assert idx.tolist() == [[[0, 1, 7, 8, 9]], [[2, 3, 7, 8, 9]]]


def test_short_row_keeps_every_real_token_before_padding():
    valid = [[[False] * 7 + [True] * 3]]
    idx = StreamingLLM(sinks=2, budget_tokens=5).select(inp(valid), 5)[0, 0].tolist()
    assert {7, 8, 9} <= set(idx) and len(idx) == 5 and idx == sorted(idx)


def test_window_rolls_in_decode():
    # after prefill 5 tokens are held; one new token arrives: the oldest non-sink leaves
    s = StreamingLLM(sinks=2, budget_tokens=5)
    assert s.decode_hold(100, 0, 2) == 5 and s.prefill_queries(100, 0, 2) == 0 and not s.observes_decode()
    idx = s.select(inp([[[True] * 6]]), 5)
    assert idx.tolist() == [[[0, 1, 3, 4, 5]]]


def test_budget_and_specs():
    s = parse("streamingllm:budget=8").selector
    assert s.sinks == 4 and s.budget(20, 0, 2) == 8 and s.budget(8, 0, 2) is None
    assert parse("streamingllm:ratio=0.5").selector.budget(40, 0, 2) == 20
    with pytest.raises(SpecError, match="sinks"):
        parse("streamingllm:budget=4")
    with pytest.raises(SpecError, match="sinks must be >= 0"):
        parse("streamingllm:sinks=-1")
