import random
import threading

import pytest
import torch

from kvshrink.engine import Engine, SamplingParams
from tests.conftest import tiny_model
from tests.engine._codec import hf_generate, method
from tests.engine.test_pool import assert_blocks_accounted


def prompts(lengths=(40, 7, 70, 23), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def agree_until_tie(model, prompt, got, n, spec=None):
    """Greedy HF tokens (stopping at EOS, as the engine does without ignore_eos) equal ``got`` up to
    the first step whose top-2 logit margin is a near-tie."""
    if spec is None:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    else:
        from kvshrink.cache import compress

        with compress(model, spec):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
    ref = out.sequences[0, len(prompt):].tolist()
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            top = out.scores[i][0].topk(2).values
            assert (top[0] - top[1]).item() < 2e-3, f"diverged at {i} with margin {(top[0] - top[1]).item()}"
            return i
    assert len(got) == len(ref)
    return len(ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_equals_hf_generate(arch):
    model = tiny_model(arch)
    ps = prompts()
    eng = Engine(model, method="full", kv_memory="8MiB", block_size=16)
    res = eng.generate(ps, SamplingParams(max_tokens=24))
    for p, r in zip(ps, res):
        assert r["finish_reason"] in ("length", "stop")
        agree_until_tie(model, p, r["token_ids"], 24)
    s = eng.stats()
    assert s.blocks_used == 0 and s.running == 0 and s.waiting == 0


@pytest.mark.parametrize("sel", ["full", "snapkv:budget=24,window=4", "pyramidkv:budget=24,window=4",
                                 "kvcrush:budget=48"])
def test_codec_and_prefill_selectors_equal_hf_path(sel):
    model = tiny_model("llama")
    m = method(sel)
    ps = prompts((40, 19, 75))
    eng = Engine(model, method=m, kv_memory="8MiB", block_size=8)
    res = eng.generate(ps, SamplingParams(max_tokens=20))
    for p, r in zip(ps, res):
        agree_until_tie(model, p, r["token_ids"], 20, spec=m)


@pytest.mark.parametrize("sel", ["streamingllm:budget=16", "h2o:budget=16"])
def test_decode_evictors_equal_hf_path_with_evict_every_1(sel):
    model = tiny_model("llama")
    ps = prompts((30, 12))
    eng = Engine(model, method=sel, kv_memory="8MiB", block_size=8, evict_every=1)
    res = eng.generate(ps, SamplingParams(max_tokens=20))
    for p, r in zip(ps, res):
        agree_until_tie(model, p, r["token_ids"], 20, spec=sel)


@pytest.mark.parametrize("sel", ["streamingllm:budget=16", "h2o:budget=16"])
def test_lazy_eviction_bounded(sel):
    """Default lazy eviction: a layer never stores more than hold + evict_every - 1 tokens between
    steps (the HF path stores exactly hold), and greedy tokens agree with the HF path on >= 40% of
    positions on this random tiny model (divergence compounds once a token differs)."""
    model = tiny_model("llama")
    ps = prompts((30, 12, 44))
    eng = Engine(model, method=sel, kv_memory="8MiB", block_size=8)
    sp = SamplingParams(max_tokens=24)
    ids = [eng.add_request(p, sp) for p in ps]
    toks = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id] += o.new_token_ids
        st = eng.store
        held = st.hold >= 0
        assert bool(held.any()) or not eng.scheduler.running
        assert bool((st.counters.stored[held] <= st.hold[held] + eng.evict_every - 1).all())
    res = [{"token_ids": toks[i]} for i in ids]
    same = total = 0
    for p, r in zip(ps, res):
        ref = hf_generate(model, p, 24, sel)
        same += sum(a == b for a, b in zip(ref, r["token_ids"]))
        total += max(len(ref), len(r["token_ids"]))
        st = eng.store
        assert st.pool.num_used == 0
    assert same / total >= 0.4


def test_preemption_completes_everything():
    model = tiny_model("llama")
    ps = prompts((60, 50, 70, 40, 65, 30), seed=3)
    # one fp token is 2 layers * 2 * 2 heads * 16 * 4 bytes = 512 B; pool of ~2 sequences at final length
    eng = Engine(model, method="full", kv_memory=512 * 220, block_size=8)
    ref = Engine(model, method="full", kv_memory="8MiB", block_size=8)
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    res = eng.generate(ps, sp)
    assert eng.stats().preemptions > 0
    assert all(r["finish_reason"] == "length" and r["output_tokens"] == 40 for r in res)
    big = ref.generate(ps, sp)
    assert [r["token_ids"] for r in res] == [r["token_ids"] for r in big]
    assert eng.stats().blocks_used == 0


def test_preemption_with_codec():
    model = tiny_model("llama")
    ps = prompts((60, 50, 70, 40), seed=4)
    eng = Engine(model, method=method(), kv_memory=60000, block_size=8)
    res = eng.generate(ps, SamplingParams(max_tokens=40, ignore_eos=True))
    assert all(r["output_tokens"] == 40 for r in res)
    assert eng.stats().preemptions > 0 and eng.stats().blocks_used == 0


def test_random_add_abort_finish_no_leak():
    model = tiny_model("llama")
    for m in ("full", method(), "h2o:budget=12", "snapkv:budget=16,window=4"):
        eng = Engine(model, method=m, kv_memory=120000, block_size=8, max_batch=5)
        rng = random.Random(0)
        ids = []
        for _ in range(40):
            r = rng.random()
            if r < 0.4:
                n = rng.randint(1, 50)
                ids.append(eng.add_request([rng.randint(3, 127) for _ in range(n)],
                                           SamplingParams(max_tokens=rng.randint(1, 30), ignore_eos=True)))
            elif r < 0.55 and ids:
                eng.abort(ids[rng.randrange(len(ids))])
            else:
                eng.step()
            assert_blocks_accounted(eng.store)
        while eng.has_unfinished():
            eng.step()
        assert eng.stats().blocks_used == 0 and eng.store.pool.num_free == eng.store.num_blocks


def test_step_outputs_and_abort():
    model = tiny_model("llama")
    eng = Engine(model, kv_memory="4MiB", block_size=8)
    a = eng.add_request(prompts((10,))[0], SamplingParams(max_tokens=5, ignore_eos=True), request_id="a")
    b = eng.add_request(prompts((12,))[0], SamplingParams(max_tokens=50, ignore_eos=True), request_id="b")
    got = {a: [], b: []}
    outs = eng.step()
    for o in outs:
        got[o.request_id] += o.new_token_ids
    assert len(got[a]) == 1 and len(got[b]) == 1
    eng.abort(b)
    eng.abort("unknown")
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
            if o.finished:
                done[o.request_id] = o
    assert done[a].finish_reason == "length" and len(got[a]) == 5 and done[a].output_tokens == 5
    assert done[b].finish_reason == "abort"
    assert eng.stats().blocks_used == 0
    eng.abort(a)  # finished: no-op


def test_too_long_prompt_rejected():
    model = tiny_model("llama")
    eng = Engine(model, kv_memory=60000, block_size=8)
    with pytest.raises(ValueError):
        eng.add_request(list(range(3, 3 + eng.max_prompt_tokens() + 1)), SamplingParams())
    eng.add_request([5] * eng.max_prompt_tokens(), SamplingParams(max_tokens=2))


def test_sampling_params_validation():
    for kw in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"seed": -1}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            SamplingParams(**kw)


def test_seeded_sampling_reproducible():
    model = tiny_model("llama")
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a = Engine(model, kv_memory="4MiB").generate([prompts((9,))[0]], sp)[0]["token_ids"]
    b = Engine(model, kv_memory="4MiB").generate([prompts((9,))[0]], sp)[0]["token_ids"]
    assert a == b


@pytest.mark.parametrize("chunked", [True, False])
def test_error_fails_request_not_engine(monkeypatch, chunked):
    """A failing forward fails its requests (here the first prompt's, alone in its step), not the engine."""
    model = tiny_model("llama")
    eng = Engine(model, kv_memory="4MiB", max_prefill_tokens=3, chunked_prefill=chunked)
    orig = eng.runner.forward
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return orig(*args)

    monkeypatch.setattr(eng.runner, "forward", flaky)
    res = eng.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert res[0]["finish_reason"] == "error" and "boom" in res[0]["error"]
    assert res[1]["finish_reason"] == "length"
    assert eng.stats().blocks_used == 0


def test_background_thread():
    model = tiny_model("llama")
    eng = Engine(model, kv_memory="4MiB", block_size=8)
    stop = threading.Event()
    finished = {}

    def loop():
        while not stop.is_set():
            for o in eng.step():
                if o.finished:
                    finished[o.request_id] = o

    t = threading.Thread(target=loop)
    t.start()
    ids = [eng.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in prompts((5, 9, 13))]
    eng.abort(ids[2])
    import time

    t0 = time.time()
    while len(finished) < 3 and time.time() - t0 < 30:
        time.sleep(0.01)
    stop.set()
    t.join()
    assert finished[ids[0]].finish_reason == "length" and finished[ids[2]].finish_reason in ("abort", "length")
    assert eng.stats().blocks_used == 0


def test_generate_with_tokenizer(tokenizer):
    model = tiny_model("llama")
    eng = Engine(model, tokenizer, kv_memory="4MiB")
    r = eng.generate(["hello"], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert isinstance(r["text"], str) and r["prompt_tokens"] == 5 and r["ttft_s"] >= 0 and r["e2e_s"] >= r["ttft_s"]


@pytest.mark.parametrize("spec", ["kivi:bits=4", "kivi:bits=2", "int8", "int4", "gear", "snapkv:budget=48+kivi:bits=2",
                                  "h2o:budget=24+int8"])
def test_registered_codecs_equal_hf_path(spec):
    from kvshrink.methods import registered

    names = [part.split(":")[0] for part in spec.split("+")]
    if any(n not in registered() for n in names):
        pytest.skip(f"{spec} not registered yet")
    model = tiny_model("llama")
    ps = prompts((40, 19, 140))
    eng = Engine(model, method=spec, kv_memory="8MiB", block_size=32, evict_every=1)
    res = eng.generate(ps, SamplingParams(max_tokens=40))
    for p, r in zip(ps, res):
        agree_until_tie(model, p, r["token_ids"], 40, spec=spec)
    assert eng.stats().blocks_used == 0


@pytest.mark.parametrize("spec,lo,hi", [("full", 0.85, 1.0), ("kivi:bits=2,residual=8,group=8", 3.0, 6.0),
                                        ("streamingllm:budget=16", 3.5, 8.0)])
def test_compression_counts_whole_contexts(spec, lo, hi):
    """The factor compares with an fp cache of every running context, so eviction counts as saved."""
    eng = Engine(tiny_model("llama"), method=spec, kv_memory="4MiB", block_size=8)
    for p in prompts((96, 120)):
        eng.add_request(p, SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()
    eng.step()
    c = eng.stats().compression
    assert lo <= c <= hi, c
    while eng.has_unfinished():
        eng.step()
    assert eng.stats().compression == 1.0


def test_engine_refuses_a_forward_its_attention_did_not_serve():
    """If transformers stops routing attention through the engine's function, no step may pass for a
    paged (compressed) one."""
    from kvshrink.errors import CompressionNotInEffect

    model = tiny_model("llama")
    eng = Engine(model, method=method("kivi:bits=4"), kv_memory="8MiB", block_size=8)
    layer0 = model.model.layers[0].self_attn
    plain = layer0.forward

    def bypass(*args, **kwargs):  # layer 0 attends through plain SDPA, as another attention path would
        kwargs.pop("kvshrink_batch", None)
        return plain(*args, **kwargs)

    layer0.forward = bypass
    (res,) = eng.generate(prompts((12,)), SamplingParams(max_tokens=2))  # a step's error fails its requests
    assert res["finish_reason"] == "error" and res["token_ids"] == []
    assert res["error"].startswith(CompressionNotInEffect.__name__) and "ran in 1 of 2 layers" in res["error"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_steps_leave_the_models_attention_as_they_found_it(arch):
    """The engine routes attention to its function for a step only: between steps the model is the
    caller's (eager here, not the sdpa it was built with), and its plain forward is unchanged."""
    model = tiny_model(arch)
    model.set_attn_implementation("eager")
    ids = torch.tensor([prompts((12,))[0]])
    ref = model(input_ids=ids).logits
    eng = Engine(model, method=method("kivi:bits=4"), kv_memory="8MiB", block_size=8)
    eng.add_request(prompts((12,))[0], SamplingParams(max_tokens=3))
    for _ in range(2):
        eng.step()
        implementations = {getattr(m, "config", model.config)._attn_implementation for m in model.modules()}
        assert implementations == {"eager"}
        torch.testing.assert_close(model(input_ids=ids).logits, ref)
