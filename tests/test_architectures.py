"""Sliding-window and hybrid-attention models, through the HF path and the engine: tiny random Gemma-3,
Gemma-2 (soft-cap), Mistral (window on every layer), Qwen3 (QK-norm, one sliding layer) and gpt-oss
(attention sinks), every one with a window shorter than the test prompts."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from kvshrink.cache import KVShrinkCache, cache_argument, cache_bytes, compress, theoretical_bytes
from kvshrink.engine import Engine, SamplingParams
from kvshrink.layer_types import FULL, SLIDING, UnsupportedModel, layer_types
from kvshrink.methods import registered
from tests.conftest import HYBRID, WINDOW, batch, tiny_model
from tests.engine.test_engine import agree_until_tie, prompts
from tests.engine.test_pool import assert_blocks_accounted

LENGTHS = (40, 25, 33)  # batch 3, left-padded, every prompt longer than the window
NEW = 8


@pytest.fixture(scope="module", params=HYBRID)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def hybrid(arch):
    return tiny_model(arch)


def _generate(model, spec=None, new=NEW, lengths=LENGTHS):
    ids, mask = batch(lengths)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                do_sample=False, return_dict_in_generate=True, output_logits=True)
    if spec is None:
        out = model.generate(**args, **{cache_argument(model): DynamicCache(config=model.config)})
        return out, out.past_key_values
    with compress(model, spec):
        cache = KVShrinkCache.for_model(model, spec)
        return model.generate(**{cache_argument(model): cache}, **args), cache


EXPECTED_TYPES = {
    "gemma3": [SLIDING, SLIDING, FULL],
    "gemma2": [SLIDING, FULL],
    "mistral": [SLIDING, SLIDING],
    "qwen3": [FULL, SLIDING],
    "gpt_oss": [SLIDING, FULL],
}


def test_layer_types_from_config(arch, hybrid):
    types = layer_types(hybrid.config)
    assert [t.name for t in types] == EXPECTED_TYPES[arch]
    assert all(t.window == WINDOW for t in types if t.sliding)
    if arch == "gemma2":
        assert all(t.softcap == 2.0 for t in types)


def test_full_hf_path_equals_dynamic_cache(arch, hybrid):
    """``full`` under kvshrink's cache and attention function: DynamicCache's tokens and logits, and the
    same bytes per layer type (a sliding layer holds window - 1 tokens)."""
    ref, ref_cache = _generate(hybrid)
    out, cache = _generate(hybrid, "full")
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert cache_bytes(cache, by_type=True) == cache_bytes(ref_cache, by_type=True)
    T = max(LENGTHS) + NEW - 1  # tokens stored (the last generated one never is)
    for layer in cache.layers:
        assert len(layer.state) == (WINDOW - 1 if layer.is_sliding else T)
    es = 4  # float32
    th = theoretical_bytes(hybrid.config, "full", T, dtype_bytes=es)
    assert {k: 3 * v for k, v in th.items() if v} == cache_bytes(cache, by_type=True)  # per sequence, batch 3


def test_window_and_softcap_matter(arch, hybrid):
    """The test models are sensitive to what they test: the same weights with a window longer than
    the context (or without the soft-cap) give other logits, so agreement above is not vacuous."""
    ref, _ = _generate(hybrid, new=1)
    wide, _ = _generate(tiny_model(arch, sliding_window=4096), new=1)
    assert (wide.logits[0] - ref.logits[0]).abs().max() > 1e-3
    if arch == "gemma2":
        uncapped, _ = _generate(tiny_model(arch, attn_logit_softcapping=None), new=1)
        assert (uncapped.logits[0] - ref.logits[0]).abs().max() > 1e-3


def test_full_engine_equals_generate(arch, hybrid):
    """The engine's greedy tokens are ``generate``'s (DynamicCache) up to a near-tie; sliding layers
    free their blocks as tokens leave the window."""
    ps = prompts((40, 7, 70, 23))
    eng = Engine(hybrid, method="full", kv_memory="8MiB", block_size=8)
    sp = SamplingParams(max_tokens=16)
    ids = [eng.add_request(p, sp) for p in ps]
    toks = {i: [] for i in ids}
    st = eng.store
    sliding = st.window > 0
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id] += o.new_token_ids
        assert_blocks_accounted(st)
        live = list(st.reserved)
        if live:
            assert bool((st.counters.stored[live][:, sliding] <= WINDOW - 1 + st.bs).all())
    for p, i in zip(ps, ids):
        agree_until_tie(hybrid, p, toks[i], 16)
    assert eng.stats().blocks_used == 0


def test_engine_admits_what_the_architecture_stores(arch, hybrid):
    """A prompt's blocks: its window's need on sliding layers, the whole prompt on full ones."""
    st = Engine(hybrid, method="full", kv_memory="8MiB", block_size=8).store
    n = 300
    per_layer = [min(n, WINDOW - 1) if t.sliding else n for t in st.types]
    assert st.kept_per_layer(n) == per_layer
    assert st.blocks_for_prompt(n) == sum(-(-k // 8) for k in per_layer)
    assert st.fp_bytes(n) == 2 * st.H * st.D * 4 * sum(per_layer)


SPECS = ["full", "kivi:bits=4", "kivi:bits=2,group=8,residual=8", "int8", "int4", "gear",
         "snapkv:ratio=0.5,window=8", "pyramidkv:ratio=0.5", "h2o:ratio=0.5", "streamingllm:ratio=0.5",
         "kvcrush:ratio=0.5", "kvcrush:ratio=0.5,base=h2o", "h2o:ratio=0.5+kivi:bits=2,group=8,residual=8",
         "snapkv:ratio=0.5,window=8+int4"]


@pytest.mark.parametrize("spec", SPECS)
def test_every_method_runs_both_paths(arch, hybrid, spec):
    names = [part.split(":")[0] for part in spec.split("+")]
    if any(n not in registered() for n in names):
        pytest.skip(f"{spec} not registered")
    out, cache = _generate(hybrid, spec, new=4)
    assert out.sequences.shape == (3, max(LENGTHS) + 4)
    assert all(torch.isfinite(x).all() for x in out.logits)
    for layer in cache.layers:
        if layer.is_sliding:  # left to its window: window - 1 tokens plus at most one encoder chunk
            assert len(layer.state) <= WINDOW - 1 + max(layer.state.k.enc.chunk, layer.state.v.enc.chunk)
    eng = Engine(hybrid, method=spec, kv_memory="8MiB", block_size=8)
    res = eng.generate(prompts((40, 25, 33)), SamplingParams(max_tokens=6, ignore_eos=True))
    assert all(r["finish_reason"] == "length" and r["output_tokens"] == 6 for r in res), res
    assert eng.stats().blocks_used == 0


def _mla_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)


@pytest.mark.parametrize("feature, config, message", [
    ("mla", _mla_config, "'deepseek_v3'.*multi-head latent attention"),
    ("kv-sharing", lambda: LlamaConfig(num_kv_shared_layers=2), "'llama'.*cross-layer KV sharing"),
    ("chunked", lambda: LlamaConfig(attention_chunk_size=64), "'llama'.*chunked attention"),
    ("linear", lambda: LlamaConfig(layer_types=["linear_attention"] * 32), "layer type 'linear_attention'"),
])
def test_unsupported_features_fail_at_set_up(feature, config, message):
    with pytest.raises(UnsupportedModel, match=message):
        layer_types(config())


def test_unsupported_model_fails_before_generation():
    model = tiny_model("llama")
    model.config.num_kv_shared_layers = 1
    try:
        with pytest.raises(UnsupportedModel, match="cross-layer KV sharing"), compress(model, "snapkv:budget=48"):
            pass
        with pytest.raises(UnsupportedModel, match="cross-layer KV sharing"):
            Engine(model, method="full", kv_memory="1MiB")
    finally:
        del model.config.num_kv_shared_layers


def test_module_window_must_match_config():
    """A module that passes a window the config does not declare is refused (not silently attended)."""
    model = tiny_model("qwen3")
    model.config.layer_types = [FULL, FULL]  # layer 1's module still slides
    with pytest.raises(UnsupportedModel, match="layer 1 was set up as full_attention.*passes sliding_window=16"):
        _generate(model, "full", new=1)
    eng = Engine(model, method="full", kv_memory="1MiB")
    (res,) = eng.generate([list(range(3, 30))], SamplingParams(max_tokens=1))
    assert res["finish_reason"] == "error" and "passes sliding_window=16" in res["error"]
