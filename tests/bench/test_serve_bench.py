"""``kvshrink bench serve`` against an in-test server (uvicorn in a thread on 127.0.0.1)."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

from kvshrink.bench.datasets import load_dataset
from kvshrink.bench.serve import comparison_rows, format_table, parse_rates, run_bench_serve
from kvshrink.cli import build_parser
from kvshrink.serve.app import create_app
from tests.conftest import tiny_tokenizer
from tests.serve.conftest import ServerThread
from tests.serve.fake_engine import FakeEngine


@pytest.fixture
def server():
    tok = tiny_tokenizer()
    s = ServerThread(create_app(FakeEngine(tok, num_blocks=256, max_batch=8, step_s=0.001), tok,
                                model_name="tiny", context_len=512)).start()
    yield s
    s.stop()


def test_bench_serve_writes_every_field(server, tmp_path):
    args = build_parser().parse_args([
        "bench", "serve", "--base-url", server.url, "--model", "tiny", "--dataset", "random",
        "--num-prompts", "6", "--random-input-len", "12", "--random-output-len", "5", "--request-rate", "50,inf",
        "--goodput", "ttft:60000", "tpot:10000", "e2el:60000", "--ignore-eos", "--seed", "1",
        "--out", str(tmp_path / "run")])
    assert run_bench_serve(args, tokenizer=tiny_tokenizer()) == 0
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [r["request_rate"] for r in res["results"]] == ["50", "inf"]
    for r in res["results"]:
        assert r["completed"] == 6 and r["failed"] == 0
        assert r["total_output_tokens"] == 30 and r["total_input_tokens"] == 6 * 12
        assert r["request_goodput"] == pytest.approx(r["request_throughput"])
        for name in ("ttft", "tpot", "itl", "e2el"):
            for stat in ("mean", "median", "std", "p90", "p99"):
                assert r[f"{stat}_{name}_ms"] >= 0
        assert r["mean_e2el_ms"] >= r["mean_ttft_ms"] > 0
        for k in ("request_throughput", "output_throughput", "total_token_throughput", "duration_s"):
            assert r[k] > 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "requests.csv")))
    assert len(rows) == 12
    assert {"send_time_s", "ttft_ms", "itl_ms", "e2el_ms", "prompt_tokens", "output_tokens", "error"} <= set(rows[0])
    for row in rows:
        # ITL is timed per SSE chunk, as vLLM's bench does: the server may coalesce tokens that
        # arrive together (on a loaded machine all 5 in one chunk) or hold back text that is not yet
        # printable, so 5 tokens give 0..4 gaps.
        itl = json.loads(row["itl_ms"])
        assert 0 <= len(itl) <= 4
        assert float(row["ttft_ms"]) + sum(itl) <= float(row["e2el_ms"]) + 1e-3
    assert (tmp_path / "run" / "latency_cdf.png").stat().st_size > 0
    assert (tmp_path / "run" / "vs_rate.png").stat().st_size > 0
    assert len((tmp_path / "run" / "records.jsonl").read_text().splitlines()) == 12


def test_unreachable_server_counts_failures(tmp_path):
    args = build_parser().parse_args([
        "bench", "serve", "--base-url", "http://127.0.0.1:9", "--model", "tiny", "--num-prompts", "2",
        "--random-input-len", "4", "--random-output-len", "2", "--out", str(tmp_path / "r"), "--timeout", "5"])
    assert run_bench_serve(args, tokenizer=tiny_tokenizer()) == 1
    res = json.loads((tmp_path / "r" / "result.json").read_text())
    assert res["completed"] == 0 and res["failed"] == 2


def test_datasets(tmp_path):
    tok = tiny_tokenizer()
    reqs = load_dataset("random", tok, 3, input_len=10, output_len=7, seed=0)
    assert [r.prompt_tokens for r in reqs] == [10, 10, 10] and all(r.max_tokens == 7 for r in reqs)
    assert [r.prompt for r in reqs] == [r.prompt for r in load_dataset("random", tok, 3, 10, 7, seed=0)]
    data = [{"conversations": [{"from": "human", "value": "tell me a story please"},
                               {"from": "gpt", "value": "once upon a time there was"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]},
            {"conversations": [{"from": "gpt", "value": "only a reply"}]}]
    f = tmp_path / "sg.json"
    f.write_text(json.dumps(data))
    reqs = load_dataset(f"sharegpt:{f}", tok, 5, output_len=None)
    assert len(reqs) == 1 and reqs[0].prompt == "tell me a story please"  # "hi" is under 4 tokens
    assert reqs[0].max_tokens == len("once upon a time there was")
    chat = load_dataset("task:chat", tok, 4, output_len=9)
    assert len(chat) == 4 and chat[0].is_chat and chat[0].prompt_tokens > 0 and not chat[0].ignore_eos
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("nope", tok, 1)
    with pytest.raises(FileNotFoundError):
        load_dataset("sharegpt:/nonexistent.json", tok, 1)


def test_rates_and_comparison_table():
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, float("inf")]
    for bad in ("0", "x", "-1", ""):
        with pytest.raises(ValueError, match="request-rate"):
            parse_rates(bad)
    base = {"completed": 4, "mean_output_tokens": 10.0, "output_throughput": 100.0, "request_throughput": 2.0,
            "p90_e2el_ms": 500.0}
    rows = comparison_rows([{**base, "method": "full", "request_rate": "1"},
                            {**base, "method": "kivi", "request_rate": "1", "mean_output_tokens": 12.0,
                             "output_throughput": 150.0},
                            {"method": "bad", "request_rate": "1", "completed": 0, "error": "boom"}])
    assert rows[1]["output_tokens_change_vs_base"] == pytest.approx(0.2)
    assert rows[1]["output_throughput_ratio"] == pytest.approx(1.5)
    assert "FAILED" in format_table(rows)


def test_cli_parses_serve_and_launch():
    a = build_parser().parse_args(["serve", "--method", "kivi:bits=4", "--kv-memory", "64MiB", "--max-waiting", "3",
                                   "--api-key", "k"])
    assert (a.host, a.port, a.max_waiting, a.api_key) == ("127.0.0.1", 8000, 3, "k")
    a = build_parser().parse_args(["bench", "serve", "--launch", "--method", "full", "--method", "kivi:bits=4",
                                   "--request-rate", "1,2", "--out", "x"])
    assert a.method == ["full", "kivi:bits=4"] and a.launch
    assert isinstance(a, argparse.Namespace)


@pytest.mark.slow  # starts a Python subprocess that imports torch (seconds to tens of seconds on a busy CPU)
def test_launch_failure_names_method_and_sweep_goes_on(tmp_path, capsys):
    args = build_parser().parse_args([
        "bench", "serve", "--launch", "--method", "nosuchmethod:x=1", "--model", "tiny", "--num-prompts", "2",
        "--random-input-len", "4", "--random-output-len", "2", "--request-rate", "1,2", "--out", str(tmp_path / "l"),
        "--startup-timeout", "90"])
    assert run_bench_serve(args, tokenizer=tiny_tokenizer()) == 1
    res = json.loads((tmp_path / "l" / "result.json").read_text())
    assert [r["request_rate"] for r in res["results"]] == ["1", "2"]
    assert all("nosuchmethod" in r["error"] and r["completed"] == 0 for r in res["results"])
    assert "nosuchmethod" in capsys.readouterr().err
    assert res["comparison"][0]["method"] == "nosuchmethod:x=1"


def test_the_run_lasts_from_the_first_send_to_the_last_completion(server):
    """Requests scheduled 0.5 s after the start: the run's duration (which throughputs divide by)
    starts at the first send, as in vLLM's benchmark and the simulator, not at the idle start."""
    import asyncio

    from kvshrink.bench.loadgen import BenchRequest, run_trace

    reqs = [BenchRequest(prompt="a b c", prompt_tokens=3, max_tokens=4, ignore_eos=True) for _ in range(2)]
    results, duration = asyncio.run(run_trace(server.url, "tiny", reqs, [0.5, 0.5]))
    assert all(r.success for r in results) and min(r.send_time for r in results) >= 0.5
    last = max(r.send_time + r.latency for r in results) - 0.5
    assert last <= duration < last + 0.25
