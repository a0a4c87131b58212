"""Eval and throughput sweeps through a local Ray cluster (2 CPUs) on the tiny random model.

Each sweep starts its workers afresh (a new Python process importing torch per worker), so these take
tens of seconds; ``make test-ray`` runs them, ``make test`` deselects the ``ray`` marker.
"""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")

from kvshrink import cli, results  # noqa: E402
from kvshrink.eval.runner import EvalConfig, run_eval  # noqa: E402
from kvshrink.sweep import RayOptions, run_eval_ray, run_throughput_ray  # noqa: E402
from tests.conftest import tiny_model, tiny_tokenizer  # noqa: E402
from tests.sweep.helpers import Failing, Logged, lines, tiny_llama  # noqa: E402

pytestmark = pytest.mark.ray

METHOD = "streamingllm:sinks=2,budget=24"
TIMING = {"prefill_s", "decode_s", "time"}


@pytest.fixture(autouse=True)
def cluster(ray_cluster):
    yield ray_cluster


def cfg(out, **kw):
    base = dict(methods=[METHOD], tasks=["needle", "chat"], out=str(out), lengths=(80,), limit=2,
                max_new_tokens=3, progress=False, extra={"model": "tiny-llama"})
    base.update(kw)
    return EvalConfig(**base)


def opts(**kw):
    return RayOptions(**{"shard_size": 1, "progress": False, "retries": 1, **kw})


def strip(recs):
    return sorted(({k: v for k, v in r.items() if k not in TIMING} for r in recs),
                  key=lambda r: (r["method"], r["task"], r["id"]))


def load(d):
    return results.Records(d / "records.jsonl").load()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run every Ray run must reproduce."""
    return run_eval(cfg(tmp_path_factory.mktemp("single") / "run"), tiny_model("llama"), tiny_tokenizer())


def test_ray_eval_equals_single_process(tmp_path, single):
    d = run_eval_ray(cfg(tmp_path / "run"), opts(), tiny_llama, tiny_tokenizer())
    assert strip(load(d)) == strip(load(single))  # scores, outputs, lengths, KV bytes
    for f in ("config.json", "samples.jsonl", "summary.json", "report.html", "hardset.jsonl", "records.csv"):
        assert (d / f).exists()
    assert (d / "config.json").read_text() == (single / "config.json").read_text()
    assert (d / "samples.jsonl").read_text() == (single / "samples.jsonl").read_text()
    s, s1 = json.loads((d / "summary.json").read_text()), json.loads((single / "summary.json").read_text())
    sweep = s.pop("sweep")
    assert s["methods"].keys() == s1["methods"].keys()
    for m in s1["methods"]:
        assert s["methods"][m]["score"] == s1["methods"][m]["score"]
    assert sweep["units_total"] == 8 and sweep["ran_now"] == 8 and not sweep["failed"]
    (nid, node), = sweep["nodes"].items()
    assert node["cpu"] and node["hostname"] and all(u["node_id"] == nid for u in sweep["units"])


def test_killed_driver_then_rerun_computes_only_missing(tmp_path, single, monkeypatch):
    real, n = results.Records.append, {"n": 0}

    def killed_after_3(self, rec):
        if n["n"] == 3:
            raise KeyboardInterrupt  # the driver dies between two records
        n["n"] += 1
        real(self, rec)

    monkeypatch.setattr(results.Records, "append", killed_after_3)
    with pytest.raises(KeyboardInterrupt):
        run_eval_ray(cfg(tmp_path / "run"), opts(), tiny_llama, tiny_tokenizer())
    monkeypatch.setattr(results.Records, "append", real)
    before = {(r["method"], r["task"], r["id"]) for r in load(tmp_path / "run")}
    assert len(before) == 3
    log = tmp_path / "log"
    d = run_eval_ray(cfg(tmp_path / "run"), opts(), tiny_llama, tiny_tokenizer(), evaluate=Logged(str(log)))
    rerun = [tuple(x.split("\t")) for x in lines(log)]
    assert len(rerun) == 5 and not before & set(rerun)  # only the missing units ran
    assert len(load(d)) == 8 and strip(load(d)) == strip(load(single))
    assert json.loads((d / "summary.json").read_text())["sweep"]["done_before"] == 3


def test_failing_unit_is_retried_then_reported(tmp_path, single):
    """Units that raise are retried then reported; a worker that dies is replaced; the rest complete."""
    log = str(tmp_path / "log")
    ev = Failing(log, fail_method=METHOD, fail_task="needle", flaky_task="chat", die_task="needle")
    d = run_eval_ray(cfg(tmp_path / "run"), opts(retries=2), tiny_llama, tiny_tokenizer(), evaluate=ev)
    sweep = json.loads((d / "summary.json").read_text())["sweep"]
    failed = sorted(f["unit"] for f in sweep["failed"])
    assert failed == [f"{METHOD} / needle / 0", f"{METHOD} / needle / 1"]
    assert all(f["attempts"] == 3 and "RuntimeError: boom on needle" in f["error"] for f in sweep["failed"])
    assert len(lines(log + ".fail")) == 2 * 3  # each failing unit: 1 try + 2 retries
    # the flaky units failed once and then completed; everything else completed
    recs = load(d)
    assert len(recs) == 6 and {(r["method"], r["task"]) for r in recs} == {
        ("full", "needle"), ("full", "chat"), (METHOD, "chat")}
    want = [r for r in strip(load(single)) if not (r["method"] == METHOD and r["task"] == "needle")]
    assert strip(recs) == want
    units = {u["unit"]: u for u in sweep["units"]}
    assert units["full / chat / 0"]["attempts"] == 2 and units["full / chat / 0"]["status"] == "done"
    died = [u for u in units.values() if u["unit"].startswith("full / needle")]
    assert sorted(u["attempts"] for u in died) == [1, 2] and all(u["status"] == "done" for u in died)
    # a rerun retries only the failed units
    d2 = run_eval_ray(cfg(tmp_path / "run"), opts(), tiny_llama, tiny_tokenizer(),
                      evaluate=Logged(log + ".2"))
    assert d2 == d and sorted(x.split("\t")[1] for x in lines(log + ".2")) == ["needle", "needle"]
    assert strip(load(d)) == strip(load(single))


def test_ray_throughput_one_unit_per_node(tmp_path, capsys):
    args = cli.build_parser().parse_args([
        "bench", "throughput", "--mode", "serving", "--method", "streamingllm:budget=16", "--workload",
        "decode-heavy=3x40x6", "--kv-memory", "80KiB", "--out", str(tmp_path / "tp"), "--ray"])
    o = RayOptions.from_args(args)
    assert o.address is None and not o.pack
    o.progress = False
    assert run_throughput_ray(args, o, model_factory=tiny_llama) == 0
    s = json.loads((tmp_path / "tp" / "summary.json").read_text())
    assert [(r["workload"], r["method"]) for r in s["runs"]] == [
        ("decode-heavy", "full"), ("decode-heavy", "streamingllm:budget=16")]
    assert s["runs"][0]["ratio_to_full"] == 1.0 and s["runs"][1]["ratio_to_full"] > 0
    assert len(s["sweep"]["nodes"]) == 1 and "node" in capsys.readouterr().out
    assert len(results.Records(tmp_path / "tp" / "records.jsonl").load()) == 2
    # resumed: nothing left to run, the same summary
    assert run_throughput_ray(args, o, model_factory=tiny_llama) == 0
    assert len(results.Records(tmp_path / "tp" / "records.jsonl").load()) == 2
