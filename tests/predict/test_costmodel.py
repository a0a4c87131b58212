"""Per-operator cost-model fitting recovers the parameters of synthetic profile points."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from kvshrink.predict.costmodel import FittedCost, fit_operator, fit_points, fit_report, load_points, nnls

PREFILL = (2e-3, 1e-5, 3e-9)  # c0 + c1 T + c2 T^2
DECODE = (1e-3, 4e-4, 2e-7)  # c0 + c1 B + c2 K
EVICT = 5e-6  # per cut-back


def synthetic_points(method: str = "kivi:bits=2", noise: float = 0.01, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def jitter(t: float) -> float:
        return t * (1 + rng.gauss(0, noise))

    pts = [{"kind": "prefill", "method": method, "tokens": T,
            "seconds": jitter(PREFILL[0] + PREFILL[1] * T + PREFILL[2] * T * T)}
           for T in (32, 64, 128, 256, 512, 1024, 2048, 4096) for _ in range(2)]
    for B, C in itertools.product((1, 2, 4, 8, 16, 32), (128, 512, 2048)):
        K = B * C
        pts.append({"kind": "decode", "method": method, "batch": B, "context": C, "kv_tokens": K,
                    "seconds": jitter(DECODE[0] + DECODE[1] * B + DECODE[2] * K)})
        pts.append({"kind": "evict", "method": method, "batch": B, "cuts": B * 4, "seconds": jitter(EVICT * B * 4)})
    pts.append({"kind": "evict", "method": method, "cuts": 0, "seconds": 0.0})  # no cut-backs: no information
    return pts


def test_fit_recovers_synthetic_parameters():
    fc = fit_points(synthetic_points())["kivi:bits=2"]
    pre, dec, ev = fc.fits["prefill"], fc.fits["decode"], fc.fits["evict"]
    assert pre.intercept == pytest.approx(PREFILL[0], rel=0.05)
    assert pre.coef["tokens"] == pytest.approx(PREFILL[1], rel=0.05)
    assert pre.coef["tokens_sq"] == pytest.approx(PREFILL[2], rel=0.05)
    assert dec.intercept == pytest.approx(DECODE[0], rel=0.05)
    assert dec.coef["batch"] == pytest.approx(DECODE[1], rel=0.05)
    assert dec.coef["kv_tokens"] == pytest.approx(DECODE[2], rel=0.05)
    assert ev.intercept == 0 and ev.coef["cuts"] == pytest.approx(EVICT, rel=0.02) and ev.n == 18
    assert dec.mean_rel_error < 0.02 and dec.r2 > 0.99
    # the StepCosts protocol of the simulator
    assert fc.decode_s(8, 8 * 512) == pytest.approx(DECODE[0] + DECODE[1] * 8 + DECODE[2] * 4096, rel=0.02)
    assert fc.prefill_s(1000) == pytest.approx(PREFILL[0] + PREFILL[1] * 1000 + PREFILL[2] * 1e6, rel=0.02)
    assert fc.evict_s(10) == pytest.approx(10 * EVICT, rel=0.02)
    assert FittedCost.from_dict(json.loads(json.dumps(fc.to_dict()))).decode_s(3, 900) == fc.decode_s(3, 900)
    assert "| kivi:bits=2 | decode | 18 |" in fit_report({"kivi:bits=2": fc})


def test_fit_keeps_coefficients_non_negative():
    # time independent of the batch, with noise: least squares would give a negative batch term
    rng = random.Random(3)
    pts = [{"kind": "decode", "method": "m", "batch": b, "kv_tokens": k,
            "seconds": (1e-3 + 1e-7 * k) * (1 + rng.gauss(0, 0.03)) * (1 - 0.002 * b)}
           for b in (1, 4, 16, 32) for k in (100, 1000, 10000)]
    f = fit_operator(pts, op="decode")
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
        fit_operator([{"kind": "decode", "batch": 1, "kv_tokens": 1, "seconds": 1.0}])
    with pytest.raises(ValueError, match="lacks feature"):
        fit_operator([{"kind": "decode", "batch": b, "seconds": 1.0} for b in range(5)])
    with pytest.raises(FileNotFoundError):
        load_points(tmp_path)
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(p) for p in synthetic_points("full")) + "\n")
    assert set(fit_points(load_points(tmp_path))) == {"full"}
