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
    pass  # owned by kvshrink/eval (issue 5)


# --------------------------------------------------------------------------------------------- bench
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput and serving benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    _add_bench_throughput(bsub)
    _add_bench_serve(bsub)


def _add_bench_throughput(bsub) -> None:
    pass  # owned by kvshrink/bench/throughput.py (issue 4)


def _add_bench_serve(bsub) -> None:
    pass  # owned by kvshrink/bench/serve.py (issue 7)


# --------------------------------------------------------------------------------------------- serve
def _add_serve(sub) -> None:
    pass  # owned by kvshrink/serve (issue 7)


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


if __name__ == "__main__":
    sys.exit(main())
