"""Chunked prefill in one packed forward per step: the same greedy tokens as prefilling each prompt
whole in its own forward, one forward per step, and a staging buffer that never outlives its prompt."""

import pytest

from kvshrink.engine import Engine, SamplingParams
from tests.conftest import tiny_model
from tests.engine.test_engine import prompts
from tests.engine.test_pool import assert_blocks_accounted

LENGTHS = (70, 9, 45, 33, 61)  # several chunks of 16 each for most
SP = SamplingParams(max_tokens=12, ignore_eos=True)


def run(eng: Engine, ps, arrive=(0, 0, 2, 5, 9), checks=None) -> dict[str, list[int]]:
    """Requests arrive at the given steps (while others decode); greedy tokens per request."""
    toks: dict[str, list[int]] = {}
    step = 0
    while len(toks) < len(ps) or eng.has_unfinished():
        for i, (p, at) in enumerate(zip(ps, arrive)):
            if at == step:
                toks[eng.add_request(p, SP, request_id=str(i))] = []
        for o in eng.step():
            toks[o.request_id] += o.new_token_ids
        if checks:
            checks(eng)
        step += 1
    return toks


def unchunked(model, spec, **kw) -> Engine:
    return Engine(model, method=spec, kv_memory="8MiB", block_size=8, chunked_prefill=False, **kw)


def chunked(model, spec, chunk=16, **kw) -> Engine:
    return Engine(model, method=spec, kv_memory="8MiB", block_size=8, max_prefill_tokens=chunk, **kw)


@pytest.mark.parametrize("spec", ["full", "kivi:bits=4,residual=16,group=8", "snapkv:budget=24,window=8",
                                  "h2o:budget=24", "streamingllm:budget=20", "snapkv:budget=24,window=8+int8"])
def test_chunked_equals_unchunked(spec):
    model = tiny_model("llama")
    ps = prompts(LENGTHS)
    ref = run(unchunked(model, spec), ps)
    eng = chunked(model, spec)
    got = run(eng, ps, checks=lambda e: assert_blocks_accounted(e.store))
    assert got == ref
    assert eng.stats().blocks_used == 0


@pytest.mark.parametrize("arch", ["gemma2", "mistral", "gpt_oss", "gemma3"])
def test_chunked_equals_unchunked_on_sliding_layers(arch):
    """Windows of 16 (soft-cap on Gemma-2, sinks on gpt-oss), chunks of 13: a chunk's queries see
    staged keys across chunk borders and not beyond the window."""
    model = tiny_model(arch)
    ps = prompts(LENGTHS)
    for spec in ("full", "snapkv:budget=24,window=8"):
        assert run(chunked(model, spec, chunk=13), ps) == run(unchunked(model, spec), ps), spec


def test_one_forward_per_step_and_budget():
    """Every step runs one forward; its prompt tokens stay within max_prefill_tokens; a prompt in
    flight continues before another is admitted, so at most one is split at a time; the logits are
    taken at the decode rows and at the last token of each prompt that ends."""
    model = tiny_model("llama")
    eng = chunked(model, "full", chunk=16)
    calls = []
    orig = eng.runner.forward

    def counting(batch, segments, ids, pos, keep):
        calls.append((0 if batch is None else batch.B, [(s.start, s.end, s.total) for s in segments], keep))
        return orig(batch, segments, ids, pos, keep)

    eng.runner.forward = counting
    mixed = []

    def checks(e):
        assert len(calls) == 1
        B, segs, keep = calls.pop()
        assert sum(end - start for start, end, _ in segs) <= 16
        assert sum(end < total for _, end, total in segs) <= 1  # one split prompt in flight at most
        assert len(keep) == B + sum(end == total for _, end, total in segs)
        assert sum(r.staging is not None for r in e.scheduler.running) <= 1
        if B and segs:
            mixed.append(1)

    run(eng, prompts(LENGTHS), checks=checks)
    assert mixed  # prompts did share steps with decoding sequences


def test_staging_lives_while_the_prompt_is_split():
    model = tiny_model("llama")
    eng = chunked(model, "snapkv:budget=24,window=8", chunk=16)
    rid = eng.add_request(prompts((50,))[0], SP)
    req = eng._requests[rid]
    eng.step()
    assert req.prefilled == 16 and req.staging is not None and not req.output
    assert req.staging.k.shape[2] == 50 and req.staging.q[0].shape[1] == 8  # the observation window only
    eng.step()
    eng.step()
    assert req.staging is not None and req.prefilled == 48
    eng.step()  # last chunk: stored, first token sampled
    assert req.staging is None and len(req.output) == 1
    # an abort mid-prefill drops the staging and every block
    rid = eng.add_request(prompts((50,), seed=3)[0], SP)
    req = eng._requests[rid]
    eng.step()
    assert req.staging is not None
    eng.abort(rid)
    assert req.staging is None
    while eng.has_unfinished():
        eng.step()
    assert eng.stats().blocks_used == 0


def test_preemption_mid_prefill_recomputes():
    """Two short prompts decode while a long one is prefilled 4 tokens a step; the pool (46 blocks)
    runs out before its last chunk, so it is preempted mid-prefill (its staging dropped), recomputed
    once the others finish, and every request gets the tokens of an unconstrained run."""
    model = tiny_model("llama")
    ps = prompts((8, 8, 120))
    sp = [SamplingParams(max_tokens=80, ignore_eos=True)] * 2 + [SamplingParams(max_tokens=10, ignore_eos=True)]
    ref = unchunked(model, "full").generate(ps, sp)
    block = unchunked(model, "full").store.block_bytes
    eng = Engine(model, kv_memory=46 * block, block_size=8, max_prefill_tokens=4)
    dropped = []
    orig = eng.scheduler.preempt

    def preempt(req):
        dropped.append(req.prefilling and req.staging is not None)
        orig(req)
        assert req.staging is None and req.prefilled == 0 and req.status.value == "waiting"

    eng.scheduler.preempt = preempt
    got = eng.generate(ps, sp)
    assert any(dropped)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in ref]
    assert eng.stats().blocks_used == 0


def test_chunked_equals_unchunked_with_sampling():
    model = tiny_model("qwen2")
    ps = prompts((40, 27, 55))
    sp = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True) for i in range(3)]
    a = chunked(model, "full", chunk=8).generate(ps, sp)
    b = unchunked(model, "full").generate(ps, sp)
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]


def test_config_switch_validated():
    from kvshrink.engine.config import EngineConfig
    from kvshrink.methods import parse

    with pytest.raises(ValueError, match="chunked_prefill"):
        EngineConfig(chunked_prefill=1).resolved(parse("full").codec)
