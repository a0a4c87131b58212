"""Load generator: a seeded arrival trace (Poisson, or gamma with burstiness) and an async streaming
OpenAI client (httpx, SSE) that times every chunk the way vLLM's ``bench serve`` does.

The trace is a pure function of (number of requests, rate, burstiness, seed), so two runs — or two
methods of a comparison — send the same requests at the same offsets.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvshrink.bench.metrics import RequestResult


@dataclass
class BenchRequest:
    """One request of a workload: a completion prompt (text) or chat messages."""

    prompt: str | list[dict]
    prompt_tokens: int
    max_tokens: int
    ignore_eos: bool = False

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets (seconds from the start) of ``n`` requests.

    ``rate`` = inf sends everything at 0. Otherwise gaps are gamma(shape=burstiness,
    scale=1/(rate·burstiness)) — exponential (Poisson arrivals) at burstiness 1, burstier below 1,
    more regular above — and, as vLLM does, the cumulative offsets are rescaled so the last one is
    exactly n/rate, which removes the 1-2 % sampling error of the total duration.
    """
    if n <= 0:
        return []
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if rate == float("inf"):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    if burstiness == float("inf"):
        gaps = np.full(n, 1.0 / rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    t = np.cumsum(gaps)
    if t[-1] > 0:
        t = t * ((n / rate) / t[-1])
    return [float(x) for x in t]


def _headers(api_key: str | None) -> dict:
    key = api_key or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _payload(req: BenchRequest, model: str) -> tuple[str, dict]:
    body: dict = {
        "model": model,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if req.ignore_eos:
        body["ignore_eos"] = True
    if req.is_chat:
        body["messages"] = req.prompt
        return "/v1/chat/completions", body
    body["prompt"] = req.prompt
    return "/v1/completions", body


async def send_one(
    client, base_url: str, model: str, req: BenchRequest, index: int, t0: float, api_key: str | None = None
) -> RequestResult:
    """Stream one request; never raises (errors end up in ``RequestResult.error``)."""
    path, body = _payload(req, model)
    res = RequestResult(index=index, prompt_tokens=req.prompt_tokens)
    st = time.perf_counter()
    res.send_time = st - t0
    last = st
    first = False
    text: list[str] = []
    try:
        async with client.stream("POST", base_url.rstrip("/") + path, json=body, headers=_headers(api_key)) as r:
            res.status = r.status_code
            if r.status_code != 200:
                raw = (await r.aread()).decode(errors="replace")
                try:
                    res.error = f"HTTP {r.status_code}: {json.loads(raw)['error']['message']}"
                except Exception:
                    res.error = f"HTTP {r.status_code}: {raw[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments / pings
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk and not chunk.get("choices"):
                    err = chunk["error"]
                    res.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                    return res
                choices = chunk.get("choices")
                if choices:
                    c = choices[0]
                    piece = (c.get("delta") or {}).get("content") if req.is_chat else c.get("text")
                    if not first:
                        first = True
                        res.ttft = now - st
                    else:
                        res.itl.append(now - last)
                    last = now
                    text.append(piece or "")
                    if c.get("finish_reason"):
                        res.finish_reason = c["finish_reason"]
                if chunk.get("usage"):
                    u = chunk["usage"]
                    if u.get("completion_tokens") is not None:
                        res.output_tokens = int(u["completion_tokens"])
                    if u.get("prompt_tokens") is not None:
                        res.prompt_tokens = int(u["prompt_tokens"])
        res.generated_text = "".join(text)
        if first:
            res.success = True
            res.latency = last - st
        else:
            res.error = "no chunk with a choice arrived (cannot measure TTFT)"
    except Exception as e:  # connection refused, reset, timeout, bad JSON...
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_trace(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    offsets: list[float],
    max_concurrency: int | None = None,
    api_key: str | None = None,
    timeout_s: float = 600.0,
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Send ``requests[i]`` at ``offsets[i]`` seconds after the start (at most ``max_concurrency`` in
    flight; a request waiting for a slot is sent late, as in vLLM). Returns the results in request
    order and the run duration (first send to last completion)."""
    import httpx

    limits = httpx.Limits(max_connections=max_concurrency or None, max_keepalive_connections=max_concurrency or 100)
    timeout = httpx.Timeout(timeout_s, connect=min(30.0, timeout_s))
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        t0 = time.perf_counter()

        async def one(i: int) -> RequestResult:
            delay = t0 + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                r = await send_one(client, base_url, model, requests[i], i, t0, api_key)
            else:
                async with sem:
                    r = await send_one(client, base_url, model, requests[i], i, t0, api_key)
            if on_done:
                on_done(r)
            return r

        results = await asyncio.gather(*(one(i) for i in range(len(requests))))
        # from the first send, as vLLM's benchmark (whose first request goes out at once): the idle
        # time before a trace's first arrival is not part of serving it
        duration = time.perf_counter() - (t0 + min(offsets, default=0.0))
    return list(results), duration
