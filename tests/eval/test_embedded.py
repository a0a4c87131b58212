"""One short end-to-end run on the embedded SmolLM2-135M (slow: loads the real model)."""

import json

import pytest

from kvshrink.eval.runner import EvalConfig, run_eval


@pytest.mark.slow
def test_embedded_kv_retrieval_short(tmp_path):
    d = run_eval(EvalConfig(methods=[], tasks=["kv-retrieval"], out=str(tmp_path), lengths=(256,), limit=1,
                            progress=False))
    s = json.loads((d / "summary.json").read_text())
    full = s["methods"]["full"]
    assert 0.0 <= full["score"] <= 1.0 and full["compression"] == pytest.approx(1.0)
    rec = json.loads((d / "records.jsonl").read_text().splitlines()[0])
    assert 200 <= rec["prompt_tokens"] <= 300 and rec["output_tokens"] >= 1
