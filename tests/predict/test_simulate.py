"""The simulator runs the engine's own scheduler and pool: same steps, same preemptions, and times
that follow from the step costs exactly."""

from dataclasses import dataclass, field

import pytest
import torch

from kvshrink.bench.trace import percentile
from kvshrink.engine import Engine, SamplingParams
from kvshrink.engine.config import EngineConfig
from kvshrink.predict.simulate import SimRequest, simulate
from tests.conftest import tiny_model
from tests.engine._codec import method


@dataclass
class Flat:
    prefill: float = 1.0
    decode: float = 0.5
    evict: float = 0.0

    def prefill_s(self, tokens: int) -> float:
        return self.prefill

    def decode_s(self, batch: int, kv_tokens: int) -> float:
        return self.decode

    def evict_s(self, cuts: int) -> float:
        return self.evict * cuts


def test_hand_computed_schedule():
    """Two prompts admitted together: prefilled one at a time (1 s each), both first tokens returned
    when the step ends at t=2; then decode steps of 0.5 s produce tokens 2 and 3 at t=2.5 and t=3."""
    model = tiny_model("llama")
    res = simulate(model.config, "full", [SimRequest(10, 3), SimRequest(10, 3)], Flat(),
                   EngineConfig(kv_memory="8MiB", block_size=8))
    assert res.ttft_s == [2.0, 2.0] and res.e2e_s == [3.0, 3.0]
    assert res.tpot_s == [0.5, 0.5] and res.itl_s == [0.5] * 4
    assert res.makespan_s == 3.0 and res.output_tokens_per_s == 2.0
    assert res.steps == 3 and res.peak_concurrency == 2 and res.preemptions == 0
    assert res.token_steps == {"0": [1, 2, 3], "1": [1, 2, 3]}


def test_arrivals_wait_for_their_time():
    model = tiny_model("llama")
    res = simulate(model.config, "full", [SimRequest(10, 2, 0.0), SimRequest(10, 2, 10.0)], Flat(),
                   EngineConfig(kv_memory="8MiB", block_size=8))
    assert res.ttft_s == [1.0, 1.0] and res.e2e_s == [1.5, 1.5] and res.makespan_s == 11.5
    # busy 3 s of 11.5: two steps a request (1 s prompt, 0.5 s decode), none while nothing is in
    assert res.busy_s == 3.0 and res.steps == 4
    got = res.percentiles()
    assert got["steps"] == 4 and got["step_ms_mean"] == 750.0
    assert got["decode_steps"] == 2 and got["decode_step_ms_mean"] == 500.0 and got["prompt_step_ms_mean"] == 1000.0


def test_a_request_a_millisecond_late_waits_for_the_first_prompt():
    """What a server does with requests sent "at once" that arrive a few ms apart: the first step
    takes the first prompt alone, the next one packs the second with the first's decode."""
    model = tiny_model("llama")
    cfg = EngineConfig(kv_memory="8MiB", block_size=8)
    together = simulate(model.config, "full", [SimRequest(10, 3, 0.0), SimRequest(10, 3, 0.0)], Flat(), cfg)
    apart = simulate(model.config, "full", [SimRequest(10, 3, 0.0), SimRequest(10, 3, 0.001)], Flat(), cfg)
    assert together.ttft_s == [2.0, 2.0] and together.steps == 3
    assert apart.ttft_s == pytest.approx([1.0, 2.499]) and apart.e2e_s == pytest.approx([3.0, 3.499])
    assert apart.steps == 4 and apart.token_steps == {"0": [1, 2, 3], "1": [2, 3, 4]}


def test_a_prefill_delays_the_decode_tokens_of_its_step():
    """A arrives at 0, B at 1.2. Step 1 prefills A (token at 1.0), step 2 decodes A (1.5); in step 3 B
    has arrived: A's decode (0.5 s) and B's prefill (1 s) run in one step, and both tokens come back
    when it ends, at 3.0. Then B decodes alone: 3.5, 4.0."""
    model = tiny_model("llama")
    res = simulate(model.config, "full", [SimRequest(10, 3, 0.0), SimRequest(10, 3, 1.2)], Flat(),
                   EngineConfig(kv_memory="8MiB", block_size=8))
    assert res.token_steps == {"0": [1, 2, 3], "1": [3, 4, 5]}
    assert res.ttft_s == [1.0, pytest.approx(1.8)] and res.e2e_s == [3.0, pytest.approx(2.8)]
    assert res.tpot_s == [1.0, 0.5] and res.itl_s == [0.5, 1.5, 0.5, 0.5]


@dataclass
class Reads(Flat):
    """Records what each decode step reads, and charges it: 0.5 s + 1 ms per column."""

    seen: list = field(default_factory=list)

    def decode_read_s(self, batch: int, kv_tokens: float, kv_read: float) -> float:
        self.seen.append((batch, kv_tokens, kv_read))
        return self.decode + 1e-3 * kv_read


def test_decode_cost_reads_every_sequence_padded_to_the_widest():
    """A 10- and a 40-token prompt (blocks of 8) decode together: attention scores 48 columns for
    each (the long one's 6 blocks once its 41st token has a block), not 10 + 40."""
    model = tiny_model("llama")
    costs = Reads()
    res = simulate(model.config, "full", [SimRequest(10, 2), SimRequest(40, 2)], costs,
                   EngineConfig(kv_memory="8MiB", block_size=8))
    assert costs.seen == [(2, 50.0, 96.0)]
    assert res.e2e_s == [pytest.approx(2.0 + 0.5 + 0.096)] * 2


def _engine_steps(model, spec, lengths, out, kv, evict_every=None, max_prefill=4096, chunked=True):
    eng = Engine(model, method=spec, kv_memory=kv, block_size=8, evict_every=evict_every,
                 max_prefill_tokens=max_prefill, chunked_prefill=chunked)
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(lengths):
        eng.add_request(torch.randint(3, 128, (n,), generator=g).tolist(),
                        SamplingParams(max_tokens=out, ignore_eos=True), request_id=str(i))
    steps: dict[str, list[int]] = {str(i): [] for i in range(len(lengths))}
    step = 0
    while eng.has_unfinished():
        step += 1
        for o in eng.step():
            steps[o.request_id] += [step] * len(o.new_token_ids)
    return steps, eng.stats().preemptions


@pytest.mark.parametrize("spec, kv, max_prefill, chunked", [
    ("full", 512 * 220, 4096, True),  # ~2 sequences at final length: preemption by recompute
    ("full", 512 * 220, 4096, False),  # the engine without chunked prefill: one forward per prompt
    ("full", 512 * 220, 48, True),  # prompts split over steps
    ("full", 512 * 220, 48, False),  # at least one whole prompt a step
    ("q8", 60000, 4096, True),
    ("h2o:budget=16", 30000, 4096, True),  # rolling: cut back every evict_every steps
    ("streamingllm:budget=16", 30000, 100, True),
    ("snapkv:budget=24,window=4", 40000, 64, True),
])
def test_engine_and_simulator_take_the_same_steps(spec, kv, max_prefill, chunked):
    model = tiny_model("llama")
    m = method() if spec == "q8" else spec
    lengths, out = (60, 50, 70, 40, 65, 30), 40
    real, preempted = _engine_steps(model, m, lengths, out, kv, max_prefill=max_prefill, chunked=chunked)
    sim = simulate(model.config, m, [SimRequest(n, out) for n in lengths], Flat(),
                   EngineConfig(kv_memory=kv, block_size=8, max_prefill_tokens=max_prefill, chunked_prefill=chunked))
    assert sim.token_steps == real
    assert sim.preemptions == preempted
    if spec == "full":
        assert preempted > 0


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5


@dataclass
class PerToken(Flat):
    def prefill_s(self, tokens: int) -> float:
        return 0.01 * tokens


def test_a_split_prompt_costs_its_chunks():
    """100 prompt tokens, 60 a step (chunked): [0, 60) costs 0.6 s and samples nothing, [60, 100)
    costs 1.0 - 0.6 = 0.4 s and gives the first token at 1.0; one decode step (0.5 s) follows."""
    model = tiny_model("llama")
    res = simulate(model.config, "full", [SimRequest(100, 2)], PerToken(),
                   EngineConfig(kv_memory="8MiB", block_size=8, max_prefill_tokens=60))
    assert res.token_steps == {"0": [2, 3]} and res.steps == 3
    assert res.ttft_s == [pytest.approx(1.0)] and res.e2e_s == [pytest.approx(1.5)]
    whole = simulate(model.config, "full", [SimRequest(100, 2)], PerToken(),
                     EngineConfig(kv_memory="8MiB", block_size=8, max_prefill_tokens=60, chunked_prefill=False))
    assert whole.token_steps == {"0": [1, 2]} and whole.ttft_s == [pytest.approx(1.0)]


@dataclass
class Packed(Flat):
    """A decode batch in the same forward as a prompt adds 0.1 s instead of its 0.5 s alone."""

    def packed_decode_s(self, batch: int, kv_tokens: float, kv_read: float) -> float:
        return 0.1


def test_a_chunk_after_a_stored_prefix_costs_what_the_cost_model_says_it_does():
    """With a ``chunk_s``, a split prompt's pieces cost it (here 1 s a piece after the first,
    against Flat's 0 s difference of two equal prefills)."""
    @dataclass
    class Chunked(Flat):
        calls: list = field(default_factory=list)

        def chunk_s(self, start: int, end: int) -> float:
            self.calls.append((start, end))
            return self.prefill if start == 0 else 1.0

    model = tiny_model("llama")
    cfg = EngineConfig(kv_memory="8MiB", block_size=8, max_prefill_tokens=16)
    costs = Chunked()
    res = simulate(model.config, "full", [SimRequest(40, 2)], costs, cfg)
    assert costs.calls == [(0, 16), (16, 32), (32, 40)]
    assert res.ttft_s == [3.0] and res.e2e_s == [3.5]
    plain = simulate(model.config, "full", [SimRequest(40, 2)], Flat(), cfg)
    assert plain.ttft_s == [1.0]  # Flat's prefill costs 1 s whatever its length: the difference is 0


def test_a_decode_packed_with_a_prompt_costs_what_the_cost_model_says_packed():
    """As in the test above, but A's decode in step 3 rides in B's prefill forward: the step costs
    1 + 0.1 s (not 1.5), so both tokens come back at 2.6. Unchunked, the prompt has a forward of its
    own and the step costs the sum again."""
    model = tiny_model("llama")
    reqs = [SimRequest(10, 3, 0.0), SimRequest(10, 3, 1.2)]
    res = simulate(model.config, "full", reqs, Packed(), EngineConfig(kv_memory="8MiB", block_size=8))
    assert res.token_steps == {"0": [1, 2, 3], "1": [3, 4, 5]}
    assert res.e2e_s == [pytest.approx(2.6), pytest.approx(2.4)] and res.ttft_s == [1.0, pytest.approx(1.4)]
    apart = simulate(model.config, "full", reqs, Packed(), EngineConfig(kv_memory="8MiB", block_size=8,
                                                                        chunked_prefill=False))
    assert apart.e2e_s == [3.0, pytest.approx(2.8)]


def test_a_packed_decode_never_costs_less_than_decoding_alone():
    """A's 10-token prompt takes 0.1 s; B (1 token) arrives at 0.05 and is prefilled next to A's
    first decode: 0.01 s of prompt + 0.1 s packed is below the decode's 0.5 s alone, so the step
    costs 0.5 s and ends at 0.6."""
    @dataclass
    class TinyPrompt(Packed):
        def prefill_s(self, tokens: int) -> float:
            return 0.01 * tokens

    model = tiny_model("llama")
    res = simulate(model.config, "full", [SimRequest(10, 3, 0.0), SimRequest(1, 1, 0.05)], TinyPrompt(),
                   EngineConfig(kv_memory="8MiB", block_size=8))
    assert res.token_steps["1"] == [2] and res.e2e_s[1] == pytest.approx(0.6 - 0.05)



@pytest.mark.parametrize("spec", ["full", "kivi:bits=4,residual=32"])
def test_a_bf16_model_pool_is_accounted_in_bf16(spec):
    """A bf16 model's tokens take half an fp32 one's bytes: the simulator sizes its pool in the
    config's dtype (a profile's config holds the dtype it was measured in), and takes the steps
    the bf16 engine takes in the same bytes; charged fp32 bytes, it would admit fewer."""
    from kvshrink.predict.simulate import config_dtype

    model = tiny_model("llama").to(torch.bfloat16)
    assert config_dtype(model.config) == torch.float32  # .to() leaves the config as it was
    model.config.dtype = torch.bfloat16  # as load_model and a profile's config say it
    lengths, out, kv = (60, 50, 70, 40, 65, 30), 40, 512 * 220
    real, preempted = _engine_steps(model, spec, lengths, out, kv)
    reqs = [SimRequest(n, out) for n in lengths]
    sim = simulate(model.config, spec, reqs, Flat(), EngineConfig(kv_memory=kv, block_size=8))
    assert sim.token_steps == real and sim.preemptions == preempted
    as_fp32 = simulate(model.config, spec, reqs, Flat(), EngineConfig(kv_memory=kv, block_size=8), dtype=torch.float32)
    assert as_fp32.peak_concurrency < sim.peak_concurrency


def test_a_profile_says_the_dtype_it_was_measured_in(tmp_path):
    import json

    from kvshrink.predict.simulate import config_dtype
    from kvshrink.predict.throughput import load_profile

    cfg = tiny_model("llama").config.to_dict()
    (tmp_path / "summary.json").write_text(json.dumps({"model_config": {**cfg, "dtype": "float32"}, "methods": {}}))
    (tmp_path / "config.json").write_text(json.dumps({"kind": "profile", "dtype": "torch.bfloat16"}))
    assert config_dtype(load_profile(tmp_path)[0]) == torch.bfloat16  # what was measured, over a stale config
    (tmp_path / "config.json").unlink()
    assert config_dtype(load_profile(tmp_path)[0]) == torch.float32
