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

    def run(a):
        from kvshrink.eval.runner import run

        return run(a)

    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------- bench
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput and serving benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    _add_bench_throughput(bsub)
    _add_bench_serve(bsub)


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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a contended machine)")

    def run(a):
        from kvshrink.bench.throughput import run_throughput

        return run_throughput(a)

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
    p.add_argument("--grace", type=float, default=30.0, help="seconds running requests get after SIGTERM")

    def run(a):
        from kvshrink.serve.app import serve

        return serve(a)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvshrink", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_methods, _add_generate, _add_demo, _add_eval, _add_bench, _add_serve):
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
