import pytest

from kvshrink.eval.drift import length_drift
from kvshrink.eval.negatives import combined, find_negatives, method_groups, scores_by_method, task_thresholds
from kvshrink.eval.report import build_summary, hardset_rows, summary_table
from kvshrink.eval.tasks import Sample


def rec(method, task, i, score, out_tokens=10, output="x", finish="eos", decode=0.9, prefill=0.1):
    return {"method": method, "task": task, "id": str(i), "score": score, "output": output,
            "output_tokens": out_tokens, "finish_reason": finish, "prefill_s": prefill, "decode_s": decode,
            "kv_bytes": 100 if method != "full" else 400, "kv_bytes_full": 400, "prompt_tokens": 50}


REF = {0: 1.0, 1: 0.8, 2: 0.5, 3: 0.0}  # task "a": median 0.65
QUANT = {0: 0.9, 1: 0.8, 2: 0.0, 3: 0.0}  # 0: 0.9 <= 0.9 -> negative; 1 equal; 2 below median; 3 zero ref
EVICT = {0: 0.5, 1: 0.7, 2: 0.5, 3: 0.0}  # 0 negative; 1: 0.7 <= 0.72 -> negative


def records():
    out = [rec("full", "a", i, s) for i, s in REF.items()]
    out += [rec("kivi", "a", i, s) for i, s in QUANT.items()]
    out += [rec("snapkv:ratio=0.5", "a", i, s) for i, s in EVICT.items()]
    out += [rec("full", "b", 0, 0.0), rec("kivi", "b", 0, 0.0), rec("snapkv:ratio=0.5", "b", 0, 0.0)]
    return out


def test_negatives_median_zero_baseline_and_combined():
    scores = scores_by_method(records())
    assert task_thresholds(scores["full"])["a"] == pytest.approx(0.65)
    negs = find_negatives(scores, "full", 0.1, "median")
    assert negs["kivi"].negatives == {("a", "0")}
    assert negs["snapkv:ratio=0.5"].negatives == {("a", "0"), ("a", "1")}
    # task b: reference 0 with median 0 -> never negative, even though the method also scores 0
    assert negs["kivi"].by_task["b"] == (0, 1)
    assert negs["kivi"].ratio == pytest.approx(1 / 5)
    assert negs["snapkv:ratio=0.5"].task_ratio("a") == pytest.approx(2 / 4)
    both = combined(negs, ["kivi", "snapkv:ratio=0.5"])
    assert both.negatives == {("a", "0")}
    assert both.ratio == pytest.approx(1 / 5)


def test_negatives_mean_filter_and_threshold():
    scores = scores_by_method(records())
    # mean of task a = 0.575: sample 2 (0.5) still below; threshold 0.3 -> 0.7 > 0.8*0.7=0.56 not negative
    negs = find_negatives(scores, "full", 0.3, "mean")
    assert negs["snapkv:ratio=0.5"].negatives == {("a", "0")}


def test_method_groups():
    g = method_groups(["full", "kivi", "snapkv:ratio=0.5", "snapkv:ratio=0.5+kivi"])
    assert g["quantisers (codec != fp)"] == ["kivi", "snapkv:ratio=0.5+kivi"]
    assert g["eviction (selector != full)"] == ["snapkv:ratio=0.5", "snapkv:ratio=0.5+kivi"]
    assert g["all methods"] == ["kivi", "snapkv:ratio=0.5", "snapkv:ratio=0.5+kivi"]


def test_length_drift_fixed_records():
    recs = [rec("full", "c", i, None, out_tokens=n, output=f"o{i}") for i, n in enumerate([10, 20, 10, 5])]
    m = [(12, "length", "o0"), (20, "eos", "o1"), (5, "eos", "zz"), (10, "length", "o3")]
    recs += [rec("m", "c", i, None, out_tokens=n, finish=f, output=o, decode=(n - 1) * 0.01)
             for i, (n, f, o) in enumerate(m)]
    d = length_drift(recs, "full")["m"]
    changes = [0.2, 0.0, -0.5, 1.0]
    assert d.length_change_mean == pytest.approx(sum(changes) / 4)
    assert d.length_change_median == pytest.approx(0.1)
    assert d.share_longer == 0.5
    assert d.share_hit_limit == 0.5
    assert d.extra_tokens_mean == pytest.approx((2 + 0 - 5 + 5) / 4)
    assert d.tpot_s == pytest.approx(0.01)
    assert d.extra_time_est_s == pytest.approx(0.5 * 0.01)
    assert d.exact_agreement == 0.75
    assert length_drift(recs, "full")["full"].length_change_mean == 0.0


def test_summary_and_hardset_from_fixed_records():
    recs = records()
    summary, negs = build_summary(recs, ["full", "kivi", "snapkv:ratio=0.5"], "full")
    e = summary["methods"]["kivi"]
    for k in ("score", "negative_ratio", "length_change_mean", "share_longer", "compression", "kv_bytes", "tasks"):
        assert k in e
    assert e["compression"] == pytest.approx(4.0)
    assert e["tasks"]["a"]["score"] == pytest.approx(1.7 / 4)
    assert e["score"] == pytest.approx((1.7 / 4 + 0.0) / 2)
    assert summary["methods"]["full"]["negative_ratio"] == 0.0
    assert summary["combined"]["all methods"]["negatives"] == 1
    samples = {("a", str(i)): Sample(str(i), "a", [{"role": "user", "content": "q"}], ["g"], "qa_f1", 8)
               for i in range(4)}
    rows = hardset_rows(recs, samples, negs, "full")
    assert {r["id"] for r in rows} == {"0", "1"}
    r0 = next(r for r in rows if r["id"] == "0")
    assert set(r0["negative_for"]) == {"kivi", "snapkv:ratio=0.5"}
    assert r0["reference_score"] == 1.0 and r0["metric"] == "qa_f1" and r0["prompt"]
    assert Sample.from_dict(r0).references == ["g"]


def test_a_method_that_never_compressed_is_flagged():
    """An uncompressed run must never read as a compressing method with factor 1.0 and no word why."""
    recs = records()
    recs += [dict(r, method="h2o:budget=4096", kv_bytes=r["kv_bytes_full"]) for r in recs if r["method"] == "full"]
    summary, _ = build_summary(recs, ["full", "kivi", "h2o:budget=4096"], "full")
    flagged = summary["methods"]["h2o:budget=4096"]
    assert flagged["compression"] == pytest.approx(1.0)
    assert flagged["uncompressed_samples"] == flagged["samples"] > 0
    assert "no sample was stored compressed" in flagged["note"]
    assert summary["methods"]["kivi"]["note"] is None and summary["methods"]["full"]["note"] is None
    assert "WARNING h2o:budget=4096: no sample was stored compressed" in summary_table(summary)
