"""``kvshrink predict lengths``, ``kvshrink predict project`` and ``kvshrink advise`` through ``cli.main``."""

from __future__ import annotations

import json

from kvshrink.cli import main
from tests.predict.test_advise import make_results
from tests.predict.test_lengths import synthetic_records


def test_predict_lengths(tmp_path, capsys):
    run = tmp_path / "eval"
    run.mkdir()
    (run / "records.jsonl").write_text("\n".join(json.dumps(r) for r in synthetic_records(30)) + "\n")
    assert main(["predict", "lengths", "--records", str(run), "--save", str(tmp_path / "len.json")]) == 0
    out = capsys.readouterr().out
    assert "MAE same as full" in out and "| all | 120 |" in out
    assert json.loads((tmp_path / "len.json").read_text())["kind"] == "length_predictor"
    assert main(["predict", "lengths", "--records", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 120
    assert main(["predict", "lengths", "--records", str(tmp_path / "nope")]) == 2
    assert "no records.jsonl" in capsys.readouterr().err


def test_predict_project(capsys):
    assert main(["predict", "project", "--config", "llama-3.1-8b", "--hardware", "H100", "--method", "kivi:bits=2",
                 "--method", "snapkv:ratio=0.75", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "| kivi |" in out and "| snapkv:ratio=0.75 |" in out and "assumptions:" in out and "80% of bandwidth" in out
    assert main(["predict", "project", "--config", "llama-3.1-70b", "--hardware-spec",
                 "name=pair,mem=160GB,bw=6.7TB/s,flops=1978T", "--batch", "8", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["hardware"]["name"] == "pair" and p["rows"][0]["batch"] == 8
    assert main(["predict", "project", "--config", "llama-3.1-8b", "--hardware", "TPU"]) == 2
    assert "presets: A100-80G, H100-80G, H200, L4" in capsys.readouterr().err
    assert main(["predict", "project", "--config", "/no/config.json", "--hardware", "L4"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["predict", "project", "--config", "llama-3.1-8b", "--hardware", "L4", "--method", "zip"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_advise_from_measured_and_projected(tmp_path, capsys):
    dirs = [str(d) for d in make_results(tmp_path)]
    out = tmp_path / "adv"
    assert main(["advise", "--model", "smollm2-135m", "--workload", "decode-heavy=16x512x256", "--results", *dirs,
                 "--max-negative", "5%", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Use kivi:" in text and "(m)" in text
    assert (out / "report.html").is_file() and (out / "pareto.png").is_file()
    # projection only, for a model with no results
    assert main(["advise", "--model", "llama-3.1-8b", "--workload", "chat=64x1024x256", "--hardware", "H100",
                 "--kv-memory", "40GB", "--method", "kivi:bits=2", "--slo", "ttft:2000,tpot:50",
                 "--out", str(tmp_path / "adv2"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in s["rows"]} == {"full", "kivi"}
    assert all(r["throughput_tok_s"]["kind"] == "predicted" for r in s["rows"])
    assert main(["advise", "--workload", "chat=1x1x1", "--out", str(tmp_path / "x")]) == 2
    assert "nothing to advise from" in capsys.readouterr().err
    assert main(["advise", "--workload", "chat=1x1x1", "--results", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
