"""Sweeps on Ray: ``kvshrink eval --ray`` and ``kvshrink bench throughput --ray``.

The sweep is cut into units, (method, task shard) for eval and (method, workload) for benchmarks. A Ray
actor per worker slot loads the model once and runs unit after unit; the driver alone writes the records
(``kvshrink.results``), so the run directory holds the same files in the same format as a single-process
run, and a cluster without a shared filesystem needs nothing more.

- Resume: units whose records are all present are not sent again; a unit cut short by a killed driver
  only redoes its missing records.
- Failures: a unit whose code raises is retried ``retries`` times (on any worker), then reported as failed
  with its error in ``summary.json`` (``sweep``); the other units still run. A worker that dies is replaced.
- Timing-sensitive units (throughput) get one worker per node that reserves all of the node's CPUs, so two
  never run at once on one machine unless ``pack``; units of one workload prefer the node that ran the
  others, and ratios to ``full`` are only computed between units of the same node.
- ``sweep.json`` in the run directory keeps, across reruns, which node ran which unit and its hardware.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvshrink import results

INSTALL_HINT = "--ray needs Ray, which is not installed: pip install 'kvshrink[ray]'"


def require_ray():
    """The ``ray`` module, or a one-line exit naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None
    return ray


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local cluster; "auto": join the running one; host:port, ray://
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None  # None: 1 when the cluster has GPUs, else 0
    retries: int = 2  # extra attempts of a unit that raised
    pack: bool = False  # allow several timing-sensitive units on one node at once
    shard_size: int = 8  # eval: samples of one task per unit
    progress: bool = True
    init_kwargs: dict = field(default_factory=dict)  # extra ray.init arguments (a new local cluster only)

    def __post_init__(self) -> None:
        if self.cpus_per_task < 0 or (self.gpus_per_task is not None and self.gpus_per_task < 0):
            raise ValueError("--ray-cpus-per-task and --ray-gpus-per-task must be >= 0")
        if self.retries < 0:
            raise ValueError(f"--ray-retries must be >= 0, got {self.retries}")
        if self.shard_size < 1:
            raise ValueError(f"--ray-shard-size must be >= 1, got {self.shard_size}")

    @classmethod
    def from_args(cls, a) -> RayOptions | None:
        """From the CLI's ``--ray*`` flags; None when ``--ray`` was not given."""
        addr = getattr(a, "ray", None)
        if addr is None:
            return None
        return cls(address=None if addr == "local" else addr, cpus_per_task=a.ray_cpus_per_task,
                   gpus_per_task=a.ray_gpus_per_task, retries=a.ray_retries,
                   pack=getattr(a, "ray_pack", False), shard_size=getattr(a, "ray_shard_size", 8))


@dataclass
class Unit:
    key: tuple  # names the unit in the summary, e.g. ("full", "needle", 0)
    payload: Any  # what the worker's run function gets (picklable)
    group: str | None = None  # units of one group prefer the worker that ran the group before


@dataclass
class UnitResult:
    key: tuple
    status: str  # "done" or "failed"
    attempts: int
    node_id: str | None = None
    seconds: float | None = None
    error: str | None = None
    output: Any = None

    def entry(self) -> dict:
        return {"key": list(self.key), "status": self.status, "attempts": self.attempts,
                "node_id": self.node_id, "seconds": None if self.seconds is None else round(self.seconds, 3),
                "error": self.error}


@dataclass
class ModelSpec:
    """A picklable model factory: what each worker loads (``kvshrink.models.load_model``)."""

    name: str
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    threads: int | None = None

    def __call__(self):
        import torch

        from kvshrink.models import load_model

        if self.threads:
            torch.set_num_threads(self.threads)
        return load_model(self.name, device=self.device, dtype=self.dtype,
                          trust_remote_code=self.trust_remote_code)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The driver needs only the tokenizer (to build samples and their keys), not the model."""
    from transformers import AutoTokenizer

    from kvshrink.models import ModelError, resolve

    try:
        tok = AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load the tokenizer of {name!r}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------------ workers
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def node_info() -> dict:
    """Where this process runs: Ray node, host, CPU model and count, GPU name (if any given to it)."""
    import ray

    info = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(), "cpu": _cpu_model(), "cpus": os.cpu_count(), "gpu": None,
            "gpus": 0}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"], info["gpus"] = torch.cuda.get_device_name(0), torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - hardware description only
        pass
    return info


class _Worker:
    """One worker slot: the model stays resident across the units it runs."""

    def __init__(self, factory: Callable[[], Any], run: Callable[[Any, Any], Any]):
        self.factory, self.run_fn, self.state = factory, run, None
        self.info = node_info()

    def node(self) -> dict:
        return self.info

    def run(self, payload: Any) -> dict:
        t0 = time.perf_counter()
        try:
            # loaded on first use, so that a failed load is a unit's error (retried), not a dead actor
            if self.state is None:
                self.state = self.factory()
            out = self.run_fn(self.state, payload)
            return {"ok": True, "output": out, "seconds": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 - reported with the unit
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                    "seconds": time.perf_counter() - t0}


def _ensure_ray(opts: RayOptions) -> bool:
    """Connect (or start a local cluster); True when this call started it, so the sweep shuts it down."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    # worker output would break the progress bar; their errors come back with the units
    kw: dict[str, Any] = {"log_to_driver": False}
    if opts.address is None:
        kw.update(include_dashboard=False, **opts.init_kwargs)
    ray.init(address=opts.address, **kw)
    return True


def _slots(exclusive: bool, opts: RayOptions, n_units: int) -> tuple[list[tuple[str, dict]], float]:
    """Worker slots as (node id, actor options), spread round-robin over nodes, and the GPUs per task."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = opts.gpus_per_task
    if gpus is None:
        gpus = 1.0 if any(n["Resources"].get("GPU", 0) for n in nodes) else 0.0
    per_node: list[list[tuple[str, dict]]] = []
    for n in nodes:
        res = n["Resources"]
        cap = math.floor(res.get("CPU", 0) / opts.cpus_per_task + 1e-9) if opts.cpus_per_task else n_units
        if gpus:
            cap = min(cap, math.floor(res.get("GPU", 0) / gpus + 1e-9))
        if exclusive and not opts.pack:
            # one timing unit per machine: its worker takes all the node's CPUs, so nothing else lands there
            cap, cpus = min(cap, 1), max(res.get("CPU", 0), opts.cpus_per_task)
        else:
            cpus = opts.cpus_per_task
        strat = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        kw = {"num_cpus": cpus, "num_gpus": gpus, "scheduling_strategy": strat}
        per_node.append([(n["NodeID"], kw)] * cap)
    slots: list[tuple[str, dict]] = []
    while len(slots) < n_units and any(per_node):
        for lst in per_node:
            if lst and len(slots) < n_units:
                slots.append(lst.pop())
    if not slots and n_units:
        raise ValueError(f"no node of the Ray cluster has {opts.cpus_per_task:g} CPUs and {gpus:g} GPUs "
                         f"for a task (resources: {ray.cluster_resources()}); lower --ray-cpus-per-task or "
                         f"--ray-gpus-per-task")
    return slots, gpus


def run_units(units: Sequence[Unit], factory: Callable[[], Any], run: Callable[[Any, Any], Any],
              on_done: Callable[[Unit, Any], None], opts: RayOptions, *, exclusive: bool = False,
              on_result: Callable[[UnitResult, dict], None] | None = None, initial: int = 0,
              total: int | None = None, desc: str = "sweep") -> tuple[list[UnitResult], dict]:
    """Run ``run(factory(), unit.payload)`` for every unit on Ray workers; ``on_done(unit, output)`` runs in
    the driver as each unit completes, then ``on_result(result, nodes)`` for each unit done or failed.
    Returns the results (in completion order) and the nodes' hardware ({node id: node_info()}).
    ``exclusive``: timing-sensitive units, one worker per node (unless ``opts.pack``).
    ``initial``/``total``: the progress bar also counts units done earlier."""
    from tqdm.auto import tqdm

    started = _ensure_ray(opts)
    import ray

    actors: list = []
    try:
        slots, _ = _slots(exclusive, opts, len(units))
        Remote = ray.remote(_Worker)

        def spawn(node_id: str, kw: dict):
            a = Remote.options(**kw).remote(factory, run)
            actors.append(a)
            return a

        workers = {spawn(nid, kw): (nid, kw) for nid, kw in slots}
        nodes: dict[str, dict] = {}
        for a in list(workers):
            try:
                info = ray.get(a.node.remote())
                nodes[info["node_id"]] = info
            except ray.exceptions.RayActorError:
                workers.pop(a)
        pending = deque(units)
        attempts: dict[tuple, int] = {}
        owner: dict[str, Any] = {}  # group -> the worker that last ran one of its units
        last: dict[Any, str | None] = {}
        # bounded: a cluster that keeps killing workers ends the sweep
        replacements = len(slots) * (opts.retries + 1)
        idle = list(workers)
        in_flight: dict = {}
        out: list[UnitResult] = []

        def pick(actor) -> Unit:
            g = last.get(actor)
            for pref in (lambda u: g is not None and u.group == g,
                         lambda u: u.group is None or owner.get(u.group) in (None, actor)):
                for i, u in enumerate(pending):
                    if pref(u):
                        del pending[i]
                        return u
            return pending.popleft()

        bar = tqdm(total=total if total is not None else len(units), initial=initial, desc=desc, unit="unit",
                   disable=not opts.progress, dynamic_ncols=True, smoothing=0.1)
        failed = 0
        with bar:
            while pending or in_flight:
                while idle and pending:
                    actor = idle.pop(0)
                    u = pick(actor)
                    if u.group is not None:
                        owner[u.group] = actor
                    last[actor] = u.group
                    in_flight[actor.run.remote(u.payload)] = (actor, u)
                if not in_flight:  # units left but no worker: every one died and could not be replaced
                    for u in pending:
                        out.append(UnitResult(u.key, "failed", attempts.get(u.key, 0),
                                              error="no Ray worker left"))
                        if on_result:
                            on_result(out[-1], nodes)
                    bar.update(len(pending))
                    break
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                actor, u = in_flight.pop(ref)
                dead = False
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    dead, res = True, {"ok": False, "error": f"worker died: {str(e).strip().splitlines()[0]}"}
                attempts[u.key] = attempts.get(u.key, 0) + 1
                nid = workers[actor][0]
                if res["ok"]:
                    on_done(u, res["output"])
                    out.append(UnitResult(u.key, "done", attempts[u.key], nid, res["seconds"],
                                          output=res["output"]))
                    if on_result:
                        on_result(out[-1], nodes)
                    bar.update(1)
                elif attempts[u.key] <= opts.retries:
                    pending.append(u)  # behind the others: a transient failure gets time to clear
                else:
                    failed += 1
                    out.append(UnitResult(u.key, "failed", attempts[u.key], nid, res.get("seconds"),
                                          res["error"]))
                    if on_result:
                        on_result(out[-1], nodes)
                    bar.update(1)
                bar.set_postfix_str(f"{failed} failed" if failed else "", refresh=False)
                if dead:
                    nid, kw = workers.pop(actor)
                    if replacements > 0 and any(n["NodeID"] == nid and n["Alive"] for n in ray.nodes()):
                        replacements -= 1
                        new = spawn(nid, kw)
                        workers[new] = (nid, kw)
                        idle.append(new)
                else:
                    idle.append(actor)
        return out, nodes
    finally:
        for a in actors:  # also on KeyboardInterrupt: the cluster keeps no workers of a dead sweep
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------------- the summary part
def key_str(key: Sequence) -> str:
    return " / ".join(str(k) for k in key)


class SweepLog:
    """``sweep.json`` in the run directory: which node ran which unit, its attempts, time and error, and each
    node's hardware. Kept across reruns and rewritten after every unit, so a resumed run (even after a killed
    driver) still knows where its earlier units ran."""

    def __init__(self, run_dir: Path, planned: Sequence[tuple], done_before: int):
        import json

        self.path = Path(run_dir) / "sweep.json"
        self.planned = [tuple(k) for k in planned]
        self.done_before, self.ran_now = done_before, 0
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.units = {tuple(e["key"]): e for e in old.get("units", [])}
        self.nodes: dict[str, dict] = old.get("nodes", {})

    def add(self, r: UnitResult, nodes: dict) -> None:
        self.nodes.update(nodes)
        self.units[r.key] = r.entry()
        self.ran_now += r.status == "done"
        results.write_json_atomic(self.path, {"units": list(self.units.values()), "nodes": self.nodes})

    def node_of(self) -> dict[tuple, str]:
        """(unit key) -> node id, for the units recorded as done."""
        return {k: e["node_id"] for k, e in self.units.items() if e["status"] == "done" and e["node_id"]}

    def summary(self) -> dict:
        """The ``sweep`` part of ``summary.json``: this configuration's units only."""
        here = [self.units[k] for k in self.planned if k in self.units]
        failed = [{"unit": key_str(e["key"]), "error": e["error"], "attempts": e["attempts"]}
                  for e in here if e["status"] == "failed"]
        used = {e["node_id"] for e in here}
        return {"units_total": len(self.planned), "ran_now": self.ran_now, "done_before": self.done_before,
                "failed": failed,
                "units": [{"unit": key_str(e["key"]), **e,
                           "hostname": self.nodes.get(e["node_id"], {}).get("hostname")} for e in here],
                "nodes": {k: v for k, v in self.nodes.items() if k in used}}


def print_sweep(sweep: dict) -> None:
    print(f"sweep: {sweep['units_total']} units ({sweep['done_before']} done before, {sweep['ran_now']} now, "
          f"{len(sweep['failed'])} failed) on {len(sweep['nodes'])} node(s)")
    for nid, n in sweep["nodes"].items():
        print(f"  node {nid[:12]} {n.get('hostname')}: {n.get('cpu')} x{n.get('cpus')}"
              + (f", {n['gpu']} x{n['gpus']}" if n.get("gpu") else ""))
    for f in sweep["failed"]:
        print(f"  FAILED {f['unit']} after {f['attempts']} attempt(s): {f['error']}")


# ---------------------------------------------------------------------------------------------- eval
def _eval_unit(state, payload) -> list[dict]:
    """One (method, task shard): the records, in sample order."""
    model, tok = state
    evaluate, method, samples, max_new_tokens, seed = payload
    return [evaluate(model, tok, s, method, max_new_tokens, seed) for s in samples]


def run_eval_ray(cfg, opts: RayOptions, model_factory: Callable[[], Any] | None = None, tokenizer=None,
                 evaluate: Callable | None = None) -> Path:
    """``run_eval`` as Ray units. ``model_factory`` (picklable, returns (model, tokenizer)) defaults to
    ``cfg.model``; ``tokenizer`` (the driver's, for the samples) to the model's; ``evaluate`` to
    ``runner.evaluate_sample``. Returns the run directory; ``summary.json`` gains a ``sweep`` part."""
    require_ray()
    from kvshrink.eval import runner
    from kvshrink.eval.tasks import build_samples

    methods = cfg.all_methods()
    tokenizer = tokenizer or load_tokenizer(cfg.model, cfg.trust_remote_code)
    factory = model_factory or ModelSpec(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code)
    samples = build_samples(cfg.tasks, tokenizer, cfg.task_config())
    if not samples:
        raise ValueError(f"tasks {cfg.tasks} produced no samples")
    run_dir = results.open_run(cfg.out, cfg.run_config())
    runner._write_samples(run_dir / "samples.jsonl", samples)
    records = results.Records(run_dir / "records.jsonl", key=runner.RECORD_KEY)
    done = records.done()
    by_task: dict[str, list] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    evaluate = evaluate or runner.evaluate_sample
    planned, units = [], []
    for m in methods:
        for task, ss in by_task.items():
            for i in range(0, len(ss), opts.shard_size):
                key = (m, task, i // opts.shard_size)
                planned.append(key)
                todo = [s for s in ss[i: i + opts.shard_size] if (m, s.task, s.id) not in done]
                if todo:
                    units.append(Unit(key, (evaluate, m, todo, cfg.max_new_tokens, cfg.seed)))
    log = SweepLog(run_dir, planned, len(planned) - len(units))
    if units:
        run_units(units, factory, _eval_unit, lambda u, recs: [records.append(r) for r in recs], opts,
                  on_result=log.add, initial=len(planned) - len(units), total=len(planned), desc="eval units")
    if cfg.report:  # else sweep.json alone says what ran where
        runner.write_eval_report(cfg, run_dir, records, samples, methods)
        summary_path = run_dir / "summary.json"
        import json

        summary = json.loads(summary_path.read_text())
        summary["sweep"] = log.summary()
        results.write_json_atomic(summary_path, summary)
    return run_dir


# ---------------------------------------------------------------------------------------- throughput
def _throughput_unit(state, u: dict) -> dict:
    from kvshrink.bench.throughput import run_unit

    model, tok = state
    return run_unit(model, tok, u["unit"], u["kv_memory"])


def run_throughput_ray(a, opts: RayOptions, model_factory: Callable[[], Any] | None = None) -> int:
    """``bench throughput`` as Ray units, one (method, workload) each; same files as the single-process run.
    ``model_factory`` (picklable, returns (model, tokenizer)) defaults to ``a.model``."""
    require_ray()
    from kvshrink.bench import throughput as tp

    config, plan = tp.plan(a)
    out = results.open_run(a.out, config)
    records = results.Records(out / "records.jsonl", key=("method", "workload"))
    done = records.done()
    planned = [(u["method"], u["workload"]) for u in plan]
    units = [Unit(k, {"unit": u, "kv_memory": a.kv_memory}, group=u["workload"])
             for k, u in zip(planned, plan) if k not in done]
    factory = model_factory or ModelSpec(a.model, a.device, a.dtype, threads=getattr(a, "threads", None))
    log = SweepLog(out, planned, len(planned) - len(units))
    if units:
        run_units(units, factory, _throughput_unit, lambda u, row: records.append(row), opts, exclusive=True,
                  on_result=log.add, initial=len(planned) - len(units), total=len(planned),
                  desc="throughput units")
    # a unit whose node is unknown (e.g. recorded by a single-process run) gets a node of its own: no ratio
    node_of = {k: log.node_of().get(k, f"unknown:{key_str(k)}") for k in planned}
    latest = {records.key(r): r for r in records}
    runs = [dict(latest[k]) for k in planned if k in latest]
    sweep = log.summary()
    tp.finish(out, config, runs, a.mode, node_of=node_of, extra={"sweep": sweep})
    print_sweep(sweep)
    return 1 if sweep["failed"] else 0


__all__ = ["INSTALL_HINT", "ModelSpec", "RayOptions", "SweepLog", "Unit", "UnitResult", "load_tokenizer",
           "node_info", "print_sweep", "require_ray", "run_eval_ray", "run_throughput_ray", "run_units"]
