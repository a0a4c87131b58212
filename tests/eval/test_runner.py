"""End to end on a tiny random model with an offline character tokenizer; resume after a crash."""

import json

import pytest

from kvshrink.eval import runner
from kvshrink.eval.runner import EvalConfig, run_eval
from kvshrink.eval.tasks import Sample, TaskConfig, build_samples, load_task
from kvshrink.results import Records
from tests.conftest import tiny_model, tiny_tokenizer

TIMING = {"prefill_s", "decode_s", "time"}
METHOD = "streamingllm:sinks=2,budget=24"


@pytest.fixture(scope="module")
def mt():
    return tiny_model("llama"), tiny_tokenizer()


def cfg(out, **kw):
    base = dict(methods=[METHOD], tasks=["needle", "kv-retrieval", "chat"], out=str(out), lengths=(80,), limit=2,
                max_new_tokens=3, progress=False, extra={"model": "tiny-llama"})
    base.update(kw)
    return EvalConfig(**base)


def strip(recs):
    return sorted(({k: v for k, v in r.items() if k not in TIMING} for r in recs),
                  key=lambda r: (r["method"], r["task"], r["id"]))


def load(d):
    return Records(d / "records.jsonl").load()


def test_end_to_end_report(tmp_path, mt):
    model, tok = mt
    d = run_eval(cfg(tmp_path / "run", tasks=["needle", "summarize", "chat"]), model, tok)
    s = json.loads((d / "summary.json").read_text())
    assert set(s["methods"]) == {"full", METHOD}
    for e in s["methods"].values():
        for k in ("score", "negative_ratio", "length_change_mean", "share_longer", "compression", "kv_bytes"):
            assert k in e
        assert 0 <= e["score"] <= 1
        assert set(e["tasks"]) == {"needle", "summarize", "chat"}
    assert s["methods"]["full"]["tasks"]["summarize"]["score"] == 1.0  # gold-less: vs the reference output
    assert s["methods"]["full"]["tasks"]["chat"]["score"] is None
    page = (d / "report.html").read_text()
    for section in ("summary", "accuracy-compression", "negatives", "combined", "length-drift", "agreement",
                    "worst-negatives"):
        assert f'id="{section}"' in page
    for png in ("accuracy_vs_compression.png", "negative_ratio_by_task.png", "length_shift.png"):
        assert (d / png).stat().st_size > 0 and png in page
    recs = load(d)
    assert len(recs) == 2 * 6
    r = recs[0]
    for k in ("id", "task", "score", "output", "prompt_tokens", "output_tokens", "finish_reason", "prefill_s",
              "decode_s", "kv_bytes"):
        assert k in r
    assert r["finish_reason"] in ("eos", "length")
    assert (d / "hardset.jsonl").exists()


def test_resume_after_crash_equals_uninterrupted(tmp_path, mt, monkeypatch):
    model, tok = mt
    kw = dict(tasks=["needle", "chat"], report=False)
    clean = run_eval(cfg(tmp_path / "clean", **kw), model, tok)

    real, calls = runner.generate_one, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(runner, "generate_one", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(cfg(tmp_path / "crash", **kw), model, tok)
    assert len(load(tmp_path / "crash")) == 5
    with open(tmp_path / "crash" / "records.jsonl", "a") as f:
        f.write('{"method": "full", "task": "nee')  # a line cut short by the crash
    monkeypatch.setattr(runner, "generate_one", real)
    resumed = run_eval(cfg(tmp_path / "crash", **kw), model, tok)
    assert resumed == tmp_path / "crash"
    assert strip(load(resumed)) == strip(load(clean))
    # a changed configuration never touches the earlier records
    other = run_eval(cfg(tmp_path / "crash", limit=1, **kw), model, tok)
    assert other != resumed and other.parent == resumed
    assert strip(load(resumed)) == strip(load(clean))


def test_hardset_roundtrip(tmp_path, mt):
    _, tok = mt
    samples = build_samples(["needle", "chat"], tok, TaskConfig(lengths=(80,), limit=2))
    p = tmp_path / "hard.jsonl"
    p.write_text("".join(json.dumps({**s.to_dict(), "reference_output": "r", "outputs": {}}) + "\n"
                         for s in samples))
    again = load_task(f"hardset:{p}").samples(tok, TaskConfig())
    assert [s.to_dict() for s in again] == [s.to_dict() for s in samples]


def test_longbench_reader(tmp_path, mt):
    _, tok = mt
    rows = {
        "hotpotqa": {"input": "Who?", "context": "Passage 1: " + "x" * 400, "answers": ["Ann"], "all_classes": None,
                     "_id": "h1", "length": 5},
        "trec": {"input": "What is X?", "context": "examples", "answers": ["Entity"],
                 "all_classes": ["Entity", "Location"], "_id": "t1", "length": 3},
    }
    for name, row in rows.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "unrelated.jsonl").write_text("{}\n")
    ss = {s.task: s for s in load_task(f"longbench:{tmp_path}").samples(tok, TaskConfig(lengths=(200,)))}
    assert set(ss) == {"longbench/hotpotqa", "longbench/trec"}
    h, t = ss["longbench/hotpotqa"], ss["longbench/trec"]
    assert h.chat and h.metric == "qa_f1" and h.max_new_tokens == 32
    assert len(tok(h.prompt[0]["content"], add_special_tokens=False)["input_ids"]) <= 200  # middle-truncated
    assert h.prompt[0]["content"].endswith("Question: Who?\nAnswer:")
    assert not t.chat and t.prompt.startswith("Please determine the type") and t.metadata["first_line"]
    assert t.metadata["all_classes"] == ["Entity", "Location"]
    with pytest.raises(FileNotFoundError):
        load_task(f"longbench:{tmp_path / 'missing'}").samples(tok, TaskConfig())


def test_config_validation():
    with pytest.raises(ValueError, match="neg_filter"):
        EvalConfig(methods=["full"], tasks=["needle"], out="x", neg_filter="max")
    with pytest.raises(ValueError, match="unknown task"):
        EvalConfig(methods=["full"], tasks=["nope"], out="x")
    with pytest.raises(ValueError):
        EvalConfig(methods=["nosuchmethod"], tasks=["needle"], out="x")
    assert EvalConfig(methods=["kivi", "full"], tasks=["chat"], out="x").all_methods() == ["full", "kivi"]
    assert isinstance(Sample.from_dict({"id": 1, "task": "t", "prompt": "p"}).id, str)
