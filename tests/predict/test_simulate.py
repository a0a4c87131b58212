"""The simulator runs the engine's own scheduler and pool: same steps, same preemptions, and times
that follow from the step costs exactly."""

from dataclasses import dataclass

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
    """Two prompts admitted together: prefills at t=1 and t=2 (one at a time), then decode steps of
    0.5 s produce both sequences' tokens 2 and 3 at t=2.5 and t=3."""
    model = tiny_model("llama")
    res = simulate(model.config, "full", [SimRequest(10, 3), SimRequest(10, 3)], Flat(),
                   EngineConfig(kv_memory="8MiB", block_size=8))
    assert res.ttft_s == [1.0, 2.0] and res.e2e_s == [3.0, 3.0]
    assert res.tpot_s == [1.0, 0.5] and sorted(res.itl_s) == [0.5, 0.5, 0.5, 1.5]
    assert res.makespan_s == 3.0 and res.output_tokens_per_s == 2.0
    assert res.steps == 3 and res.peak_concurrency == 2 and res.preemptions == 0
    assert res.token_steps == {"0": [1, 2, 3], "1": [1, 2, 3]}


def test_arrivals_wait_for_their_time():
    model = tiny_model("llama")
    res = simulate(model.config, "full", [SimRequest(10, 2, 0.0), SimRequest(10, 2, 10.0)], Flat(),
                   EngineConfig(kv_memory="8MiB", block_size=8))
    assert res.ttft_s == [1.0, 1.0] and res.e2e_s == [1.5, 1.5] and res.makespan_s == 11.5


def _engine_steps(model, spec, lengths, out, kv, evict_every=None):
    eng = Engine(model, method=spec, kv_memory=kv, block_size=8, evict_every=evict_every)
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


@pytest.mark.parametrize("spec, kv", [
    ("full", 512 * 220),  # ~2 sequences at final length: preemption by recompute
    ("q8", 60000),
    ("h2o:budget=16", 30000),  # rolling: cut back every evict_every steps
    ("streamingllm:budget=16", 30000),
    ("snapkv:budget=24,window=4", 40000),
])
def test_engine_and_simulator_take_the_same_steps(spec, kv):
    model = tiny_model("llama")
    m = method() if spec == "q8" else spec
    lengths, out = (60, 50, 70, 40, 65, 30), 40
    real, preempted = _engine_steps(model, m, lengths, out, kv)
    sim = simulate(model.config, m, [SimRequest(n, out) for n in lengths], Flat(),
                   EngineConfig(kv_memory=kv, block_size=8))
    assert sim.token_steps == real
    assert sim.preemptions == preempted
    if spec == "full":
        assert preempted > 0


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
