"""Command line: argument parsing only. Every command calls one function of the package.

Each command has its own ``_add_<command>`` function below; the work happens elsewhere.
"""

from __future__ import annotations

import argparse
import sys

from kvshrink.methods import SpecError
from kvshrink.models import DEFAULT_MODEL, ModelError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"HF model dir, hub name, or {DEFAULT_MODEL!r} (embedded)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model dir")


def _ray_args(p: argparse.ArgumentParser, unit: str, timing: bool = False) -> None:
    g = p.add_argument_group("Ray sweep (pip install 'kvshrink[ray]'; see kvshrink.sweep)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"run the sweep as Ray tasks, one per {unit}: no ADDRESS starts a local cluster, "
                        "'auto' joins the running one (or host:port, ray://...)")
    g.add_argument("--ray-cpus-per-task", type=float, default=1.0, help="CPUs each worker reserves")
    g.add_argument("--ray-gpus-per-task", type=float, default=None,
                   help="GPUs each worker reserves (default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--ray-retries", type=int, default=2, help="extra attempts of a failing unit before it is reported")
    if timing:
        g.add_argument("--ray-pack", action="store_true",
                       help="allow several timed units on one node at once (default: one per node)")
    else:
        g.add_argument("--ray-shard-size", type=int, default=8, help="samples of one task per unit")


# ------------------------------------------------------------------------------------------- methods
def _add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list compression methods with their parameters and defaults")
    p.set_defaults(func=lambda a: __import__("kvshrink.methods.describe", fromlist=["x"]).print_methods())


# ------------------------------------------------------------------------------------------ generate
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate with one method and print the output and KV bytes")
    _model_args(p)
    p.add_argument("--method", default="full", help="method spec, e.g. 'snapkv:ratio=0.5+kivi:bits=4'")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    def run(a):
        from kvshrink.generate import generate_cli

        return generate_cli(a)

    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="needle-in-a-haystack on the embedded model across methods")
    _model_args(p)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true")

    def run(a):
        from kvshrink.demo import run_demo

        return run_demo(a)

    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------- eval
def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, negative samples and length drift of methods against 'full'")
    _model_args(p)
    p.add_argument("--method", action="append", default=None, help="method spec (repeat); 'full' runs as reference")
    p.add_argument("--task", action="append", required=True,
                   help="needle | wiki-qa | kv-retrieval | summarize | chat | longbench:DIR | hardset:FILE (repeat)")
    p.add_argument("--limit", type=int, default=None, help="samples per task (spread evenly over lengths/depths)")
    p.add_argument("--out", required=True, help="run directory (resumed when the configuration matches)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's own output limit")
    p.add_argument("--no-reference", action="store_true", help="do not run 'full' as the reference")
    p.add_argument("--lengths", default="1024,2048,4096",
                   help="context lengths in tokens, comma-separated (longbench: middle-truncated to the largest)")
    p.add_argument("--neg-threshold", type=float, default=0.1, help="negative when score <= reference x (1 - t)")
    p.add_argument("--neg-filter", choices=("median", "mean"), default="median",
                   help="reference must score >= the task's median or mean reference score")
    p.add_argument("--seed", type=int, default=0)
    _ray_args(p, "(method, task shard)")

    def run(a):
        # here, not in eval: the Ray layer (kvshrink.sweep) sits above eval and bench, never below
        from kvshrink.eval.runner import config_from_args, print_summary, run_eval
        from kvshrink.sweep import RayOptions, print_sweep, run_eval_ray

        cfg, ray = config_from_args(a), RayOptions.from_args(a)
        run_dir = run_eval(cfg) if ray is None else run_eval_ray(cfg, ray)
        summary = print_summary(run_dir)
        if "sweep" in summary:
            print_sweep(summary["sweep"])
        print(f"\nrecords, summary.json, report.html and hardset.jsonl in {run_dir}")
        return 1 if summary.get("sweep", {}).get("failed") else 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------- bench
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput and serving benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    _add_bench_throughput(bsub)
    _add_bench_serve(bsub)


def _engine_args(p) -> None:
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prompt tokens prefilled per engine step, over all prompts (default 4096)")
    p.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill each prompt whole in its own forward instead of in chunks packed with the "
                        "decode tokens into one forward per step")
    p.add_argument("--no-packed-linear", action="store_true",
                   help="CPU: run the model's linear layers through stock F.linear (HF generate's kernels) "
                        "instead of oneDNN on weights packed once")
    p.add_argument("--no-paged-kernels", action="store_true",
                   help="CPU: gather and decode KV blocks in eager PyTorch before attending, instead of the "
                        "compiled kernels that read them in place")


def _add_bench_throughput(bsub) -> None:
    p = bsub.add_parser("throughput", help="engine throughput per method (serving, fixed batch/length, step)")
    _model_args(p)
    p.add_argument("--method", action="append", help="method spec (repeatable); full is always included")
    p.add_argument("--kv-memory", default=None, help="KV pool bytes, e.g. 512MiB (default: ~4 uncompressed seqs)")
    p.add_argument("--mode", choices=["fixed-batch", "fixed-length", "serving", "step"], default="serving")
    p.add_argument("--out", default="runs/throughput")
    p.add_argument("--quick", action="store_true", help="small workloads (~2 min)")
    p.add_argument("--workload", action="append",
                   help="serving mode: decode-heavy or long-prompt, optionally sized NAME=REQUESTSxPROMPTxOUTPUT "
                        "(repeatable; default both, 16x512x256 and 6x2048x128: ~10 min with the default methods)")
    p.add_argument("--compare-hf", action="store_true", help="also run plain HF generate one request at a time")
    p.add_argument("--reference-kv-memory", default=None,
                   help="also run full under a pool of this size (e.g. 4GiB: room for every request), the limit a "
                        "compressed method in the small pool can approach; rows get ratio_to_reference")
    p.add_argument("--trace", default=None, help="JSONL trace ({prompt_tokens, output_tokens, arrival_s}) instead of "
                                                   "workloads: the file `predict throughput --workload trace:FILE` takes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a contended machine)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every unit this many times, round after round (A B C A B C ...); rows report the "
                        "median over rounds and ratios are taken round by round, so a machine whose speed drifts "
                        "during the run does not bias them")
    _engine_args(p)
    _ray_args(p, "(method, workload)", timing=True)

    def run(a):
        from kvshrink.bench.throughput import run_throughput
        from kvshrink.sweep import RayOptions, run_throughput_ray

        ray = RayOptions.from_args(a)
        if ray is None:
            return run_throughput(a)
        if a.rounds != 1:
            raise SystemExit("--rounds runs on this machine only (a Ray sweep spreads units over nodes)")
        return run_throughput_ray(a, ray)  # the same units as Ray tasks, one per node at a time

    p.set_defaults(func=run)


def _add_bench_serve(bsub) -> None:
    p = bsub.add_parser("serve", help="load-test an OpenAI-compatible server (vLLM bench serve metrics); "
                        "--launch compares methods on kvshrink's own server")
    p.add_argument("--base-url", default=None, help="server to test, e.g. http://127.0.0.1:8000 (not with --launch)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name sent in requests (and tokenizer default)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for datasets and token counts (default: --model)")
    p.add_argument("--dataset", default="random", help="random | sharegpt:FILE | task:NAME (task:chat)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--request-rate", default="inf", help="requests/s, 'inf', or a comma list: 1,2,4")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to ignore EOS (fixed output lengths)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--launch", action="store_true", help="start kvshrink's server once per --method")
    p.add_argument("--method", action="append", default=None, help="method spec (repeat; with --launch)")
    p.add_argument("--kv-memory", default="1GiB", help="KV pool of each launched server")
    p.add_argument("--device", default=None, help="device of launched servers")
    p.add_argument("--dtype", default=None, help="dtype of launched servers")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for a launched server")
    for engine, name, kv in (("vllm", "vLLM", "auto,fp8"), ("sglang", "SGLang", "auto,fp8_e5m2")):
        p.add_argument(f"--launch-{engine}", action="store_true",
                       help=f"also start {name}'s own server (same model, 127.0.0.1) once per --{engine}-kv-dtype")
        p.add_argument(f"--{engine}-kv-dtype", default="auto", help=f"{name} --kv-cache-dtype values, e.g. {kv}")
        p.add_argument(f"--{engine}-args", default="",
                       help=f"extra {name} server arguments as one string: --{engine}-args='--max-model-len 8192'")

    def run(a):
        from kvshrink.bench.serve import run_bench_serve

        return run_bench_serve(a)

    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------- serve
def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server (completions, chat, metrics) over the engine")
    _model_args(p)
    p.add_argument("--method", default="full", help="method spec, e.g. 'snapkv:ratio=0.5+kivi:bits=4'")
    p.add_argument("--kv-memory", default="1GiB", help="KV pool size, e.g. 512MiB, 2GiB or a byte count")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-waiting", type=int, default=256, help="waiting requests before new ones get 429")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: --model)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=None)
    _engine_args(p)
    p.add_argument("--grace", type=float, default=30.0, help="seconds running requests get after SIGTERM")

    def run(a):
        from kvshrink.serve.app import serve

        return serve(a)

    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------ profile/predict
def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure what an engine step costs per method; fit a step-cost model")
    _model_args(p)
    p.add_argument("--method", action="append", required=True, help="method spec (repeat)")
    p.add_argument("--out", required=True, help="profile directory (resumed per method)")
    p.add_argument("--quick", action="store_true", help="a smaller grid (~1 min per method on a small model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    def run(a):
        import torch

        from kvshrink.models import load_model
        from kvshrink.predict.throughput import run_profile

        if a.threads:
            torch.set_num_threads(a.threads)
        model, _ = load_model(a.model, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
        print(run_profile(model, a.model, a.method, a.out, quick=a.quick))
        return 0

    p.set_defaults(func=run)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict serving from a profile (no model run)")
    psub = p.add_subparsers(dest="predict_command", required=True)
    t = psub.add_parser("throughput", help="simulate the engine's scheduler and pool against a profile "
                                          "(or roofline costs: --config C --hardware H)")
    t.add_argument("--profile", default=None, help="measured step costs (`kvshrink profile`)")
    t.add_argument("--config", default=None,
                   help="instead of --profile: a model config (config.json, model dir, shipped name) for the roofline")
    _hardware_args(t, required=False)
    t.add_argument("--method", action="append", help="method spec in the profile (repeat; default: all)")
    t.add_argument("--workload", required=True,
                   help="NAME[=NxPxO] as bench throughput takes it (decode-heavy, long-prompt), or trace:FILE (JSONL)")
    t.add_argument("--kv-memory", required=True, help="KV pool bytes, e.g. 141MiB")
    t.add_argument("--block-size", type=int, default=32)
    t.add_argument("--json", action="store_true", help="one JSON object per method")

    def run_throughput(a):
        import json

        from kvshrink.predict.throughput import load_profile, predict, workload_requests

        if not a.profile:
            from kvshrink.predict.commands import run_throughput_roofline

            return run_throughput_roofline(a)
        if a.config or a.hardware or a.hardware_spec:
            raise ValueError("predict throughput: --profile (measured costs) or --config with --hardware "
                             "(roofline costs), not both")
        cfg, models = load_profile(a.profile)
        reqs = workload_requests(a.workload, cfg.get_text_config().vocab_size)
        for m in a.method or list(models):
            r = predict(a.profile, m, reqs, a.kv_memory, a.block_size).percentiles()
            if a.json:
                print(json.dumps({"method": m, "workload": a.workload, **r}))
            else:
                print(f"{m:36s} {r['output_tokens_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_ms_p50']:9.0f} ms  "
                      f"TPOT p50 {r['tpot_ms_p50']:7.1f} ms  E2E p50 {r['e2e_ms_p50']:9.0f} ms  "
                      f"peak {r['peak_concurrency']}  preemptions {r['preemptions']}")
        return 0

    t.set_defaults(func=run_throughput)
    v = psub.add_parser("validate", help="run workloads on the engine and predict them; print both side by side")
    _model_args(v)
    v.add_argument("--profile", required=True)
    v.add_argument("--method", action="append", help="default: every method of the profile")
    v.add_argument("--workload", action="append",
                   help="NAME=NxPxO[@rate=R] (repeat; default: three shapes, one with Poisson arrivals)")
    v.add_argument("--kv-memory", default=None, help="default: four uncompressed sequences of the workload")
    v.add_argument("--out", default="runs/predict-validate")
    v.add_argument("--threads", type=int, default=None, help="torch CPU threads (the launched servers' too)")
    v.add_argument("--serve-rates", default="0.5,inf",
                   help="request rates of the sweep through `kvshrink serve` (comma list, inf; 'none': no sweep)")
    v.add_argument("--serve-workload", default="8x320x48", metavar="NxPxO",
                   help="the sweep's random prompts: requests x prompt tokens x output tokens")
    v.add_argument("--rounds", type=int, default=1,
                   help="measure every row this many times, round after round; rows report medians and the "
                        "measured [min-max], errors are taken between medians")
    v.add_argument("--no-speed-probe", action="store_true",
                   help="skip the decode-step probe before and after each measurement (the *_at_speed predictions)")

    def run_validate(a):
        from kvshrink.predict.commands import run_validate

        return run_validate(a)

    v.set_defaults(func=run_validate)
    _add_predict_lengths(psub)
    _add_predict_project(psub)


def _hardware_args(p: argparse.ArgumentParser, required: bool) -> None:
    from kvshrink.predict.hardware import PRESETS

    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--hardware", default=None, help=f"preset: {', '.join(PRESETS)}, or 'measure' (this CPU)")
    g.add_argument("--hardware-spec", default=None, metavar="SPEC",
                   help="your own: FILE.json or name=mygpu,mem=80GB,bw=3.35TB/s,flops=989T[,vflops=67T]")
    p.add_argument("--bw-efficiency", type=float, default=None, help="achieved share of peak bandwidth (default 0.8)")
    p.add_argument("--flops-efficiency", type=float, default=None, help="achieved share of peak FLOP/s (default 0.6)")
    p.add_argument("--dequant", choices=("fused", "unfused"), default=None,
                   help="KV decoded inside the attention kernel (default) or into a full-precision copy first")
    p.add_argument("--dtype", default=None, help="override the config's dtype (bfloat16, float16, float32)")


def _add_predict_lengths(psub) -> None:
    p = psub.add_parser("lengths", help="learn methods' output lengths from eval records; held-out MAE vs naive")
    p.add_argument("--records", nargs="+", required=True, metavar="RUN_DIR", help="eval run directories")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds over prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, metavar="FILE", help="write the model fitted on all records (JSON)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: __import__("kvshrink.predict.commands", fromlist=["x"]).run_lengths(a))


def _add_predict_project(psub) -> None:
    p = psub.add_parser("project", help="roofline step cost per method for a model config on described hardware")
    p.add_argument("--config", default=None,
                   help="HF config.json, a model dir, or llama-3.1-8b / llama-3.1-70b / smollm2-135m")
    _hardware_args(p, required=True)
    p.add_argument("--validate", default=None, metavar="PROFILE",
                   help="roofline vs a measured profile's raw points, per step and operator (with --hardware measure)")
    p.add_argument("--threads", type=int, default=None,
                   help="--hardware measure: torch threads to measure with (default: the profile's, else torch's)")
    p.add_argument("--save-hardware", default=None, metavar="FILE",
                   help="write the hardware description (e.g. the measured one) as JSON for --hardware-spec")
    p.add_argument("--method", action="append", default=None, help="method spec (repeat); full is always included")
    p.add_argument("--batch", type=int, default=None, help="sequences per decode step (default: as many as fit)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--kv-memory", default=None, help="KV bytes (default: device memory - weights - 10%%)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: __import__("kvshrink.predict.commands", fromlist=["x"]).run_project(a))


# -------------------------------------------------------------------------------------------- advise
def _add_advise(sub) -> None:
    p = sub.add_parser("advise", help="rank methods from measured results and predictions; Pareto plot, advice")
    p.add_argument("--model", default=None, help="model of the results to use (and its config for --hardware)")
    p.add_argument("--workload", required=True, help="NAME=NxPxO (requests x prompt x output) or a bench workload")
    p.add_argument("--kv-memory", default=None, help="KV bytes, e.g. 40GB (default with --hardware: what is left)")
    p.add_argument("--max-negative", default="5%", help="largest acceptable negative-sample rate (5%% or 0.05)")
    p.add_argument("--slo", default=None, help="ttft:MS,tpot:MS[,e2el:MS] for goodput")
    p.add_argument("--results", nargs="+", default=None, metavar="DIR", help="eval / bench throughput / bench serve runs")
    p.add_argument("--profile", default=None, help="a `kvshrink profile` dir: simulate the engine on this machine")
    p.add_argument("--method", action="append", default=None, help="methods to rank (repeat; default: all found)")
    p.add_argument("--config", default=None, help="model config for the projection (default: --model)")
    p.add_argument("--length-model", default=None, help="`predict lengths --save` file for unmeasured drift")
    p.add_argument("--any-model", action="store_true", help="also use results measured on other models")
    p.add_argument("--out", default="runs/advise")
    p.add_argument("--json", action="store_true")
    _hardware_args(p, required=False)
    p.set_defaults(func=lambda a: __import__("kvshrink.predict.commands", fromlist=["x"]).run_advise(a))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvshrink", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_methods, _add_generate, _add_demo, _add_eval, _add_bench, _add_serve, _add_profile, _add_predict,
                _add_advise):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars drown the command's own output
    try:
        rc = args.func(args)
    except (SpecError, ModelError, FileNotFoundError, ValueError) as e:
        print(f"kvshrink {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def entry() -> int:
    """The ``kvshrink`` console script: a process kvshrink owns, so it may tune the CPU allocator."""
    from kvshrink.cpu_alloc import tune_cpu_allocator

    tune_cpu_allocator()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
