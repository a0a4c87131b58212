"""``kvshrink profile``, ``kvshrink predict throughput`` and ``kvshrink predict validate``.

A profile directory (kvshrink's results format) holds ``config.json`` (what was measured),
``records.jsonl`` (raw points), ``summary.json`` (``{"model_config": ..., "methods": {spec: StepCostModel}}``).
Prediction needs no model weights: the model's config is stored in the profile.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import PretrainedConfig

from kvshrink.bench.trace import load_trace, run_trace
from kvshrink.engine.config import EngineConfig
from kvshrink.engine.pool import parse_bytes
from kvshrink.predict.costmodel import FittedCost, fit_points, fit_report
from kvshrink.predict.profile import measure
from kvshrink.predict.simulate import SimRequest, SimResult, simulate
from kvshrink.results import Records, open_run, write_json_atomic

PROFILE_PREFILL = (64, 256, 512, 1024, 2048)
PROFILE_DECODE = ((1, 256), (4, 256), (8, 512), (16, 256), (8, 1024))
PROFILE_QUICK = ((32, 128, 256), ((1, 128), (4, 128), (8, 256)))


def workload_requests(spec: str, vocab: int, seed: int = 0) -> list[SimRequest]:
    """``NAME[=NxPxO]`` as ``bench throughput --workload`` takes it (the very lengths it draws for a
    model of ``vocab`` tokens), or ``trace:FILE``."""
    if spec.startswith("trace:"):
        return load_trace(spec[len("trace:") :])
    from kvshrink.bench.throughput import _requests, parse_workloads

    (n, p, o), = parse_workloads([spec], quick=False).values()
    return [SimRequest(len(ids), out) for ids, out in _requests(n, p, o, vocab, seed)]


# ---------------------------------------------------------------------------------------- profile
def run_profile(model, model_name: str, methods: list[str], out: str | Path, quick: bool = False) -> Path:
    prefill, decode = PROFILE_QUICK if quick else (PROFILE_PREFILL, PROFILE_DECODE)
    cfg = {"kind": "profile", "model": model_name, "methods": methods, "prefill": list(prefill),
           "decode": [list(x) for x in decode], "dtype": str(next(model.parameters()).dtype),
           "threads": torch.get_num_threads()}
    run = open_run(out, cfg)
    records = Records(run / "records.jsonl", key=("method",))
    done = records.done()
    for m in methods:
        if (m,) in done:
            continue
        for p in measure(model, m, prefill, decode):
            records.append(p)
    fits = fit_points(records.load())
    print(fit_report(fits))
    write_json_atomic(run / "summary.json", {"model_config": model.config.to_dict(),
                                             "dtype_bytes": next(model.parameters()).element_size(),
                                             "methods": {m: f.to_dict() for m, f in fits.items()}})
    return run


def load_profile(path: str | Path) -> tuple[PretrainedConfig, dict[str, FittedCost]]:
    p = Path(path) / "summary.json"
    if not p.exists():
        raise ValueError(f"{path}: not a profile directory (no summary.json); run `kvshrink profile` first")
    d = json.loads(p.read_text())
    cfg = PretrainedConfig.from_dict(d["model_config"])
    return cfg, {m: FittedCost.from_dict(c) for m, c in d["methods"].items()}


def predict(profile: str | Path, method: str, requests: list[SimRequest], kv_memory: int | str,
            block_size: int = 32) -> SimResult:
    cfg, models = load_profile(profile)
    if method not in models:
        raise ValueError(f"method {method!r} is not in the profile ({', '.join(models)}); profile it first")
    return simulate(cfg, method, requests, models[method], EngineConfig(kv_memory=kv_memory, block_size=block_size))


# --------------------------------------------------------------------------------------- validate
VALIDATE_WORKLOADS = ("decode-heavy=8x384x96", "long-prompt=3x1536x48", "decode-heavy=12x256x64@rate=0.5")


def validate(model, profile: str | Path, methods: list[str] | None, workloads: list[str] | None,
             kv_memory: int | str | None, out: str | Path) -> list[dict]:
    """Each method x workload measured on the engine and predicted from the profile, side by side.
    ``NAME=NxPxO@rate=R`` gives Poisson arrivals at R requests/s (seeded)."""
    cfg, models = load_profile(profile)
    rows = []
    run = open_run(out, {"kind": "predict-validate", "profile": str(profile), "methods": methods,
                         "workloads": workloads, "kv_memory": kv_memory})
    records = Records(run / "records.jsonl", key=("method", "workload"))
    done = {(r["method"], r["workload"]): r for r in records.load()}
    for wl in workloads or VALIDATE_WORKLOADS:
        reqs = _with_rate(wl, cfg.get_text_config().vocab_size)
        kv = kv_memory or _four_sequences(cfg, reqs)
        for m in methods or list(models):
            if (m, wl) in done:
                rows.append(done[(m, wl)])
                continue
            predicted = simulate(cfg, m, reqs, models[m], EngineConfig(kv_memory=kv)).percentiles()
            measured = run_trace(model, m, reqs, kv)
            row = {"method": m, "workload": wl, "kv_memory": parse_bytes(kv)}
            for k in ("output_tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p50", "preemptions"):
                row[f"{k}_measured"], row[f"{k}_predicted"] = measured[k], predicted[k]
                if measured[k]:
                    row[f"{k}_error"] = (predicted[k] - measured[k]) / measured[k]
            records.append(row)
            rows.append(row)
    write_json_atomic(run / "summary.json", {"rows": rows})
    return rows


def _with_rate(wl: str, vocab: int) -> list[SimRequest]:
    spec, _, rate = wl.partition("@rate=")
    reqs = workload_requests(spec, vocab)
    if rate:
        rng = random.Random(1)
        t = 0.0
        for r in reqs:
            r.arrival_s = t
            t += rng.expovariate(float(rate))
    return reqs


def _four_sequences(cfg, reqs: list[SimRequest], dtype_bytes: int = 4) -> int:
    """The bench's default pool: four uncompressed sequences at the workload's mean final length."""
    from kvshrink.bench.throughput import fp_config_token_bytes

    per_token = fp_config_token_bytes(cfg, dtype_bytes)
    mean = sum(r.prompt_tokens + r.output_tokens for r in reqs) / len(reqs)
    return int(4 * mean * per_token)


def simulator_figures(profile: str | Path, workload, kv_memory: float | None, drift: dict[str, float],
                      slo: dict[str, float], methods: list[str] | None = None) -> list:
    """``advise``'s predicted figures from the simulator on a profile measured on this machine: the
    workload's requests (output lengths changed by each method's length drift, where known)."""
    from kvshrink.predict.advise import PREDICTED, Figures

    cfg, models = load_profile(profile)
    base = workload_requests(f"decode-heavy={workload.requests}x{workload.prompt}x{workload.output}",
                             cfg.get_text_config().vocab_size)
    kv = int(kv_memory) if kv_memory else _four_sequences(cfg, base)
    out = []
    for m, cost in models.items():
        if methods and m not in methods:
            continue
        change = drift.get(m)
        reqs = [SimRequest(r.prompt_tokens, max(1, round(r.output_tokens * (1 + (change or 0.0))))) for r in base]
        res = simulate(cfg, m, reqs, cost, EngineConfig(kv_memory=kv))
        met = None
        if slo and len(res.tpot_s) == len(res.ttft_s):
            ok = [all((k != "ttft" or t * 1000 <= v) and (k != "tpot" or p * 1000 <= v) and (k != "e2el" or e * 1000 <= v)
                      for k, v in slo.items()) for t, p, e in zip(res.ttft_s, res.tpot_s, res.e2e_s)]
            met = sum(ok) / res.makespan_s
        mean = (lambda xs: sum(xs) / len(xs) if xs else None)  # noqa: E731
        out.append(Figures(
            method=m, kind=PREDICTED, origin=f"simulator ({profile})", throughput_tok_s=res.output_tokens_per_s,
            goodput_req_s=met, ttft_s=mean(res.ttft_s), tpot_s=mean(res.tpot_s), e2e_s=mean(res.e2e_s),
            e2e_includes_drift=change is not None, length_change=change,
            assumptions=[f"engine scheduler simulated on the step costs profiled in {profile}, KV pool {kv} bytes"]))
    return out
