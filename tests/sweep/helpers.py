"""Picklable pieces the Ray workers import by name (the workers share the driver's working directory)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvshrink.eval.runner import evaluate_sample
from tests.conftest import tiny_model, tiny_tokenizer


def tiny_llama():
    """The model factory of the tests: the same seeded random weights in every worker."""
    return tiny_model("llama"), tiny_tokenizer()


@dataclass
class Logged:
    """``evaluate_sample`` that logs each (method, task, id) it computes to a file (workers are other
    processes)."""

    log: str

    def __call__(self, model, tok, sample, method, max_new_tokens, seed):
        with open(self.log, "a") as f:
            f.write(f"{method}\t{sample.task}\t{sample.id}\n")
        return evaluate_sample(model, tok, sample, method, max_new_tokens, seed)


@dataclass
class Failing(Logged):
    """Always raises on ``fail_task`` under ``fail_method``; raises once (then works) on ``flaky_task``;
    kills its worker process once on ``die_task`` under ``full``."""

    fail_method: str = ""
    fail_task: str = ""
    flaky_task: str = ""
    die_task: str = ""

    def __call__(self, model, tok, sample, method, max_new_tokens, seed):
        if method == "full" and sample.task == self.die_task and _first(self.log + ".died"):
            os._exit(3)  # the worker process dies: Ray reports it, the sweep starts another worker
        if method == self.fail_method and sample.task == self.fail_task:
            with open(self.log + ".fail", "a") as f:
                f.write(f"{sample.id}\n")
            raise RuntimeError(f"boom on {sample.task}")
        marker = Path(f"{self.log}.flaky.{method.replace(':', '_')}.{sample.id}")
        if sample.task == self.flaky_task and not marker.exists():
            marker.touch()
            raise ValueError("transient")
        return super().__call__(model, tok, sample, method, max_new_tokens, seed)


def _first(path: str) -> bool:
    """True for exactly one caller across processes (two workers may reach the same check at once)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def lines(path) -> list[str]:
    p = Path(path)
    return p.read_text().splitlines() if p.exists() else []
