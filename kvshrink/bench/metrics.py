"""Serving metrics with vLLM ``bench serve``'s definitions (vllm/benchmarks/serve.py, ``calculate_metrics``).

Per request (client clock, seconds; a request is measured from the moment it is sent):
- **TTFT** = arrival of the first streamed chunk carrying a choice − send time.
- **ITL** = the gaps between consecutive streamed chunks after the first (one entry per gap).
- **E2E** (``e2el``) = arrival of the *last chunk carrying a choice* − send time (the trailing usage-only
  chunk and ``[DONE]`` do not count).
- **TPOT** = (E2E − TTFT) / (output tokens − 1): time per output token *excluding the first*; only
  requests with more than one output token enter the TPOT statistics. For goodput a one-token request
  has TPOT 0.
- output tokens: the server's ``usage.completion_tokens`` when it sends one, otherwise the generated
  text re-tokenised with the tokenizer (without special tokens), otherwise 1.

Over a run of duration D (first send to last completion, measured by the load generator):
- completed / failed; request throughput = completed / D; output-token throughput = Σ output / D;
  total-token throughput = (Σ prompt of completed + Σ output) / D.
- **goodput** = (completed requests meeting *every* given SLO: TTFT ≤ ttft, TPOT ≤ tpot, E2E ≤ e2el,
  SLOs in ms) / D.
- mean / median / std / p90 / p99 of TTFT, TPOT, ITL and E2E in ms (numpy's mean, median, population
  std and linear-interpolation percentiles; 0 for an empty list, as vLLM does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (90, 99)
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What the client observed for one request (times in seconds)."""

    index: int = 0
    send_time: float = 0.0  # seconds since the run started
    prompt_tokens: int = 0
    success: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2E
    output_tokens: int | None = None  # from usage; None when the server sent none
    generated_text: str = ""
    finish_reason: str | None = None
    status: int | None = None
    error: str = ""

    def row(self) -> dict:
        return {
            "index": self.index,
            "send_time_s": round(self.send_time, 6),
            "ttft_ms": self.ttft * 1000 if self.success else None,
            "itl_ms": [round(x * 1000, 4) for x in self.itl],
            "e2el_ms": self.latency * 1000 if self.success else None,
            "tpot_ms": (
                (self.latency - self.ttft) / (self.output_tokens - 1) * 1000
                if self.success and self.output_tokens and self.output_tokens > 1
                else None
            ),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens if self.success else 0,
            "finish_reason": self.finish_reason,
            "status": self.status,
            "error": self.error,
        }


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    out: dict[str, float] = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            key, sep, val = part.partition(":")
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"--goodput: {part!r} is not KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
            try:
                ms = float(val)
            except ValueError:
                raise ValueError(f"--goodput: {part!r}: {val!r} is not a number of milliseconds") from None
            if ms < 0:
                raise ValueError(f"--goodput: {part!r}: the SLO must be >= 0 ms")
            out[key] = ms
    return out


def _stats(name: str, values: list[float], percentiles=PERCENTILES) -> dict[str, float]:
    arr = np.asarray(values if values else [0.0], dtype=np.float64) * 1000.0
    out = {
        f"mean_{name}_ms": float(np.mean(arr)),
        f"median_{name}_ms": float(np.median(arr)),
        f"std_{name}_ms": float(np.std(arr)),
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def compute_metrics(
    results: list[RequestResult],
    duration_s: float,
    goodput: dict[str, float] | None = None,
    tokenizer=None,
    percentiles=PERCENTILES,
) -> dict:
    """Aggregate metrics of one run (see the module docstring for the definitions)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    ttfts: list[float] = []
    tpots: list[float] = []
    all_tpots: list[float] = []
    itls: list[float] = []
    e2els: list[float] = []
    out_lens: list[int] = []
    total_input = 0
    completed = 0
    for r in results:
        if not r.success:
            continue
        n = r.output_tokens
        if not n:
            if tokenizer is not None:
                n = len(tokenizer(r.generated_text, add_special_tokens=False).input_ids)
            else:
                n = 1
            r.output_tokens = n
        out_lens.append(n)
        total_input += r.prompt_tokens
        tpot = 0.0
        if n > 1:
            tpot = (r.latency - r.ttft) / (n - 1)
            tpots.append(tpot)
        all_tpots.append(tpot)
        itls += r.itl
        ttfts.append(r.ttft)
        e2els.append(r.latency)
        completed += 1

    good = 0
    if goodput:
        per_key = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
        keys = [k for k in SLO_KEYS if k in goodput]
        for i in range(completed):
            if all(per_key[k][i] <= goodput[k] / 1000.0 for k in keys):
                good += 1
    total_output = int(sum(out_lens))
    m = {
        "completed": completed,
        "failed": len(results) - completed,
        "duration_s": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "mean_output_tokens": total_output / completed if completed else 0.0,
        "request_throughput": completed / duration_s,
        "request_goodput": (good / duration_s) if goodput else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    for name, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        m.update(_stats(name, vals, percentiles))
    return m
