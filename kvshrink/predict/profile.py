"""``kvshrink profile``: what an engine step costs on this machine, by what is in it, per method.

Raw points, measured through the real engine (so codec encode/decode, selector scoring and eviction
are in them), are kept as records; ``costmodel.fit_points`` fits the per-operator cost model
(prefill quadratic in T; decode linear in batch and in the stored tokens read, so dequantisation
lands in the read term; eviction per cut-back).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from kvshrink.bench.throughput import _fp_token_bytes
from kvshrink.engine import Engine, SamplingParams
from kvshrink.engine.timers import reset_timers, timers


def measure(model, method: str, prefill_sizes: Sequence[int], decode_grid: Sequence[tuple[int, int]],
            steps: int = 8, repeats: int = 2, seed: int = 0, progress: bool = True) -> list[dict]:
    """Raw points through the engine: prefills of each size, decode steps of each (batch, context)."""
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    fp_token = _fp_token_bytes(model)
    points: list[dict] = []
    work = len(prefill_sizes) * repeats + len(decode_grid)
    bar = tqdm(total=work, desc=f"profile {method}", unit="pt", disable=not progress)
    for T in prefill_sizes:
        eng = Engine(model, method=method, kv_memory=int(2 * T * fp_token) + (16 << 20), max_prefill_tokens=T)
        times = []
        for _ in range(repeats):
            eng.add_request(prompt(T), SamplingParams(max_tokens=1, ignore_eos=True))
            reset_timers()
            while eng.has_unfinished():
                eng.step()
            times.append(timers().get("prefill", 0.0))
            bar.update()
        points.append({"kind": "prefill", "method": method, "tokens": T, "seconds": statistics.median(times)})
    for B, C in decode_grid:
        kv = int(B * (C + steps + 8) * fp_token * 1.3) + (32 << 20)
        eng = Engine(model, method=method, kv_memory=kv, max_batch=B)
        for _ in range(B):
            eng.add_request(prompt(C), SamplingParams(max_tokens=max(steps, 64) + 8, ignore_eos=True))
        while eng.scheduler.waiting or any(not r.output for r in eng.scheduler.running):
            eng.step()
        eng.step()  # warm-up decode
        st = eng.store
        # a rolling selector's cut-backs come every evict_every steps: measure at least one
        rolling = eng.method.selector.decode_hold(C, 0, st.L) is not None
        n_steps = max(steps, eng.evict_every + 2) if rolling else steps
        per_step, kv_tokens, cuts_before = [], [], eng.stats().evictions
        reset_timers()
        for _ in range(n_steps):
            kv_tokens.append(int(st.counters.stored[list(st.reserved)].sum()) / st.L)
            t0 = time.perf_counter()
            eng.step()
            per_step.append(time.perf_counter() - t0)
        evict_s, cuts = timers().get("compact", 0.0), eng.stats().evictions - cuts_before
        points.append({"kind": "decode", "method": method, "batch": B, "context": C,
                       "kv_tokens": statistics.mean(kv_tokens),
                       "seconds": statistics.median(per_step) - (evict_s / n_steps if not rolling else 0.0)})
        points.append({"kind": "evict", "method": method, "batch": B, "context": C, "cuts": cuts,
                       "seconds": evict_s})
        bar.update()
    bar.close()
    return points
