"""KVCrush: head-behaviour signatures, anchors, evenly spaced representatives; hand-checked."""

import pytest
import torch

from kvshrink.methods import SelectionInput, SpecError, parse
from kvshrink.methods.kvcrush import KVCrush, head_signatures

# One KV head, two query heads, eight tokens.
#   head 0: [8 7 6 5 4 3 2 1] -> top half {0,1,2,3} -> bits 1 1 1 1 0 0 0 0
#   head 1: [1 8 2 7 3 6 4 5] -> top half {1,3,5,7} -> bits 0 1 0 1 0 1 0 1
#   signatures (h0, h1): 0:(1,0) 1:(1,1) 2:(1,0) 3:(1,1) 4:(0,0) 5:(0,1) 6:(0,0) 7:(0,1)
HEAD = torch.tensor([[[8.0, 7, 6, 5, 4, 3, 2, 1], [1, 8, 2, 7, 3, 6, 4, 5]]])


def inp(head=HEAD, valid=None):
    valid = torch.ones(1, 1, head.shape[-1], dtype=torch.bool) if valid is None else valid
    return SelectionInput(
        length=head.shape[-1],
        layer=0,
        num_layers=1,
        valid=valid,
        scores=head.mean(1, keepdim=True),
        head_scores=head,
    )


def test_signatures():
    sig = head_signatures(HEAD, torch.ones(1, 2, 8, dtype=torch.bool))
    assert sig.int().tolist() == [[[1, 1, 1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1, 0, 1]]]


@pytest.mark.parametrize(
    "anchor, expected",
    [
        # base H2O keeps 2 of 4: recent {7} + heavy {1} (group-mean score 7.5); evicted {0,2,3,4,5,6}
        # zeros: d = 0:1 2:1 3:2 4:0 5:1 6:0 -> sorted 4 6 0 2 5 3; stride 6//2=3 -> picks 4, 2
        ("zeros", [1, 2, 4, 7]),
        # ones: d = 0:1 2:1 3:0 4:2 5:1 6:2 -> sorted 3 0 2 5 4 6 -> picks 3, 5
        ("ones", [1, 3, 5, 7]),
        # alternate (0,1): d = 0:2 2:2 3:1 4:1 5:0 6:1 -> sorted 5 3 4 6 0 2 -> picks 5, 6
        ("alternate", [1, 5, 6, 7]),
        # mean: each head's bits are half ones -> majority 0 -> same as zeros
        ("mean", [1, 2, 4, 7]),
    ],
)
def test_representatives_hand_checked(anchor, expected):
    k = KVCrush(base="h2o", share=0.5, anchor=anchor, budget_tokens=4)
    assert k.select(inp(), 4).tolist() == [[expected]]


def test_mean_anchor_is_majority():
    sig = torch.tensor([[[1, 1, 0, 1], [0, 0, 1, 0], [1, 0, 1, 0]]], dtype=torch.bool)
    valid = torch.ones(1, 3, 4, dtype=torch.bool)
    bits = KVCrush(anchor="mean").anchor_bits(sig, valid, 0)
    assert bits.tolist() == [[True, False, False]]


def test_random_anchor_is_seeded():
    a = KVCrush(base="h2o", share=0.5, budget_tokens=4, seed=3)
    assert torch.equal(a.select(inp(), 4), a.select(inp(), 4))
    idx = a.select(inp(), 4)[0, 0].tolist()
    assert {1, 7} <= set(idx) and len(set(idx)) == 4


def test_share_zero_is_the_base_and_padding_comes_last():
    g = torch.Generator().manual_seed(0)
    head = torch.rand(1, 2, 12, generator=g)
    assert torch.equal(
        KVCrush(base="h2o", share=0.0, budget_tokens=6).select(inp(head), 6),
        parse("h2o:budget=6").selector.select(inp(head), 6),
    )
    # 5 real tokens, budget 4 (2 base + 2 representatives): every pick is a real token
    valid = torch.tensor([[[False] * 7 + [True] * 5]])
    idx = KVCrush(base="h2o", share=0.5, anchor="zeros", budget_tokens=4).select(inp(head, valid), 4)
    assert valid[0, 0, idx[0, 0]].all()


def test_snapkv_base_keeps_window():
    g = torch.Generator().manual_seed(1)
    head = torch.rand(1, 2, 60, generator=g)
    idx = KVCrush(budget_tokens=44).select(inp(head), 44)[0, 0].tolist()
    assert len(set(idx)) == 44 and set(range(28, 60)) <= set(idx)  # 33 from SnapKV incl. its window


def test_flags_and_specs():
    k = parse("kvcrush:budget=48").selector
    assert (k.base, k.share, k.anchor) == ("snapkv", 0.25, "random")
    assert k.prefill_queries(100, 0, 2) == 32 and k.decode_hold(100, 0, 2) is None and not k.observes_decode()
    h = parse("kvcrush:base=h2o,budget=8").selector
    assert h.prefill_queries(100, 0, 2) == 100 and h.observes_decode() and h.decode_hold(100, 0, 2) == 8
    assert k.min_budget() == 43  # 43 - int(10.75) = 33 = SnapKV's window + 1
    with pytest.raises(SpecError, match="smaller than the tokens"):
        parse("kvcrush:budget=42")
    with pytest.raises(SpecError, match="base must be one of"):
        parse("kvcrush:base=pyramidkv,budget=48")
    with pytest.raises(SpecError, match="share must be in"):
        parse("kvcrush:budget=48,share=1.5")
    with pytest.raises(SpecError, match="anchor must be one of"):
        parse("kvcrush:budget=48,anchor=middle")
