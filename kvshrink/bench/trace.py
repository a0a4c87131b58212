"""Request traces: one file that ``bench throughput --trace`` measures and ``predict throughput``
simulates, so a prediction and a measurement of the same requests compare directly.

JSON Lines, one request a line: ``{"prompt_tokens": 512, "output_tokens": 128, "arrival_s": 0.0}``
(``arrival_s`` optional: all at once). Every request generates exactly ``output_tokens`` (EOS ignored).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvshrink.engine import Engine, SamplingParams


@dataclass
class TraceRequest:
    prompt_tokens: int
    output_tokens: int
    arrival_s: float = 0.0


def load_trace(path: str | Path) -> list[TraceRequest]:
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            r = TraceRequest(int(d["prompt_tokens"]), int(d["output_tokens"]), float(d.get("arrival_s", 0.0)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: want {{\"prompt_tokens\": N, \"output_tokens\": N, \"arrival_s\": S}}"
                             f" ({type(e).__name__}: {e})") from None
        if r.prompt_tokens < 1 or r.output_tokens < 1 or r.arrival_s < 0:
            raise ValueError(f"{path}:{i}: prompt_tokens and output_tokens must be >= 1, arrival_s >= 0")
        out.append(r)
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def percentile(xs, p: float) -> float | None:
    """Linear-interpolation percentile (numpy's default, as ``bench.metrics``); None when empty."""
    return float(np.percentile(xs, p)) if len(xs) else None


def step_means(steps: int, step_s: float, decode_steps: int, decode_s: float) -> dict:
    """A run's step count and mean step times in ms: all steps, those that prefilled no prompt token
    (decode only) and the rest (None where there are none); measured here and simulated alike."""
    out: dict = {"steps": steps, "decode_steps": decode_steps}
    for key, seconds, n in (("step_ms_mean", step_s, steps), ("decode_step_ms_mean", decode_s, decode_steps),
                            ("prompt_step_ms_mean", step_s - decode_s, steps - decode_steps)):
        out[key] = seconds / n * 1000 if n else None
    return out


def run_trace(model, method: str, requests: list[TraceRequest], kv_memory: int | str, seed: int = 0) -> dict:
    """The engine on ``requests``, arrivals honoured on the wall clock (random token ids of the given
    lengths). Returns output tokens/s and TTFT/TPOT/E2E percentiles, as ``predict throughput`` does."""
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    eng = Engine(model, method=method, kv_memory=kv_memory)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    times: dict[str, list[float]] = {}
    peak, steps, step_s = 0, 0, 0.0
    decode_steps, decode_s, prompt_tokens = 0, 0.0, 0  # steps that prefilled no prompt token
    t0 = time.perf_counter()
    added = 0
    while added < len(order) or eng.has_unfinished():
        now = time.perf_counter() - t0
        while added < len(order) and requests[order[added]].arrival_s <= now:
            i = order[added]
            r = requests[i]
            eng.add_request(torch.randint(3, vocab, (r.prompt_tokens,), generator=g).tolist(),
                            SamplingParams(max_tokens=r.output_tokens, ignore_eos=True), request_id=str(i))
            times[str(i)] = []
            added += 1
        if not eng.has_unfinished():
            time.sleep(max(0.0, requests[order[added]].arrival_s - now))
            continue
        started = time.perf_counter()
        outs = eng.step()
        took = time.perf_counter() - started
        steps, step_s = steps + 1, step_s + took
        for o in outs:
            times[o.request_id] += [time.perf_counter() - t0] * len(o.new_token_ids)
        st = eng.stats()
        peak = max(peak, st.running)
        if st.prompt_tokens == prompt_tokens:
            decode_steps, decode_s = decode_steps + 1, decode_s + took
        prompt_tokens = st.prompt_tokens
    end = max(ts[-1] for ts in times.values() if ts)
    makespan = end - min(r.arrival_s for r in requests)
    ttft = [ts[0] - requests[int(i)].arrival_s for i, ts in times.items() if ts]
    tpot = [(ts[-1] - ts[0]) / (len(ts) - 1) for ts in times.values() if len(ts) > 1]
    e2e = [ts[-1] - requests[int(i)].arrival_s for i, ts in times.items() if ts]
    out = {"method": method, "output_tokens_per_s": sum(len(ts) for ts in times.values()) / makespan,
           "makespan_s": makespan, "peak_concurrency": peak, "preemptions": eng.stats().preemptions,
           **step_means(steps, step_s, decode_steps, decode_s)}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for p in (50, 90, 99):
            v = percentile(xs, p)
            out[f"{name}_ms_p{p}"] = None if v is None else v * 1000
    return out
