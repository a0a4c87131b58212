"""``kvshrink profile``: what an engine step costs on this machine, by what is in it, per method.

Raw points, measured through the real engine (so codec encode/decode, selector scoring and eviction
are in them), are kept as records; ``costmodel.fit_points`` fits the per-operator cost model
(prefill quadratic in T; decode piecewise-linear in the batch size plus a term per stored token the
attention reads, so dequantisation lands in the read term; eviction per cut-back).

Decode is measured as *batch ladders*: one engine prefills ``B`` prompts of ``C`` tokens once (each
prompt's prefill is a prefill sample too), then decode steps are timed at every batch size from ``B``
down to 1 by choosing which of the running sequences a step decodes (the others keep their blocks and
wait). A point per batch size costs a few steps instead of a prefill of its own, which is what makes
measuring every batch size affordable: on a CPU a step's cost is neither linear nor monotone in the
batch (a GEMM with M=4 costs 2.3x M=1, and M=8 or 16 can be cheaper than M=7 or 15, the kernel's
blocking), so the cost model interpolates between measured batch sizes rather than assuming a slope.
Every sample is kept twice: wall-clock ``seconds`` (what a step takes here, now) and ``cpu_seconds``,
this thread's CPU time over the same step (``time.thread_time``; with one torch thread the forward runs
in it): on a shared machine the first grows with the other processes' load, the second hardly does,
so a profile's CPU-time fit and the CPU share a run gets (``predict validate``) tell a wrong cost
model from a busy machine. The batch sizes are visited in ``rounds`` interleaved passes (alternating direction), so a burst of
load from another process on a shared machine spreads over all of them instead of bending the curve
at the few it happened to coincide with; the median over the passes is kept.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kvshrink.bench.throughput import _fp_token_bytes
from kvshrink.engine import Engine, SamplingParams
from kvshrink.engine.config import EngineConfig
from kvshrink.engine.timers import reset_timers, timers
from kvshrink.predict.simulate import decode_read


@dataclass(frozen=True)
class ProfileGrid:
    """What ``measure`` times. ``prefill``: prompt lengths (``repeats`` times each, interleaved, median
    kept). ``ladders``: ``(max batch, prompt length)`` pairs, each timed at every batch size from the
    max down to 1, in ``rounds`` passes of ``warmup`` untimed then ``steps`` timed decode steps."""

    prefill: tuple[int, ...] = (64, 256, 512, 1024, 2048)
    ladders: tuple[tuple[int, int], ...] = ((16, 256), (8, 1024))
    steps: int = 3
    warmup: int = 1
    rounds: int = 3
    repeats: int = 2
    mixed_prompt: int = 256  # mixed steps: a prompt of this many tokens (at most the ladder's) admitted
    # into a step of 1, half the ladder's and all its sequences, ``repeats`` times each; 0: none
    # chunks: ``(start, tokens)``, a prompt's tokens [start, start + tokens) after its first ``start``
    # were prefilled (``tokens <= start``: the step budget is ``start``); () for none, >= 3 to fit
    chunks: tuple[tuple[int, int], ...] = ((256, 256), (512, 512), (1024, 256), (1024, 1024))

    def to_dict(self) -> dict:
        return {"prefill": list(self.prefill), "ladders": [list(x) for x in self.ladders], "steps": self.steps,
                "warmup": self.warmup, "rounds": self.rounds, "repeats": self.repeats,
                "mixed_prompt": self.mixed_prompt, "chunks": [list(x) for x in self.chunks]}

    def mixed_batches(self, max_batch: int) -> list[int]:
        return sorted({max_batch, max(1, max_batch // 2), 1}, reverse=True) if self.mixed_prompt else []


DEFAULT_GRID = ProfileGrid()
QUICK_GRID = ProfileGrid(prefill=(32, 128, 256), ladders=((8, 128), (4, 256)), steps=2, rounds=2, mixed_prompt=128,
                         chunks=((64, 64), (128, 128), (256, 64)))


def measure(model, method: str, grid: ProfileGrid = DEFAULT_GRID, seed: int = 0, progress: bool = True) -> list[dict]:
    """Raw points through the engine: prefills of each size, then each decode ladder."""
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    fp_token = _fp_token_bytes(model)
    points: list[dict] = []
    work = (len(grid.prefill) + len(grid.chunks)) * grid.repeats + sum(
        b * grid.rounds + len(grid.mixed_batches(b)) * grid.repeats for b, _ in grid.ladders)
    bar = tqdm(total=work, desc=f"profile {method}", unit="pt", disable=not progress)
    engines = {T: Engine(model, method=method, kv_memory=int(2 * T * fp_token) + (16 << 20), max_prefill_tokens=T)
               for T in grid.prefill}
    times: dict[int, list[float]] = {T: [] for T in grid.prefill}
    cpu: dict[int, list[float]] = {T: [] for T in grid.prefill}
    for _ in range(grid.repeats):  # sizes interleaved: a burst of outside load hits one sample of several
        for T, eng in engines.items():
            eng.add_request(prompt(T), SamplingParams(max_tokens=1, ignore_eos=True))
            reset_timers()
            c0 = time.thread_time()
            while eng.has_unfinished():
                eng.step()
            cpu[T].append(time.thread_time() - c0)
            times[T].append(timers().get("prefill", 0.0))
            bar.update()
    points += [{"kind": "prefill", "method": method, "tokens": T, "seconds": statistics.median(ts), "samples": ts,
                "cpu_seconds": statistics.median(cpu[T]), "cpu_samples": cpu[T]} for T, ts in times.items()]
    del engines
    points += _chunks(model, method, grid, prompt, fp_token, bar)
    for B, C in grid.ladders:
        points += _ladder(model, method, B, C, grid, prompt, fp_token, bar)
    bar.close()
    return points


def _chunks(model, method: str, grid: ProfileGrid, prompt, fp_token: int, bar) -> list[dict]:
    """Each ``(start, tokens)`` of the grid: a prompt of ``start + tokens`` under a step budget of
    ``start``, so its second step prefills the chunk after a stored prefix; that step timed."""
    for start, tokens in grid.chunks:
        if not 0 < tokens <= start:
            raise ValueError(f"profile chunk ({start}, {tokens}): need 0 < tokens <= start")
    engines = {c: Engine(model, method=method, kv_memory=int(2 * sum(c) * fp_token) + (16 << 20),
                         max_prefill_tokens=c[0]) for c in grid.chunks}
    times: dict[tuple[int, int], list[float]] = {c: [] for c in grid.chunks}
    cpu: dict[tuple[int, int], list[float]] = {c: [] for c in grid.chunks}
    for _ in range(grid.repeats):
        for c, eng in engines.items():
            eng.add_request(prompt(sum(c)), SamplingParams(max_tokens=1, ignore_eos=True))
            eng.step()  # tokens [0, start)
            reset_timers()
            c0 = time.thread_time()
            eng.step()  # tokens [start, start + tokens): the chunk, and the first token
            cpu[c].append(time.thread_time() - c0)
            times[c].append(timers().get("prefill", 0.0))
            if eng.has_unfinished():
                raise RuntimeError(f"profile {method}: the chunk {c} did not end its prompt in two steps")
            bar.update()
    return [{"kind": "chunk", "method": method, "start": s, "tokens": n, "seconds": statistics.median(times[(s, n)]),
             "samples": times[(s, n)], "cpu_seconds": statistics.median(cpu[(s, n)]), "cpu_samples": cpu[(s, n)]}
            for s, n in grid.chunks]


def _ladder(model, method: str, B: int, C: int, grid: ProfileGrid, prompt, fp_token: int, bar) -> list[dict]:
    # the first sequence decodes in every step of the ladder, plus while the others are admitted
    mixed = grid.mixed_batches(B)
    longest = C + B * grid.rounds * (grid.steps + grid.warmup) + B + 8 + len(mixed) * grid.repeats
    T = min(grid.mixed_prompt, C)
    # one whole prompt admitted per step, in a forward of its own (unchunked): each prefill timed alone
    eng = Engine(model, method=method, config=EngineConfig(
        kv_memory=int((B * longest + T) * fp_token * 1.3) + (32 << 20), max_batch=B + 1, max_prefill_tokens=C,
        chunked_prefill=False))
    for _ in range(B):
        eng.add_request(prompt(C), SamplingParams(max_tokens=longest - C, ignore_eos=True))
    sch = eng.scheduler
    prefills = []
    while sch.waiting or any(not r.output for r in sch.running):
        reset_timers()
        eng.step()
        if timers().get("prefill"):
            prefills.append(timers()["prefill"])
    eng.step()  # warm-up at the full batch
    everyone = list(sch.running)  # admission order; a step decodes a prefix of it
    samples: dict[int, list[float]] = {b: [] for b in range(1, B + 1)}
    kv_tokens: dict[int, list[float]] = {b: [] for b in range(1, B + 1)}
    kv_read: dict[int, list[float]] = {b: [] for b in range(1, B + 1)}
    cpu_samples: dict[int, list[float]] = {b: [] for b in range(1, B + 1)}
    cuts: list[tuple[int, int, float]] = []  # (batch, cut-backs, seconds) of the steps that cut
    for rnd in range(grid.rounds):
        for b in (range(B, 0, -1) if rnd % 2 == 0 else range(1, B + 1)):
            # the scheduler decodes what is running: the others wait with their blocks, as if preempted
            # without being freed (no request is waiting, so nothing is admitted into the free slots)
            sch.running = everyone[:b]
            for i in range(grid.warmup + grid.steps):
                tokens, read = batch_reads(eng)
                t, c, cut = timed_step(eng)
                if cut:
                    cuts.append((b, cut, timers().get("compact", 0.0)))
                if i >= grid.warmup:
                    samples[b].append(t)
                    cpu_samples[b].append(c)
                    kv_tokens[b].append(tokens)
                    kv_read[b].append(read)
            bar.update()
    points_mixed = []
    # from here one forward carries the decode batch and the prompt (the engine's default, chunked)
    eng.cfg, sch.chunked = dataclasses.replace(eng.cfg, chunked_prefill=True), True
    for b in mixed:
        for _ in range(grid.repeats):
            # paired with the same prompt alone and the same batch alone, timed next to it: what the
            # packing saves is a small difference of large times, so the machine's drift must cancel
            point = {"kind": "mixed", "method": method, "batch": b, "context": C, "tokens": T}
            for part, batch in (("prefill", []), ("decode", everyone[:b]), ("mixed", everyone[:b])):
                sch.running = batch
                if part == "mixed":
                    point["kv_tokens"], point["kv_read"] = batch_reads(eng)
                if part != "decode":
                    eng.add_request(prompt(T), SamplingParams(max_tokens=1, ignore_eos=True))  # done in the step
                t, c, _ = timed_step(eng)
                if part not in timers():
                    raise RuntimeError(f"profile {method}: the {part} step of {len(batch)} sequences and a {T}-token "
                                       f"prompt did not run as one")
                key = "" if part == "mixed" else f"{part}_"
                point[f"{key}seconds"], point[f"{key}cpu_seconds"] = t, c
            points_mixed.append(point)
            bar.update()
    sch.running = everyone
    points = [{"kind": "prefill", "method": method, "tokens": C, "seconds": statistics.median(prefills),
               "samples": prefills, "source": f"ladder {B}x{C}"}] if prefills else []
    for b in range(B, 0, -1):
        points.append({"kind": "decode", "method": method, "batch": b, "context": C,
                       "kv_tokens": statistics.mean(kv_tokens[b]), "kv_read": statistics.mean(kv_read[b]),
                       "seconds": statistics.median(samples[b]), "samples": samples[b],
                       "cpu_seconds": statistics.median(cpu_samples[b]), "cpu_samples": cpu_samples[b]})
    points += [{"kind": "evict", "method": method, "batch": b, "context": C, "cuts": n, "seconds": t,
                "cpu_seconds": t} for b, n, t in cuts]
    return points + points_mixed


def batch_reads(eng: Engine) -> tuple[float, float]:
    """The running batch's stored tokens and padded read per layer, as its next decode step sees them."""
    st = eng.store
    slots = torch.tensor([r.slot for r in eng.scheduler.running])
    return int(st.counters.stored[slots].sum()) / st.L, decode_read(st, slots, st.plan_growth(slots).new_blocks)


def timed_step(eng: Engine) -> tuple[float, float, int]:
    """One engine step: wall and CPU seconds without a rolling selector's cut-back (the evict
    operator's, not the step's; its CPU time taken as its wall time), and the cut-backs it made."""
    evictions = eng.stats().evictions
    reset_timers()
    t0, c0 = time.perf_counter(), time.thread_time()
    eng.step()
    t, c = time.perf_counter() - t0, time.thread_time() - c0
    cut = eng.stats().evictions - evictions
    if cut:
        compact = timers().get("compact", 0.0)
        t, c = t - compact, c - min(c, compact)
    return t, c, cut

