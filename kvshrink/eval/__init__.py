"""Evaluation: tasks (data + metric), the runner (every method x sample through HF generate under
``kvshrink.compress``), negative samples, length drift, and the report.

    kvshrink eval --method kivi:bits=2 --method snapkv:ratio=0.75 --task needle --task chat --out runs/eval
"""

from kvshrink.eval.runner import EvalConfig, run_eval

__all__ = ["EvalConfig", "run_eval"]
