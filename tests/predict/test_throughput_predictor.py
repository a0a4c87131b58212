"""Trace and workload parsing, and the prediction CLI on a tiny profile."""

import json

import pytest

from kvshrink.bench.trace import load_trace
from kvshrink.predict.costmodel import fit_points
from kvshrink.predict.simulate import SimRequest
from kvshrink.predict.throughput import workload_requests
from tests.conftest import tiny_model


def test_trace_file(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"prompt_tokens": 512, "output_tokens": 128, "arrival_s": 0.5}\n\n{"prompt_tokens": 8, "output_tokens": 2}\n')
    assert load_trace(p) == [SimRequest(512, 128, 0.5), SimRequest(8, 2, 0.0)]
    p.write_text('{"prompt_tokens": 512}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: want"):
        load_trace(p)
    p.write_text('{"prompt_tokens": 0, "output_tokens": 3}\n')
    with pytest.raises(ValueError, match=">= 1"):
        load_trace(p)


def test_workload_lengths_are_the_bench_ones():
    from kvshrink.bench.throughput import _requests

    reqs = workload_requests("decode-heavy=5x100x20", vocab=128)
    bench = _requests(5, 100, 20, vocab=128)
    assert [(r.prompt_tokens, r.output_tokens) for r in reqs] == [(len(p), o) for p, o in bench]


def test_predict_cli_json(tmp_path, capsys):
    from kvshrink.cli import main
    from kvshrink.results import write_json_atomic

    model = tiny_model("llama")
    pts = [{"kind": "prefill", "method": "full", "tokens": t, "seconds": 0.01 + 1e-4 * t} for t in (8, 16, 32, 64)]
    pts += [{"kind": "decode", "method": "full", "batch": b, "kv_tokens": 20 * b, "seconds": 0.005 + 1e-3 * b + 1e-6 * b}
            for b in (1, 2, 4, 8)]
    cost = fit_points(pts)["full"]
    write_json_atomic(tmp_path / "summary.json", {"model_config": model.config.to_dict(),
                                                  "methods": {"full": cost.to_dict()}})
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"prompt_tokens": 20, "output_tokens": 5}) for _ in range(4)))
    assert main(["predict", "throughput", "--profile", str(tmp_path), "--workload", f"trace:{trace}",
                 "--kv-memory", "8MiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    for k in ("output_tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p50", "peak_concurrency", "preemptions"):
        assert k in out
    assert out["peak_concurrency"] == 4 and out["preemptions"] == 0 and out["output_tokens_per_s"] > 0
    assert main(["predict", "throughput", "--profile", str(tmp_path / "nope"), "--workload", "decode-heavy",
                 "--kv-memory", "8MiB"]) == 2


def test_bench_and_predict_take_one_trace(tmp_path):
    """`bench throughput --trace` measures the file `predict throughput` simulates: same requests,
    the same output fields."""
    from kvshrink.bench.trace import run_trace

    model = tiny_model("llama")
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"prompt_tokens": 12 + i, "output_tokens": 4, "arrival_s": 0.01 * i})
                               for i in range(3)))
    row = run_trace(model, "full", load_trace(trace), "8MiB")
    assert row["output_tokens_per_s"] > 0 and row["preemptions"] == 0 and 1 <= row["peak_concurrency"] <= 3
    for k in ("ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p50"):
        assert row[k] is not None and row[k] >= 0
    assert row["e2e_ms_p50"] >= row["ttft_ms_p50"]


def test_advise_from_a_profile_uses_the_simulator(tmp_path):
    from kvshrink.cli import main
    from kvshrink.results import write_json_atomic

    model = tiny_model("llama")
    methods = {}
    for m, per_kv in (("full", 1e-5), ("streamingllm:budget=16", 1e-5)):
        pts = [{"kind": "prefill", "method": m, "tokens": t, "seconds": 0.01 + 1e-4 * t} for t in (8, 16, 32, 64)]
        pts += [{"kind": "decode", "method": m, "batch": b, "kv_tokens": 30 * b,
                 "seconds": 0.005 + 1e-3 * b + per_kv * 30 * b} for b in (1, 2, 4, 8)]
        methods[m] = fit_points(pts)[m].to_dict()
    write_json_atomic(tmp_path / "prof" / "summary.json", {"model_config": model.config.to_dict(), "methods": methods})
    rc = main(["advise", "--profile", str(tmp_path / "prof"), "--workload", "decode-heavy=6x40x10",
               "--kv-memory", "60000", "--out", str(tmp_path / "adv"), "--json"])
    assert rc == 0
    s = json.loads(next((tmp_path / "adv").rglob("summary.json")).read_text())
    rows = {r["method"]: r for r in s["rows"]}
    assert set(rows) == {"full", "streamingllm:budget=16"}
    for r in rows.values():
        assert r["throughput_tok_s"]["kind"] == "predicted" and r["throughput_tok_s"]["origin"].startswith("simulator")
    # the small pool admits more evicting sequences at once: the simulator says it is faster
    assert rows["streamingllm:budget=16"]["throughput_tok_s"]["value"] > rows["full"]["throughput_tok_s"]["value"]
    assert rows["full"]["negative_rate"]["kind"] == "measured"  # the reference, by definition


def test_profile_measures_every_batch_size_of_a_ladder():
    """One ladder: each batch size from the max down to 1 gets ``rounds x steps`` decode samples,
    each prompt of the ladder a prefill sample; a rolling selector's cut-backs are evict points."""
    from kvshrink.predict.costmodel import fit_points
    from kvshrink.predict.profile import ProfileGrid, measure

    model = tiny_model("llama")
    grid = ProfileGrid(prefill=(8, 16), ladders=((4, 40),), steps=2, warmup=1, rounds=3, repeats=2,
                       chunks=((8, 8), (16, 8), (16, 16)))
    for spec in ("full", "streamingllm:budget=16"):
        pts = measure(model, spec, grid, progress=False)
        pre = [p for p in pts if p["kind"] == "prefill"]
        dec = [p for p in pts if p["kind"] == "decode"]
        assert [(p["tokens"], len(p["samples"])) for p in pre] == [(8, 2), (16, 2), (40, 4)]
        assert [p["batch"] for p in dec] == [4, 3, 2, 1] and all(len(p["samples"]) == 6 for p in dec)
        assert all(p["seconds"] > 0 and p["kv_read"] >= p["kv_tokens"] > 0 for p in dec)
        cuts = [p for p in pts if p["kind"] == "evict"]
        if spec == "full":
            assert cuts == [] and all(p["kv_tokens"] >= p["batch"] * 40 for p in dec)
        else:  # held at 16 + at most one cadence (32) per layer
            assert cuts and all(p["cuts"] > 0 for p in cuts)
            assert all(p["kv_tokens"] <= p["batch"] * (16 + 32) for p in dec)
        fits = fit_points(pts)[spec].fits
        assert fits["decode"].knots == (1, 2, 3, 4)
        # mixed steps: the ladder's prompt length (256 > 40) admitted next to 4, 2 and 1 decoding sequences
        mixed = [p for p in pts if p["kind"] == "mixed"]
        assert [(p["batch"], p["tokens"]) for p in mixed] == [(4, 40)] * 2 + [(2, 40)] * 2 + [(1, 40)] * 2
        assert all(p["seconds"] > 0 and p["kv_read"] >= p["kv_tokens"] > 0 for p in mixed)
        assert all(p[f"{part}_{t}"] > 0 for p in mixed for part in ("prefill", "decode") for t in ("seconds", "cpu_seconds"))
        assert fits["mixed"].coef["prefill_s"] == 1.0 and fits["mixed"].coef["decode_s"] >= 0
        # chunks after a stored prefix: each (start, tokens) of the grid timed ``repeats`` times
        chunks = [p for p in pts if p["kind"] == "chunk"]
        assert [(p["start"], p["tokens"], len(p["samples"])) for p in chunks] == [(s, n, 2) for s, n in grid.chunks]
        assert all(p["seconds"] > 0 and p["cpu_seconds"] > 0 for p in chunks)
        assert fits["chunk"].coef["difference"] == 1.0 and fits["chunk"].coef["cross"] >= 0
