"""Serving metrics on synthetic timestamps: exact values of vLLM's definitions."""

from __future__ import annotations

import math

import pytest

from kvshrink.bench.loadgen import arrival_times
from kvshrink.bench.metrics import RequestResult, compute_metrics, parse_goodput


def _req(ttft, itl, out_tokens, prompt=10, ok=True):
    return RequestResult(prompt_tokens=prompt, success=ok, ttft=ttft, itl=list(itl),
                         latency=ttft + sum(itl), output_tokens=out_tokens)


def test_exact_metrics():
    a = _req(0.100, [0.02, 0.02, 0.02], 4, prompt=10)  # e2e 0.160, tpot 0.020
    b = _req(0.300, [0.05, 0.05], 3, prompt=20)  # e2e 0.400, tpot 0.050
    c = _req(0.050, [], 1, prompt=5)  # single token: no TPOT, TPOT 0 for goodput
    d = _req(0.0, [], 0, prompt=7, ok=False)
    m = compute_metrics([a, b, c, d], duration_s=2.0, goodput={"ttft": 200, "tpot": 30})
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 35 and m["total_output_tokens"] == 8
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["total_token_throughput"] == pytest.approx(43 / 2)
    # a meets both SLOs, b misses TTFT and TPOT, c meets both (tpot 0) -> 2 good / 2 s
    assert m["request_goodput"] == pytest.approx(1.0)
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["median_ttft_ms"] == pytest.approx(100.0)
    assert m["mean_tpot_ms"] == pytest.approx(35.0)  # (20 + 50) / 2: c excluded
    assert m["mean_itl_ms"] == pytest.approx((3 * 20 + 2 * 50) / 5)
    assert m["median_itl_ms"] == pytest.approx(20.0)
    assert m["mean_e2el_ms"] == pytest.approx((160 + 400 + 50) / 3)
    assert m["p90_e2el_ms"] == pytest.approx(160 + 0.8 * (400 - 160))  # linear interpolation
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt(((100 - 150) ** 2 + 150**2 + 100**2) / 3))
    assert m["mean_output_tokens"] == pytest.approx(8 / 3)


def test_tpot_excludes_first_token():
    # TTFT 1 s, then 9 tokens 0.1 s apart: TPOT = (E2E - TTFT) / (10 - 1) = 0.1, whatever the TTFT
    r = _req(1.0, [0.1] * 9, 10)
    m = compute_metrics([r], 1.0)
    assert m["mean_tpot_ms"] == pytest.approx(100.0)
    assert m["mean_e2el_ms"] == pytest.approx(1900.0)
    assert m["request_goodput"] is None


def test_e2el_slo_and_missing_usage_counts_with_tokenizer():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": text.split()})()

    r = _req(0.1, [0.1, 0.1], None)
    r.generated_text = "a b c d"
    m = compute_metrics([r], 1.0, goodput={"e2el": 301}, tokenizer=Tok())
    assert m["total_output_tokens"] == 4
    assert m["request_goodput"] == pytest.approx(1.0)
    assert m["mean_tpot_ms"] == pytest.approx(200 / 3)
    m = compute_metrics([r], 1.0, goodput={"e2el": 299})
    assert m["request_goodput"] == 0.0


def test_all_failed_and_bad_args():
    m = compute_metrics([_req(0, [], 0, ok=False)], 1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0
    with pytest.raises(ValueError, match="duration"):
        compute_metrics([], 0.0)
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:1000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 1000.0}
    for bad in (["ttft"], ["foo:1"], ["ttft:x"], ["ttft:-1"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


def test_arrivals_seeded_and_scaled():
    a = arrival_times(50, 4.0, 1.0, seed=3)
    assert a == arrival_times(50, 4.0, 1.0, seed=3)
    assert a != arrival_times(50, 4.0, 1.0, seed=4)
    assert a[-1] == pytest.approx(50 / 4.0) and all(x <= y for x, y in zip(a, a[1:]))
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    even = arrival_times(4, 2.0, float("inf"))
    assert even == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # burstier traces have more variable gaps
    import numpy as np

    cv = lambda t: np.std(np.diff(t)) / np.mean(np.diff(t))  # noqa: E731
    assert cv(arrival_times(400, 10, 0.25, 1)) > cv(arrival_times(400, 10, 4.0, 1))
    with pytest.raises(ValueError):
        arrival_times(3, 0.0)
    with pytest.raises(ValueError):
        arrival_times(3, 1.0, 0.0)
