"""``kvshrink bench throughput``: the engine's throughput per method, side by side in one process.

Modes
- ``serving``: workloads of requests admitted as memory allows under a KV pool sized (by default) to
  hold about 4 uncompressed sequences at final length: ``decode-heavy`` (many ~512+512 requests,
  ``ignore_eos``) and ``long-prompt`` (~2k prompt + 128 output).
- ``fixed-batch``: decode throughput vs batch size at a fixed prompt/output length.
- ``fixed-length``: decode throughput vs context length at a fixed batch.
- ``step``: a decode-step micro-benchmark at equal batch and context (e.g. kivi-4 vs full).

Every run is a row of kvshrink.results' format (records.jsonl, summary.json with ``runs``, summary.csv);
ratios are to ``full`` measured in the same invocation. ``--compare-hf`` adds plain HF ``generate``, one
request at a time, on a subset of the same requests. ``--reference-kv-memory BYTES`` (serving and trace
modes) adds ``full`` under a pool of that size (``full@BYTES``), normally one that holds every request
at once: a compressed method under the small pool does the same model work with more concurrency, so
that reference is the limit it can approach; each row's ``ratio_to_reference`` is measured against it.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch

from kvshrink.bench.trace import percentile
from kvshrink.engine import Engine, SamplingParams, reset_timers, timers
from kvshrink.results import Records, open_run, write_csv, write_json_atomic

WORKLOADS = {  # name: (requests, prompt, output) at default size / --quick; --workload NAME=NxPxO overrides
    "decode-heavy": ((16, 512, 256), (12, 128, 128)),
    "long-prompt": ((6, 2048, 128), (6, 512, 32)),
}


def parse_size(size: str) -> tuple[int, int, int]:
    """``"64x512x256"`` -> (requests, prompt tokens, output tokens), each >= 1; ValueError otherwise."""
    parts = size.lower().split("x")
    n, p, o = (int(x) for x in parts) if len(parts) == 3 else (0, 0, 0)
    if min(n, p, o) < 1:
        raise ValueError(f"bad size {size!r}: want REQUESTSxPROMPTxOUTPUT, each >= 1")
    return n, p, o


def parse_workloads(specs: list[str] | None, quick: bool) -> dict[str, tuple[int, int, int]]:
    """``["decode-heavy", "long-prompt=32x2048x128"]`` -> {name: (requests, prompt, output)}."""
    out = {}
    for spec in specs or list(WORKLOADS):
        name, _, size = spec.partition("=")
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
        if size:
            try:
                out[name] = parse_size(size)
            except ValueError:
                raise SystemExit(f"bad workload size {size!r}: want REQUESTSxPROMPTxOUTPUT, e.g. 64x512x512") from None
        else:
            out[name] = WORKLOADS[name][1 if quick else 0]
    return out


def _requests(n: int, prompt: int, output: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = max(8, int(prompt * rng.uniform(0.85, 1.15)))
        o = max(4, int(output * rng.uniform(0.85, 1.15)))
        out.append(([rng.randrange(3, vocab) for _ in range(p)], o))
    return out


def fp_config_token_bytes(config, dtype_bytes: int) -> int:
    """Bytes one token takes in an uncompressed cache of every layer (keys and values)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * d * dtype_bytes


def _fp_token_bytes(model) -> int:
    return fp_config_token_bytes(model.config, next(model.parameters()).element_size())


def run_engine(model, tok, method: str, reqs, kv_memory: int, block_size: int = 32, max_batch: int = 256,
               progress=None, **engine_options) -> dict:
    """Run all requests through the engine (all arriving at once: saturation); returns the
    measurements of one run, TTFT percentiles included (from arrival to the step that returns the
    first token). ``engine_options``: more ``Engine`` arguments (``max_prefill_tokens``,
    ``chunked_prefill``, ``packed_linear``, ``paged_kernels``), recorded in the row."""
    eng = Engine(model, tok, method=method, kv_memory=kv_memory, block_size=block_size, max_batch=max_batch,
                 **engine_options)
    options = {k: getattr(eng.cfg, k) for k in ("max_prefill_tokens", "chunked_prefill", "packed_linear",
                                                 "paged_kernels")}
    reset_timers()
    arrival = {eng.add_request(p, SamplingParams(max_tokens=o, ignore_eos=True)): time.perf_counter()
               for p, o in reqs}
    ttft: dict[str, float] = {}
    last: dict[str, float] = {}  # request -> when its latest token came back
    itl: list[float] = []  # gaps between a request's consecutive steps with tokens: a prefill stalls them
    peak_c = peak_b = 0
    comp = []
    t0 = time.perf_counter()
    pure_decode_tokens = 0  # tokens of steps that ran the decode forward alone
    while eng.has_unfinished():
        before = timers()
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            if o.new_token_ids and o.request_id not in ttft:
                ttft[o.request_id] = now - arrival[o.request_id]
            elif o.new_token_ids:
                itl.append(now - last[o.request_id])
            last[o.request_id] = now
        after = timers()
        if all(after.get(k, 0.0) == before.get(k, 0.0) for k in ("prefill", "mixed")):
            pure_decode_tokens += sum(len(o.new_token_ids) for o in outs)
        s = eng.stats()
        peak_c, peak_b = max(peak_c, s.running), max(peak_b, s.kv_bytes_used)
        if s.running:
            comp.append(s.compression)
        if progress is not None:
            progress.update(sum(len(o.new_token_ids) for o in outs))
    wall = time.perf_counter() - t0
    s = eng.stats()
    t = timers()
    gen = s.generation_tokens
    prefill_t = t.get("prefill", 0.0) + t.get("mixed", 0.0)  # a mixed step's cost is mostly its prefill chunks
    decode_t = t.get("decode", 0.0)
    n_prefills = len(reqs) + s.preemptions
    return {
        "method": method, "requests": len(reqs), "wall_s": wall, "output_tokens": gen,
        "prompt_tokens": s.prompt_tokens, "tokens_per_s": gen / wall,
        "total_tokens_per_s": (gen + sum(len(p) for p, _ in reqs)) / wall,
        "prefill_tokens_per_s": s.prompt_tokens / prefill_t if prefill_t else None,
        # chunked prefill packs decode tokens into the prefill steps ("mixed"): decode tok/s is then
        # that of the steps that decode alone
        "decode_tokens_per_s": ((pure_decode_tokens if options["chunked_prefill"] else gen - n_prefills) / decode_t
                                if decode_t else None),
        "mixed_s": t.get("mixed", 0.0),
        "peak_concurrency": peak_c, "peak_kv_bytes": peak_b, "kv_bytes_total": s.kv_bytes_total,
        "preemptions": s.preemptions, "compression": sum(comp) / len(comp) if comp else 1.0,
        "time_breakdown_s": _breakdown(t),
        "ttft_ms_p50": _ms(percentile(list(ttft.values()), 50)), "ttft_ms_p90": _ms(percentile(list(ttft.values()), 90)),
        "itl_ms_p99": _ms(percentile(itl, 99)), "itl_ms_max": _ms(max(itl, default=None)),
        **options,
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def _breakdown(t: dict[str, float]) -> dict[str, float]:
    """The timers, plus ``decode.linear_and_rest``: decode forward time outside attention (the
    projections, MLP, norms, lm_head and HF's module overhead). Attention is ``decode.gather_dequant``
    (reading and decoding blocks), ``decode.attend`` (scoring and weighting) and ``decode.commit``."""
    out = dict(t)
    attn = sum(t.get(k, 0.0) for k in ("decode.gather_dequant", "decode.attend", "decode.commit"))
    if "decode.forward" in t:
        out["decode.linear_and_rest"] = max(t["decode.forward"] - attn, 0.0)
    return {k: round(v, 3) for k, v in sorted(out.items())}


def run_hf(model, reqs) -> dict:
    """Plain HF generate, one request at a time (DynamicCache, greedy, fixed output length)."""
    t0 = time.perf_counter()
    gen = 0
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for p, o in reqs:
            ids = torch.tensor([p], device=dev)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=o, min_new_tokens=o,
                                 do_sample=False, pad_token_id=0)
            gen += out.shape[1] - len(p)
    wall = time.perf_counter() - t0
    return {"method": "hf-generate (one at a time)", "requests": len(reqs), "wall_s": wall, "output_tokens": gen,
            "tokens_per_s": gen / wall, "total_tokens_per_s": (gen + sum(len(p) for p, _ in reqs)) / wall,
            "peak_concurrency": 1}


def decode_step_ms(model, method: str, batch: int, context: int, steps: int, vocab: int, **engine_options) -> dict:
    """Mean wall time of an engine decode step with ``batch`` sequences at ``context`` tokens
    (``engine_options``: more ``Engine`` arguments, e.g. ``paged_kernels=False``)."""
    reqs = _requests(batch, context, steps + 4, vocab, seed=1)
    reqs = [(p[:context] + [5] * max(0, context - len(p)), steps + 4) for p, _ in reqs]
    kv = int(batch * (context + steps + 8) * _fp_token_bytes(model) * 1.3) + (64 << 20)
    eng = Engine(model, method=method, kv_memory=kv, max_batch=batch, **engine_options)
    for p, o in reqs:
        eng.add_request(p, SamplingParams(max_tokens=o, ignore_eos=True))
    while len([r for r in eng.scheduler.running if r.output]) < batch or eng.scheduler.waiting:
        eng.step()
    eng.step()  # warm-up decode
    reset_timers()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    ms = (time.perf_counter() - t0) / steps * 1000
    t = timers()
    while eng.has_unfinished():
        for r in list(eng.scheduler.running):
            eng.abort(r.request_id)
        eng.step()
    return {"method": method, "workload": f"step-b{batch}-c{context}", "batch": batch, "context": context,
            "step_ms": ms, "time_breakdown_ms": {k: round(v / steps * 1000, 2) for k, v in sorted(t.items())}}


HF_METHOD = "hf-generate (one at a time)"


def reference_label(kv_memory: str) -> str:
    """The row name of ``full`` under the reference pool."""
    return f"full@{kv_memory}"


def _with_reference(units: list[dict], reference_kv: str | None) -> list[dict]:
    """After each workload's units, ``full`` once more under the reference pool."""
    if not reference_kv:
        return units
    out: list[dict] = []
    for i, u in enumerate(units):
        out.append(u)
        if i + 1 < len(units) and units[i + 1]["workload"] == u["workload"]:
            continue
        first = next(x for x in units if x["workload"] == u["workload"] and x["kind"] in ("serving", "trace"))
        out.append({**first, "method": reference_label(reference_kv), "spec": "full", "kv_memory": reference_kv})
    return out


def plan(a) -> tuple[dict, list[dict]]:
    """The run's configuration and its units in run order: one (method, workload) measurement each, as
    plain data, so that a unit can run anywhere (``kvshrink.sweep``); what depends on the model (vocab,
    KV pool sizes) is computed where it runs."""
    methods = list(dict.fromkeys(["full", *(a.method or ["kivi:bits=4", "kivi:bits=2"])]))
    workloads = parse_workloads(getattr(a, "workload", None), a.quick) if a.mode == "serving" else {}
    config = {"command": "bench throughput", "model": a.model, "methods": methods, "mode": a.mode,
              "kv_memory": a.kv_memory, "quick": a.quick, "compare_hf": a.compare_hf, "workloads": workloads or None}
    units: list[dict] = []
    if getattr(a, "trace", None):  # the same file `predict throughput --workload trace:FILE` simulates
        config["trace"] = str(a.trace)
        units += [{"kind": "trace", "method": m, "workload": f"trace:{Path(a.trace).name}", "path": str(a.trace)}
                  for m in methods]
    elif a.mode == "serving":
        for wl, (n, n_prompt, n_out) in workloads.items():
            units += [{"kind": "serving", "method": m, "workload": wl, "n": n, "prompt": n_prompt, "output": n_out}
                      for m in methods]
            if a.compare_hf:
                units.append({"kind": "hf", "method": HF_METHOD, "workload": wl, "n": n, "prompt": n_prompt,
                              "output": n_out})
    elif a.mode in ("fixed-batch", "fixed-length"):
        # one axis swept, the other fixed; the pool fits every request (the sweep measures the step, not admission)
        if a.mode == "fixed-batch":
            n_prompt, n_out = (256, 32) if a.quick else (512, 64)
            points = [(b, n_prompt) for b in ([1, 4, 16] if a.quick else [1, 2, 4, 8, 16, 32])]
        else:
            n_out = 16 if a.quick else 32
            points = [(4, c) for c in ([256, 1024] if a.quick else [256, 512, 1024, 2048, 4096, 8192])]
        for b, ctx in points:
            swept = b if a.mode == "fixed-batch" else ctx
            units += [{"kind": "point", "method": m, "workload": f"{a.mode}-{swept}", "batch": b, "context": ctx,
                       "output": n_out, "seed": swept} for m in methods]
    elif a.mode == "step":
        B, C, S = (8, 512, 8) if a.quick else (16, 1024, 16)
        units += [{"kind": "step", "method": m, "workload": f"step-b{B}-c{C}", "batch": B, "context": C, "steps": S}
                  for m in methods]
    reference = getattr(a, "reference_kv_memory", None)
    if reference and not (a.mode == "serving" or getattr(a, "trace", None)):
        raise SystemExit("--reference-kv-memory applies to serving and trace runs (a pool that admits requests)")
    config["reference_kv_memory"] = reference
    engine = {"max_prefill_tokens": getattr(a, "max_prefill_tokens", None) or 4096,
              "chunked_prefill": not getattr(a, "no_chunked_prefill", False),
              "packed_linear": not getattr(a, "no_packed_linear", False),
              "paged_kernels": not getattr(a, "no_paged_kernels", False)}
    config["engine"] = engine
    for u in units:
        if u["kind"] in ("serving", "point", "step"):
            u["engine"] = engine
    return config, _with_reference(units, reference)


def run_unit(model, tok, u: dict, kv_memory: str | None = None, progress: bool = False) -> dict:
    """One unit of ``plan``: its row. A unit's own ``kv_memory`` (the reference pool) wins over the run's."""
    kv_memory = u.get("kv_memory", kv_memory)
    spec = u.get("spec", u["method"])
    vocab = min(model.config.vocab_size, 32000)
    fpt = _fp_token_bytes(model)
    if u["kind"] in ("serving", "hf"):
        reqs = _requests(u["n"], u["prompt"], u["output"], vocab)
        if u["kind"] == "hf":
            row = run_hf(model, reqs[: max(2, u["n"] // 8)])
            row.update(workload=u["workload"])
            return row
        from tqdm import tqdm

        from kvshrink.engine import parse_bytes

        kv = parse_bytes(kv_memory) if kv_memory else int(4 * (u["prompt"] + u["output"]) * fpt * 1.05)
        with tqdm(total=sum(o for _, o in reqs), desc=f"{u['workload']} {u['method']}", unit="tok", leave=False,
                  disable=not progress) as bar:
            row = run_engine(model, tok, spec, reqs, kv, progress=bar, **u.get("engine", {}))
        row.update(method=u["method"], workload=u["workload"], kv_memory=kv)
        return row
    if u["kind"] == "trace":
        from kvshrink.bench.trace import load_trace, run_trace
        from kvshrink.engine import parse_bytes

        reqs = load_trace(u["path"])
        mean = sum(r.prompt_tokens + r.output_tokens for r in reqs) / len(reqs)
        kv = parse_bytes(kv_memory) if kv_memory else int(4 * mean * fpt * 1.05)
        row = run_trace(model, spec, reqs, kv)
        row.update(method=u["method"], workload=u["workload"], kv_memory=kv, tokens_per_s=row["output_tokens_per_s"])
        return row
    if u["kind"] == "point":
        b, ctx, n_out = u["batch"], u["context"], u["output"]
        reqs = [(p, n_out) for p, _ in _requests(b, ctx, n_out, vocab, seed=u["seed"])]
        kv = int(b * (ctx * 1.2 + n_out) * fpt * 1.2) + (32 << 20)
        row = run_engine(model, tok, u["method"], reqs, kv, **u.get("engine", {}))
        row.update(workload=u["workload"], batch=b, context=ctx)
        return row
    return decode_step_ms(model, u["method"], u["batch"], u["context"], u["steps"], vocab, **u.get("engine", {}))


def run_throughput(a) -> int:
    """``kvshrink bench throughput`` on this machine (``kvshrink.sweep.run_throughput_ray``: on Ray)."""
    rounds = getattr(a, "rounds", None)
    rounds = 1 if rounds is None else rounds
    if rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {rounds}")
    from kvshrink.models import load_model

    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype)
    config, units = plan(a)
    out = open_run(a.out, config)
    records = Records(out / "records.jsonl")
    config["rounds"] = rounds
    runs: list[dict] = []
    for rnd in range(rounds):
        for u in units:
            row = run_unit(model, tok, u, a.kv_memory, progress=True)
            if rounds > 1:
                row["round"] = rnd
            records.append(row)
            runs.append(row)
    finish(out, config, runs, a.mode)
    return 0


MEDIAN_KEYS = ("tokens_per_s", "decode_tokens_per_s", "prefill_tokens_per_s", "step_ms", "ratio_to_full",
               "decode_ratio_to_full", "ratio_to_reference", "ttft_ms_p50", "ttft_ms_p90", "itl_ms_max", "wall_s")


def over_rounds(runs: list[dict]) -> list[dict]:
    """One row per (method, workload): the first round's row with every figure of ``MEDIAN_KEYS``
    replaced by its median over the rounds (ratios were taken within each round), ``rounds`` and,
    for the ratios, ``*_range`` ([min, max] over rounds)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r.get("workload")), []).append(r)
    out = []
    for rows in groups.values():
        row = {k: v for k, v in rows[0].items() if k != "round"}
        row["rounds"] = len(rows)
        for k in MEDIAN_KEYS:
            xs = sorted(r[k] for r in rows if isinstance(r.get(k), (int, float)))
            if not xs:
                continue
            row[k] = statistics.median(xs)
            if k.startswith("ratio"):
                row[f"{k}_range"] = [xs[0], xs[-1]]
        out.append(row)
    return out


def finish(out, config: dict, runs: list[dict], mode: str, node_of: dict | None = None,
           extra: dict | None = None) -> None:
    """Ratios to ``full``, summary.json/.csv, plots and the table. ``node_of`` ((method, workload) -> node):
    a ratio only between units measured on the same node (None: all on this one)."""
    def same_node(r: dict, row: dict) -> bool:  # and the same round, where the run has several
        return r.get("round") == row.get("round") and (node_of is None or node_of.get(
            (r["method"], r.get("workload"))) == node_of.get((row["method"], row.get("workload"))))

    for row in runs:
        base = next((r for r in runs if r["method"] == "full" and r.get("workload") == row.get("workload")
                     and same_node(r, row)), None)
        key = "step_ms" if mode == "step" else "tokens_per_s"
        if base and row.get(key) and base.get(key):
            row["ratio_to_full"] = row[key] / base[key]
            if row.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
                row["decode_ratio_to_full"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        else:
            row["ratio_to_full"] = None
        ref = next((r for r in runs if r["method"] == reference_label(str(config.get("reference_kv_memory")))
                    and r.get("workload") == row.get("workload") and same_node(r, row)), None)
        if ref and row.get("tokens_per_s") and ref.get("tokens_per_s"):
            row["ratio_to_reference"] = row["tokens_per_s"] / ref["tokens_per_s"]
    for row in runs:
        for k in ("tokens_per_s", "decode_tokens_per_s", "peak_concurrency", "peak_kv_bytes"):
            row.setdefault(k, None)
    every_round = runs
    if any("round" in r for r in runs):  # the summary is the median over rounds; every round's row is kept
        runs = over_rounds(runs)
        extra = {**(extra or {}), "every_round": every_round}
    write_json_atomic(out / "summary.json", {"config": config, "runs": runs, **(extra or {})})
    if runs:
        write_csv(out / "summary.csv", runs)
    try:
        from kvshrink.bench.plots import plot_throughput

        plot_throughput(runs, out, mode)
    except Exception as e:  # noqa: BLE001 - plots are a convenience
        print(f"plots skipped: {e}")
    _print_table(runs, mode)
    if every_round is not runs:
        print(f"medians over {runs[0]['rounds']} rounds; ratios taken within each round "
              f"(ranges in summary.json, every round's row in records.jsonl)")
    print(f"results in {out}")


def _print_table(runs: list[dict], mode: str) -> None:
    if mode == "step":
        print(f"{'method':28s} {'workload':18s} {'step_ms':>8s} {'ratio':>6s}")
        for r in runs:
            print(f"{r['method']:28s} {r['workload']:18s} {r['step_ms']:8.1f} {r['ratio_to_full'] or 0:6.2f}")
        return
    print(f"{'workload':16s} {'method':28s} {'tok/s':>7s} {'dec tok/s':>9s} {'pre tok/s':>9s} {'conc':>4s} "
          f"{'peakKV MB':>9s} {'compr':>5s} {'preempt':>7s} {'x full':>6s} {'x ref':>6s} {'TTFT p50':>8s} {'p90 ms':>7s} {'ITL max':>7s}")
    for r in runs:
        def f(x, fmt):
            return format(x, fmt) if isinstance(x, (int, float)) else "-"
        print(f"{r.get('workload', ''):16s} {r['method']:28s} {f(r['tokens_per_s'], '7.1f')} "
              f"{f(r.get('decode_tokens_per_s'), '9.1f')} {f(r.get('prefill_tokens_per_s'), '9.0f')} "
              f"{f(r.get('peak_concurrency'), '4d')} {f((r.get('peak_kv_bytes') or 0) / 1e6, '9.1f')} "
              f"{f(r.get('compression'), '5.2f')} {f(r.get('preemptions'), '7d')} {f(r.get('ratio_to_full'), '6.2f')} "
              f"{f(r.get('ratio_to_reference'), '6.2f')} {f(r.get('ttft_ms_p50'), '8.0f')} {f(r.get('ttft_ms_p90'), '7.0f')} {f(r.get('itl_ms_max'), '7.0f')}")


__all__ = ["decode_step_ms", "finish", "parse_workloads", "plan", "run_engine", "run_hf", "run_throughput",
           "run_unit"]
