"""``kvshrink advise`` on hand-made results: ranking, measured/predicted marks, Pareto front, report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvshrink.predict.advise import (
    MEASURED,
    PREDICTED,
    Criteria,
    Figures,
    Workload,
    advise,
    load_results,
    pareto_front,
    parse_fraction,
    parse_slo,
    parse_workload,
    roofline_figures,
    table,
    write_report,
)
from kvshrink.results import write_json_atomic

MODEL = "smollm2-135m"
WL = Workload("decode-heavy", 16, 512, 256)
NEG = {"full": 0.0, "kivi:bits=2": 0.02, "snapkv:ratio=0.75": 0.04, "streamingllm:ratio=0.75": 0.12}
TPS = {"full": 100.0, "kivi:bits=2": 180.0, "snapkv:ratio=0.75": 150.0, "streamingllm:ratio=0.75": 250.0}


def make_results(root: Path, model: str = MODEL) -> list[Path]:
    ev, bt, bs = root / "eval", root / "bench", root / "serve"
    write_json_atomic(ev / "config.json", {"kind": "eval", "model": model})
    write_json_atomic(ev / "summary.json", {"reference": "full", "tasks": ["chat"], "methods": {
        m: {"negative_ratio": n, "length_change_mean": 0.1 if m != "full" else 0.0, "compression": 4.0}
        for m, n in NEG.items()}})
    (ev / "records.jsonl").write_text("\n".join(json.dumps(
        {"method": m, "task": "chat", "id": "0", "kv_bytes": 1000, "prompt_tokens": 90, "output_tokens": 10})
        for m in NEG) + "\n")
    write_json_atomic(bt / "summary.json", {
        "config": {"command": "bench throughput", "model": model, "workloads": {"decode-heavy": [16, 512, 256]}},
        "runs": [{"method": m, "workload": "decode-heavy", "tokens_per_s": t} for m, t in TPS.items()]
        + [{"method": "full", "workload": "long-prompt", "tokens_per_s": 999.0}]})
    write_json_atomic(bs / "summary.json", {
        "config": {"kind": "bench_serve", "model": model, "dataset": "random", "random_input_len": 512,
                   "random_output_len": 256},
        "results": [{"method": "kivi:bits=2", "request_rate": "inf", "completed": 4, "duration_s": 2.0,
                     "output_throughput": 170.0, "mean_ttft_ms": 200.0, "mean_tpot_ms": 20.0,
                     "mean_e2el_ms": 5300.0}]})
    (bs / "records.jsonl").write_text("\n".join(json.dumps(
        {"method": "kivi:bits=2", "request_rate": "inf", "index": i, "ttft_ms": t, "tpot_ms": 20.0,
         "e2el_ms": 5300.0}) for i, t in enumerate((100, 200, 300, 900))) + "\n")
    return [ev, bt, bs]


def test_parsers():
    assert parse_workload("chat=64x512x256") == Workload("chat", 64, 512, 256)
    assert parse_workload("8x100x10").requests == 8
    with pytest.raises(ValueError, match="NAME=REQUESTSxPROMPTxOUTPUT"):
        parse_workload("chat=64x512")
    assert parse_slo("ttft:500,tpot:50") == {"ttft": 500.0, "tpot": 50.0}
    with pytest.raises(ValueError, match="KEY:MS"):
        parse_slo("latency:3")
    assert parse_fraction("5%") == pytest.approx(0.05) and parse_fraction("0.1") == 0.1
    assert pareto_front([(1, 0.0), (2, 0.1), (1.5, 0.2), (None, 0.0)]) == [True, True, False, False]


def test_ranks_hand_made_results_and_marks_measured_vs_predicted(tmp_path):
    figs, notes = load_results(make_results(tmp_path), WL, MODEL, parse_slo("ttft:250"))
    assert any("long-prompt" in n for n in notes)  # another workload's run is not used
    # a method nobody measured, predicted faster than everything (e.g. by the simulator)
    figs.append(Figures("h2o:ratio=0.75", PREDICTED, "simulator", throughput_tok_s=300.0, bytes_per_token=500.0))
    rows, rec = advise(figs, Criteria(0.05), WL)
    order = [r.method for r in rows]
    # within 5%: kivi (180) > snapkv (150) > full (100); unknown: h2o; over the limit: streamingllm
    assert order == ["kivi", "snapkv:ratio=0.75", "full", "h2o:ratio=0.75", "streamingllm:ratio=0.75"]
    by = {r.method: r for r in rows}
    k = by["kivi"]
    assert (k.cells["throughput_tok_s"].value, k.cells["throughput_tok_s"].kind) == (180.0, MEASURED)
    assert k.cells["negative_rate"].kind == MEASURED
    assert k.cells["goodput_req_s"].value == pytest.approx(2 / 2.0)  # 2 of 4 requests within TTFT 250 ms over 2 s
    assert k.cells["bytes_per_token"].value == pytest.approx(1000 / 100)
    # E2E with drift from measured TTFT, TPOT and length change: 0.2 + 256 * 1.1 * 0.02
    assert k.cells["e2e_drift_s"].value == pytest.approx(0.2 + 256 * 1.1 * 0.02)
    assert k.cells["e2e_drift_s"].kind == MEASURED
    h = by["h2o:ratio=0.75"]
    assert h.cells["throughput_tok_s"].kind == PREDICTED and h.cells["negative_rate"].value is None
    assert [r.method for r in rows if r.pareto] == ["kivi", "full", "streamingllm:ratio=0.75"]
    assert rec.startswith("Use kivi:") and "streamingllm:ratio=0.75 is faster" in rec
    assert "h2o:ratio=0.75 would give" in rec
    assert rec.endswith(".") and not re.search(r"\.\s+[A-Z]", rec)  # one sentence
    t = table(rows)
    assert "180 (m)" in t and "300 (p)" in t
    # a stricter limit moves snapkv out
    rows, _ = advise(figs, Criteria(0.03), WL)
    assert [r.method for r in rows][:2] == ["kivi", "full"]


def test_measured_beats_predicted_and_other_models_are_skipped(tmp_path):
    dirs = make_results(tmp_path / "a")
    figs, notes = load_results(dirs, WL, "some-other-model")
    assert figs == [] and len(notes) == 3
    figs, _ = load_results(dirs, WL, MODEL)
    figs.insert(0, Figures("kivi", PREDICTED, "roofline", throughput_tok_s=1e6, negative_rate=0.5))
    rows, _ = advise(figs, Criteria(), WL)
    kivi = next(r for r in rows if r.method == "kivi")
    assert kivi.cells["throughput_tok_s"].value == 180.0 and kivi.cells["negative_rate"].value == 0.02
    with pytest.raises(FileNotFoundError):
        load_results([tmp_path / "missing"])


def test_roofline_figures_and_report(tmp_path):
    from kvshrink.predict.hardware import get_hardware
    from kvshrink.predict.modelconfig import load_shape
    from kvshrink.predict.roofline import RooflineCost
    from kvshrink.predict.storage import storage

    shape, hw = load_shape("llama-3.1-8b"), get_hardware("H100")
    costs = [RooflineCost(storage(m, shape), hw) for m in ("full", "kivi:bits=2")]
    wl = Workload("chat", 256, 2048, 512)
    figs = roofline_figures(costs, wl, 40e9, {"kivi": 0.2}, parse_slo("tpot:60"))
    full, kivi = figs
    assert full.kind == PREDICTED and full.throughput_tok_s > 0 and full.goodput_req_s is not None
    assert kivi.throughput_tok_s > full.throughput_tok_s  # more sequences fit
    assert kivi.bytes_per_token < full.bytes_per_token and kivi.length_change == 0.2
    assert "614 tokens" in kivi.assumptions[0]  # 512 x 1.2 output tokens
    rows, rec = advise(figs, Criteria(0.05, {"tpot": 60.0}), wl)
    run = write_report(tmp_path / "adv", {"model": "llama-3.1-8b", "workload": wl.label}, rows, rec, [], ["a"],
                       Criteria())
    html = (run / "report.html").read_text()
    assert "(p)" in html and rec.split(":")[0] in html and (run / "pareto.png").stat().st_size > 1000
    assert json.loads((run / "summary.json").read_text())["rows"][0]["method"] == "full"
