"""The contract with transformers that ``compress()`` relies on, checked on whatever version is
installed: the cache is taken under either argument name, and a forward that ran without kvshrink's
cache or attention function raises instead of passing for a compressed run."""

import pytest
import torch
from transformers import DynamicCache

from kvshrink.cache import CACHE_ARGS, KVShrinkCache, cache_argument, compress, output_cache
from kvshrink.errors import CompressionNotInEffect
from tests.conftest import batch


def _prefill_then_decode(model, cache_kwargs: dict):
    """Logits of a left-padded prefill and one decode step, the cache handed over as ``cache_kwargs``."""
    ids, mask = batch((30, 18, 25))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs)
    cache = output_cache(out)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    step = model(input_ids=nxt, attention_mask=mask2, position_ids=pos[:, -1:] + 1, use_cache=True,
                 **{cache_argument(model): cache})
    return torch.cat([out.logits[:, -1:], step.logits], dim=1), cache


@pytest.mark.parametrize("name", CACHE_ARGS)
def test_full_equals_dynamic_cache_under_either_name(model, name):
    ref, ref_cache = _prefill_then_decode(model, {cache_argument(model): DynamicCache()})
    assert isinstance(ref_cache, DynamicCache)
    with compress(model, "full"):
        given = KVShrinkCache.for_model(model, "full")
        got, used = _prefill_then_decode(model, {name: given})
    assert used is given  # the cache passed in, under either name, is the one the model filled
    assert all(layer.seen == 31 for layer in given.layers)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_fresh_cache_is_made_when_none_is_given(model):
    with compress(model, "kivi:bits=2"):
        _, used = _prefill_then_decode(model, {})
    assert isinstance(used, KVShrinkCache) and used.nbytes() > 0


def test_a_model_that_ignores_our_cache_raises(model):
    """What transformers 5.24 did silently: the model filled a cache of its own, not kvshrink's."""

    def swap_in_dynamic_cache(mod, args, kwargs):
        kwargs[cache_argument(mod)] = DynamicCache()
        return args, kwargs

    ids, mask = batch((30, 18, 25))
    with compress(model, "kivi:bits=2"):
        handle = model.register_forward_pre_hook(swap_in_dynamic_cache, with_kwargs=True)  # runs after ours
        try:
            with pytest.raises(CompressionNotInEffect, match="did not use kvshrink's cache.*transformers"):
                model(input_ids=ids, attention_mask=mask, use_cache=True)
        finally:
            handle.remove()


def test_attention_switched_back_raises(model):
    ids, mask = batch((30, 18, 25))
    with compress(model, "h2o:budget=8"):
        model.set_attn_implementation("sdpa")
        with pytest.raises(CompressionNotInEffect, match="attention function never ran.*'sdpa'"):
            model(input_ids=ids, attention_mask=mask, use_cache=True)
        with pytest.raises(CompressionNotInEffect):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    assert model.config._attn_implementation == "sdpa"


def test_use_cache_false_is_left_alone(model):
    ids, mask = batch((30, 18, 25))
    ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with compress(model, "kivi:bits=2"):
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert output_cache(out) is None
    torch.testing.assert_close(out.logits, ref)
