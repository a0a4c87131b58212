"""Output-length drift and agreement against the reference output, per prompt.

For every sample both the method and the reference generated:
- relative length change ``(method_tokens - reference_tokens) / max(reference_tokens, 1)``;
  mean and median, share longer, share hitting the token limit (finish reason ``length``);
- what the extra tokens cost end to end: ``extra tokens x the method's per-token decode time``
  (decode seconds / (output tokens - 1)), next to the measured change of prefill + decode time;
- agreement where there is no gold: the share of outputs exactly equal to the reference's, and
  the ROUGE-L F of the output against the reference output.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from kvshrink.eval.metrics import rouge_l

Key = tuple[str, str]


@dataclass
class DriftStats:
    n: int = 0
    length_change_mean: float = 0.0
    length_change_median: float = 0.0
    share_longer: float = 0.0
    share_shorter: float = 0.0
    share_hit_limit: float = 0.0
    reference_share_hit_limit: float = 0.0
    extra_tokens_mean: float = 0.0
    tpot_s: float = 0.0  # the method's mean decode seconds per output token
    extra_time_est_s: float = 0.0  # mean extra tokens x tpot
    e2e_change_s: float = 0.0  # mean measured (prefill + decode) change
    exact_agreement: float = 0.0
    rouge_l_to_reference: float = 0.0
    changes: list[float] = field(default_factory=list)  # per-sample relative change (for histograms)

    def to_dict(self, with_changes: bool = False) -> dict:
        d = asdict(self)
        if not with_changes:
            d.pop("changes")
        return d


def _by_key(records: Iterable[Mapping]) -> dict[str, dict[Key, Mapping]]:
    out: dict[str, dict[Key, Mapping]] = {}
    for r in records:
        out.setdefault(r["method"], {})[(r["task"], r["id"])] = r
    return out


def tpot(rec: Mapping) -> float | None:
    n = int(rec.get("output_tokens") or 0)
    return float(rec["decode_s"]) / (n - 1) if n > 1 else None


def drift_stats(method: Mapping[Key, Mapping], reference: Mapping[Key, Mapping], tasks: set[str] | None = None,
                with_rouge: bool = True) -> DriftStats:
    """Drift of one method's records against the reference's, over the shared (task, id) keys
    (optionally only the given tasks)."""
    keys = [k for k in method if k in reference and (tasks is None or k[0] in tasks)]
    st = DriftStats(n=len(keys))
    if not keys:
        return st
    changes, extra, e2e, limit, ref_limit, equal, rl, tps = [], [], [], 0, 0, 0, [], []
    for k in keys:
        m, r = method[k], reference[k]
        mt, rt = int(m["output_tokens"]), int(r["output_tokens"])
        changes.append((mt - rt) / max(rt, 1))
        extra.append(mt - rt)
        e2e.append((m["prefill_s"] + m["decode_s"]) - (r["prefill_s"] + r["decode_s"]))
        limit += m.get("finish_reason") == "length"
        ref_limit += r.get("finish_reason") == "length"
        equal += m.get("output", "") == r.get("output", "")
        if with_rouge:
            rl.append(rouge_l(m.get("output", ""), r.get("output", "")))
        t = tpot(m)
        if t is not None:
            tps.append(t)
    n = len(keys)
    st.changes = changes
    st.length_change_mean = statistics.fmean(changes)
    st.length_change_median = float(statistics.median(changes))
    st.share_longer = sum(c > 0 for c in changes) / n
    st.share_shorter = sum(c < 0 for c in changes) / n
    st.share_hit_limit = limit / n
    st.reference_share_hit_limit = ref_limit / n
    st.extra_tokens_mean = statistics.fmean(extra)
    st.tpot_s = statistics.fmean(tps) if tps else 0.0
    st.extra_time_est_s = st.extra_tokens_mean * st.tpot_s
    st.e2e_change_s = statistics.fmean(e2e)
    st.exact_agreement = equal / n
    st.rouge_l_to_reference = statistics.fmean(rl) if rl else 0.0
    return st


def length_drift(records: Iterable[Mapping], reference: str = "full", tasks: set[str] | None = None,
                 with_rouge: bool = True) -> dict[str, DriftStats]:
    """``{method: DriftStats}`` for every method with a reference to compare to (the reference included,
    whose drift is zero)."""
    by = _by_key(records)
    ref = by.get(reference)
    if ref is None:
        return {}
    return {m: drift_stats(recs, ref, tasks, with_rouge) for m, recs in by.items()}
