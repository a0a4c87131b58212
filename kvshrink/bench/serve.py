"""``kvshrink bench serve``: load-test an OpenAI-compatible server, or compare methods on kvshrink's own.

One measurement = one workload sent at one request rate with a seeded arrival trace
(loadgen.arrival_times); metrics follow vLLM's definitions (metrics.py). Outputs under ``--out``
(results.py's format): ``config.json``, ``records.jsonl`` (one record per request: method, rate, send
time, TTFT, ITL list, E2E, prompt/output tokens, error), ``requests.csv`` (the same rows),
``result.json`` = ``summary.json`` (metrics per method and rate), and plots: ``latency_cdf.png``,
``vs_rate.png`` with several rates, and with ``--launch`` ``comparison.json``/``comparison.csv`` and
``p90_e2el_vs_rate.png`` (one line per method).

``--launch`` starts ``python -m kvshrink.cli serve`` once per method on a free loopback port with the
same ``--kv-memory``, waits for ``/health``, sends the identical traces, then stops it (SIGTERM, then
kill after a timeout). A server that fails to start is recorded with its reason; the sweep goes on.

``--launch-vllm`` / ``--launch-sglang`` do the same with vLLM's and SGLang's own servers (same model, one
server per ``--vllm-kv-dtype`` / ``--sglang-kv-dtype`` value, e.g. ``auto,fp8``), labelled
``vllm:kv=fp8``..., on the same traces, beside or instead of kvshrink's methods. Where one is not installed
it is skipped with a one-line reason. Their KV pools are sized by their own flags (``--vllm-args``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kvshrink.bench.datasets import load_dataset
from kvshrink.bench.loadgen import arrival_times, run_trace
from kvshrink.bench.metrics import compute_metrics, parse_goodput
from kvshrink.results import Records, open_run, write_csv, write_json_atomic

TABLE_KEYS = ("request_throughput", "output_throughput", "request_goodput", "median_ttft_ms", "p90_ttft_ms",
              "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "median_e2el_ms", "p90_e2el_ms",
              "p99_e2el_ms", "mean_output_tokens")


def parse_rates(text: str | float) -> list[float]:
    if isinstance(text, (int, float)):
        return [float(text)]
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            r = float("inf") if part in ("inf", "infinity") else float(part)
        except ValueError:
            raise ValueError(f"--request-rate: {part!r} is not a number or 'inf'") from None
        if not r > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {part}")
        out.append(r)
    if not out:
        raise ValueError("--request-rate: give at least one rate")
    return out


def _rate_label(r: float) -> str:
    return "inf" if math.isinf(r) else f"{r:g}"


def measure(base_url, model, requests, rate, *, burstiness=1.0, seed=0, max_concurrency=None, goodput=None,
            tokenizer=None, api_key=None, timeout_s=600.0, on_done=None) -> tuple[dict, list]:
    """Send ``requests`` at ``rate`` and return (metrics, per-request results)."""
    offsets = arrival_times(len(requests), rate, burstiness, seed)
    results, duration = asyncio.run(run_trace(base_url, model, requests, offsets, max_concurrency, api_key,
                                              timeout_s, on_done))
    m = compute_metrics(results, duration, goodput, tokenizer)
    m.update({"request_rate": _rate_label(rate), "burstiness": burstiness, "max_concurrency": max_concurrency,
              "num_prompts": len(requests)})
    return m, results


def engine_steps(base_url: str, timeout_s: float = 10.0) -> tuple[int, float] | None:
    """(steps, seconds) the server's engine has stepped so far, from its ``/metrics`` step histogram;
    None where the server has no such metric (not a kvshrink server, or an older one)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=timeout_s, trust_env=False).text
    for family in text_string_to_metric_families(text):
        if family.name == "kvshrink_engine_step_seconds":
            got = {s.name: s.value for s in family.samples}
            return int(got["kvshrink_engine_step_seconds_count"]), float(got["kvshrink_engine_step_seconds_sum"])
    return None


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from kvshrink.models import resolve

    try:
        return AutoTokenizer.from_pretrained(resolve(name))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load tokenizer {name!r} ({first}); pass --tokenizer with a local "
                         f"model directory") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchError(RuntimeError):
    pass


class LaunchedServer:
    """``python -m kvshrink.cli serve`` on a free loopback port; a context manager that stops it."""

    def __init__(self, model, method, kv_memory, log_path, startup_timeout=300.0, device=None, dtype=None,
                 max_waiting=100000, grace=10.0):
        def command(port: int) -> list[str]:
            cmd = [sys.executable, "-m", "kvshrink.cli", "serve", "--model", model, "--method", method,
                   "--kv-memory", str(kv_memory), "--host", "127.0.0.1", "--port", str(port),
                   "--max-waiting", str(max_waiting), "--grace", str(grace), "--served-model-name", model]
            if device:
                cmd += ["--device", device]
            if dtype:
                cmd += ["--dtype", dtype]
            return cmd

        self._setup(method, command, log_path, startup_timeout, grace)

    def _setup(self, label: str, command: Callable[[int], list[str]], log_path, startup_timeout: float,
               grace: float, popen_kw: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.method = label
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.grace = grace
        self.cmd = command(self.port)
        self.proc: subprocess.Popen | None = None
        self.popen_kw: dict = popen_kw or {}

    def __enter__(self):
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     **self.popen_kw)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise LaunchError(f"server for method {self.method!r} exited with code {self.proc.returncode}: "
                                  f"{self._tail()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2.0, trust_env=False)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise LaunchError(f"server for method {self.method!r} not healthy after {self.startup_timeout:g} s: "
                          f"{self._tail()}")

    def _tail(self, n: int = 3) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "(no log)"
        return " | ".join(lines[-n:]) or "(empty log)"

    def stop(self) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(self.grace + 15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if not self._log.closed:
            self._log.close()
        return p.returncode

    def __exit__(self, *exc):
        self.stop()
        return False


# ------------------------------------------------------------------------------------ vLLM and SGLang
INSTALL = {"vllm": "pip install vllm", "sglang": "pip install 'sglang[all]'"}


def engine_missing(engine: str) -> str | None:
    """None when ``engine`` (vllm, sglang) can be launched here, else the one-line reason."""
    found = (shutil.which("vllm") or importlib.util.find_spec("vllm")) if engine == "vllm" else \
        importlib.util.find_spec("sglang")
    return None if found else f"skipped {engine}: not installed ({INSTALL[engine]})"


def engine_command(engine: str, model_path: str, served_name: str, port: int, kv_dtype: str,
                   extra: Sequence[str] = (), dtype: str | None = None, seed: int = 0) -> list[str]:
    """The command line of vLLM's or SGLang's OpenAI-compatible server on 127.0.0.1:``port``."""
    common = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name,
              "--kv-cache-dtype", kv_dtype]
    if engine == "vllm":
        exe = shutil.which("vllm")
        head = [exe, "serve", model_path] if exe else [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                                     "--model", model_path]
        return [*head, *common, "--seed", str(seed), *(["--dtype", dtype] if dtype else []), *extra]
    if engine == "sglang":
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, *common,
                "--random-seed", str(seed), *(["--dtype", dtype] if dtype else []), *extra]
    raise ValueError(f"unknown engine {engine!r}")


def external_servers(args) -> tuple[dict[str, Callable[[int], list[str]]], list[str]]:
    """The vLLM/SGLang servers asked for: {label: port -> command} for those installed, and skip lines."""
    from kvshrink.models import resolve

    out: dict[str, Callable[[int], list[str]]] = {}
    skipped: list[str] = []
    for engine in ("vllm", "sglang"):
        if not getattr(args, f"launch_{engine}", False):
            continue
        reason = engine_missing(engine)
        if reason:
            skipped.append(reason)
            continue
        path = resolve(args.model)  # kvshrink's embedded model name: its converted HF directory
        extra = shlex.split(getattr(args, f"{engine}_args", "") or "")
        kv_dtypes = (getattr(args, f"{engine}_kv_dtype", None) or "auto").split(",")
        for kv in [k.strip() for k in kv_dtypes if k.strip()]:
            out[f"{engine}:kv={kv}"] = functools.partial(engine_command, engine, path, args.model, kv_dtype=kv,
                                                         extra=extra, dtype=args.dtype, seed=args.seed)
    return out, skipped


class ExternalServer(LaunchedServer):
    """vLLM's or SGLang's server as a subprocess in its own process group (they start workers of their own,
    and stopping must take those down too)."""

    def __init__(self, label: str, command: Callable[[int], list[str]], log_path, startup_timeout: float = 300.0,
                 grace: float = 30.0):
        self._setup(label, command, log_path, startup_timeout, grace, {"start_new_session": True})

    def stop(self) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            _killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(self.grace + 15)
            except subprocess.TimeoutExpired:
                pass
        _killpg(p.pid, signal.SIGKILL)  # whatever of the group is left
        if p.poll() is None:
            p.wait(10)
        if not self._log.closed:
            self._log.close()
        return p.returncode


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------- plots
def plot_latency_cdf(rows: list[dict], path: Path, group_key: str = "group") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    groups = sorted({r[group_key] for r in rows}, key=str)
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2el_ms"), ("TTFT", "TPOT", "E2E latency")):
        allv = [r[key] for r in rows if r.get(key) is not None]
        scale, unit = (1000.0, "s") if allv and max(allv) >= 10_000 else (1.0, "ms")
        for g in groups:
            vals = np.sort([r[key] / scale for r in rows if r[group_key] == g and r.get(key) is not None])
            if len(vals):
                ax.step(vals, np.arange(1, len(vals) + 1) / len(vals), where="post", label=str(g))
        ax.set_xlabel(f"{title} ({unit})")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_rate(summaries: list[dict], path: Path, keys=("p90_e2el_ms",), by: str = "method") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    methods = list(dict.fromkeys(s[by] for s in summaries))
    finite = [float(s["request_rate"]) for s in summaries if s["request_rate"] != "inf"]
    inf_x = (max(finite) * 2) if finite else 1.0
    for ax, key in zip(axes[0], keys):
        for m in methods:
            pts = sorted((inf_x if s["request_rate"] == "inf" else float(s["request_rate"]), s.get(key))
                         for s in summaries if s[by] == m and s.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(m))
        ax.set_xlabel("request rate (req/s; inf plotted at 2x the largest)" if "inf" in
                      {s["request_rate"] for s in summaries} else "request rate (req/s)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------- the command
def comparison_rows(summaries: list[dict]) -> list[dict]:
    """Per method and rate: the table keys plus changes and ratios against ``full`` (or the first
    method when ``full`` was not run) at the same rate."""
    methods = list(dict.fromkeys(s["method"] for s in summaries))
    base = "full" if "full" in methods else methods[0]
    ref = {s["request_rate"]: s for s in summaries if s["method"] == base and s.get("completed")}
    rows = []
    for s in summaries:
        row = {"method": s["method"], "request_rate": s["request_rate"], "completed": s.get("completed"),
               "failed": s.get("failed"), "error": s.get("error")}
        for k in TABLE_KEYS:
            row[k] = s.get(k)
        b = ref.get(s["request_rate"])
        if b and s.get("completed"):
            row["baseline"] = base
            row["output_tokens_change_vs_base"] = (
                s["mean_output_tokens"] / b["mean_output_tokens"] - 1 if b["mean_output_tokens"] else None)
            row["output_throughput_ratio"] = (
                s["output_throughput"] / b["output_throughput"] if b["output_throughput"] else None)
            row["request_throughput_ratio"] = (
                s["request_throughput"] / b["request_throughput"] if b["request_throughput"] else None)
            row["p90_e2el_ratio"] = s["p90_e2el_ms"] / b["p90_e2el_ms"] if b["p90_e2el_ms"] else None
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [("method", "method", "{}"), ("rate", "request_rate", "{}"), ("ok", "completed", "{}"),
            ("req/s", "request_throughput", "{:.2f}"), ("out tok/s", "output_throughput", "{:.1f}"),
            ("goodput", "request_goodput", "{:.2f}"), ("TTFT p50", "median_ttft_ms", "{:.0f}"),
            ("TTFT p90", "p90_ttft_ms", "{:.0f}"), ("TPOT p50", "median_tpot_ms", "{:.1f}"),
            ("TPOT p90", "p90_tpot_ms", "{:.1f}"), ("E2E p90", "p90_e2el_ms", "{:.0f}"),
            ("out len", "mean_output_tokens", "{:.1f}"), ("len chg", "output_tokens_change_vs_base", "{:+.1%}"),
            ("tput x", "output_throughput_ratio", "{:.2f}")]

    def fmt(r, key, f):
        v = r.get(key)
        if key == "completed" and r.get("error") and not v:
            return "FAILED"
        if v is None:
            return "-"
        try:
            return f.format(v)
        except (ValueError, TypeError):
            return str(v)

    table = [[c[0] for c in cols]] + [[fmt(r, k, f) for _, k, f in cols] for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(cols))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run_bench_serve(args, tokenizer=None) -> int:
    from tqdm import tqdm

    rates = parse_rates(args.request_rate)
    goodput = parse_goodput(args.goodput)
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    asked_external = getattr(args, "launch_vllm", False) or getattr(args, "launch_sglang", False)
    if (args.launch or asked_external) and args.base_url:
        raise ValueError("--launch/--launch-vllm/--launch-sglang start their own servers: drop --base-url")
    if not args.launch and not asked_external and not args.base_url:
        raise ValueError("give --base-url URL, or --launch with --method (and/or --launch-vllm, --launch-sglang)")
    methods = args.method or (["full"] if args.launch else [] if asked_external else [None])
    if not args.launch and args.method and (len(args.method) > 1 or asked_external):
        raise ValueError("several --method values need --launch")
    external, skipped = external_servers(args) if asked_external else ({}, [])
    for line in skipped:
        print(line, file=sys.stderr)
    if not methods and not external:
        raise ValueError("no server to measure: " + "; ".join(skipped))
    tokenizer = tokenizer or _load_tokenizer(args.tokenizer or args.model)
    out_len = args.random_output_len if args.dataset.startswith("random") else None  # others: the data's own
    requests = load_dataset(args.dataset, tokenizer, args.num_prompts, args.random_input_len, out_len, args.seed,
                            args.ignore_eos)
    config = {"kind": "bench_serve", "model": args.model, "dataset": args.dataset, "num_prompts": args.num_prompts,
              "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
              "request_rates": [_rate_label(r) for r in rates], "burstiness": args.burstiness,
              "max_concurrency": args.max_concurrency, "goodput": goodput, "ignore_eos": args.ignore_eos,
              "seed": args.seed, "launch": bool(args.launch), "methods": methods,
              "kv_memory": args.kv_memory if args.launch else None,
              "base_url": None if args.launch else args.base_url}
    if asked_external:  # only then: earlier run directories keep their configuration hash
        config["external"] = {"servers": list(external), "skipped": skipped,
                              "vllm_args": getattr(args, "vllm_args", None),
                              "sglang_args": getattr(args, "sglang_args", None)}
    run_dir = open_run(args.out, config)
    records = Records(run_dir / "records.jsonl", key=("method", "request_rate", "index"))
    if records.path.exists():
        records.path.unlink()  # a rerun of the same configuration measures again
    summaries: list[dict] = []
    csv_rows: list[dict] = []
    total = (len(methods) + len(external)) * len(rates) * len(requests)
    bar = tqdm(total=total, desc="bench serve", unit="req", disable=not sys.stderr.isatty())
    for method in [*methods, *external]:
        label = method or "server"
        server = None
        try:
            if method in external:
                bar.set_postfix_str(f"starting {label}")
                server = ExternalServer(label, external[method], run_dir / "logs" / f"server-{_safe(label)}.log",
                                        args.startup_timeout).__enter__()
                base_url = server.url
            elif args.launch:
                bar.set_postfix_str(f"starting {label}")
                server = LaunchedServer(args.model, method, args.kv_memory,
                                        run_dir / "logs" / f"server-{_safe(label)}.log",
                                        args.startup_timeout, args.device, args.dtype).__enter__()
                base_url = server.url
            else:
                base_url = args.base_url
            for rate in rates:
                bar.set_postfix_str(f"{label} @ {_rate_label(rate)} req/s")
                m, results = measure(base_url, args.model, requests, rate, burstiness=args.burstiness,
                                     seed=args.seed, max_concurrency=args.max_concurrency, goodput=goodput,
                                     tokenizer=tokenizer, api_key=args.api_key, timeout_s=args.timeout,
                                     on_done=lambda r: bar.update(1))
                m["method"] = label
                summaries.append(m)
                bar.write(f"{label} @ {_rate_label(rate)} req/s: {m['completed']}/{len(requests)} ok, "
                          f"{m['output_throughput']:.1f} out tok/s, p90 E2E {m['p90_e2el_ms']:.0f} ms",
                          file=sys.stderr)
                for r in results:
                    row = {"method": label, "request_rate": _rate_label(rate), **r.row()}
                    records.append(row)
                    csv_rows.append(row)
        except LaunchError as e:
            print(f"bench serve: {e}", file=sys.stderr)
            for rate in rates:
                summaries.append({"method": label, "request_rate": _rate_label(rate), "completed": 0,
                                  "failed": len(requests), "error": str(e)})
            bar.update(len(rates) * len(requests))
        finally:
            if server is not None:
                rc = server.stop()
                if rc not in (0, None):
                    print(f"bench serve: server for {label!r} exited with code {rc}", file=sys.stderr)
    bar.close()

    ok = [s for s in summaries if s.get("completed")]
    result = {"config": config, "results": summaries}
    if skipped:
        result["skipped"] = skipped
    if len(summaries) == 1:
        result.update(summaries[0])
    compared = args.launch or bool(external)
    if compared:
        comp = comparison_rows(summaries)
        result["comparison"] = comp
        write_json_atomic(run_dir / "comparison.json", comp)
        write_csv(run_dir / "comparison.csv", comp)
    write_json_atomic(run_dir / "result.json", result)
    write_json_atomic(run_dir / "summary.json", result)
    if csv_rows:
        write_csv(run_dir / "requests.csv", csv_rows)
        for r in csv_rows:
            several = len(methods) + len(external) > 1 or len(rates) > 1
            r["group"] = f"{r['method']} @ {r['request_rate']}" if several else r["method"]
        plot_latency_cdf(csv_rows, run_dir / "latency_cdf.png")
    if len(rates) > 1 and ok:
        plot_vs_rate(ok, run_dir / "vs_rate.png", keys=("p90_ttft_ms", "p90_tpot_ms", "p90_e2el_ms",
                                                        "output_throughput", "request_throughput"))
    if compared and ok:
        plot_vs_rate(ok, run_dir / "p90_e2el_vs_rate.png", keys=("p90_e2el_ms",))
    rows = comparison_rows(summaries) if summaries else []
    print(format_table(rows))
    print(f"results in {run_dir}")
    return 0 if ok else 1


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in s)
