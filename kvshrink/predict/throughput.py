"""``kvshrink profile``, ``kvshrink predict throughput`` and ``kvshrink predict validate``.

A profile directory (kvshrink's results format) holds ``config.json`` (what was measured),
``records.jsonl`` (raw points), ``summary.json`` (``{"model_config": ..., "methods": {spec: StepCostModel}}``).
Prediction needs no model weights: the model's config is stored in the profile.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from kvshrink.bench.throughput import _fp_token_bytes
from kvshrink.bench.trace import load_trace, run_trace
from kvshrink.engine import Engine, SamplingParams
from kvshrink.engine.config import EngineConfig
from kvshrink.engine.pool import parse_bytes
from kvshrink.engine.timers import reset_timers, timers
from kvshrink.predict.costmodel import FittedCost, fit_points, fit_report
from kvshrink.predict.profile import DEFAULT_GRID, QUICK_GRID, ProfileGrid, batch_reads, measure, timed_step
from kvshrink.predict.simulate import SimRequest, SimResult, config_dtype, simulate
from kvshrink.results import Records, open_run, write_json_atomic


def workload_requests(spec: str, vocab: int, seed: int = 0) -> list[SimRequest]:
    """``NAME[=NxPxO]`` as ``bench throughput --workload`` takes it (the very lengths it draws for a
    model of ``vocab`` tokens), or ``trace:FILE``."""
    if spec.startswith("trace:"):
        return load_trace(spec[len("trace:") :])
    from kvshrink.bench.throughput import _requests, parse_workloads

    (n, p, o), = parse_workloads([spec], quick=False).values()
    return [SimRequest(len(ids), out) for ids, out in _requests(n, p, o, vocab, seed)]


# ---------------------------------------------------------------------------------------- profile
def run_profile(model, model_name: str, methods: list[str], out: str | Path, quick: bool = False,
                grid: ProfileGrid | None = None) -> Path:
    grid = grid or (QUICK_GRID if quick else DEFAULT_GRID)
    cfg = {"kind": "profile", "model": model_name, "methods": methods, "grid": grid.to_dict(),
           "dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads()}
    run = open_run(out, cfg)
    records = Records(run / "records.jsonl", key=("method",))
    done = records.done()
    for m in methods:
        if (m,) in done:
            continue
        for p in measure(model, m, grid):
            records.append(p)
    fits = fit_points(records.load())
    print(fit_report(fits))
    cpu_fits = fit_points(records.load(), time_key="cpu_seconds")
    write_json_atomic(run / "summary.json", {"model_config": model.config.to_dict(),
                                             "dtype_bytes": next(model.parameters()).element_size(),
                                             "methods": {m: f.to_dict() for m, f in fits.items()},
                                             "methods_cpu": {m: f.to_dict() for m, f in cpu_fits.items()}})
    return run


def profile_dtype(path: str | Path) -> str | None:
    """The dtype of the model a profile was measured on ("float32", ...), or None if it does not say."""
    p = Path(path) / "config.json"
    got = json.loads(p.read_text()).get("dtype") if p.exists() else None
    return got.removeprefix("torch.") if got else None


def load_profile(path: str | Path, cpu: bool = False) -> tuple[PretrainedConfig, dict[str, FittedCost]]:
    """The model config and the fitted costs per method: wall-clock, or with ``cpu`` the CPU-time
    fits (empty for a profile written before CPU time was sampled)."""
    p = Path(path) / "summary.json"
    if not p.exists():
        raise ValueError(f"{path}: not a profile directory (no summary.json); run `kvshrink profile` first")
    d = json.loads(p.read_text())
    cfg = PretrainedConfig.from_dict(d["model_config"])
    cfg.dtype = profile_dtype(path) or {2: "bfloat16"}.get(d.get("dtype_bytes"), "float32")  # what was measured
    fits = d.get("methods_cpu", {}) if cpu else d["methods"]
    return cfg, {m: FittedCost.from_dict(c) for m, c in fits.items()}


@dataclass
class Scaled:
    """Step costs times a factor: ``prefill`` for a prompt's forward, ``decode`` for a decode step,
    the decode part packed with a prompt, and a cut-back. Two factors because a shared machine slows
    them apart: a decode step is bound by memory traffic, which a neighbour's load takes, a prefill
    by arithmetic, which it hardly does (``SpeedProbe`` measures both)."""

    costs: FittedCost
    prefill: float
    decode: float

    @classmethod
    def at_share(cls, costs: FittedCost, share: float) -> Scaled:
        """A machine that gives this process ``share`` of a CPU: every step takes its CPU time over
        the share (a run's share is its CPU time over its wall time)."""
        return cls(costs, 1 / share, 1 / share)

    def prefill_s(self, tokens: int) -> float:
        return self.costs.prefill_s(tokens) * self.prefill

    def decode_s(self, batch: int, kv_tokens: float) -> float:
        return self.costs.decode_s(batch, kv_tokens) * self.decode

    def decode_read_s(self, batch: int, kv_tokens: float, kv_read: float) -> float:
        return self.costs.decode_read_s(batch, kv_tokens, kv_read) * self.decode

    def packed_decode_s(self, batch: int, kv_tokens: float, kv_read: float) -> float:
        return self.costs.packed_decode_s(batch, kv_tokens, kv_read) * self.decode

    def chunk_s(self, start: int, end: int) -> float:
        return self.costs.chunk_s(start, end) * self.prefill

    def evict_s(self, cuts: int) -> float:
        return self.costs.evict_s(cuts) * self.decode


def predict(profile: str | Path, method: str, requests: list[SimRequest], kv_memory: int | str,
            block_size: int = 32) -> SimResult:
    cfg, models = load_profile(profile)
    if method not in models:
        raise ValueError(f"method {method!r} is not in the profile ({', '.join(models)}); profile it first")
    return simulate(cfg, method, requests, models[method], EngineConfig(kv_memory=kv_memory, block_size=block_size))


# --------------------------------------------------------------------------------------- validate
VALIDATE_WORKLOADS = ("decode-heavy=8x384x96", "long-prompt=3x1536x48", "decode-heavy=12x256x64@rate=0.5")
# steps and step_ms_mean: the engine's steps, timed around ``step()`` (a server's in its worker thread);
# decode_ / prompt_step_ms_mean: of the steps that prefilled no prompt token / some (engine rows only)
COMPARED = ("output_tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p50", "preemptions", "steps",
            "step_ms_mean", "decode_steps", "decode_step_ms_mean", "prompt_step_ms_mean")
VARIANTS = ("", "_at_share", "_at_speed")  # the profile as measured; CPU time at the run's share; at the probe's speed


@dataclass(frozen=True)
class ServeSweep:
    """The server part of ``predict validate``: ``requests`` random prompts of ``prompt`` tokens (the
    ``random`` dataset of ``bench serve``), ``output`` tokens each with EOS ignored, sent to
    ``kvshrink serve`` (one server per method, loopback, ``threads`` torch threads) at each of
    ``rates`` requests/s (``bench serve``'s seeded arrival trace; inf: all at once)."""

    requests: int = 8
    prompt: int = 320
    output: int = 48
    rates: tuple[float, ...] = (0.5, float("inf"))
    seed: int = 0
    threads: int | None = None
    startup_timeout: float = 300.0

    @property
    def label(self) -> str:
        return f"serve:{self.requests}x{self.prompt}x{self.output}"


@dataclass(frozen=True)
class Speed:
    """Measured over predicted seconds (> 1: slower than when profiled), of prompts and of decode steps."""

    prefill: float
    decode: float

    def mean(self, other: Speed) -> Speed:
        return Speed((self.prefill + other.prefill) / 2, (self.decode + other.decode) / 2)


class SpeedProbe:
    """The machine's speed now against when it was profiled: a few decode steps of a fixed batch
    (``batch`` sequences of ``context`` tokens, prefilled once per method) and ``prefills`` prompts
    of ``context`` tokens alone, timed, over what the method's profile fit says they cost. On a cloud
    VM the same steps can run 10-25% slower one half hour than the next (the CPU is shared in ways its
    CPU time does not show: memory bandwidth, frequency), and decode steps and prompts slow apart, so
    an error of the prediction at the machine's speed (``_at_speed``) is the model's own, apart from
    the drift."""

    def __init__(self, model, models: dict[str, FittedCost], batch: int = 4, context: int = 256, steps: int = 4,
                 prefills: int = 2):
        self.model, self.models, self.batch, self.context = model, models, batch, context
        self.steps, self.prefills = steps, prefills
        self._engines: dict[str, Engine] = {}
        self._vocab = model.config.get_text_config().vocab_size
        self._prompts = torch.Generator().manual_seed(7)

    def _prompt(self) -> list[int]:
        return torch.randint(3, self._vocab, (self.context,), generator=self._prompts).tolist()

    def _engine(self, method: str) -> Engine:
        if method not in self._engines:
            longest = self.context + 1024
            # a slot and room for one more prompt than the batch: the prefill probe's, while the batch waits
            eng = Engine(self.model, method=method, max_batch=self.batch + 1,
                         kv_memory=int((self.batch + 1) * longest * _fp_token_bytes(self.model) * 1.3) + (32 << 20))
            for _ in range(self.batch):
                eng.add_request(self._prompt(), SamplingParams(max_tokens=longest - self.context, ignore_eos=True))
            while eng.scheduler.waiting or any(not r.output for r in eng.scheduler.running):
                eng.step()
            eng.step()  # warm
            self._engines[method] = eng
        return self._engines[method]

    def factor(self, method: str) -> Speed:
        eng, cost = self._engine(method), self.models[method]
        measured = predicted = 0.0
        for _ in range(self.steps):
            if not eng.scheduler.running:  # the probe's sequences ran out: prefill new ones
                del self._engines[method]
                eng = self._engine(method)
            kv_tokens, read = batch_reads(eng)
            predicted += cost.decode_read_s(len(eng.scheduler.running), kv_tokens, read)
            measured += timed_step(eng)[0]
        prefill_measured, sch = 0.0, eng.scheduler
        batch, sch.running = sch.running, []  # the batch waits with its blocks: the prompt runs alone
        try:
            for _ in range(self.prefills):
                eng.add_request(self._prompt(), SamplingParams(max_tokens=1, ignore_eos=True))
                reset_timers()
                eng.step()
                if "prefill" not in timers():
                    raise RuntimeError(f"speed probe {method}: a {self.context}-token prompt did not run alone")
                prefill_measured += timers()["prefill"]  # the profile's prefill points time the same
        finally:
            sch.running = batch
        prefill_predicted = self.prefills * cost.prefill_s(self.context)
        return Speed(prefill_measured / prefill_predicted if self.prefills else 1.0, measured / predicted)


def _compare(method: str, workload: str, kv: int, measured: dict, predicted: dict,
             at_share: dict | None = None, share: float | None = None, at_speed: dict | None = None,
             speed: Speed | None = None) -> dict:
    """One row: measured, predicted (wall-clock profile) and, where the profile has CPU-time fits,
    predicted from CPU time at the CPU share the measured run got (``_at_share``): what the model
    says once the machine's load is taken as measured, so a model error shows apart from the load;
    with the ``SpeedProbe``'s factors ``speed`` (before and after the run, averaged), predicted with
    every prompt's and decode step's cost times its factor (``_at_speed``)."""
    row = {"method": method, "workload": workload, "kv_memory": parse_bytes(kv), "cpu_share": share,
           "speed_factor": speed and speed.decode, "prefill_speed_factor": speed and speed.prefill}
    for k in COMPARED:
        m = measured.get(k)
        for suffix, pred in (("", predicted), ("_at_share", at_share), ("_at_speed", at_speed)):
            if pred is None:
                continue
            row[f"{k}_predicted{suffix}"] = pred.get(k)
            if m and pred.get(k) is not None:
                row[f"{k}_error{suffix}"] = (pred[k] - m) / m
        row[f"{k}_measured"] = m
    return row


def _percentiles(cfg, method: str, reqs: list[SimRequest], costs, kv) -> dict:
    """What ``validate`` compares: the simulated run's figures, with ``costs`` for every step."""
    return simulate(cfg, method, reqs, costs, EngineConfig(kv_memory=kv)).percentiles()


def _at_share(cfg, method: str, reqs: list[SimRequest], cpu_models: dict[str, FittedCost], kv, share: float | None):
    if method not in cpu_models or not share:
        return None
    return _percentiles(cfg, method, reqs, Scaled.at_share(cpu_models[method], share), kv)


def _at_speed(cfg, method: str, reqs: list[SimRequest], models: dict[str, FittedCost], kv, speed: Speed | None):
    """The profile on a machine running prompts and decode steps at ``1 / speed`` of it."""
    if speed is None:
        return None
    return _percentiles(cfg, method, reqs, Scaled(models[method], speed.prefill, speed.decode), kv)


def _speed(probe: SpeedProbe | None, method: str, before: Speed | None = None) -> Speed | None:
    """A probe's factors now (None without a probe), averaged with ``before`` (the ones before the run)."""
    if probe is None:
        return None
    now = probe.factor(method)
    return now if before is None else before.mean(now)


def combine_rounds(rows: list[dict]) -> dict:
    """One row from the rounds of one (method, workload): the median of each measured figure, its
    [min, max] over rounds (``*_measured_range``: how far the machine alone moved it), the median of
    the predictions (the CPU-time ones follow each round's CPU share) and the errors between medians."""
    out = {k: v for k, v in rows[0].items() if k != "round"}
    if len(rows) == 1:
        return out
    out["rounds"] = len(rows)
    for key in ("cpu_share", "speed_factor", "prefill_speed_factor"):
        got = [r[key] for r in rows if r.get(key) is not None]
        out[key] = statistics.median(got) if got else None
    for k in COMPARED:
        got = [r[f"{k}_measured"] for r in rows if r.get(f"{k}_measured") is not None]
        if not got:
            continue
        m = statistics.median(got)
        out[f"{k}_measured"], out[f"{k}_measured_range"] = m, [min(got), max(got)]
        for suffix in VARIANTS:
            preds = [r[f"{k}_predicted{suffix}"] for r in rows if r.get(f"{k}_predicted{suffix}") is not None]
            if preds:
                p = statistics.median(preds)
                out[f"{k}_predicted{suffix}"], out[f"{k}_error{suffix}"] = p, ((p - m) / m if m else None)
    return out


def validate(model, profile: str | Path, methods: list[str] | None, workloads: list[str] | None,
             kv_memory: int | str | None, out: str | Path, serve: ServeSweep | None = None,
             model_name: str | None = None, tokenizer=None, rounds: int = 1, speed_probe: bool = True) -> list[dict]:
    """Each method x workload measured on the engine and predicted from the profile, side by side.
    ``NAME=NxPxO@rate=R`` gives Poisson arrivals at R requests/s (seeded). With ``serve`` (and the
    ``model_name`` a server loads, and its ``tokenizer``), one request-rate sweep through the server too.

    ``rounds``: every measurement that many times, round after round (all engine rows, then the
    server sweep, then again), each round's row kept in ``records.jsonl``; the rows returned are
    ``combine_rounds``' medians, with the measured range that says how much of an error is the
    machine's own spread. ``speed_probe``: a ``SpeedProbe`` before and after every measurement, and
    the predictions at the speed it found too (``*_at_speed``)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    cfg, models = load_profile(profile)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    measured_in = profile_dtype(profile)
    if measured_in is not None and measured_in != dtype:
        raise ValueError(f"the profile {profile} was measured on a {measured_in} model, this one is {dtype}: "
                         f"validate with --dtype {measured_in}, or profile this dtype")
    cpu_models = load_profile(profile, cpu=True)[1]
    probe = SpeedProbe(model, models) if speed_probe else None
    run = open_run(out, {"kind": "predict-validate", "profile": str(profile), "methods": methods,
                         "workloads": workloads, "kv_memory": kv_memory, "rounds": rounds,
                         "serve": None if serve is None else {**asdict(serve), "rates": [str(r) for r in serve.rates]}})
    records = Records(run / "records.jsonl", key=("method", "workload", "round"))
    done = {(r["method"], r["workload"], r.get("round", 0)): r for r in records.load()}
    if serve is not None and (model_name is None or tokenizer is None):
        raise ValueError("the server sweep needs the model's name (what `kvshrink serve --model` loads) "
                         "and its tokenizer")
    by_row: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(rounds):
        for wl in workloads or VALIDATE_WORKLOADS:
            reqs = _with_rate(wl, cfg.get_text_config().vocab_size)
            kv = kv_memory or _four_sequences(cfg, reqs)
            for m in methods or list(models):
                row = done.get((m, wl, rnd))
                if row is None:
                    predicted = _percentiles(cfg, m, reqs, models[m], kv)
                    before = _speed(probe, m)
                    c0, t0 = time.process_time(), time.perf_counter()
                    measured = run_trace(model, m, reqs, kv)
                    share = (time.process_time() - c0) / (time.perf_counter() - t0)
                    speed = _speed(probe, m, before)
                    row = {**_compare(m, wl, kv, measured, predicted,
                                      _at_share(cfg, m, reqs, cpu_models, kv, share), share,
                                      _at_speed(cfg, m, reqs, models, kv, speed), speed), "round": rnd}
                    records.append(row)
                by_row.setdefault((m, wl), []).append(row)
        if serve is not None:
            for row in _validate_serve(cfg, models, cpu_models, methods or list(models), serve, kv_memory,
                                       model_name, tokenizer, run, records, done, rnd, probe, dtype):
                by_row.setdefault((row["method"], row["workload"]), []).append(row)
    rows = [combine_rounds(rs) for rs in by_row.values()]
    write_json_atomic(run / "summary.json", {"rows": rows, "rounds": rounds})
    return rows


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _validate_serve(cfg, models: dict[str, FittedCost], cpu_models: dict[str, FittedCost], methods: list[str],
                    sweep: ServeSweep,
                    kv_memory: int | str | None, model_name: str, tokenizer, run: Path, records: Records,
                    done: dict, rnd: int = 0, probe: SpeedProbe | None = None,
                    dtype: str | None = None) -> list[dict]:
    """One server per method (``bench serve``'s ``LaunchedServer``, its model in ``dtype``: the
    profile's), the sweep's rates sent to it; the simulator gets the same prompts' token counts and
    the arrivals the client measured (``arrivals_s``; the nominal offsets' prediction is kept as
    ``*_predicted_nominal``). Round ``rnd``'s rows (those in ``done`` are not measured again)."""
    from kvshrink.bench.datasets import random_dataset
    from kvshrink.bench.loadgen import arrival_times
    from kvshrink.bench.serve import LaunchedServer, _rate_label, _safe, engine_steps
    from kvshrink.bench.serve import measure as serve_measure

    bench = random_dataset(tokenizer, sweep.requests, sweep.prompt, sweep.output, sweep.seed, ignore_eos=True)
    base = [SimRequest(r.prompt_tokens, r.max_tokens) for r in bench]
    kv = kv_memory or _four_sequences(cfg, base)
    rows = []
    for m in methods:
        todo = [r for r in sweep.rates if (m, f"{sweep.label}@rate={_rate_label(r)}", rnd) not in done]
        rows += [done[(m, f"{sweep.label}@rate={_rate_label(r)}", rnd)] for r in sweep.rates if r not in todo]
        if not todo:
            continue
        server = LaunchedServer(model_name, m, kv, run / "logs" / f"server-{_safe(m)}.log", sweep.startup_timeout,
                                dtype=dtype)
        if sweep.threads:  # the server's torch threads, as the profile's (``kvshrink serve`` has no flag)
            server.popen_kw = {"env": {**os.environ, "OMP_NUM_THREADS": str(sweep.threads),
                                       "MKL_NUM_THREADS": str(sweep.threads)}}
        with server:
            for rate in todo:
                offsets = arrival_times(len(bench), rate, 1.0, sweep.seed)
                nominal = [SimRequest(r.prompt_tokens, r.output_tokens, t) for r, t in zip(base, offsets)]
                pid = server.proc.pid if getattr(server, "proc", None) is not None else None
                before = _speed(probe, m)
                steps0 = engine_steps(server.url)
                c0, t0 = (_process_cpu_s(pid) if pid else None), time.perf_counter()
                got, results = serve_measure(server.url, model_name, bench, rate, seed=sweep.seed)
                c1 = _process_cpu_s(pid) if pid else None
                steps1 = engine_steps(server.url)
                share = (c1 - c0) / (time.perf_counter() - t0) if c0 is not None and c1 is not None else None
                speed = _speed(probe, m, before)
                if got["failed"]:
                    errors = sorted({r.error for r in results if r.error})
                    raise RuntimeError(f"server sweep, {m} at {_rate_label(rate)} req/s: {got['failed']} requests "
                                       f"failed ({'; '.join(errors)[:300]})")
                # the simulator gets the arrivals the client measured, not the nominal offsets: requests
                # sent "at once" leave a client milliseconds apart, and a server steps as soon as the
                # first one is in, so the rest wait for its prompt (on 2026-12-04, 8 sent at once: the
                # first at 0.2 ms, the others at 10-13 ms, and the server's first step held one prompt)
                first = min(r.send_time for r in results)
                reqs = [SimRequest(b.prompt_tokens, b.output_tokens, r.send_time - first)
                        for b, r in zip(base, results)]
                predicted = _percentiles(cfg, m, reqs, models[m], kv)
                measured = {"output_tokens_per_s": got["output_throughput"], "ttft_ms_p50": got["median_ttft_ms"],
                            "tpot_ms_p50": got["median_tpot_ms"], "e2e_ms_p50": got["median_e2el_ms"]}
                # the server's engine steps, timed in its worker thread: a TPOT miss whose steps agree
                # with the simulated ones is the time a token takes from the step to the client
                if steps0 is not None and steps1 is not None and steps1[0] > steps0[0]:
                    measured["steps"] = steps1[0] - steps0[0]
                    measured["step_ms_mean"] = (steps1[1] - steps0[1]) / measured["steps"] * 1000
                row = _compare(m, f"{sweep.label}@rate={_rate_label(rate)}", kv, measured, predicted,
                               _at_share(cfg, m, reqs, cpu_models, kv, share), share,
                               _at_speed(cfg, m, reqs, models, kv, speed), speed)
                # the server's own count of the prompts: the simulator's input, from the client's tokenizer
                row["prompt_tokens_server"] = got["total_input_tokens"]
                row["prompt_tokens_simulated"] = sum(r.prompt_tokens for r in base)
                row["arrivals_s"] = [r.arrival_s for r in reqs]
                for k, v in _percentiles(cfg, m, nominal, models[m], kv).items():  # at the nominal offsets
                    if k in COMPARED:
                        row[f"{k}_predicted_nominal"] = v
                row["round"] = rnd
                records.append(row)
                rows.append(row)
    return rows


def validation_table(rows: list[dict], keys: tuple[str, ...] = ("output_tokens_per_s", "ttft_ms_p50",
                                                                 "tpot_ms_p50"),
                     also: tuple[str, ...] = ("step_ms_mean", "decode_step_ms_mean", "prompt_step_ms_mean")) -> str:
    """Measured / predicted (error) per row, as Markdown, with the worst absolute error per quantity
    (of ``keys``, the columns, and of ``also``: a step's mean time, which tells a TPOT miss of the
    step's cost from one of the time a token takes to reach the client)."""
    def cell(r: dict, k: str) -> str:
        m, p = r.get(k + "_measured"), r.get(k + "_predicted")
        if m is None or p is None:
            return "-"
        err, spread = r.get(k + "_error"), r.get(k + "_measured_range")
        at, fast = r.get(k + "_error_at_share"), r.get(k + "_error_at_speed")
        got = f"{m:.1f} [{spread[0]:.1f}-{spread[1]:.1f}]" if spread else f"{m:.1f}"
        text = f"{got} / {p:.1f} ({err * 100:+.1f}%)" if err is not None else f"{got} / {p:.1f}"
        return text + (f" [{at * 100:+.1f}%]" if at is not None else "") + \
            (f" {{{fast * 100:+.1f}%}}" if fast is not None else "")

    def num(r: dict, key: str) -> str:
        return f"{r[key]:.2f}" if r.get(key) else "-"

    lines = ["| method | workload | CPU share | speed (decode / prefill) | " + " | ".join(
        f"{k} measured / predicted (error) [at the run's CPU share] {{at the probe's speed}}" for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    lines += [f"| {r['method']} | {r['workload']} | {num(r, 'cpu_share')} | "
              f"{num(r, 'speed_factor')} / {num(r, 'prefill_speed_factor')} | "
              + " | ".join(cell(r, k) for k in keys) + " |" for r in rows]
    for suffix, what in (("_error", "wall-clock profile"), ("_error_at_share", "CPU-time profile at the run's share"),
                         ("_error_at_speed", "wall-clock profile at the probe's speed")):
        for k in keys + also:
            errs = [abs(r[k + suffix]) for r in rows if r.get(k + suffix) is not None]
            if errs:
                lines.append(f"{k} ({what}): within 5% in {sum(e <= 0.05 for e in errs)} of {len(errs)}, "
                             f"worst {max(errs) * 100:.1f}%, median {sorted(errs)[len(errs) // 2] * 100:.1f}%")
    for k in keys:  # where the machine alone moved a figure by more than the 5% aim
        spreads = [(r[k + "_measured_range"], r[k + "_measured"]) for r in rows if r.get(k + "_measured_range")]
        wide = sum((hi - lo) / m > 0.05 for (lo, hi), m in spreads if m)
        if spreads:
            lines.append(f"{k} measured over rounds: spread (max - min) / median above 5% in {wide} of {len(spreads)}")
    return "\n".join(lines)


def _with_rate(wl: str, vocab: int) -> list[SimRequest]:
    spec, _, rate = wl.partition("@rate=")
    reqs = workload_requests(spec, vocab)
    if rate:
        rng = random.Random(1)
        t = 0.0
        for r in reqs:
            r.arrival_s = t
            t += rng.expovariate(float(rate))
    return reqs


def _four_sequences(cfg, reqs: list[SimRequest]) -> int:
    """The bench's default pool: four uncompressed sequences (in the model's dtype) at the workload's
    mean final length."""
    from kvshrink.bench.throughput import fp_config_token_bytes

    per_token = fp_config_token_bytes(cfg, config_dtype(cfg).itemsize)
    mean = sum(r.prompt_tokens + r.output_tokens for r in reqs) / len(reqs)
    return int(4 * mean * per_token)


def simulator_figures(profile: str | Path, workload, kv_memory: float | None, drift: dict[str, float],
                      slo: dict[str, float], methods: list[str] | None = None) -> list:
    """``advise``'s predicted figures from the simulator on a profile measured on this machine: the
    workload's requests (output lengths changed by each method's length drift, where known)."""
    from kvshrink.predict.advise import PREDICTED, Figures

    cfg, models = load_profile(profile)
    base = workload_requests(f"decode-heavy={workload.requests}x{workload.prompt}x{workload.output}",
                             cfg.get_text_config().vocab_size)
    kv = int(kv_memory) if kv_memory else _four_sequences(cfg, base)
    out = []
    for m, cost in models.items():
        if methods and m not in methods:
            continue
        change = drift.get(m)
        reqs = [SimRequest(r.prompt_tokens, max(1, round(r.output_tokens * (1 + (change or 0.0))))) for r in base]
        res = simulate(cfg, m, reqs, cost, EngineConfig(kv_memory=kv))
        met = None
        if slo and len(res.tpot_s) == len(res.ttft_s):
            ok = [all((k != "ttft" or t * 1000 <= v) and (k != "tpot" or p * 1000 <= v) and (k != "e2el" or e * 1000 <= v)
                      for k, v in slo.items()) for t, p, e in zip(res.ttft_s, res.tpot_s, res.e2e_s)]
            met = sum(ok) / res.makespan_s
        mean = (lambda xs: sum(xs) / len(xs) if xs else None)  # noqa: E731
        out.append(Figures(
            method=m, kind=PREDICTED, origin=f"simulator ({profile})", throughput_tok_s=res.output_tokens_per_s,
            goodput_req_s=met, ttft_s=mean(res.ttft_s), tpot_s=mean(res.tpot_s), e2e_s=mean(res.e2e_s),
            e2e_includes_drift=change is not None, length_change=change,
            assumptions=[f"engine scheduler simulated on the step costs profiled in {profile}, KV pool {kv} bytes"]))
    return out
