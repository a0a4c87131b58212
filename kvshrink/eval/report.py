"""Analysis and report of an eval run: ``summary.json``, ``hardset.jsonl`` and an offline
``report.html`` with PNG plots beside it (matplotlib, Agg backend).

Scores (all in [0, 1]):
- a sample's score is its task metric against the gold references; gold-less tasks with a metric
  (``summarize``) score ROUGE-L against the *reference output* (so ``full`` scores 1 there);
  ``chat`` has no score and feeds length drift and agreement only;
- a task's score is the mean over its samples; a method's ``score`` is the mean over its tasks
  (every task weighs the same); ``negative_ratio`` is negatives / scored samples over all tasks.
"""

from __future__ import annotations

import html
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvshrink import results
from kvshrink.eval.drift import length_drift
from kvshrink.eval.metrics import rouge_l
from kvshrink.eval.negatives import NegativeStats, combined, find_negatives, method_groups, scores_by_method
from kvshrink.eval.tasks import Sample

WORST = 20


def effective_records(records: Sequence[dict], samples: Mapping[tuple[str, str], Sample] | None,
                      reference: str | None) -> list[dict]:
    """Copies of the records with gold-less scored samples scored against the reference output."""
    ref_out = {(r["task"], r["id"]): r.get("output", "") for r in records if r["method"] == reference}
    out = []
    for r in records:
        r = dict(r)
        k = (r["task"], r["id"])
        s = samples.get(k) if samples else None
        metric = s.metric if s else r.get("metric", "none")
        gold = bool(s.references) if s else r.get("score") is not None
        if r.get("score") is None and not gold and metric != "none" and k in ref_out:
            r["score"] = 1.0 if r["method"] == reference else rouge_l(r.get("output", ""), ref_out[k])
            r["score_vs"] = "reference_output"
        out.append(r)
    return out


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def build_summary(records: Sequence[dict], methods: Sequence[str], reference: str | None,
                  threshold: float = 0.1, filter: str = "median") -> tuple[dict, dict[str, NegativeStats]]:
    """``summary.json``'s content (from effective records) and the negative stats behind it."""
    scores = scores_by_method(records)
    negs = find_negatives(scores, reference, threshold, filter) if reference in scores else {}
    drift = length_drift(records, reference) if reference else {}
    tasks = list(dict.fromkeys(r["task"] for r in records))
    out: dict = {
        "reference": reference, "neg_threshold": threshold, "neg_filter": filter, "tasks": tasks, "methods": {},
    }
    for m in methods:
        recs = [r for r in records if r["method"] == m]
        if not recs:
            continue
        task_scores = {t: _mean(r["score"] for r in recs if r["task"] == t) for t in tasks}
        kv = sum(r["kv_bytes"] for r in recs)
        kv_full = sum(r["kv_bytes_full"] for r in recs)
        st = negs.get(m)
        d = drift.get(m)
        neg_ratio = 0.0 if m == reference else (st.ratio if st else None)
        entry = {
            "score": _mean(v for v in task_scores.values()),
            "negative_ratio": neg_ratio,
            "negatives": 0 if st is None else len(st.negatives),
            "length_change_mean": d.length_change_mean if d else None,
            "length_change_median": d.length_change_median if d else None,
            "share_longer": d.share_longer if d else None,
            "share_hit_limit": d.share_hit_limit if d else sum(r["finish_reason"] == "length" for r in recs) / len(recs),
            "extra_tokens_mean": d.extra_tokens_mean if d else None,
            "extra_time_est_s": d.extra_time_est_s if d else None,
            "e2e_change_s": d.e2e_change_s if d else None,
            "exact_agreement": d.exact_agreement if d else None,
            "rouge_l_to_reference": d.rouge_l_to_reference if d else None,
            "compression": kv_full / kv if kv else None,
            "kv_bytes": kv / len(recs),
            "kv_bytes_full": kv_full / len(recs),
            "prefill_s": _mean(r["prefill_s"] for r in recs),
            "decode_s": _mean(r["decode_s"] for r in recs),
            "output_tokens": _mean(r["output_tokens"] for r in recs),
            "samples": len(recs),
            "uncompressed_samples": sum(r["kv_bytes"] >= r["kv_bytes_full"] for r in recs),
            "note": None,
            "tasks": {},
        }
        if m != "full" and entry["uncompressed_samples"] == len(recs):
            entry["note"] = (
                "no sample was stored compressed (measured KV bytes >= uncompressed in every sample): the "
                "budget may exceed every prompt, or the method was not in effect"
            )
        for t in tasks:
            trecs = [r for r in recs if r["task"] == t]
            if not trecs:
                continue
            td = length_drift([r for r in records if r["task"] == t and r["method"] in (m, reference)],
                              reference, with_rouge=True).get(m) if reference else None
            entry["tasks"][t] = {
                "score": task_scores[t],
                "negative_ratio": 0.0 if m == reference and task_scores[t] is not None
                else (st.task_ratio(t) if st else None),
                "samples": len(trecs),
                "length_change_mean": td.length_change_mean if td and td.n else None,
                "exact_agreement": td.exact_agreement if td and td.n else None,
                "rouge_l_to_reference": td.rouge_l_to_reference if td and td.n else None,
            }
        out["methods"][m] = entry
    out["combined"] = {}
    for name, group in method_groups([m for m in methods if m in negs], reference).items():
        c = combined(negs, group)
        out["combined"][name] = {
            "methods": group, "negative_ratio": c.ratio, "negatives": len(c.negatives), "scored": len(c.scored),
            "tasks": {t: {"negative_ratio": c.task_ratio(t)} for t in sorted(c.by_task)},
        }
    return out, negs


# ------------------------------------------------------------------------------------------ hard set


def hardset_rows(records: Sequence[dict], samples: Mapping[tuple[str, str], Sample],
                 negs: Mapping[str, NegativeStats], reference: str | None) -> list[dict]:
    """One row per sample negative for at least one method: the sample (all that is needed to run
    and score it again), the reference output and score, every method's output and score."""
    by = {(r["method"], r["task"], r["id"]): r for r in records}
    keys: dict[tuple[str, str], list[str]] = {}
    for m, st in negs.items():
        for k in sorted(st.negatives):
            keys.setdefault(k, []).append(m)
    rows = []
    for k, ms in keys.items():
        s = samples.get(k)
        if s is None:
            continue
        ref = by.get((reference, *k), {})
        row = s.to_dict()
        row.update({
            "reference_method": reference, "reference_output": ref.get("output"), "reference_score": ref.get("score"),
            "negative_for": ms,
            "method": ms[0], "method_output": by[(ms[0], *k)].get("output"), "method_score": by[(ms[0], *k)]["score"],
            "outputs": {m: by[(m, *k)].get("output") for m in ms},
            "scores": {m: by[(m, *k)].get("score") for m in ms},
        })
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- plots


def _plots(run_dir: Path, summary: dict, records: Sequence[dict], reference: str | None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    ms = summary["methods"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, e in ms.items():
        if e["score"] is None or not e["compression"]:
            continue
        ax.scatter(e["compression"], e["score"], s=40)
        ax.annotate(m, (e["compression"], e["score"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV compression (uncompressed bytes / stored bytes)")
    ax.set_ylabel("score (mean over tasks)")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy vs compression")
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy_vs_compression.png", dpi=110)
    plt.close(fig)
    files["accuracy"] = "accuracy_vs_compression.png"

    others = [m for m in ms if m != reference]
    tasks = [t for t in summary["tasks"] if any(ms[m]["tasks"].get(t, {}).get("negative_ratio") is not None
                                                  for m in others)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) + 2), 4))
    width = 0.8 / max(len(others), 1)
    for i, m in enumerate(others):
        vals = [ms[m]["tasks"].get(t, {}).get("negative_ratio") or 0.0 for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], vals, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=20, fontsize=8)
    ax.set_ylabel("negative ratio")
    ax.set_title("Negative samples per task")
    if others:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "negative_ratio_by_task.png", dpi=110)
    plt.close(fig)
    files["negatives"] = "negative_ratio_by_task.png"

    if reference:
        drift = length_drift(records, reference, with_rouge=False)
        ref_tokens = [r["output_tokens"] for r in records if r["method"] == reference]
        show = [m for m in others if m in drift][:12]
        fig, axes = plt.subplots(max(len(show), 1), 2, figsize=(9, 2.4 * max(len(show), 1)), squeeze=False)
        for i, m in enumerate(show):
            toks = [r["output_tokens"] for r in records if r["method"] == m]
            a, b = axes[i]
            a.hist(drift[m].changes, bins=20, color="tab:orange")
            a.axvline(0, color="k", lw=0.8)
            a.set_title(f"{m}: relative length change vs {reference}", fontsize=8)
            hi = max(ref_tokens + toks + [1])
            bins = [hi * j / 20 for j in range(21)]
            b.hist(ref_tokens, bins=bins, alpha=0.5, label=reference)
            b.hist(toks, bins=bins, alpha=0.5, label=m)
            b.set_title("output tokens", fontsize=8)
            b.legend(fontsize=7)
        if not show:
            axes[0][0].text(0.5, 0.5, "no method besides the reference", ha="center")
        fig.tight_layout()
        fig.savefig(run_dir / "length_shift.png", dpi=100)
        plt.close(fig)
        files["drift"] = "length_shift.png"
    return files


# -------------------------------------------------------------------------------------------- html


def _f(x, pct: bool = False, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{100 * x:.1f}%" if pct else f"{x:.{digits}f}"
    return str(x)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _prompt_text(s: Sample | None) -> str:
    if s is None:
        return ""
    if isinstance(s.prompt, str):
        return s.prompt
    return "\n".join(str(m.get("content", "")) for m in s.prompt)


def summary_table(summary: dict, markdown: bool = True) -> str:
    """The per-method summary as a Markdown table (the CLI prints it)."""
    tasks = summary["tasks"]
    head = ["method", "score", "neg. ratio", "compression", "KV MiB", "len. change", "longer"] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, e in summary["methods"].items():
        cells = [m, _f(e["score"]), _f(e["negative_ratio"], True), _f(e["compression"], digits=2) + "x"
                 if e["compression"] else "–", f"{e['kv_bytes'] / 2**20:.2f}", _f(e["length_change_mean"], True),
                 _f(e["share_longer"], True)]
        for t in tasks:
            te = e["tasks"].get(t, {})
            sc, nr = te.get("score"), te.get("negative_ratio")
            cells.append(_f(sc) + (f" ({_f(nr, True)} neg)" if nr is not None and m != summary["reference"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{m}: {e['note']}" for m, e in summary["methods"].items() if e.get("note")]
    return "\n".join(lines + [f"\nWARNING {n}" for n in notes])


def _html(summary: dict, records: Sequence[dict], samples: Mapping[tuple[str, str], Sample],
          negs: Mapping[str, NegativeStats], reference: str | None, files: Mapping[str, str]) -> str:
    esc = html.escape
    ms = summary["methods"]
    tasks = summary["tasks"]
    rows = []
    for m, e in ms.items():
        rows.append([esc(m), _f(e["score"]), _f(e["negative_ratio"], True),
                     _f(e["compression"], digits=2), f"{e['kv_bytes'] / 2**20:.3f}", _f(e["prefill_s"]),
                     _f(e["decode_s"]), _f(e["output_tokens"], digits=1)]
                    + [_f(e["tasks"].get(t, {}).get("score")) + (
                        f" <small>({_f(e['tasks'][t]['negative_ratio'], True)})</small>"
                        if m != reference and e["tasks"].get(t, {}).get("negative_ratio") is not None else "")
                       for t in tasks])
    summary_html = _table(["method", "score", "negative ratio", "compression", "KV MiB/sample", "prefill s",
                           "decode s", "output tok"] + tasks, rows)
    comb = _table(["group", "methods", "negative ratio", "negatives", "scored"],
                  [[esc(g), esc(", ".join(c["methods"])), _f(c["negative_ratio"], True), str(c["negatives"]),
                    str(c["scored"])] for g, c in summary.get("combined", {}).items()]) \
        if summary.get("combined") else "<p>No method besides the reference.</p>"
    drift_rows = [[esc(m), _f(e["length_change_mean"], True), _f(e["length_change_median"], True),
                   _f(e["share_longer"], True), _f(e["share_hit_limit"], True), _f(e["extra_tokens_mean"], digits=2),
                   _f(e["extra_time_est_s"], digits=4), _f(e["e2e_change_s"], digits=4)] for m, e in ms.items()]
    drift_html = _table(["method", "mean rel. change", "median rel. change", "share longer", "share at limit",
                         "extra tokens", "est. extra time s (extra × TPOT)", "measured E2E change s"], drift_rows)
    agree_rows = []
    for m, e in ms.items():
        agree_rows.append([esc(m), _f(e["exact_agreement"], True), _f(e["rouge_l_to_reference"])]
                          + [_f(e["tasks"].get(t, {}).get("exact_agreement"), True) + " / "
                             + _f(e["tasks"].get(t, {}).get("rouge_l_to_reference")) for t in tasks])
    agree_html = _table(["method", "exact-equal share", "ROUGE-L to reference"]
                        + [f"{t} (equal / ROUGE-L)" for t in tasks], agree_rows)

    by = {(r["method"], r["task"], r["id"]): r for r in records}
    worst = []
    for m, st in negs.items():
        for k in st.negatives:
            ref, rec = by.get((reference, *k)), by.get((m, *k))
            if ref and rec:
                worst.append((ref["score"] - rec["score"], m, k, ref, rec))
    worst.sort(key=lambda w: (-w[0], w[1], w[2]))
    items = []
    for _gap, m, k, ref, rec in worst[:WORST]:
        s = samples.get(k)
        prompt = _prompt_text(s)
        tail = prompt if len(prompt) <= 600 else "…" + prompt[-600:]
        gold = ", ".join(s.references) if s and s.references else "(no gold)"
        items.append(
            f"<div class='neg'><h3>{esc(k[0])} / {esc(k[1])} — {esc(m)} "
            f"(reference {ref['score']:.2f} → {rec['score']:.2f})</h3>"
            f"<p><b>gold:</b> {esc(gold)}</p><details><summary>prompt (tail)</summary><pre>{esc(tail)}</pre></details>"
            f"<table class='side'><tr><th>{esc(str(reference))}</th><th>{esc(m)}</th></tr>"
            f"<tr><td><pre>{esc(ref.get('output', ''))}</pre></td><td><pre>{esc(rec.get('output', ''))}</pre></td>"
            f"</tr></table></div>")
    worst_html = "".join(items) or "<p>No negative samples.</p>"

    def img(key: str, alt: str) -> str:
        return f"<img src='{files[key]}' alt='{esc(alt)}'>" if key in files else "<p>(no reference: no plot)</p>"

    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>kvshrink eval report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1300px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; }}
table.side td {{ width: 50%; }} pre {{ white-space: pre-wrap; margin: 0; font-size: 12px; }}
img {{ max-width: 100%; }} .neg {{ border-top: 1px solid #999; margin-top: 1em; }}
</style></head><body>
<h1>kvshrink eval report</h1>
<p>Reference: <b>{esc(str(reference))}</b>. Negative sample: reference score ≥ task {esc(summary['neg_filter'])}
reference score, reference score &gt; 0, method score ≤ reference × (1 − {summary['neg_threshold']}).
Scores in [0, 1]; a method's score is the mean of its task scores; gold-less tasks with a metric
(summarize) are scored by ROUGE-L against the reference output.</p>
<h2 id="summary">Summary</h2>
{summary_html}
<h2 id="accuracy-compression">Accuracy vs compression</h2>
{img("accuracy", "accuracy vs compression")}
<h2 id="negatives">Negative ratio per task</h2>
{img("negatives", "negative ratio per task")}
<h3 id="combined">Combined negative sets</h3>
{comb}
<h2 id="length-drift">Length drift</h2>
{drift_html}
{img("drift", "length shift distributions")}
<h2 id="agreement">Agreement with the reference output</h2>
{agree_html}
<h2 id="worst-negatives">Worst negative samples</h2>
{worst_html}
</body></html>
"""


def write_report(run_dir: str | Path, records: Sequence[dict], samples: Sequence[Sample], methods: Sequence[str],
                 reference: str | None = "full", threshold: float = 0.1, filter: str = "median") -> dict:
    """Write ``summary.json``, ``hardset.jsonl``, ``records.csv``, the plots and ``report.html``."""
    run_dir = Path(run_dir)
    smap = {(s.task, s.id): s for s in samples}
    recs = effective_records(records, smap, reference)
    summary, negs = build_summary(recs, methods, reference, threshold, filter)
    results.write_json_atomic(run_dir / "summary.json", summary)
    rows = hardset_rows(recs, smap, negs, reference)
    tmp = run_dir / ".hardset.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(run_dir / "hardset.jsonl")
    results.write_csv(run_dir / "records.csv", [{k: v for k, v in r.items() if k != "output"} for r in recs])
    files = _plots(run_dir, summary, recs, reference)
    page = _html(summary, recs, smap, negs, reference, files)
    tmp = run_dir / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(run_dir / "report.html")
    return summary
