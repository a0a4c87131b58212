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


def inp(head=HEAD, valid=None, kv_heads=1):
    T = head.shape[-1]
    valid = torch.ones(1, kv_heads, T, dtype=torch.bool) if valid is None else valid
    return SelectionInput(
        length=T,
        layer=0,
        num_layers=1,
        valid=valid,
        scores=head.view(1, kv_heads, -1, T).mean(2),
        head_scores=head,
    )


def test_signatures():
    sig = head_signatures(HEAD, torch.ones(1, 2, 8, dtype=torch.bool))
    assert sig.int().tolist() == [[[1, 1, 1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1, 0, 1]]]


@pytest.mark.parametrize(
    "anchor, expected",
    [
        # base H2O keeps 2 of 4: recent {7} + heavy {1} (group-mean score 7.5). The top half is ranked
        # over the evictable region {0..6} (7 tokens, top 3), as kvcrush.cpp does:
        #   head 0 -> {0,1,2}, head 1 -> {1,3,5}; signatures 0:(1,0) 2:(1,0) 3:(0,1) 4:(0,0) 5:(0,1) 6:(0,0)
        # evicted {0,2,3,4,5,6}; stride 6 // 2 = 3
        # zeros: d = 0:1 2:1 3:1 4:0 5:1 6:0 -> sorted 4 6 0 2 3 5 -> picks 4, 2
        ("zeros", [1, 2, 4, 7]),
        # ones: d = 0:1 2:1 3:1 4:2 5:1 6:2 -> sorted 0 2 3 5 4 6 -> picks 0, 5
        ("ones", [0, 1, 5, 7]),
        # alternate (0,1): d = 0:2 2:2 3:0 4:1 5:0 6:1 -> sorted 3 5 4 6 0 2 -> picks 3, 6
        ("alternate", [1, 3, 6, 7]),
        # mean: 3 of 7 evictable tokens set per head -> majority 0 -> same as zeros
        ("mean", [1, 2, 4, 7]),
    ],
)
def test_representatives_hand_checked(anchor, expected):
    k = KVCrush(base="h2o", share=0.5, anchor=anchor, budget_tokens=4)
    assert k.select(inp(), 4).tolist() == [[expected]]


def test_signatures_per_kv_head_when_columns_differ():
    """Two KV heads (two query heads each) whose column j holds different tokens, as after an H2O
    eviction: each KV head's signatures come from its own query group. KV head 0 sees the pattern
    above; KV head 1 sees it reversed. Summing bits over all four query heads per column (the old
    rule) mixes the two and picks other representatives."""
    head = torch.cat([HEAD, HEAD.flip(-1)], dim=1)  # [1, 4, 8]
    k = KVCrush(base="h2o", share=0.5, anchor="zeros", budget_tokens=4)
    got = k.select(inp(head, kv_heads=2), 4)[0].tolist()
    # KV head 0: as in the hand-checked case. KV head 1, query heads [1 2 3 4 5 6 7 8], [5 4 6 3 7 2 8 1]:
    # recent {7}, heavy by group mean (3,3,4,5,6,4,7.5 over 0..6) -> {6}; over {0..6} top 3:
    # head 2 -> {4,5,6}, head 3 -> {2,4,6}; evicted {0,1,2,3,4,5}: signatures 0:(0,0) 1:(0,0) 2:(0,1)
    # 3:(0,0) 4:(1,1) 5:(1,0) -> zeros d = 0 0 1 0 2 1 -> sorted 0 1 3 2 5 4 -> stride 3 -> picks 0, 2
    assert got == [[1, 2, 4, 7], [0, 2, 6, 7]]
    old = KVCrush(base="h2o", share=0.5, anchor="zeros", budget_tokens=4, signature="group")
    assert old.select(inp(head, kv_heads=2), 4)[0].tolist() == got  # auto = group for an H2O base
    # The old rule: bits over all four query heads per column, top half over every real token.
    sig_all = head_signatures(head, torch.ones(1, 4, 8, dtype=torch.bool))
    d_old = sig_all.sum(1)[0]  # zeros anchor: distance = bits set
    base = parse("h2o:budget=2").selector.select(inp(head, kv_heads=2), 2)[0]
    old_picks = []
    for h in range(2):
        evicted = [j for j in range(8) if j not in base[h].tolist()]
        order = sorted(evicted, key=lambda j: (int(d_old[j]), j))
        old_picks.append(sorted(base[h].tolist() + order[:: len(evicted) // 2][:2]))
    assert old_picks != got


def test_additive_puts_representatives_on_top():
    carved = KVCrush(base="h2o", share=0.5, budget_tokens=4)
    added = KVCrush(base="h2o", share=0.5, budget_tokens=4, additive=True)
    assert carved.budget(100, 0, 1) == 4 and added.budget(100, 0, 1) == 6
    assert carved.split(4) == (2, 2) and added.split(6) == (4, 2)
    assert added.decode_hold(100, 0, 1) == 6 and added.decode_hold(3, 0, 1) == 6
    idx = added.select(inp(), 6)[0, 0].tolist()
    base = parse("h2o:budget=4").selector.select(inp(), 4)[0, 0].tolist()
    assert len(set(idx)) == 6 and set(base) <= set(idx)
    assert parse("kvcrush:ratio=0.5,additive=true").selector.budget(100, 0, 1) == 62  # 50 + 12


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
    with pytest.raises(SpecError, match="signature=layer needs a token order shared"):
        parse("kvcrush:base=h2o,budget=48,signature=layer")
