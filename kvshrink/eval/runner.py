"""``kvshrink eval``: every (method, sample) through HF ``generate`` under ``kvshrink.compress``,
one record each in ``DIR/records.jsonl``; then the analysis and the report.

Resumable: the run directory belongs to one generation configuration (``results.open_run``); a
rerun with the same configuration skips the (method, task, id) keys already recorded, and a
changed configuration goes to a sibling ``run-<hash>`` directory. Analysis settings
(``--neg-threshold``, ``--neg-filter``) are not part of that configuration: rerunning with other
values only rewrites the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvshrink import results
from kvshrink.eval.metrics import score as score_output
from kvshrink.eval.tasks import Sample, TaskConfig, build_samples, load_task
from kvshrink.generate import generate_one
from kvshrink.methods import parse
from kvshrink.models import DEFAULT_MODEL

REFERENCE = "full"
RECORD_KEY = ("method", "task", "id")


@dataclass
class EvalConfig:
    methods: list[str]
    tasks: list[str]
    out: str
    model: str = DEFAULT_MODEL
    limit: int | None = None  # samples per task
    max_new_tokens: int | None = None  # overrides every task's own
    reference: bool = True  # run ``full`` first as the reference
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    neg_threshold: float = 0.1
    neg_filter: str = "median"
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    progress: bool = True
    report: bool = True  # False: records only (summary/report on a later run)
    extra: dict = field(default_factory=dict)  # anything else that identifies the run (e.g. a custom model)

    def __post_init__(self) -> None:
        self.lengths = tuple(int(n) for n in self.lengths)
        if not self.tasks:
            raise ValueError("tasks: give at least one --task")
        if not self.methods and not self.reference:
            raise ValueError("methods: give at least one --method (or drop --no-reference)")
        if not 0 <= self.neg_threshold < 1:
            raise ValueError(f"neg_threshold must be in [0, 1), got {self.neg_threshold}")
        if self.neg_filter not in ("median", "mean"):
            raise ValueError(f"neg_filter must be 'median' or 'mean', got {self.neg_filter!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for m in self.methods:
            parse(m)  # a bad spec fails before any model is loaded
        for t in self.tasks:
            load_task(t)

    def all_methods(self) -> list[str]:
        ms = [m for m in dict.fromkeys(self.methods)]
        if self.reference:
            ms = [REFERENCE] + [m for m in ms if m != REFERENCE]
        return ms

    def task_config(self) -> TaskConfig:
        return TaskConfig(lengths=self.lengths, seed=self.seed, limit=self.limit)

    def run_config(self) -> dict:
        """What identifies the records (the run directory's config.json)."""
        return {
            "kind": "eval", "model": self.model, "methods": self.all_methods(), "tasks": list(self.tasks),
            "limit": self.limit, "max_new_tokens": self.max_new_tokens, "lengths": list(self.lengths),
            "seed": self.seed, "dtype": self.dtype, **self.extra,
        }


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="eval", unit="sample", disable=not enabled, dynamic_ncols=True)


def evaluate_sample(model, tokenizer, sample: Sample, method: str, max_new_tokens: int | None, seed: int) -> dict:
    """One record: the generation, its timings and KV bytes, and its score."""
    torch.manual_seed(seed)
    g = generate_one(model, tokenizer, sample.prompt, method,
                     max_new_tokens=max_new_tokens or sample.max_new_tokens, chat=sample.chat)
    return {
        "method": method, "task": sample.task, "id": sample.id,
        "score": score_output(sample.metric, g.output, sample.references, sample.metadata),
        "output": g.output, "prompt_tokens": g.prompt_tokens, "output_tokens": g.output_tokens,
        "max_new_tokens": max_new_tokens or sample.max_new_tokens, "finish_reason": g.finish_reason,
        "prefill_s": round(g.prefill_s, 6), "decode_s": round(g.decode_s, 6),
        "kv_bytes": g.kv_bytes, "kv_bytes_full": g.kv_bytes_full, "metric": sample.metric,
        "method_canonical": g.method, "time": time.time(),
    }


def run_eval(cfg: EvalConfig, model=None, tokenizer=None) -> Path:
    """Generate every missing record, then write ``summary.json``, ``report.html`` and
    ``hardset.jsonl``. Pass ``model``/``tokenizer`` to evaluate an already loaded model (then
    ``cfg.extra`` should name it so that its runs get their own directory). Returns the run directory."""
    methods = cfg.all_methods()
    if model is None or tokenizer is None:
        from kvshrink.models import load_model

        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype,
                                      trust_remote_code=cfg.trust_remote_code)
    samples = build_samples(cfg.tasks, tokenizer, cfg.task_config())
    if not samples:
        raise ValueError(f"tasks {cfg.tasks} produced no samples")
    run_dir = results.open_run(cfg.out, cfg.run_config())
    _write_samples(run_dir / "samples.jsonl", samples)
    records = results.Records(run_dir / "records.jsonl", key=RECORD_KEY)
    done = records.done()
    todo = [(m, s) for m in methods for s in samples if (m, s.task, s.id) not in done]
    total = len(methods) * len(samples)
    with _progress(total, total - len(todo), cfg.progress) as bar:
        for method, sample in todo:
            bar.set_postfix_str(f"{method} {sample.task}", refresh=False)
            records.append(evaluate_sample(model, tokenizer, sample, method, cfg.max_new_tokens, cfg.seed))
            bar.update(1)
    if not cfg.report:
        return run_dir
    write_eval_report(cfg, run_dir, records, samples, methods)
    return run_dir


def write_eval_report(cfg: EvalConfig, run_dir: Path, records: results.Records, samples: Sequence[Sample],
                      methods: Sequence[str]) -> None:
    """The report over the latest record of every (method, sample), in method x sample order: the same
    files whatever order the records were written in (a resumed run, a Ray sweep)."""
    from kvshrink.eval.report import write_report

    order = {(m, s.task, s.id): i for i, (m, s) in enumerate((m, s) for m in methods for s in samples)}
    recs = _latest([r for r in records.load() if records.key(r) in order])
    recs.sort(key=lambda r: order[records.key(r)])
    write_report(run_dir, recs, samples, methods, reference=REFERENCE if REFERENCE in methods else None,
                 threshold=cfg.neg_threshold, filter=cfg.neg_filter)


def _latest(recs: Sequence[dict]) -> list[dict]:
    """One record per key (the last written), in first-seen order."""
    by: dict[tuple, dict] = {}
    for r in recs:
        by[(r["method"], r["task"], r["id"])] = r
    return list(by.values())


def _write_samples(path: Path, samples: Sequence[Sample]) -> None:
    import json
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _lengths(text: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(text, str):
        return tuple(int(x) for x in text.replace(",", " ").split())
    return tuple(int(x) for x in text)


def config_from_args(args) -> EvalConfig:
    """``kvshrink eval`` arguments as an ``EvalConfig``."""
    return EvalConfig(
        methods=list(args.method or []), tasks=list(args.task), out=args.out, model=args.model, limit=args.limit,
        max_new_tokens=args.max_new_tokens, reference=not args.no_reference, lengths=_lengths(args.lengths),
        neg_threshold=args.neg_threshold, neg_filter=args.neg_filter, seed=args.seed, device=args.device,
        dtype=args.dtype, trust_remote_code=args.trust_remote_code,
    )


def print_summary(run_dir: Path) -> dict:
    """Print a finished run's summary table; returns its summary.json."""
    import json

    from kvshrink.eval.report import summary_table

    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    print(summary_table(summary))
    return summary
