"""Length predictor on synthetic eval records with a known drift."""

from __future__ import annotations

import json
import math
import random

import pytest

from kvshrink.predict.lengths import LengthPredictor, evaluate, load_pairs, pairs_from_records

# method: (compression, drift per log2-compression, extra drift per log-reference-length)
METHODS = {
    "snapkv:ratio=0.5": (2.0, 0.10, 0.10),
    "snapkv:ratio=0.875": (8.0, 0.10, 0.10),
    "streamingllm:ratio=0.75": (4.0, 0.25, -0.05),
    "kivi:bits=2": (4.7, 0.02, 0.0),
}
TASKS = {"qa": 24, "summarize": 90, "chat": 160}  # reference output length scale
LIMIT = 256


def synthetic_records(n_prompts: int = 60, seed: int = 0) -> list[dict]:
    """``full`` plus four methods; a method's length is the reference's times
    ``exp(a*log2(c) + b*(log r - 4)) * noise``, capped at the limit (so drift depends on the method,
    its compression and the reference length: a constant ratio cannot capture it)."""
    rng = random.Random(seed)
    recs = []
    for i in range(n_prompts):
        task = list(TASKS)[i % len(TASKS)]
        prompt = rng.randint(200, 2000)
        ref = min(LIMIT, max(2, int(TASKS[task] * rng.lognormvariate(0, 0.5))))
        recs.append({"method": "full", "task": task, "id": str(i), "prompt_tokens": prompt, "output_tokens": ref,
                     "max_new_tokens": LIMIT, "finish_reason": "length" if ref >= LIMIT else "stop",
                     "kv_bytes": 1000 * prompt, "kv_bytes_full": 1000 * prompt})
        for m, (c, a, b) in METHODS.items():
            ratio = math.exp(a * math.log2(c) + b * (math.log(ref) - 4)) * rng.lognormvariate(0, 0.05)
            out = min(LIMIT, max(1, round(ref * ratio)))
            recs.append({"method": m, "task": task, "id": str(i), "prompt_tokens": prompt, "output_tokens": out,
                         "max_new_tokens": LIMIT, "finish_reason": "length" if out >= LIMIT else "stop",
                         "kv_bytes": int(1000 * prompt / c), "kv_bytes_full": 1000 * prompt})
    return recs


def test_beats_both_naive_baselines_on_known_drift():
    ev = evaluate(pairs_from_records(synthetic_records()), folds=5)
    o = ev["overall"]
    assert ev["pairs"] == 60 * len(METHODS)
    assert o["model"] < 0.7 * o["full_x_mean_ratio"] < o["same_as_full"]
    for m, (_, _, b) in METHODS.items():
        e = ev["methods"][m]
        if b:  # drift that depends on the reference length: the model beats both per method
            assert e["model"] < 0.7 * min(e["full_x_mean_ratio"], e["same_as_full"]), (m, e)
        else:  # a constant ratio is the mean-ratio baseline's own model: the fit is near it (noise ~4 tokens)
            assert e["model"] < 1.5 * e["full_x_mean_ratio"], (m, e)


def test_predict_one_prompt_follows_the_drift():
    lp = LengthPredictor.fit(pairs_from_records(synthetic_records()))
    short = lp.predict("snapkv:ratio=0.875", 1000, "chat", LIMIT, reference_tokens=100)
    mild = lp.predict("snapkv:ratio=0.5", 1000, "chat", LIMIT, reference_tokens=100)
    truth = 100 * math.exp(0.10 * 3 + 0.10 * (math.log(100) - 4))
    assert abs(short - truth) / truth < 0.1 and mild < short
    assert lp.predict("full", 1000, "chat", LIMIT, reference_tokens=77) == 77
    assert lp.predict("kivi:bits=2", 1000, "chat", LIMIT, reference_tokens=LIMIT) <= LIMIT  # capped
    assert 1 <= lp.predict("kivi:bits=2", 1000, "qa", LIMIT) <= LIMIT  # without a reference length
    again = LengthPredictor.from_dict(json.loads(json.dumps(lp.to_dict())))
    assert again.predict("snapkv:ratio=0.875", 1000, "chat", LIMIT, reference_tokens=100) == pytest.approx(short)


def test_load_pairs_from_run_dirs(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "records.jsonl").write_text("\n".join(json.dumps(r) for r in synthetic_records(6)) + "\n{broken")
    (d / "samples.jsonl").write_text(json.dumps({"task": "qa", "id": "0", "prompt": "a\nb?"}) + "\n")
    pairs = load_pairs([d])
    assert len(pairs) == 6 * len(METHODS)
    p0 = next(p for p in pairs if p.prompt.endswith("|qa|0"))
    assert p0.prompt_lines == 2 and p0.question
    with pytest.raises(FileNotFoundError):
        load_pairs([tmp_path / "missing"])


def test_scikit_learn_models_chosen_per_method_by_group_folds():
    from sklearn.base import BaseEstimator

    from kvshrink.predict.lengths import CANDIDATES, Candidate

    recs = synthetic_records()
    # a method that never drifts: its length is full's, so "same" (the simplest candidate) must win
    recs += [{**r, "method": "int8"} for r in recs if r["method"] == "full"]
    lp = LengthPredictor.fit(pairs_from_records(recs))
    assert lp.chosen("int8") == Candidate("same")
    # drift that depends on the reference length: only a learnt model can follow it
    for m in ("snapkv:ratio=0.5", "snapkv:ratio=0.875"):
        assert lp.chosen(m).learnt, (m, lp.cv_mae[m])
        assert isinstance(lp.fitted.with_ref[lp.chosen(m)], BaseEstimator)
    assert isinstance(lp.fitted.without_ref[lp.no_ref], BaseEstimator)
    assert set(lp.cv_mae["int8"]) == {c.label for c in CANDIDATES}
    # a method never seen in training takes the candidate best over all methods
    assert lp.chosen("pyramidkv:ratio=0.5") == lp.default


def test_folds_hold_out_every_method_of_a_prompt_together():
    from kvshrink.predict.lengths import _group_splits

    pairs = pairs_from_records(synthetic_records(20))
    splits = _group_splits(pairs, 5, seed=0)
    assert len(splits) == 5
    seen = []
    for tr, te in splits:
        test_prompts = {pairs[i].prompt for i in te}
        assert not test_prompts & {pairs[i].prompt for i in tr}
        assert len(te) == len(test_prompts) * len(METHODS)  # all four methods of each held-out prompt
        seen += list(te)
    assert sorted(seen) == list(range(len(pairs)))
    # shuffled: a different seed gives different folds
    assert [sorted(te) for _, te in _group_splits(pairs, 5, seed=1)] != [sorted(te) for _, te in splits]


def test_reference_at_the_limit_is_predicted_by_the_methods_censored_median():
    from kvshrink.predict.lengths import MIN_AT_LIMIT, Candidate, Pair

    def pair(i: int, ref: int, out: int) -> Pair:
        return Pair("h2o:budget=64", "chat", f"p{i}", 40, ref, ref >= 128, 128, 2.0, out, "h2o", "fp")

    free = [pair(i, 50 + i, 60 + i) for i in range(6)]
    cut = [pair(10 + i, 128, o) for i, o in enumerate([128, 100, 90, 128, 70])]
    assert len(cut) >= MIN_AT_LIMIT
    lp = LengthPredictor.fit(free + cut, candidate=Candidate("ratio"))
    # median of y / limit over the censored training pairs: [70, 90, 100, 128, 128] -> 100
    assert lp.predict("h2o:budget=64", 40, "chat", 128, reference_tokens=128) == pytest.approx(100.0)
    # an uncensored reference goes through the ratio model: r * exp(mean log(y / r)) over the free pairs
    o = sum(math.log((60 + i) / (50 + i)) for i in range(6)) / 6
    assert lp.predict("h2o:budget=64", 40, "chat", 128, reference_tokens=80) == pytest.approx(80 * math.exp(o))
    # "same" ignores drift everywhere
    same = LengthPredictor.fit(free + cut, candidate=Candidate("same"))
    assert same.predict("h2o:budget=64", 40, "chat", 128, reference_tokens=128) == 128


def test_compression_is_the_methods_storage_at_the_reference_length(tmp_path):
    from kvshrink.predict.modelconfig import load_shape
    from kvshrink.predict.storage import storage

    recs = [{"method": "full", "task": "chat", "id": "0", "prompt_tokens": 40, "output_tokens": 100,
             "max_new_tokens": 128, "finish_reason": "eos", "kv_bytes": 9, "kv_bytes_full": 9},
            # a budget method's measured bytes follow its own (here: long) output: not a feature to use
            {"method": "streamingllm:budget=64", "task": "chat", "id": "0", "prompt_tokens": 40,
             "output_tokens": 128, "max_new_tokens": 128, "finish_reason": "length", "kv_bytes": 1,
             "kv_bytes_full": 7}]
    d = tmp_path / "run"
    d.mkdir()
    (d / "records.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (d / "config.json").write_text(json.dumps({"kind": "eval", "model": "smollm2-135m"}))
    (p,) = load_pairs([d])
    st = storage("streamingllm:budget=64", load_shape("smollm2-135m", "float32"))
    # 140 tokens (prompt + full's output) against 64 kept: 140 / 64
    assert p.compression == pytest.approx(st.compression(140, 40)) == pytest.approx(140 / 64)
    (d / "config.json").write_text(json.dumps({"kind": "eval", "model": "/no/such/model"}))
    assert load_pairs([d])[0].compression == 7.0  # no model config: the measured ratio


def test_old_saved_format_is_refused():
    with pytest.raises(ValueError, match="predict lengths --save"):
        LengthPredictor.from_dict({"kind": "length_predictor", "vocab": {}, "with_ref": {}})
