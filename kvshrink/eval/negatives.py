"""Negative samples (after "Rethinking KV cache compression"): where a method fails a sample that
the reference (the uncompressed ``full`` cache) handles well.

A sample is negative for a method when
- the reference's score is at least the task's median (or mean) reference score,
- the reference's score is above 0 (a zero baseline is never negative: the paper's extractor
  counted those, e.g. passage_count with median 0, which inflates the ratio), and
- the method's score is at most ``reference * (1 - t)`` (``t`` = 0.1 by default).

Only samples that both the method and the reference scored count (gold-less chat samples have no
score). A *combined* set is negative for every method of a group (all quantisers, all eviction
methods, all methods).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

Key = tuple[str, str]  # (task, id)


@dataclass
class NegativeStats:
    negatives: set[Key] = field(default_factory=set)
    scored: set[Key] = field(default_factory=set)  # samples both the method and the reference scored
    by_task: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (negatives, scored)

    @property
    def ratio(self) -> float | None:
        return len(self.negatives) / len(self.scored) if self.scored else None

    def task_ratio(self, task: str) -> float | None:
        neg, n = self.by_task.get(task, (0, 0))
        return neg / n if n else None


def scores_by_method(records: Iterable[Mapping]) -> dict[str, dict[Key, float]]:
    """``{method: {(task, id): score}}`` of the records whose score is not None."""
    out: dict[str, dict[Key, float]] = {}
    for r in records:
        if r.get("score") is not None:
            out.setdefault(r["method"], {})[(r["task"], r["id"])] = float(r["score"])
    return out


def task_thresholds(reference: Mapping[Key, float], filter: str = "median") -> dict[str, float]:
    """Per task, the median (or mean) reference score."""
    by_task: dict[str, list[float]] = {}
    for (task, _), s in reference.items():
        by_task.setdefault(task, []).append(s)
    agg = statistics.median if filter == "median" else statistics.fmean
    if filter not in ("median", "mean"):
        raise ValueError(f"filter must be 'median' or 'mean', got {filter!r}")
    return {t: float(agg(v)) for t, v in by_task.items()}


def is_negative(ref: float, method: float, task_threshold: float, t: float) -> bool:
    return ref > 0 and ref >= task_threshold and method <= ref * (1 - t)


def find_negatives(
    scores: Mapping[str, Mapping[Key, float]],
    reference: str = "full",
    threshold: float = 0.1,
    filter: str = "median",
) -> dict[str, NegativeStats]:
    """Negative samples of every method but the reference."""
    ref = scores.get(reference, {})
    thr = task_thresholds(ref, filter)
    out: dict[str, NegativeStats] = {}
    for method, ms in scores.items():
        if method == reference:
            continue
        st = NegativeStats()
        counts: dict[str, list[int]] = {}
        for key, s in ms.items():
            if key not in ref:
                continue
            st.scored.add(key)
            c = counts.setdefault(key[0], [0, 0])
            c[1] += 1
            if is_negative(ref[key], s, thr[key[0]], threshold):
                st.negatives.add(key)
                c[0] += 1
        st.by_task = {t: (c[0], c[1]) for t, c in counts.items()}
        out[method] = st
    return out


def combined(stats: Mapping[str, NegativeStats], methods: Sequence[str]) -> NegativeStats:
    """Samples negative for *every* method in ``methods``, over the samples all of them scored."""
    members = [stats[m] for m in methods if m in stats]
    if not members:
        return NegativeStats()
    scored = set.intersection(*(m.scored for m in members))
    neg = set.intersection(*(m.negatives for m in members)) & scored
    by_task: dict[str, list[int]] = {}
    for task, _ in scored:
        by_task.setdefault(task, [0, 0])[1] += 1
    for task, _ in neg:
        by_task[task][0] += 1
    return NegativeStats(negatives=neg, scored=scored, by_task={t: (c[0], c[1]) for t, c in by_task.items()})


def method_groups(methods: Sequence[str], reference: str | None = "full") -> dict[str, list[str]]:
    """Groups for combined sets: ``quantisers`` (codec != fp), ``eviction`` (selector != full),
    ``all`` (every method but the reference). Empty groups are left out."""
    from kvshrink.methods import parse

    quant, evict, allm = [], [], []
    for m in methods:
        if m == reference:
            continue
        allm.append(m)
        try:
            cm = parse(m)
        except ValueError:
            continue
        if cm.codec.name != "fp":
            quant.append(m)
        if cm.selector.name != "full":
            evict.append(m)
    groups = {"quantisers (codec != fp)": quant, "eviction (selector != full)": evict, "all methods": allm}
    return {k: v for k, v in groups.items() if v}
