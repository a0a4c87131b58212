"""Per-operator cost-model fitting recovers the parameters of synthetic profile points."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from kvshrink.predict.costmodel import (
    FittedCost,
    fit_operator,
    fit_points,
    fit_report,
    hat_basis,
    load_points,
    nnls,
)

PREFILL = (2e-3, 1e-5, 3e-9)  # c0 + c1 T + c2 T^2
# w(B) at the profiled batch sizes (concave and stepwise, as a CPU GEMM's cost in M) + c R
WEIGHTS = {1: 0.100, 2: 0.106, 4: 0.145, 8: 0.170, 16: 0.290}
READ = 4e-6  # per column read (46 kB a token of this model at ~10 GB/s)
EVICT = 5e-6  # per cut-back


def decode_time(B: float, R: float) -> float:
    return float(np.interp(B, list(WEIGHTS), list(WEIGHTS.values()))) + READ * R


def synthetic_points(method: str = "kivi:bits=2", noise: float = 0.0, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def jitter(t: float) -> float:
        return t * (1 + rng.gauss(0, noise)) if noise else t

    pts = [{"kind": "prefill", "method": method, "tokens": T,
            "seconds": jitter(PREFILL[0] + PREFILL[1] * T + PREFILL[2] * T * T)}
           for T in (32, 64, 128, 256, 512, 1024, 2048, 4096) for _ in range(2)]
    for B, C in itertools.product(WEIGHTS, (128, 512, 2048)):
        R = B * (C + 1)
        pts.append({"kind": "decode", "method": method, "batch": B, "context": C, "kv_tokens": B * C, "kv_read": R,
                    "seconds": jitter(decode_time(B, R))})
        pts.append({"kind": "evict", "method": method, "batch": B, "cuts": B * 4, "seconds": jitter(EVICT * B * 4)})
    pts.append({"kind": "evict", "method": method, "cuts": 0, "seconds": 0.0})  # no cut-backs: no information
    return pts


def test_fit_recovers_synthetic_parameters():
    """Noise-free points of the model's own form: every parameter comes back (to rounding)."""
    fc = fit_points(synthetic_points())["kivi:bits=2"]
    pre, dec, ev = fc.fits["prefill"], fc.fits["decode"], fc.fits["evict"]
    assert pre.intercept == pytest.approx(PREFILL[0], rel=1e-6)
    assert pre.coef["tokens"] == pytest.approx(PREFILL[1], rel=1e-6)
    assert pre.coef["tokens_sq"] == pytest.approx(PREFILL[2], rel=1e-6)
    assert dec.knots == (1, 2, 4, 8, 16) and dec.knot_feature == "batch" and dec.intercept == 0
    for b, w in WEIGHTS.items():
        assert dec.coef[f"batch@{b}"] == pytest.approx(w, rel=1e-6)
    assert dec.coef["kv_read"] == pytest.approx(READ, rel=1e-6)
    assert ev.intercept == 0 and ev.coef["cuts"] == pytest.approx(EVICT, rel=1e-6) and ev.n == 15
    assert dec.max_rel_error < 1e-6 and dec.r2 == pytest.approx(1.0)
    # the StepCosts protocol of the simulator
    assert fc.decode_read_s(8, 8 * 512, 8 * 520) == pytest.approx(WEIGHTS[8] + READ * 8 * 520, rel=1e-6)
    assert fc.decode_s(8, 8 * 512) == pytest.approx(WEIGHTS[8] + READ * 8 * 512, rel=1e-6)  # read = stored
    assert fc.prefill_s(1000) == pytest.approx(PREFILL[0] + PREFILL[1] * 1000 + PREFILL[2] * 1e6, rel=1e-6)
    assert fc.evict_s(10) == pytest.approx(10 * EVICT, rel=1e-6)
    back = FittedCost.from_dict(json.loads(json.dumps(fc.to_dict())))
    assert back.decode_read_s(3, 900, 950) == fc.decode_read_s(3, 900, 950)
    assert "| kivi:bits=2 | decode | 15 |" in fit_report({"kivi:bits=2": fc})


def test_fit_with_noise_stays_close():
    fc = fit_points(synthetic_points(noise=0.01))["kivi:bits=2"]
    dec = fc.fits["decode"]
    for b, w in WEIGHTS.items():
        assert dec.coef[f"batch@{b}"] == pytest.approx(w, rel=0.05)
    assert dec.coef["kv_read"] == pytest.approx(READ, rel=0.1)


def test_batch_cost_interpolates_between_knots_and_extrapolates_upwards():
    fc = fit_points(synthetic_points())["kivi:bits=2"]
    # between profiled batch sizes: on the line between their weights (3 is halfway from 2 to 4)
    assert fc.decode_read_s(3, 0, 0) == pytest.approx((WEIGHTS[2] + WEIGHTS[4]) / 2, rel=1e-6)
    assert fc.decode_read_s(12, 0, 0) == pytest.approx((WEIGHTS[8] + WEIGHTS[16]) / 2, rel=1e-6)
    assert fc.decode_read_s(16, 0, 0) == pytest.approx(WEIGHTS[16], rel=1e-6)
    # past the last knot: the last segment's slope (15 ms per sequence here)
    slope = (WEIGHTS[16] - WEIGHTS[8]) / 8
    assert fc.decode_read_s(24, 0, 0) == pytest.approx(WEIGHTS[16] + 8 * slope, rel=1e-6)
    # a falling last segment (noise) never makes a bigger batch cheaper
    f = fit_operator([{"kind": "decode", "batch": b, "kv_read": 0.0, "seconds": t}
                      for b, t in ((1, 0.1), (2, 0.2), (3, 0.18))], knots=(1, 2, 3), features=())
    assert f.predict({"batch": 3}) == pytest.approx(0.18) and f.predict({"batch": 6}) == pytest.approx(0.18)
    # the basis: weights interpolate, and sum to one inside the range
    assert hat_basis(3, (1, 2, 4)) == [0.0, 0.5, 0.5] and hat_basis(1, (1, 2, 4)) == [1.0, 0.0, 0.0]
    assert hat_basis(4, (1, 2, 4)) == [0.0, 0.0, 1.0]


def test_knot_less_decode_fit_is_the_linear_model():
    """``knots=()`` (and profiles written before knots) is c0 + c1 B + c2 K."""
    pts = [{"kind": "decode", "method": "m", "batch": b, "kv_tokens": b * c, "seconds": 1e-3 + 4e-4 * b + 2e-7 * b * c}
           for b in (1, 2, 4, 8) for c in (128, 1024)]
    f = fit_operator(pts, op="decode", knots=(), features=("kv_tokens",))
    assert f.knots == () and f.intercept == pytest.approx(1e-3, rel=1e-6)
    assert f.coef == pytest.approx({"batch": 4e-4, "kv_tokens": 2e-7}, rel=1e-6)
    old = {"op": "decode", "features": ["batch", "kv_tokens"], "intercept": 1e-3,
           "coef": {"batch": 4e-4, "kv_tokens": 2e-7}, "n": 8, "mean_rel_error": 0, "max_rel_error": 0, "r2": 1}
    fc = FittedCost.from_dict({"method": "m", "fits": {"decode": old}})
    assert fc.decode_read_s(4, 4000, 5000) == pytest.approx(1e-3 + 4e-4 * 4 + 2e-7 * 4000)


def test_fit_keeps_coefficients_non_negative():
    # time independent of the batch, with noise: least squares would give a negative batch term
    rng = random.Random(3)
    pts = [{"kind": "decode", "method": "m", "batch": b, "kv_tokens": k,
            "seconds": (1e-3 + 1e-7 * k) * (1 + rng.gauss(0, 0.03)) * (1 - 0.002 * b)}
           for b in (1, 4, 16, 32) for k in (100, 1000, 10000)]
    f = fit_operator(pts, op="decode", knots=(), features=("kv_tokens",))
    assert min(f.coef.values()) >= 0 and f.intercept >= 0
    assert f.coef["kv_tokens"] == pytest.approx(1e-7, rel=0.2)


def test_nnls_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        A, b = rng.normal(size=(12, 4)), rng.normal(size=12)
        x = nnls(A, b)
        assert (x >= 0).all()
        ref = np.inf
        for r in range(0, 5):
            for c in itertools.combinations(range(4), r):
                z = np.zeros(4)
                if c:
                    sol = np.linalg.lstsq(A[:, list(c)], b, rcond=None)[0]
                    if (sol < 0).any():
                        continue
                    z[list(c)] = sol
                ref = min(ref, float(np.sum((A @ z - b) ** 2)))
        assert float(np.sum((A @ x - b) ** 2)) == pytest.approx(ref, rel=1e-6, abs=1e-9)


def test_errors_and_profile_records(tmp_path):
    with pytest.raises(ValueError, match="cannot fit"):
        fit_operator([{"kind": "prefill", "tokens": t, "seconds": 1.0} for t in (8, 16)])  # 3 parameters
    with pytest.raises(ValueError, match="lacks feature"):
        fit_operator([{"kind": "decode", "batch": b % 2 + 1, "seconds": 1.0} for b in range(6)])  # no kv_read
    with pytest.raises(ValueError, match="increasing"):
        fit_operator([{"kind": "decode", "batch": b, "kv_read": 1, "seconds": 1.0} for b in range(5)], knots=(2, 1))
    with pytest.raises(FileNotFoundError):
        load_points(tmp_path)
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(p) for p in synthetic_points("full")) + "\n")
    assert set(fit_points(load_points(tmp_path))) == {"full"}


def test_cpu_time_fit_and_a_share_of_the_cpu():
    """``time_key="cpu_seconds"`` fits the CPU-time samples (points without them are skipped); at a
    CPU share of one half every step takes twice its CPU time."""
    from kvshrink.predict.throughput import Scaled

    pts = [{**p, "cpu_seconds": p["seconds"] / 2} for p in synthetic_points()]
    pts.append({"kind": "prefill", "method": "kivi:bits=2", "tokens": 77, "seconds": 9.0})  # wall time only
    wall, cpu = fit_points(pts)["kivi:bits=2"], fit_points(pts, time_key="cpu_seconds")["kivi:bits=2"]
    assert cpu.fits["prefill"].n == wall.fits["prefill"].n - 1
    assert cpu.decode_read_s(8, 0, 4096) == pytest.approx(decode_time(8, 4096) / 2, rel=1e-6)
    half = Scaled.at_share(cpu, 0.5)
    assert half.decode_read_s(8, 0, 4096) == pytest.approx(decode_time(8, 4096), rel=1e-6)
    assert half.prefill_s(100) == pytest.approx(2 * cpu.prefill_s(100)) and half.evict_s(3) == 2 * cpu.evict_s(3)


def test_an_evictor_whose_reads_do_not_vary_takes_the_read_cost_of_its_codec():
    """StreamingLLM's points read its budget per sequence at every context: alone, any split of
    batch weights and read term fits them. It gets the read coefficient of ``full`` (same fp codec,
    reads that vary), and its weights are fitted given it; a method with no such donor keeps its own fit."""
    budget_read = {B: B * 161 for B in WEIGHTS}
    evictor = [{"kind": "decode", "method": "streamingllm:budget=160", "batch": B, "kv_tokens": B * 160,
                "kv_read": R, "seconds": decode_time(B, R) + 0.01} for B, R in budget_read.items()
               for _ in range(3)]
    alone = fit_points(evictor)["streamingllm:budget=160"].fits["decode"]
    both = fit_points(synthetic_points("full") + evictor)
    got = both["streamingllm:budget=160"].fits["decode"]
    assert got.coef["kv_read"] == both["full"].fits["decode"].coef["kv_read"] == pytest.approx(READ, rel=1e-6)
    for b, w in WEIGHTS.items():  # its own step overhead (+10 ms) in the weights, the read where it belongs
        assert got.coef[f"batch@{b}"] == pytest.approx(w + 0.01, rel=1e-6)
    assert got.max_rel_error < 1e-6
    assert alone.coef["kv_read"] != pytest.approx(READ, rel=0.1)  # what its points alone give
    other_codec = fit_points(synthetic_points("kivi:bits=2") + evictor)["streamingllm:budget=160"].fits["decode"]
    assert other_codec.coef == alone.coef


def test_a_mixed_step_costs_its_prompt_and_a_fitted_share_of_its_decode():
    """Mixed points built as prefill(T) + 0.4 decode(B, R) give k = 0.4 back; the packed decode is
    0.4 of the decode alone, and a profile without mixed points keeps the whole decode (k = 1)."""
    share = 0.4
    mixed = [{"kind": "mixed", "method": "kivi:bits=2", "batch": B, "kv_tokens": B * C, "kv_read": B * (C + 1),
              "tokens": T, "seconds": PREFILL[0] + PREFILL[1] * T + PREFILL[2] * T * T
              + share * decode_time(B, B * (C + 1))}
             for B, C, T in itertools.product((1, 4, 16), (128, 1024), (64, 256))]
    fc = fit_points(synthetic_points() + mixed)["kivi:bits=2"]
    assert fc.fits["mixed"].coef == {"prefill_s": 1.0, "decode_s": pytest.approx(share, rel=1e-5)}
    assert fc.packed_decode_s(8, 8 * 512, 8 * 520) == pytest.approx(share * decode_time(8, 8 * 520), rel=1e-5)
    plain = fit_points(synthetic_points())["kivi:bits=2"]
    assert "mixed" not in plain.fits and plain.packed_decode_s(8, 0, 4096) == plain.decode_read_s(8, 0, 4096)
    assert FittedCost.from_dict(fc.to_dict()).packed_decode_s(3, 9, 900) == fc.packed_decode_s(3, 9, 900)


def test_a_chunk_after_a_stored_prefix_costs_the_prefill_difference_plus_a_fitted_cross_term():
    """Chunk points built as 2 ms + (prefill(S+N) - prefill(S)) + 3e-7 N S give both back; a chunk
    from 0 is a whole prompt's start; a profile without chunk points charges the difference."""
    def prefill(t):
        return PREFILL[0] + PREFILL[1] * t + PREFILL[2] * t * t

    chunks = [{"kind": "chunk", "method": "kivi:bits=2", "start": S, "tokens": N,
               "seconds": 0.002 + prefill(S + N) - prefill(S) + 3e-7 * N * S}
              for S, N in ((256, 256), (512, 512), (1024, 256), (1024, 1024))]
    fc = fit_points(synthetic_points() + chunks)["kivi:bits=2"]
    fit = fc.fits["chunk"]
    assert fit.coef["difference"] == 1.0 and fit.coef["cross"] == pytest.approx(3e-7, rel=1e-4)
    assert fit.intercept == pytest.approx(0.002, rel=1e-3)
    assert fc.chunk_s(700, 1300) == pytest.approx(0.002 + prefill(1300) - prefill(700) + 3e-7 * 600 * 700, rel=1e-4)
    assert fc.chunk_s(0, 512) == fc.prefill_s(512)
    plain = fit_points(synthetic_points())["kivi:bits=2"]
    assert plain.chunk_s(700, 1300) == pytest.approx(prefill(1300) - prefill(700), rel=1e-6)
    assert FittedCost.from_dict(fc.to_dict()).chunk_s(300, 600) == fc.chunk_s(300, 600)


def test_mixed_points_timed_next_to_their_parts_use_those_times():
    """Each mixed step here ran on a machine 30% slower than the fits (the prompt and batch alone,
    timed next to it, say so): k comes from those paired times, not from the fits; the CPU-time fit
    takes the points' paired CPU times."""
    share = 0.5
    mixed = []
    for B, C, T in itertools.product((1, 4, 16), (128, 1024), (64, 256)):
        pre, dec = 1.3 * (PREFILL[0] + PREFILL[1] * T + PREFILL[2] * T * T), 1.3 * decode_time(B, B * (C + 1))
        mixed.append({"kind": "mixed", "method": "full", "batch": B, "kv_tokens": B * C, "kv_read": B * (C + 1),
                      "tokens": T, "seconds": pre + share * dec, "prefill_seconds": pre, "decode_seconds": dec,
                      "cpu_seconds": (pre + share * dec) / 2, "prefill_cpu_seconds": pre / 2,
                      "decode_cpu_seconds": dec / 2})
    pts = [{**p, "cpu_seconds": p["seconds"] / 2} for p in synthetic_points("full")] + mixed
    for time_key in ("seconds", "cpu_seconds"):
        got = fit_points(pts, time_key=time_key)["full"].fits["mixed"]
        assert got.coef["decode_s"] == pytest.approx(share, rel=1e-5) and got.max_rel_error < 1e-6

