"""SnapKV: pooled observation-window votes over the prefix, the window always kept; hand-checked."""

import pytest
import torch

from kvshrink.methods import SelectionInput, SpecError, parse
from kvshrink.methods.scoring import pool
from kvshrink.methods.snapkv import SnapKV


def inp(scores, valid=None):
    scores = torch.tensor(scores, dtype=torch.float32)
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else torch.tensor(valid)
    return SelectionInput(length=scores.shape[-1], layer=0, num_layers=1, valid=valid, scores=scores)


def test_max_pool_over_prefix_only():
    # T=12, window 3 -> prefix 0..8. Max pooling (k=3) spreads the 3 at token 0 to {0, 1}; the 2.5
    # at token 8 spreads to {7, 8}. The window's large votes must not leak into token 8 (the
    # reference pools the prefix alone), so top-2 = {0, 1}.
    scores = [[[3, 0, 0, 0, 0, 0, 0, 0, 2.5, 9, 9, 9]]]
    idx = SnapKV(window=3, kernel=3, budget_tokens=5).select(inp(scores), 5)
    assert idx.tolist() == [[[0, 1, 9, 10, 11]]]


def test_pooling_clusters_neighbours():
    # A single peak keeps its neighbours (kernel 3, budget-window = 3): {3, 4, 5}; without
    # pooling (kernel 1) the three largest raw votes win instead.
    scores = [[[0.1, 0, 0.2, 0, 4, 0, 0.3, 0, 0, 0, 0, 0]]]
    assert SnapKV(window=3, kernel=3, budget_tokens=6).select(inp(scores), 6).tolist() == [
        [[3, 4, 5, 9, 10, 11]]
    ]
    assert SnapKV(window=3, kernel=1, budget_tokens=6).select(inp(scores), 6).tolist() == [
        [[2, 4, 6, 9, 10, 11]]
    ]


def test_avg_pool_counts_padding_like_the_reference():
    # F.avg_pool1d's default count_include_pad=True: token 0 averages (pad 0 + 3 + 0)/3 = 1, not 1.5,
    # so the 1.3 plateau at tokens 4..6 (average 1.3 at token 5) wins.
    assert pool(torch.tensor([[3.0, 0.0, 0.0]]), 3, "avg").tolist() == [[1.0, 1.0, 0.0]]
    scores = [[[3, 0, 0, 0, 1.3, 1.3, 1.3, 0, 0, 9, 9, 9]]]
    idx = SnapKV(window=3, kernel=3, pool="avg", budget_tokens=4).select(inp(scores), 4)
    assert idx.tolist() == [[[5, 9, 10, 11]]]


def test_per_kv_head_and_padding():
    scores = [[[5, 5, 0, 1, 0, 2, 0, 0], [5, 5, 3, 0.5, 0, 0, 1, 0]]]
    valid = [[[False, False] + [True] * 6] * 2]
    # window 2 -> prefix 0..5; kernel 1; budget 4 -> top-2 real prefix tokens per KV head
    idx = SnapKV(window=2, kernel=1, budget_tokens=4).select(inp(scores, valid), 4)
    # (the padding's 5s never win; token 6 of head 1 is in the window, not the prefix)
    assert idx.tolist() == [[[3, 5, 6, 7], [2, 3, 6, 7]]]


def test_defaults_and_specs():
    s = parse("snapkv:budget=64").selector
    assert (s.window, s.kernel, s.pool) == (32, 7, "max")
    assert s.prefill_queries(100, 0, 2) == 32 and s.decode_hold(100, 0, 2) is None and not s.observes_decode()
    assert s.budget(100, 0, 2) == 64 and s.budget(64, 0, 2) is None
    assert parse("snapkv:ratio=0.9").selector.budget(100, 0, 2) == 33  # never below window + 1
    with pytest.raises(SpecError, match="budget < window"):
        parse("snapkv:budget=32")
    with pytest.raises(SpecError, match="pool must be one of"):
        parse("snapkv:budget=64,pool=mean")
    with pytest.raises(SpecError, match="kernel must be"):
        parse("snapkv:budget=64,kernel=0")


def test_query_head_granularity_selects_per_query_head_and_stores_them():
    """granularity=query_head (the reference's repeat_kv-then-select): one selection per query head,
    H_q heads cached (twice the memory of kv_head on 4 query / 2 KV heads), in both paths."""
    from kvshrink.cache import KVShrinkCache, cache_argument, cache_bytes, compress
    from kvshrink.engine import Engine, SamplingParams
    from tests.conftest import batch, tiny_model
    from tests.engine.test_engine import agree_until_tie, prompts

    model = tiny_model("llama")
    ids, mask = batch((40, 25, 33))
    caches = {}
    for g in ("kv_head", "query_head"):
        spec = f"snapkv:budget=24,window=8,granularity={g}"
        with compress(model, spec):
            cache = KVShrinkCache.for_model(model, spec)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, do_sample=False,
                           **{cache_argument(model): cache})
        caches[g] = cache
    q = caches["query_head"]
    assert q.layers[0].state.get()[0].shape[1] == 4 and caches["kv_head"].layers[0].state.get()[0].shape[1] == 2
    assert cache_bytes(q) == 2 * cache_bytes(caches["kv_head"])
    # the two query heads of a KV group choose their own tokens (they differ somewhere on random weights)
    pos = q.layers[0].pos
    assert not torch.equal(pos[:, 0::2], pos[:, 1::2])
    # the reference's rule per query head: the query head's own window votes, pooled, top-k + window
    sel = parse("snapkv:budget=24,window=8,granularity=query_head").selector
    head = torch.rand(1, 4, 40, generator=torch.Generator().manual_seed(0))
    one = SelectionInput(length=40, layer=0, num_layers=1, valid=torch.ones(1, 4, 40, dtype=torch.bool),
                         scores=head, head_scores=head)
    assert torch.equal(sel.select(one, 24), parse("snapkv:budget=24,window=8").selector.select(one, 24))
    spec = "snapkv:budget=24,window=8,granularity=query_head"
    eng = Engine(model, method=spec, kv_memory="8MiB", block_size=8)
    assert eng.store.H == 4
    ps = prompts((40, 19, 75))
    for p, r in zip(ps, eng.generate(ps, SamplingParams(max_tokens=12))):
        agree_until_tie(model, p, r["token_ids"], 12, spec=spec)
    assert eng.stats().blocks_used == 0
