import json

import pytest

from kvshrink import cli
from kvshrink.bench.throughput import parse_workloads
from tests.conftest import tiny_model, tiny_tokenizer


@pytest.fixture
def tiny(monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    monkeypatch.setattr("kvshrink.models.load_model", lambda *a, **k: (model, tok))


def test_serving_summary_has_the_stable_fields(tiny, tmp_path):
    out = tmp_path / "tp"
    rc = cli.main(["bench", "throughput", "--mode", "serving", "--method", "kivi:bits=4,residual=8,group=8",
                   "--method", "streamingllm:budget=16", "--workload", "decode-heavy=5x40x12",
                   "--workload", "long-prompt=3x90x4", "--compare-hf", "--kv-memory", "80KiB", "--out", str(out)])
    assert rc == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [(r["workload"], r["method"]) for r in runs] == [
        (w, m) for w in ("decode-heavy", "long-prompt")
        for m in ("full", "kivi:bits=4,residual=8,group=8", "streamingllm:budget=16", "hf-generate (one at a time)")]
    for r in runs:
        for k in ("method", "workload", "tokens_per_s", "decode_tokens_per_s", "peak_concurrency", "peak_kv_bytes",
                  "ratio_to_full"):
            assert k in r
        assert r["tokens_per_s"] > 0
    by = {(r["workload"], r["method"]): r for r in runs}
    full = by[("decode-heavy", "full")]
    assert full["ratio_to_full"] == 1.0
    assert full["output_tokens"] >= 5 * 10  # every request ran to its fixed length (12 +- 15%)
    # under the same pool, eviction fits more sequences at once than the full cache
    assert by[("decode-heavy", "streamingllm:budget=16")]["peak_concurrency"] > full["peak_concurrency"]
    for r in runs:
        if r["method"] != "hf-generate (one at a time)":
            assert r["peak_kv_bytes"] <= r["kv_bytes_total"] == by[(r["workload"], "full")]["kv_bytes_total"]
    assert (out / "summary.csv").exists() and (out / "records.jsonl").exists()


def test_step_mode(tiny, tmp_path):
    rc = cli.main(["bench", "throughput", "--mode", "step", "--quick", "--method", "int8", "--out", str(tmp_path)])
    assert rc == 0
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["full", "int8"] and runs[0]["ratio_to_full"] == 1.0
    assert all(r["step_ms"] > 0 for r in runs)


def test_parse_workloads():
    assert parse_workloads(None, quick=False)["decode-heavy"] == (16, 512, 256)
    assert parse_workloads(["long-prompt=2x64x8"], quick=True) == {"long-prompt": (2, 64, 8)}
    with pytest.raises(SystemExit, match="unknown workload"):
        parse_workloads(["nope"], quick=False)
    with pytest.raises(SystemExit, match="REQUESTSxPROMPTxOUTPUT"):
        parse_workloads(["decode-heavy=3x0x2"], quick=False)


@pytest.mark.parametrize("mode,axis,points", [("fixed-batch", "batch", [1, 4, 16]),
                                              ("fixed-length", "context", [256, 1024])])
def test_sweeps(tiny, tmp_path, mode, axis, points):
    rc = cli.main(["bench", "throughput", "--mode", mode, "--quick", "--method", "kivi:bits=2", "--out", str(tmp_path)])
    assert rc == 0
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert [(r[axis], r["method"]) for r in runs] == [(x, m) for x in points for m in ("full", "kivi:bits=2")]
    assert all(r["preemptions"] == 0 and r["peak_concurrency"] == r["batch"] for r in runs)
    assert list(tmp_path.glob("*.png"))


def test_reference_pool_runs_full_unbounded_and_gives_each_row_its_ratio(tiny, tmp_path):
    rc = cli.main(["bench", "throughput", "--method", "streamingllm:budget=16", "--workload", "decode-heavy=6x40x12",
                   "--kv-memory", "80KiB", "--reference-kv-memory", "4MiB", "--out", str(tmp_path)])
    assert rc == 0
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["full", "streamingllm:budget=16", "full@4MiB"]
    full, small, ref = runs
    assert ref["kv_bytes_total"] > full["kv_bytes_total"] == small["kv_bytes_total"]
    assert ref["peak_concurrency"] == 6 > full["peak_concurrency"]  # room for every request at once
    assert ref["output_tokens"] == full["output_tokens"]  # the same requests, to the same lengths
    assert ref["ratio_to_reference"] == 1.0
    assert full["ratio_to_reference"] == full["tokens_per_s"] / ref["tokens_per_s"]
    assert ref["ratio_to_full"] == ref["tokens_per_s"] / full["tokens_per_s"]
    with pytest.raises(SystemExit, match="serving and trace"):
        cli.main(["bench", "throughput", "--mode", "step", "--reference-kv-memory", "4MiB", "--out", str(tmp_path)])


def test_rounds_interleave_units_and_take_ratios_within_a_round(tiny, tmp_path):
    rc = cli.main(["bench", "throughput", "--method", "streamingllm:budget=16", "--workload", "decode-heavy=4x40x8",
                   "--kv-memory", "80KiB", "--reference-kv-memory", "4MiB", "--rounds", "3", "--out", str(tmp_path)])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    methods = ["full", "streamingllm:budget=16", "full@4MiB"]
    assert [(r["round"], r["method"]) for r in rows] == [(i, m) for i in range(3) for m in methods]  # A B C A B C
    summary = json.loads((tmp_path / "summary.json").read_text())
    every = summary["every_round"]
    for r in every:  # each ratio against the reference of its own round
        ref = next(x for x in every if x["method"] == "full@4MiB" and x["round"] == r["round"])
        assert r["ratio_to_reference"] == r["tokens_per_s"] / ref["tokens_per_s"]
    runs = summary["runs"]
    assert [r["method"] for r in runs] == methods and all(r["rounds"] == 3 for r in runs)
    for r in runs:
        mine = sorted(x["ratio_to_reference"] for x in every if x["method"] == r["method"])
        assert r["ratio_to_reference"] == mine[1] and r["ratio_to_reference_range"] == [mine[0], mine[2]]
        assert r["tokens_per_s"] == sorted(x["tokens_per_s"] for x in every if x["method"] == r["method"])[1]
    with pytest.raises(SystemExit, match="rounds must be >= 1"):
        cli.main(["bench", "throughput", "--rounds", "0", "--out", str(tmp_path / "x")])
