"""The ``kvshrink predict lengths``, ``kvshrink predict project`` and ``kvshrink advise`` commands:
arguments in, one function each of the package, a table or JSON out."""

from __future__ import annotations

import json


def _hardware(a):
    from kvshrink.predict.hardware import get_hardware

    return get_hardware(getattr(a, "hardware", None), getattr(a, "hardware_spec", None))


def _assumptions(a):
    from kvshrink.predict.roofline import Assumptions

    kw = {k: getattr(a, k) for k in ("bw_efficiency", "flops_efficiency", "dequant") if getattr(a, k, None) is not None}
    return Assumptions(**kw)


def _bytes(text: str | None) -> float | None:
    from kvshrink.predict.hardware import parse_quantity

    if text is None:
        return None
    v = parse_quantity(text)
    if v <= 0:
        raise ValueError(f"--kv-memory must be > 0, got {text!r}")
    return v


def run_lengths(a) -> int:
    from kvshrink.predict.lengths import LengthPredictor, evaluate, format_evaluation, load_pairs

    pairs = load_pairs(a.records)
    if not pairs:
        raise ValueError(f"{', '.join(a.records)}: no method record has a 'full' reference record to pair with")
    ev = evaluate(pairs, folds=a.folds, seed=a.seed)
    if a.save:
        from kvshrink.results import write_json_atomic

        write_json_atomic(a.save, LengthPredictor.fit(pairs).to_dict())
    if a.json:
        print(json.dumps(ev, indent=2))
    else:
        print(format_evaluation(ev))
        if a.save:
            print(f"\nlength model (fitted on all {len(pairs)} pairs) in {a.save}")
    return 0


def _profile_threads(profile: str | None) -> int | None:
    """The torch threads a profile was measured with (its config.json), or None."""
    from pathlib import Path

    if not profile or not (Path(profile) / "config.json").is_file():
        return None
    return json.loads((Path(profile) / "config.json").read_text()).get("threads")


def _project_hardware(a):
    """``--hardware measure``: this CPU, measured with ``--threads`` (else the validated profile's
    threads, so both describe the same setting); else a preset or ``--hardware-spec``. Written to
    ``--save-hardware`` (a JSON file ``--hardware-spec`` reads) when given."""
    from kvshrink.predict.hardware import MEASURE, measure_host

    if (getattr(a, "hardware", None) or "").lower() == MEASURE:
        hw = measure_host(getattr(a, "threads", None) or _profile_threads(getattr(a, "validate", None)))
    else:
        hw = _hardware(a)
    if getattr(a, "save_hardware", None):
        from kvshrink.results import write_json_atomic

        write_json_atomic(a.save_hardware, hw.to_dict())
    return hw


def _project_assumptions(a, hw):
    from kvshrink.predict.roofline import Assumptions

    return Assumptions.for_hardware(hw, **{k: getattr(a, k, None) for k in ("bw_efficiency", "flops_efficiency",
                                                                           "dequant")})


def run_project(a) -> int:
    from kvshrink.predict.modelconfig import load_shape
    from kvshrink.predict.roofline import format_projection, format_validation, project, validate_profile

    hw = _project_hardware(a)
    assume = _project_assumptions(a, hw)
    if getattr(a, "validate", None):
        v = validate_profile(a.validate, hw, assume, a.method)
        print(json.dumps(v, indent=2) if a.json else format_validation(v))
        if not a.config:
            return 0
    if not a.config:
        raise ValueError("give --config (a config.json, a model dir, or a shipped name) or --validate PROFILE")
    shape = load_shape(a.config, a.dtype)
    p = project(shape, hw, a.method or [], a.context, a.batch, _bytes(a.kv_memory), assume)
    print(json.dumps(p, indent=2) if a.json else format_projection(p))
    return 0


def run_throughput_roofline(a) -> int:
    """``predict throughput --config C --hardware H``: the engine's simulator on roofline step costs."""
    import torch
    from transformers import PretrainedConfig

    from kvshrink.engine.config import EngineConfig
    from kvshrink.predict.modelconfig import load_shape
    from kvshrink.predict.roofline import RooflineCost
    from kvshrink.predict.simulate import simulate
    from kvshrink.predict.storage import storage
    from kvshrink.predict.throughput import workload_requests

    if not a.config:
        raise ValueError("predict throughput: give --profile DIR (measured) or --config C with --hardware H")
    shape = load_shape(a.config, a.dtype)
    hw = _project_hardware(a)
    assume = _project_assumptions(a, hw)
    cfg = PretrainedConfig.from_dict(_config_dict(a.config))
    dtype = {4: torch.float32, 2: torch.bfloat16, 1: torch.float8_e4m3fn}[shape.dtype_bytes]
    reqs = workload_requests(a.workload, shape.vocab)
    if not a.json:
        print(f"{shape.name} on {hw.name} (roofline, no profile); assumptions:")
        for x in assume.lines(hw):
            print(f"  - {x}")
    for m in a.method or ["full"]:
        cost = RooflineCost(storage(m, shape), hw, assume)
        r = simulate(cfg, m, reqs, cost, EngineConfig(kv_memory=a.kv_memory, block_size=a.block_size),
                     dtype=dtype).percentiles()
        if a.json:
            print(json.dumps({"method": m, "workload": a.workload, "costs": f"roofline {hw.name}", **r}))
        else:
            print(f"{m:36s} {r['output_tokens_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_ms_p50']:9.1f} ms  "
                  f"TPOT p50 {r['tpot_ms_p50']:7.2f} ms  E2E p50 {r['e2e_ms_p50']:9.0f} ms  "
                  f"peak {r['peak_concurrency']}  preemptions {r['preemptions']}")
    return 0


def _config_dict(name_or_path: str) -> dict:
    """The config.json behind ``load_shape``'s argument, as a dict (the simulator builds its pool from it)."""
    from kvshrink.predict.modelconfig import load_config

    d, _ = load_config(name_or_path)
    return d.get("text_config", d) if isinstance(d.get("text_config"), dict) else d


def run_advise(a) -> int:
    from kvshrink.predict import advise as adv

    wl = adv.parse_workload(a.workload)
    crit = adv.Criteria(adv.parse_fraction(a.max_negative), adv.parse_slo(a.slo))
    kv = _bytes(a.kv_memory)
    if not a.results and not a.hardware and not a.hardware_spec and not getattr(a, "profile", None):
        raise ValueError("nothing to advise from: give --results DIR (measured), --profile DIR (simulated on "
                         "this machine) and/or --hardware NAME (roofline)")
    figs, notes = adv.load_results(a.results or [], wl, None if a.any_model else a.model, crit.slo)
    assumptions: list[str] = []
    if getattr(a, "profile", None):
        from kvshrink.predict.throughput import simulator_figures

        figs += simulator_figures(a.profile, wl, kv, _drift(figs, a.length_model, wl), crit.slo,
                                  [adv._key(m) for m in a.method] if a.method else None)
    if a.hardware or a.hardware_spec:
        from kvshrink.predict.modelconfig import load_shape
        from kvshrink.predict.roofline import RooflineCost
        from kvshrink.predict.storage import storage

        hw, assume = _hardware(a), _assumptions(a)
        if not (a.config or a.model):
            raise ValueError("--hardware projects from a model config: give --model or --config "
                             "(a config.json, a model dir, or llama-3.1-8b / llama-3.1-70b)")
        try:
            shape = load_shape(a.config or a.model, a.dtype)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--hardware projects from a model config: {e} (or pass --config)") from None
        methods = list(dict.fromkeys(["full", *(adv._key(m) for m in a.method or []),
                                      *(f.method for f in figs)]))
        costs, skipped = [], []
        for m in methods:
            try:
                costs.append(RooflineCost(storage(m, shape), hw, assume))
            except ValueError:
                skipped.append(m)
        if skipped:
            notes.append(f"no roofline projection for {', '.join(skipped)} (not a method spec)")
        drift = _drift(figs, a.length_model, wl)
        figs += adv.roofline_figures(costs, wl, kv, drift, crit.slo)
        assumptions = assume.lines(hw) + [
            f"{shape.name}: {shape.params / 1e9:.2f}B parameters, {shape.dtype_bytes} bytes each",
            f"KV memory {kv / 1e9:.2f} GB" if kv else "KV memory: device memory after weights and reserve",
            "length change for the projection: measured (eval) where known, else the --length-model, else 0",
        ]
        notes += [f"{f.method}: {'; '.join(f.assumptions)}" for f in figs if f.kind == adv.PREDICTED]
    elif a.method:
        have = {f.method for f in figs}
        miss = [m for m in (adv._key(x) for x in a.method) if m not in have]
        if miss:
            notes.append(f"no measured result for {', '.join(miss)} and no --hardware to project them")
    rows, rec = adv.advise(figs, crit, wl)
    if a.method:
        keep = {"full", *(adv._key(m) for m in a.method)}
        rows = adv.rank([r for r in rows if r.method in keep], crit)
        rec = adv.recommendation(rows, crit)
    config = {"model": a.model, "workload": wl.label, "kv_memory": kv, "hardware": a.hardware or a.hardware_spec,
              "max_negative": crit.max_negative, "slo": crit.slo, "results": [str(x) for x in a.results or []],
              "methods": a.method}
    run = adv.write_report(a.out, config, rows, rec, notes, assumptions, crit)
    if a.json:
        print((run / "summary.json").read_text())
        return 0
    print(f"{a.model or 'model'} / {wl.label}" + (f" / SLO {crit.slo}" if crit.slo else ""))
    print(adv.table(rows))
    print(f"\n{rec}")
    for n in notes:
        print(f"note: {n}")
    if assumptions:
        print("assumptions of the predictions:")
        for x in assumptions:
            print(f"  - {x}")
    print(f"report.html, pareto.png and summary.json in {run}")
    return 0


def _drift(figs, length_model: str | None, wl) -> dict[str, float]:
    """Relative output-length change per method: measured (eval) first, else the length model's."""
    out = {f.method: f.length_change for f in figs if f.length_change is not None}
    if length_model:
        from pathlib import Path

        from kvshrink.predict.lengths import LengthPredictor

        if not Path(length_model).is_file():
            raise FileNotFoundError(f"--length-model {length_model} not found (write one with "
                                    f"`kvshrink predict lengths --save FILE`)")
        lp = LengthPredictor.load(length_model)
        for m in lp.compression:
            if m not in out:
                from kvshrink.predict.advise import _key

                # the workload's output length is full's; the method may run past it, up to twice as long
                out.setdefault(_key(m), lp.predict(m, wl.prompt, "", 2 * wl.output, reference_tokens=wl.output)
                               / wl.output - 1)
    return out


# --------------------------------------------------------------------------------------- validate
def serve_sweep(rates: str | None, workload: str, threads: int | None):
    """``--serve-rates``/``--serve-workload`` as a ``ServeSweep`` (None: no sweep through the server)."""
    from kvshrink.bench.serve import parse_rates
    from kvshrink.bench.throughput import parse_size
    from kvshrink.predict.throughput import ServeSweep

    if rates is None or rates.strip().lower() in ("", "none", "off"):
        return None
    try:
        n, p, o = parse_size(workload)
    except ValueError:
        raise ValueError(f"--serve-workload {workload!r}: want REQUESTSxPROMPTxOUTPUT (each >= 1), "
                         "e.g. 8x320x48") from None
    return ServeSweep(requests=n, prompt=p, output=o, rates=tuple(parse_rates(rates)), threads=threads)


def run_validate(a) -> int:
    import torch

    from kvshrink.models import load_model
    from kvshrink.predict.throughput import validate, validation_table

    if a.threads:
        torch.set_num_threads(a.threads)
    sweep = serve_sweep(a.serve_rates, a.serve_workload, torch.get_num_threads())
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
    rows = validate(model, a.profile, a.method, a.workload, a.kv_memory, a.out, serve=sweep, model_name=a.model,
                    tokenizer=tok, rounds=a.rounds, speed_probe=not a.no_speed_probe)
    print(validation_table(rows))
    return 0
