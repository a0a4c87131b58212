"""Discrete-event simulation of the engine: its own ``Scheduler`` and pool accounting, without the model.

The engine's ``KVStore`` is built on the ``meta`` device (no KV memory is allocated, the block pool and
every counter are the real ones), requests go through ``Scheduler.schedule`` exactly as in
``Engine.step``, prefills are recorded with the selector's per-layer budgets (``record_stored``),
decode steps take their blocks with ``plan_growth``/``allocate`` (preempting as the engine does) and
advance the counters, and rolling selectors are cut back by ``evict_due`` with the accounting-only cut.
Only time is modelled: each step costs what a :class:`StepCosts` says a step with that content costs.

A step is timed as the engine runs it: the decode of the running batch, the cut-backs due, and the
step's prefill chunks (``SchedulerOutput.chunks``: whole prompts unchunked, each in a forward of its
own; chunked, the pieces the step's ``max_prefill_tokens`` leaves room for, packed into the decode's
forward). A preempted request re-prefills prompt + generated tokens (recompute). The cost of a step
is the sum of its parts: a chunk ``[s, e)`` costs ``chunk_s(s, e)`` where the cost model measured
chunks, else ``prefill_s(e) - prefill_s(s)``; a decode batch
packed with chunks into one forward costs ``packed_decode_s`` where the cost model has it (the
weights are read once for decode and prompt rows: the profile's mixed steps measure what that saves),
never less than decoding alone would. Every token of a step is stamped at the
step's end, because that is when ``Engine.step`` returns them to its caller (``bench throughput`` and
the server's worker alike): a decode token of a step that also admits a long prompt waits for it.

A change to admission, preemption or eviction in the engine changes the simulation with it: they are
the same functions (``tests/predict/test_simulate.py`` checks the two step for step).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvshrink.bench.trace import TraceRequest, percentile, step_means
from kvshrink.engine.config import EngineConfig
from kvshrink.engine.eviction import cut_accounting, evict_due
from kvshrink.engine.pool import KVStore
from kvshrink.engine.request import Request, RequestStatus
from kvshrink.engine.scheduler import Scheduler
from kvshrink.engine.types import SamplingParams
from kvshrink.methods import CompressionMethod, parse


class StepCosts(Protocol):
    """Seconds an engine step spends, by what is in it."""

    def prefill_s(self, tokens: int) -> float:
        """One prompt of ``tokens`` tokens through the model (the engine prefills one at a time)."""

    def decode_s(self, batch: int, kv_tokens: int) -> float:
        """One decode step of ``batch`` sequences whose attention reads ``kv_tokens`` stored tokens
        per layer in all (the sum of the sequences' stored lengths, averaged over layers)."""

    def evict_s(self, cuts: int) -> float:
        """``cuts`` (sequence, layer) cut-backs of a rolling selector."""


def decode_read(store: KVStore, slots: torch.Tensor, new_blocks: torch.Tensor | None = None) -> float:
    """Stored-order columns the decode attention of ``slots`` scores, per layer on average: every
    sequence is padded to the widest of the batch (``DecodeBatch.width``: the most blocks any sequence
    holds, times the block size, or the longest stored length + 1), so a short sequence batched with
    a long one costs what the long one costs. A cost model that knows this (``decode_read_s``) gets it.
    Counted after the step's blocks are taken, as ``DecodeBatch`` sees them (before: pass the plan's
    ``new_blocks``)."""
    c = store.counters.rows(slots)
    blocks = c.blocks if new_blocks is None else c.blocks + new_blocks
    width = torch.maximum(blocks.amax(0) * store.bs, c.stored.amax(0) + 1)  # [L]
    return float(len(slots) * width.sum()) / store.L


def _decode_cost(costs: StepCosts):
    """``(batch, kv_tokens, kv_read) -> seconds``: the padded read where the cost model takes it."""
    padded = getattr(costs, "decode_read_s", None)
    if padded is not None:
        return padded
    return lambda batch, kv_tokens, kv_read: costs.decode_s(batch, kv_tokens)


def _chunk_cost(costs: StepCosts):
    """``(start, end) -> seconds`` of a prompt's tokens ``[start, end)``: the cost model's chunk
    cost where it has one (``chunk_s``: a chunk after a stored prefix, measured), else what
    prefilling up to ``end`` costs beyond prefilling up to ``start``."""
    chunk = getattr(costs, "chunk_s", None)
    if chunk is not None:
        return chunk
    return lambda start, end: costs.prefill_s(end) - (costs.prefill_s(start) if start else 0.0)


SimRequest = TraceRequest  # one request of a simulated workload: the trace format


@dataclass
class SimResult:
    output_tokens_per_s: float
    makespan_s: float
    ttft_s: list[float]
    tpot_s: list[float]
    itl_s: list[float]
    e2e_s: list[float]
    peak_concurrency: int
    preemptions: int
    steps: int
    finish_reasons: dict[str, int] = field(default_factory=dict)
    busy_s: float = 0.0  # the steps' seconds in all (the makespan less the idle time between arrivals)
    decode_steps: int = 0  # steps that prefilled no prompt token, and their seconds
    decode_busy_s: float = 0.0
    token_steps: dict[str, list[int]] = field(default_factory=dict)  # request id ("0", "1", ...) -> steps

    def percentiles(self) -> dict[str, float]:
        out: dict[str, float] = {"output_tokens_per_s": self.output_tokens_per_s, "makespan_s": self.makespan_s,
                                 "peak_concurrency": self.peak_concurrency, "preemptions": self.preemptions,
                                 **step_means(self.steps, self.busy_s, self.decode_steps, self.decode_busy_s)}
        for name, xs in (("ttft", self.ttft_s), ("tpot", self.tpot_s), ("itl", self.itl_s), ("e2e", self.e2e_s)):
            for p in (50, 90, 99):
                v = percentile(xs, p)
                out[f"{name}_ms_p{p}"] = None if v is None else v * 1000
        return out


def config_dtype(model_config) -> torch.dtype:
    """The dtype a config's model runs in (a profile's config holds the dtype it was measured in),
    float32 where it names none."""
    got = getattr(model_config, "dtype", None)
    if isinstance(got, str):
        got = getattr(torch, got.removeprefix("torch."), None)
    return got if isinstance(got, torch.dtype) else torch.float32


def simulate(model_config, method: str | CompressionMethod, requests: Sequence[SimRequest], costs: StepCosts,
             config: EngineConfig | None = None, dtype: torch.dtype | None = None) -> SimResult:
    """Run ``requests`` through the engine's scheduler and pool against ``costs``; every request
    generates exactly its ``output_tokens`` (a length model, or EOS, decides them beforehand).
    ``dtype``: the pool's (the model's) dtype, by default the config's: a bf16 token costs half the
    bytes of an fp32 one, so the same pool holds twice the uncompressed sequences."""
    m = parse(method)
    cfg = (config or EngineConfig()).resolved(m.codec)
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    dtype = dtype or config_dtype(model_config)
    store = KVStore(text, m, cfg.kv_memory, cfg.block_size, cfg.max_batch, dtype, torch.device("meta"))
    sch = Scheduler(store, min(cfg.max_batch, store.max_slots), cfg.max_prefill_tokens, chunked=cfg.chunked_prefill)
    max_context = int(getattr(text, "max_position_embeddings", 0) or 1 << 30)
    pending = [(r.arrival_s, i, r) for i, r in enumerate(requests)]
    heapq.heapify(pending)
    live: dict[int, tuple[Request, SimRequest]] = {}
    times: dict[int, list[float]] = {}
    reasons: dict[str, int] = {}
    token_steps: dict[str, list[int]] = {}  # request id -> the step (1-based) of each output token
    clock, steps, peak, busy = 0.0, 0, 0, 0.0
    decode_steps, decode_busy = 0, 0.0
    decode_cost, chunk_cost = _decode_cost(costs), _chunk_cost(costs)
    packed = getattr(costs, "packed_decode_s", None)
    done = 0

    def finish(req: Request, reason: str) -> None:
        nonlocal done
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        reasons[reason] = reasons.get(reason, 0) + 1
        done += 1

    while done < len(requests):
        while pending and pending[0][0] <= clock:
            _, i, r = heapq.heappop(pending)
            if r.prompt_tokens < 1 or r.output_tokens < 1:
                raise ValueError(f"request {i}: prompt_tokens and output_tokens must be >= 1")
            req = Request(str(i), [0] * r.prompt_tokens, SamplingParams(max_tokens=r.output_tokens, ignore_eos=True),
                          arrival=r.arrival_s)
            live[id(req)] = (req, r)
            times[id(req)] = []
            token_steps[req.request_id] = []
            sch.add(req)
        if not sch.running and not sch.waiting:
            clock = pending[0][0]
            continue
        plan = sch.schedule()
        steps += 1
        for req in plan.too_long:
            finish(req, "length")
        produced: list[Request] = []  # in the engine's order: the decode batch, then prefills

        def emit(req: Request, step: int, produced: list[Request]) -> None:
            req.output.append(0)
            token_steps[req.request_id].append(step)
            produced.append(req)
            if len(req.output) >= req.sampling.max_tokens or len(req.context) >= max_context:
                finish(req, "length")

        decode_alone = decode_packed = evict_s = chunks_s = 0.0
        if plan.decode:
            slots = plan.growth.slots
            kv_tokens = int(store.counters.stored[slots].sum()) / store.L
            read = decode_read(store, slots)
            decode_alone = decode_packed = decode_cost(len(plan.decode), int(kv_tokens), read)
            if packed is not None and plan.chunks and cfg.chunked_prefill:  # one forward with the prompts
                decode_packed = packed(len(plan.decode), int(kv_tokens), read)
            store.advance(plan.growth)
            for req in plan.decode:
                emit(req, steps, produced)
            alive = [r.slot for r in plan.decode if not r.finished]
            if alive:  # the engine cuts back inside its decode phase, before the prefills
                cuts = evict_due(store, torch.tensor(alive), cfg.evict_every, cut=cut_accounting)
                if cuts:
                    evict_s = costs.evict_s(cuts)
        for chunk in plan.chunks:
            req = chunk.req
            chunks_s += chunk_cost(chunk.start, chunk.end)
            if chunk.last:  # the prompt's KV enters the pool, its first token is sampled
                for layer, kept in enumerate(store.kept_per_layer(req.prefill_len)):
                    store.record_stored(torch.tensor([req.slot]), layer, kept)
                req.prefills += 1
                emit(req, steps, produced)
        step_s = evict_s + max(decode_alone, chunks_s + decode_packed)  # packed: never below decoding alone
        clock, busy = clock + step_s, busy + step_s
        if not plan.chunks:
            decode_steps, decode_busy = decode_steps + 1, decode_busy + step_s
        peak = max(peak, len(sch.running))
        for req in produced:  # all returned by the step at its end
            times[id(req)].append(clock)
        for req in produced + plan.too_long:
            if req.finished and req.slot is not None:
                sch.remove(req)

    ttft, tpot, itl, e2e = [], [], [], []
    total_out = 0
    for req, r in live.values():
        ts = times[id(req)]
        total_out += len(req.output)
        if not ts:
            continue
        # a preempted request recomputes: its tokens so far are kept, so times stay monotonic
        ttft.append(ts[0] - r.arrival_s)
        e2e.append(ts[-1] - r.arrival_s)
        if len(ts) > 1:
            tpot.append((ts[-1] - ts[0]) / (len(ts) - 1))
            itl += [b - a for a, b in zip(ts, ts[1:])]
    start = min(r.arrival_s for r in requests)
    makespan = clock - start
    return SimResult(total_out / makespan if makespan > 0 else 0.0, makespan, ttft, tpot, itl, e2e, peak,
                     sch.preemptions, steps, reasons, busy, decode_steps, decode_busy, token_steps)
