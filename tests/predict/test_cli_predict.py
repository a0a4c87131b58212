"""``kvshrink predict lengths``, ``kvshrink predict project`` and ``kvshrink advise`` through ``cli.main``."""

from __future__ import annotations

import json

import pytest

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


# ----------------------------------------------------------------------------- predict validate
def _tiny_profile(tmp_path):
    from kvshrink.predict.profile import ProfileGrid
    from kvshrink.predict.throughput import run_profile
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    grid = ProfileGrid(prefill=(8, 16, 32), ladders=((3, 16), (2, 24)), steps=1, rounds=1, repeats=1,
                       chunks=((8, 8), (16, 8), (16, 16)))
    return model, run_profile(model, "tiny", ["full"], tmp_path / "prof", grid=grid)


class _InProcessServer:
    """Stands in for ``LaunchedServer``: the real app and engine on the tiny model, in a thread."""

    launched: list = []

    def __init__(self, model_name, method, kv_memory, log_path, startup_timeout, dtype=None):
        self.method, self.kv_memory, self.popen_kw, self.dtype = method, kv_memory, {}, dtype
        _InProcessServer.launched.append(self)

    def __enter__(self):
        from kvshrink.engine import Engine
        from kvshrink.serve.app import create_app
        from tests.conftest import tiny_model, tiny_tokenizer
        from tests.serve.conftest import ServerThread

        tok = tiny_tokenizer()
        eng = Engine(tiny_model("llama"), tok, method=self.method, kv_memory=self.kv_memory)
        self.thread = ServerThread(create_app(eng, tok, model_name="tiny", method=self.method)).start()
        self.url = self.thread.url
        return self

    def __exit__(self, *exc):
        self.thread.stop()
        return False


def test_validate_runs_the_engine_and_a_server_sweep(tmp_path, monkeypatch):
    import kvshrink.bench.serve as bench_serve
    from kvshrink.engine.config import EngineConfig
    from kvshrink.predict.simulate import SimRequest, simulate
    from kvshrink.predict.throughput import ServeSweep, load_profile, validate, validation_table
    from tests.conftest import tiny_tokenizer

    model, prof = _tiny_profile(tmp_path)
    monkeypatch.setattr(bench_serve, "LaunchedServer", _InProcessServer)
    _InProcessServer.launched = []
    sweep = ServeSweep(requests=3, prompt=12, output=4, rates=(50.0, float("inf")), threads=1)
    rows = validate(model, prof, None, ["decode-heavy=2x20x4"], "8MiB", tmp_path / "val", serve=sweep,
                    model_name="tiny", tokenizer=tiny_tokenizer())
    assert [(r["method"], r["workload"]) for r in rows] == [
        ("full", "decode-heavy=2x20x4"), ("full", "serve:3x12x4@rate=50"), ("full", "serve:3x12x4@rate=inf")]
    assert [s.method for s in _InProcessServer.launched] == ["full"]  # one server per method, every rate
    assert _InProcessServer.launched[0].popen_kw["env"]["OMP_NUM_THREADS"] == "1"
    assert _InProcessServer.launched[0].dtype == "float32"  # the server loads the model in the profile's dtype
    for r in rows:
        for k in ("output_tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p50"):
            assert r[f"{k}_measured"] > 0 and r[f"{k}_predicted"] > 0
            assert r[f"{k}_error"] == (r[f"{k}_predicted"] - r[f"{k}_measured"]) / r[f"{k}_measured"]
    serve_rows = rows[1:]
    assert all(r["prompt_tokens_server"] == r["prompt_tokens_simulated"] == 36 for r in serve_rows)
    # the engine's steps, timed around step(): the engine row takes the simulator's steps exactly (the
    # same scheduler, all requests there at once); the server's are read off its /metrics
    assert rows[0]["steps_measured"] == rows[0]["steps_predicted"] > 0
    assert rows[0]["decode_steps_measured"] == rows[0]["decode_steps_predicted"] > 0  # and the same kinds
    assert rows[0]["decode_step_ms_mean_measured"] > 0 and rows[0]["prompt_step_ms_mean_measured"] > 0
    for r in rows:
        assert r["steps_measured"] >= 4 and r["step_ms_mean_measured"] > 0 and r["step_ms_mean_predicted"] > 0
    # the prediction of the all-at-once rate is the simulator on the same prompts at the times the
    # client sent them (from the first: milliseconds apart); at the nominal offsets (all at 0) it is kept too
    cfg, models = load_profile(prof)
    sent = serve_rows[1]["arrivals_s"]
    assert len(sent) == 3 and min(sent) == 0.0 and max(sent) < 1.0
    at_sent = [SimRequest(12, 4, t) for t in sent]
    direct = simulate(cfg, "full", at_sent, models["full"], EngineConfig(kv_memory="8MiB"))
    assert serve_rows[1]["output_tokens_per_s_predicted"] == direct.output_tokens_per_s
    nominal = simulate(cfg, "full", [SimRequest(12, 4)] * 3, models["full"], EngineConfig(kv_memory="8MiB"))
    assert serve_rows[1]["ttft_ms_p50_predicted_nominal"] == nominal.percentiles()["ttft_ms_p50"]
    # the engine run in this process has a CPU share, and a prediction from CPU time at that share;
    # the in-process server has no process of its own to read, so none
    engine_row = rows[0]
    assert 0 < engine_row["cpu_share"] and engine_row["output_tokens_per_s_predicted_at_share"] > 0
    assert engine_row["output_tokens_per_s_error_at_share"] == pytest.approx(
        engine_row["output_tokens_per_s_predicted_at_share"] / engine_row["output_tokens_per_s_measured"] - 1)
    assert all(r["cpu_share"] is None and "ttft_ms_p50_error_at_share" not in r for r in serve_rows)
    table = validation_table(rows)
    assert "| full | serve:3x12x4@rate=inf | - |" in table
    assert "output_tokens_per_s (wall-clock profile): within 5% in" in table
    assert "output_tokens_per_s (CPU-time profile at the run's share): within 5% in" in table
    assert "step_ms_mean (wall-clock profile): within 5% in" in table
    # a decode-step probe before and after every measurement (the server's too: it runs here, while
    # the server waits): the prediction at the probe's speed is the simulator with every prompt's
    # cost times the prefill factor and every decode step's times the decode factor
    from kvshrink.predict.throughput import Scaled

    assert all(r["speed_factor"] > 0 and r["prefill_speed_factor"] > 0 for r in rows)
    decode, prefill = serve_rows[1]["speed_factor"], serve_rows[1]["prefill_speed_factor"]
    slowed = simulate(cfg, "full", at_sent, Scaled(models["full"], prefill, decode), EngineConfig(kv_memory="8MiB"))
    assert serve_rows[1]["output_tokens_per_s_predicted_at_speed"] == slowed.output_tokens_per_s
    together = simulate(cfg, "full", [SimRequest(12, 4)] * 3, Scaled(models["full"], prefill, decode),
                        EngineConfig(kv_memory="8MiB"))
    assert together.ttft_s == pytest.approx([t * prefill for t in nominal.ttft_s])  # 3 prompts in one step
    uniform = simulate(cfg, "full", [SimRequest(12, 4)] * 3, Scaled(models["full"], decode, decode),
                       EngineConfig(kv_memory="8MiB"))
    assert uniform.output_tokens_per_s == pytest.approx(nominal.output_tokens_per_s / decode)
    assert "output_tokens_per_s (wall-clock profile at the probe's speed): within 5% in" in table
    # a rerun resumes: nothing measured again, no server started
    _InProcessServer.launched = []
    again = validate(model, prof, None, ["decode-heavy=2x20x4"], "8MiB", tmp_path / "val", serve=sweep,
                     model_name="tiny", tokenizer=tiny_tokenizer())
    assert again == rows and _InProcessServer.launched == []


def test_validate_refuses_a_model_of_another_dtype_than_the_profile(tmp_path):
    import torch

    from kvshrink.predict.throughput import profile_dtype, validate

    model, prof = _tiny_profile(tmp_path)
    assert profile_dtype(prof) == "float32"
    with pytest.raises(ValueError, match="measured on a float32 model, this one is bfloat16"):
        validate(model.to(torch.bfloat16), prof, None, ["decode-heavy=2x20x4"], "8MiB", tmp_path / "val")
    assert not (tmp_path / "val").exists(), "refused before measuring anything"


def test_validate_rounds_interleave_and_report_medians_with_the_measured_range(tmp_path, monkeypatch):
    import kvshrink.bench.serve as bench_serve
    import kvshrink.predict.throughput as throughput
    from kvshrink.predict.throughput import ServeSweep, validate, validation_table
    from tests.conftest import tiny_tokenizer

    model, prof = _tiny_profile(tmp_path)
    monkeypatch.setattr(bench_serve, "LaunchedServer", _InProcessServer)
    _InProcessServer.launched = []
    order, speeds = [], iter([30.0, 10.0, 20.0])  # the engine row's measured tokens/s, round by round
    real = throughput.run_trace

    def run_trace(model, method, reqs, kv):
        order.append(("engine", len(order)))
        return {**real(model, method, reqs, kv), "output_tokens_per_s": next(speeds)}

    monkeypatch.setattr(throughput, "run_trace", run_trace)
    sweep = ServeSweep(requests=2, prompt=12, output=3, rates=(float("inf"),), threads=1)
    rows = validate(model, prof, None, ["decode-heavy=2x20x4"], "8MiB", tmp_path / "val", serve=sweep,
                    model_name="tiny", tokenizer=tiny_tokenizer(), rounds=3)
    # round after round: engine, server, engine, server, ...
    assert len(order) == 3 and len(_InProcessServer.launched) == 3
    assert [(r["method"], r["workload"], r["rounds"]) for r in rows] == [
        ("full", "decode-heavy=2x20x4", 3), ("full", "serve:2x12x3@rate=inf", 3)]
    engine = rows[0]
    assert engine["output_tokens_per_s_measured"] == 20.0
    assert engine["output_tokens_per_s_measured_range"] == [10.0, 30.0]
    p = engine["output_tokens_per_s_predicted"]
    assert engine["output_tokens_per_s_error"] == (p - 20.0) / 20.0
    records = [json.loads(x) for x in (tmp_path / "val" / "records.jsonl").read_text().splitlines()]
    assert sorted((r["workload"], r["round"]) for r in records) == sorted(
        (w, i) for w in ("decode-heavy=2x20x4", "serve:2x12x3@rate=inf") for i in range(3))
    table = validation_table(rows)
    assert "20.0 [10.0-30.0] / " in table
    assert "output_tokens_per_s measured over rounds: spread (max - min) / median above 5% in 1 of 2" in table \
        or "output_tokens_per_s measured over rounds: spread (max - min) / median above 5% in 2 of 2" in table
    # a rerun resumes every round: nothing measured again
    _InProcessServer.launched, order[:] = [], []
    again = validate(model, prof, None, ["decode-heavy=2x20x4"], "8MiB", tmp_path / "val", serve=sweep,
                     model_name="tiny", tokenizer=tiny_tokenizer(), rounds=3)
    assert again == rows and order == [] and _InProcessServer.launched == []
    with pytest.raises(ValueError, match="rounds"):
        validate(model, prof, None, ["decode-heavy=2x20x4"], "8MiB", tmp_path / "v0", rounds=0)


def test_validate_cli_arguments():
    from kvshrink.cli import build_parser
    from kvshrink.predict.commands import serve_sweep

    a = build_parser().parse_args(["predict", "validate", "--profile", "p", "--threads", "1"])
    assert a.serve_rates == "0.5,inf" and a.serve_workload == "8x320x48" and a.rounds == 1
    assert build_parser().parse_args(["predict", "validate", "--profile", "p", "--rounds", "3"]).rounds == 3
    s = serve_sweep(a.serve_rates, a.serve_workload, 1)
    assert (s.requests, s.prompt, s.output, s.rates, s.threads) == (8, 320, 48, (0.5, float("inf")), 1)
    assert serve_sweep("none", "8x320x48", 1) is None
    with pytest.raises(ValueError, match="REQUESTSxPROMPTxOUTPUT"):
        serve_sweep("1", "8x320", 1)


def test_speed_probe_times_decode_steps_and_prompts_against_the_profile():
    """The probe decodes its own 4 sequences (prefilled once per method, growing a token a step) and
    prefills prompts of their length alone while they wait, and divides each time by what the cost
    model says: charged 1 s a step and 10 s a prompt, a tiny model's millisecond steps give factors
    far below 1, the prompts' ten times lower than the steps' would be at equal speed."""
    from kvshrink.predict.throughput import Speed, SpeedProbe
    from tests.conftest import tiny_model

    seen, prompts = [], []

    class Charged:
        def decode_read_s(self, batch, kv_tokens, kv_read):
            seen.append((batch, kv_tokens, kv_read))
            return 1.0

        def prefill_s(self, tokens):
            prompts.append(tokens)
            return 10.0

    probe = SpeedProbe(tiny_model("llama"), {"full": Charged()}, batch=4, context=16, steps=3, prefills=2)
    first, second = probe.factor("full"), probe.factor("full")
    for speed in (first, second):
        assert 0 < speed.decode < 0.5 and 0 < speed.prefill < 0.05
    assert [b for b, _, _ in seen] == [4] * 6 and prompts == [16, 16]
    # 16 prompt tokens + the warm-up step's, then one more per probed step, on the same sequences:
    # the prompts probed in between run alone and leave the batch as it was
    assert [kv for _, kv, _ in seen] == [4 * (17 + i) for i in range(6)]
    assert len(probe._engines["full"].scheduler.running) == 4
    assert Speed(1.0, 2.0).mean(Speed(3.0, 4.0)) == Speed(2.0, 3.0)
