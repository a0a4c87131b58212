"""The parts of ``--ray`` and ``--launch-vllm/--launch-sglang`` that need no cluster and no engine
installed."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import httpx
import pytest

from kvshrink import cli
from kvshrink.bench import serve
from kvshrink.sweep import INSTALL_HINT, RayOptions
from tests.conftest import tiny_tokenizer


def test_ray_flags():
    p = cli.build_parser()
    assert RayOptions.from_args(p.parse_args(["eval", "--task", "needle", "--out", "x"])) is None
    o = RayOptions.from_args(p.parse_args(["eval", "--task", "needle", "--out", "x", "--ray", "--ray-retries",
                                           "5", "--ray-gpus-per-task", "0.5", "--ray-shard-size", "3"]))
    assert (o.address, o.retries, o.gpus_per_task, o.cpus_per_task, o.shard_size) == (None, 5, 0.5, 1.0, 3)
    o = RayOptions.from_args(p.parse_args(["bench", "throughput", "--ray", "auto", "--ray-pack"]))
    assert o.address == "auto" and o.pack
    with pytest.raises(ValueError, match="ray-retries"):
        RayOptions(retries=-1)


@pytest.mark.parametrize("argv", [["eval", "--task", "needle", "--out", "OUT", "--ray"],
                                  ["bench", "throughput", "--out", "OUT", "--ray", "auto"]])
def test_ray_not_installed_says_how_in_one_line(argv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.setattr("kvshrink.models.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as e:
        cli.main([str(tmp_path) if a == "OUT" else a for a in argv])
    assert str(e.value) == INSTALL_HINT and "\n" not in INSTALL_HINT and "kvshrink[ray]" in INSTALL_HINT


def serve_args(tmp_path, *extra):
    return cli.build_parser().parse_args([
        "bench", "serve", "--model", "tiny", "--num-prompts", "3", "--random-input-len", "8",
        "--random-output-len", "3", "--out", str(tmp_path / "run"), "--startup-timeout", "20", *extra])


def test_engine_commands(monkeypatch):
    monkeypatch.setattr(serve.shutil, "which", lambda name: f"/opt/bin/{name}")
    cmd = serve.engine_command("vllm", "/m", "tiny", 8123, "fp8", ["--max-model-len", "4096"], "bfloat16", 3)
    assert cmd == ["/opt/bin/vllm", "serve", "/m", "--host", "127.0.0.1", "--port", "8123",
                   "--served-model-name", "tiny", "--kv-cache-dtype", "fp8", "--seed", "3",
                   "--dtype", "bfloat16", "--max-model-len", "4096"]
    cmd = serve.engine_command("sglang", "/m", "tiny", 8124, "fp8_e5m2")
    assert cmd[:4] == [sys.executable, "-m", "sglang.launch_server", "--model-path"]
    assert cmd[cmd.index("--kv-cache-dtype") + 1] == "fp8_e5m2"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    monkeypatch.setattr(serve.shutil, "which", lambda name: None)
    assert serve.engine_command("vllm", "/m", "tiny", 1, "auto")[:3] == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def test_one_server_per_kv_dtype(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "engine_missing", lambda engine: None)
    args = serve_args(tmp_path, "--launch-vllm", "--vllm-kv-dtype", "auto, fp8",
                      "--vllm-args=--enforce-eager", "--launch-sglang")
    servers, skipped = serve.external_servers(args)
    assert list(servers) == ["vllm:kv=auto", "vllm:kv=fp8", "sglang:kv=auto"] and not skipped
    cmd = servers["vllm:kv=fp8"](9000)
    assert cmd[cmd.index("--port") + 1] == "9000" and cmd[-1] == "--enforce-eager" and "fp8" in cmd


def test_not_installed_is_skipped_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve.shutil, "which", lambda name: None)
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    assert serve.engine_missing("vllm") == "skipped vllm: not installed (pip install vllm)"
    with pytest.raises(ValueError, match="no server to measure: skipped vllm"):
        serve.run_bench_serve(serve_args(tmp_path, "--launch-vllm"), tokenizer=tiny_tokenizer())
    assert capsys.readouterr().err.strip() == "skipped vllm: not installed (pip install vllm)"
    with pytest.raises(ValueError, match="drop --base-url"):
        serve.run_bench_serve(serve_args(tmp_path, "--launch-sglang", "--base-url", "http://x"),
                              tokenizer=tiny_tokenizer())


def test_external_servers_beside_a_server_on_one_trace(tmp_path, monkeypatch):
    """The comparison loop, with the launched engine replaced by an in-test server (nothing heavy starts)."""
    from kvshrink.serve.app import create_app
    from tests.serve.conftest import ServerThread
    from tests.serve.fake_engine import FakeEngine

    tok = tiny_tokenizer()
    srv = ServerThread(create_app(FakeEngine(tok, num_blocks=256, max_batch=8, step_s=0.001), tok,
                                  model_name="tiny", context_len=512)).start()
    started = []

    class Fake:
        def __init__(self, label, command, log_path, startup_timeout):
            started.append((label, command(1234)))
            self.url = srv.url

        def __enter__(self):
            return self

        def stop(self):
            return 0

    monkeypatch.setattr(serve, "ExternalServer", Fake)
    monkeypatch.setattr(serve, "engine_missing",
                        lambda e: None if e == "vllm" else f"skipped {e}: not installed (x)")
    try:
        rc = serve.run_bench_serve(serve_args(tmp_path, "--launch-vllm", "--vllm-kv-dtype", "auto,fp8",
                                              "--launch-sglang", "--ignore-eos"), tokenizer=tok)
    finally:
        srv.stop()
    assert rc == 0 and [s[0] for s in started] == ["vllm:kv=auto", "vllm:kv=fp8"]
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [r["method"] for r in res["comparison"]] == ["vllm:kv=auto", "vllm:kv=fp8"]
    assert all(r["completed"] == 3 for r in res["results"])
    assert res["skipped"] == ["skipped sglang: not installed (x)"]


def test_external_server_stops_its_process_group(tmp_path):
    """A stand-in server with a child process of its own: /health, then SIGTERM reaches the whole group."""
    script = tmp_path / "fake_server.py"
    script.write_text(textwrap.dedent("""
        import http.server, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(sys.argv[2], "w").write(str(child.pid))
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404); self.end_headers()
            def log_message(self, *a):
                pass
        http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """))
    pid_file = tmp_path / "child.pid"
    s = serve.ExternalServer("fake:kv=auto",
                             lambda port: [sys.executable, str(script), str(port), str(pid_file)],
                             tmp_path / "log.txt", startup_timeout=20, grace=2)
    with s:
        assert httpx.get(s.url + "/health", trust_env=False).status_code == 200
        child = int(pid_file.read_text())
    assert s.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # the child is gone once init has reaped it
            os.kill(child, 0)
            time.sleep(0.1)


def test_ratios_only_between_units_of_one_node(tmp_path, monkeypatch):
    from kvshrink.bench import throughput as tp

    monkeypatch.setattr("kvshrink.bench.plots.plot_throughput", lambda *a, **k: None)
    runs = [{"method": m, "workload": w, "tokens_per_s": t} for m, w, t in
            [("full", "a", 10.0), ("kivi", "a", 20.0), ("full", "b", 10.0), ("kivi", "b", 30.0)]]
    node_of = {("full", "a"): "n1", ("kivi", "a"): "n1", ("full", "b"): "n1", ("kivi", "b"): "n2"}
    tp.finish(tmp_path, {"mode": "serving"}, runs, "serving", node_of=node_of, extra={"sweep": {"x": 1}})
    s = json.loads((tmp_path / "summary.json").read_text())
    assert [r["ratio_to_full"] for r in s["runs"]] == [1.0, 2.0, 1.0, None] and s["sweep"] == {"x": 1}


def test_ray_flags_go_to_the_sweep_and_the_rest_stays_local(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("kvshrink.sweep.run_throughput_ray", lambda a, opts: calls.append(("ray", opts)) or 0)
    monkeypatch.setattr("kvshrink.bench.throughput.run_throughput", lambda a: calls.append(("local", a.rounds)) or 0)
    assert cli.main(["bench", "throughput", "--ray", "--ray-retries", "2", "--out", str(tmp_path)]) == 0
    assert cli.main(["bench", "throughput", "--rounds", "2", "--out", str(tmp_path)]) == 0
    (kind, opts), local = calls
    assert kind == "ray" and opts.address is None and opts.retries == 2 and local == ("local", 2)
    with pytest.raises(SystemExit, match="--rounds runs on this machine only"):
        cli.main(["bench", "throughput", "--ray", "--rounds", "2", "--out", str(tmp_path)])
