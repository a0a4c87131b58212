"""The HF path as a whole: every registered method through ``model.generate`` on tiny Llama and
Qwen2 (GQA 4 query / 2 KV heads), batch 3, left-padded mixed lengths."""

import pytest
import torch

from kvshrink.cache import KVShrinkCache, cache_argument, compress, output_cache
from kvshrink.methods import SpecError, parse, registered
from tests.conftest import batch

LENGTHS = (80, 50, 66)
NEW = 5

# A spec per selector that compresses these prompts (window sizes fit short prompts).
SELECTOR_SPECS = {
    "full": "full",
    "streamingllm": "streamingllm:budget=24",
    "h2o": "h2o:budget=24",
    "snapkv": "snapkv:budget=24,window=8",
    "pyramidkv": "pyramidkv:budget=24",
    "kvcrush": "kvcrush:budget=48",
}


def _selectors():
    return [SELECTOR_SPECS.get(n, n) for n, c in registered().items() if c.kind == "selector"]


def _specs():
    specs = _selectors()
    codecs = [n for n, c in registered().items() if c.kind == "codec" and n != "fp"]
    specs += [f"snapkv:budget=24,window=8+{c}" for c in codecs]
    specs += [f"h2o:budget=24+{c}" for c in codecs]
    return specs


def _generate(model, spec=None, sample=False, new=NEW, **kw):
    ids, mask = batch(LENGTHS)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    args.update(do_sample=sample, return_dict_in_generate=True, output_logits=True, **kw)
    if spec is None:
        return model.generate(**args), None
    torch.manual_seed(0)
    with compress(model, spec):
        cache = KVShrinkCache.for_model(model, spec)
        return model.generate(**{cache_argument(model): cache}, **args), cache


@pytest.mark.parametrize(
    "spec",
    ["full"] + [f"{n}:budget=500" for n in ("streamingllm", "h2o", "snapkv", "pyramidkv", "kvcrush")],
)
def test_uncompressed_equals_dynamic_cache(model, spec):
    ref, _ = _generate(model)
    out, cache = _generate(model, spec)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert all(not layer.pruned for layer in cache.layers)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("spec", _specs())
def test_every_method_generates(model, spec, sample):
    out, cache = _generate(model, spec, sample=sample)
    assert out.sequences.shape == (3, max(LENGTHS) + NEW)
    assert all(torch.isfinite(x).all() for x in out.logits)
    assert cache.nbytes() > 0


@pytest.mark.parametrize("spec", ["streamingllm:budget=24", "h2o:budget=24", "kvcrush:base=h2o,budget=24"])
def test_evicting_selectors_hold_the_budget(model, spec):
    _, cache = _generate(model, spec)
    for layer in cache.layers:
        assert len(layer.state) == 24 and layer.valid.shape == (3, 2, 24)
        assert layer.valid.all()  # every row has more than 24 real tokens: no padding kept
        assert layer.state.get()[0].shape[-2] == 24


@pytest.mark.parametrize("spec", ["snapkv:budget=24,window=8", "pyramidkv:budget=24", "kvcrush:budget=48"])
def test_one_shot_selectors_keep_the_budget_then_grow(model, spec):
    _, cache = _generate(model, spec)
    sel = parse(spec).selector
    n = len(cache.layers)
    for i, layer in enumerate(cache.layers):
        b = sel.budget(max(LENGTHS), i, n)
        assert len(layer.state) == b + NEW - 1 and layer.valid.all()
    if spec.startswith("pyramidkv"):  # C=24, W=8, T=80, L=2: min=0, max=32 -> 40 and 8
        assert [len(layer.state) - NEW + 1 for layer in cache.layers] == [40, 8]


def _layer0_keys(model, sequences):
    """Keys of layer 0 for every position of the finished sequences (they depend only on token and
    position, so they identify which tokens a compressed cache holds)."""
    ids, mask = batch(LENGTHS)
    full_mask = torch.cat([mask, torch.ones(3, sequences.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    pos = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
    out = model(input_ids=sequences, attention_mask=full_mask, position_ids=pos, use_cache=True)
    return output_cache(out).layers[0].keys, full_mask


@pytest.mark.parametrize("sinks", [4, 2])
def test_streamingllm_keeps_sinks_and_recent(model, sinks):
    out, cache = _generate(model, f"streamingllm:budget=24,sinks={sinks}")
    keys, full_mask = _layer0_keys(model, out.sequences)
    stored = cache.layers[0].state.get()[0]
    T = out.sequences.shape[1] - 1  # the last generated token is never stored
    for b in range(3):
        real = torch.nonzero(full_mask[b, :T]).flatten()
        expected = torch.cat([real[:sinks], real[-(24 - sinks) :]])
        torch.testing.assert_close(stored[b], keys[b][:, expected], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec, recent", [("h2o:budget=24", 12), ("snapkv:budget=24,window=8", 8), ("pyramidkv:budget=24", 8)]
)
def test_recent_window_always_kept(model, spec, recent):
    out, cache = _generate(model, spec, new=1)  # prefill only: the window is the prompt's tail
    keys, _ = _layer0_keys(model, out.sequences)
    stored = cache.layers[0].state.get()[0]
    T = max(LENGTHS)
    torch.testing.assert_close(stored[:, :, -recent:], keys[:, :, T - recent : T], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuch:budget=8", "unknown method 'nosuch'"),
        ("snapkv:budget=64,windw=8", "unknown parameter 'windw'"),
        ("h2o:budget=-1", "budget must be >= 0"),
        ("h2o:ratio=1.5", r"ratio must be in \[0, 1\)"),
        ("h2o:budget=8,recent_ratio=2", "recent_ratio must be in"),
        ("snapkv:budget=64,pool=mean", "pool must be one of"),
        ("snapkv:budget=16", "budget < window"),
        ("pyramidkv:budget=8,window=8", "budget < window"),
        ("streamingllm:budget=4,sinks=4", "budget < sinks"),
        ("kvcrush:budget=48,share=1", "share must be in"),
        ("kvcrush:budget=48,anchor=middle", "anchor must be one of"),
        ("snapkv:budget=64,ratio=0.5", "either budget=N or ratio=r"),
        ("snapkv:budget=x", "budget_tokens must be int"),
        ("snapkv:budget=64+h2o:budget=8", "more than one selector"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(SpecError, match=message):
        parse(spec)
