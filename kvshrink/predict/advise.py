"""``kvshrink advise``: measured figures where they exist, predictions where they don't, ranked.

Inputs, per method (keys are canonical specs):
- ``Figures`` with ``kind="measured"``, read from result directories: eval summaries (negative-sample
  rate, length change, bytes per token), ``bench throughput`` runs (output tokens/s) and ``bench
  serve`` runs (throughput, TTFT, TPOT; goodput recomputed from the per-request records under the
  given SLO);
- ``Figures`` with ``kind="predicted"``: ``roofline_figures`` now, the simulator later (it fills the
  same dataclass).

Each cell of the table takes the first measured value, else the first predicted one, and is marked
with its kind. E2E with length drift, when no source gives it::

    E2E = TTFT + O (1 + Δ) TPOT          (O the workload's output tokens, Δ the mean relative length
                                          change against full; measured only when all three are)

Ranking: methods whose negative-sample rate is known and within ``--max-negative`` first, then those
with an unknown rate, then those over the limit; within a group by goodput under the SLO (when an
SLO is given and the figure exists), else by throughput; ties by bytes per token.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvshrink.predict.storage import canonical

MEASURED, PREDICTED = "measured", "predicted"
METRICS = ("throughput_tok_s", "goodput_req_s", "ttft_s", "tpot_s", "e2e_s", "length_change", "negative_rate",
           "bytes_per_token", "compression")
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class Figures:
    """What one source says about one method under the workload. Every figure is optional.

    The simulator fills one per method with ``kind="predicted"``, ``origin="simulator"``: output
    tokens/s, requests/s meeting the SLO, mean TTFT/TPOT/E2E in seconds (``e2e_includes_drift`` when
    its lengths came from the length predictor), and the bytes per token it admitted with."""

    method: str
    kind: str = PREDICTED  # MEASURED | PREDICTED
    origin: str = ""  # e.g. "bench serve runs/x", "roofline H100-80G", "simulator"
    throughput_tok_s: float | None = None  # output tokens/s
    goodput_req_s: float | None = None  # requests/s meeting every SLO
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None  # mean end-to-end seconds per request
    e2e_includes_drift: bool = False
    length_change: float | None = None  # mean relative output-length change vs full
    negative_rate: float | None = None  # share of negative samples vs full
    bytes_per_token: float | None = None  # stored KV bytes per token of context
    compression: float | None = None
    assumptions: list[str] = field(default_factory=list)


@dataclass
class Cell:
    value: float | None
    kind: str | None = None
    origin: str = ""

    @property
    def mark(self) -> str:
        return {MEASURED: "m", PREDICTED: "p"}.get(self.kind or "", "")


@dataclass
class Workload:
    name: str
    requests: int
    prompt: int
    output: int

    @property
    def label(self) -> str:
        return f"{self.name}={self.requests}x{self.prompt}x{self.output}"


@dataclass
class Criteria:
    max_negative: float = 0.05
    slo: dict[str, float] = field(default_factory=dict)  # ms, keys in SLO_KEYS


def parse_workload(spec: str) -> Workload:
    """``NAME=NxPxO``, ``NxPxO`` or a ``bench throughput`` workload name (its default size)."""
    name, eq, size = spec.partition("=")
    if not eq and "x" in spec and spec.replace("x", "").isdigit():
        name, size = "custom", spec
    from kvshrink.bench.throughput import WORKLOADS, parse_size

    if size:
        try:
            n, p, o = parse_size(size)
        except ValueError:
            raise ValueError(f"workload {spec!r}: want NAME=REQUESTSxPROMPTxOUTPUT, requests, prompt and output "
                             ">= 1, e.g. chat=64x512x256") from None
        return Workload(name, n, p, o)

    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; give NAME=NxPxO or one of {', '.join(WORKLOADS)}")
    n, p, o = WORKLOADS[name][0]
    return Workload(name, n, p, o)


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft:500,tpot:50"`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    out: dict[str, float] = {}
    for part in (text or "").replace(",", " ").split():
        k, sep, v = part.partition(":")
        try:
            ms = float(v.removesuffix("ms"))
        except ValueError:
            ms = -1.0
        if not sep or k not in SLO_KEYS or ms < 0:
            raise ValueError(f"--slo: {part!r} is not KEY:MS with KEY one of {', '.join(SLO_KEYS)} and MS >= 0")
        out[k] = ms
    return out


def parse_fraction(text: str | float) -> float:
    """``"5%"`` -> 0.05, ``"0.05"`` -> 0.05."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"--max-negative: {text!r} is not a share (5% or 0.05)") from None
    if not 0 <= v <= 1:
        raise ValueError(f"--max-negative: {text!r} is outside 0..100%")
    return v


def _key(spec: str) -> str:
    try:
        return canonical(spec)
    except ValueError:  # not a method spec (e.g. "hf-generate (one at a time)"): kept as written
        return spec


def _same_model(a: str | None, b: str | None) -> bool:
    def norm(x: str) -> str:
        return Path(str(x).rstrip("/")).name.lower().removesuffix(".json")

    return a is None or b is None or norm(a) == norm(b)


# ------------------------------------------------------------------------------------ measured results


def _eval_figures(d: Path, summ: dict) -> list[Figures]:
    from kvshrink.results import Records

    tokens: dict[str, list[float]] = {}
    if (d / "records.jsonl").is_file():  # bytes per token of context: Σ KV bytes / Σ (prompt + output)
        for r in Records(d / "records.jsonl"):
            if r.get("kv_bytes") is not None:
                t = tokens.setdefault(r["method"], [0.0, 0.0])
                t[0] += float(r["kv_bytes"])
                t[1] += float(r.get("prompt_tokens") or 0) + float(r.get("output_tokens") or 0)
    out = []
    for m, e in summ["methods"].items():
        t = tokens.get(m)
        out.append(Figures(
            method=_key(m), kind=MEASURED, origin=f"eval {d}", negative_rate=e.get("negative_ratio"),
            length_change=e.get("length_change_mean"), compression=e.get("compression"),
            bytes_per_token=t[0] / t[1] if t and t[1] else None))
    return out


def _bench_throughput_figures(d: Path, summ: dict, wl: Workload | None) -> tuple[list[Figures], list[str]]:
    cfg = summ.get("config") or {}
    sizes = cfg.get("workloads") or {}
    out, notes = [], []
    for r in summ.get("runs", []):
        name = r.get("workload")
        if wl is not None:
            size = sizes.get(name)
            if name != wl.name and list(size or ()) != [wl.requests, wl.prompt, wl.output]:
                notes.append(f"{d}: bench run {r['method']} @ {name} is another workload than {wl.label}: not used")
                continue
        if r.get("tokens_per_s") is None:
            continue
        out.append(Figures(method=_key(r["method"]), kind=MEASURED, origin=f"bench throughput {d} ({name})",
                           throughput_tok_s=float(r["tokens_per_s"])))
    return out, notes


def _goodput(reqs: Sequence[Mapping], duration_s: float, slo: Mapping[str, float]) -> float | None:
    """Requests meeting every SLO per second (bench serve's definition, a one-token request has TPOT 0)."""
    if not slo or duration_s <= 0:
        return None
    good = 0
    for r in reqs:
        if r.get("e2el_ms") is None:
            continue
        vals = {"ttft": r.get("ttft_ms"), "tpot": r.get("tpot_ms") or 0.0, "e2el": r.get("e2el_ms")}
        good += all(vals[k] is not None and vals[k] <= v for k, v in slo.items())
    return good / duration_s


def _bench_serve_figures(d: Path, summ: dict, wl: Workload | None, slo: Mapping[str, float]
                         ) -> tuple[list[Figures], list[str]]:
    from kvshrink.results import Records

    cfg = summ.get("config") or {}
    if wl is not None and str(cfg.get("dataset", "")).startswith("random") and (
            cfg.get("random_input_len"), cfg.get("random_output_len")) != (wl.prompt, wl.output):
        return [], [f"{d}: bench serve of {cfg.get('random_input_len')}+{cfg.get('random_output_len')} tokens is "
                    f"another workload than {wl.label}: not used"]
    recs = Records(d / "records.jsonl").load() if (d / "records.jsonl").is_file() else []
    best: dict[str, Figures] = {}
    for res in summ.get("results", []):
        if not res.get("completed"):
            continue
        m = _key(str(res.get("method")))
        rate = res.get("request_rate")
        mine = [r for r in recs if r.get("method") == res.get("method") and r.get("request_rate") == rate]
        f = Figures(method=m, kind=MEASURED, origin=f"bench serve {d} @ {rate} req/s",
                    throughput_tok_s=res.get("output_throughput"),
                    goodput_req_s=_goodput(mine, float(res.get("duration_s") or 0), slo) if mine else None,
                    ttft_s=_ms(res.get("mean_ttft_ms")), tpot_s=_ms(res.get("mean_tpot_ms")),
                    e2e_s=_ms(res.get("mean_e2el_ms")))
        old = best.get(m)
        if old is None or (f.throughput_tok_s or 0) > (old.throughput_tok_s or 0):
            if old is not None and (old.goodput_req_s or 0) > (f.goodput_req_s or 0):
                f.goodput_req_s = old.goodput_req_s  # goodput: the best rate for it
            best[m] = f
        elif (f.goodput_req_s or 0) > (old.goodput_req_s or 0):
            old.goodput_req_s = f.goodput_req_s
    return list(best.values()), []


def _ms(x) -> float | None:
    return float(x) / 1000 if x is not None else None


def load_results(dirs: Iterable[str | Path], workload: Workload | None = None, model: str | None = None,
                 slo: Mapping[str, float] | None = None) -> tuple[list[Figures], list[str]]:
    """Measured figures from eval, bench throughput and bench serve directories (a directory holding
    several runs, e.g. ``run-<hash>`` siblings, is searched one level down). Returns (figures, notes)."""
    figs: list[Figures] = []
    notes: list[str] = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise FileNotFoundError(f"results directory {d} not found")
        found = [d] if (d / "summary.json").is_file() else sorted(p.parent for p in d.glob("*/summary.json"))
        if not found:
            raise FileNotFoundError(f"{d}: no summary.json (give an eval or bench run directory)")
        for run in found:
            try:
                summ = json.loads((run / "summary.json").read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{run}/summary.json: not valid JSON ({e})") from None
            cfg = summ.get("config") or (json.loads((run / "config.json").read_text())
                                         if (run / "config.json").is_file() else {})
            if not _same_model(model, cfg.get("model")):
                notes.append(f"{run}: results of model {cfg.get('model')!r}, not {model!r}: not used")
                continue
            if isinstance(summ.get("methods"), dict) and "reference" in summ:
                figs += _eval_figures(run, summ)
            elif "runs" in summ:
                f, n = _bench_throughput_figures(run, summ, workload)
                figs, notes = figs + f, notes + n
            elif "results" in summ:
                f, n = _bench_serve_figures(run, summ, workload, slo or {})
                figs, notes = figs + f, notes + n
            else:
                notes.append(f"{run}: not an eval or bench summary: skipped")
    return figs, notes


# ------------------------------------------------------------------------------------------ roofline


def roofline_figures(costs: Sequence, workload: Workload, kv_memory: float | None,
                     length_change: Mapping[str, float] | None = None, slo: Mapping[str, float] | None = None,
                     max_batch: int = 1024) -> list[Figures]:
    """Closed-form serving figures from ``RooflineCost``s until the simulator fills ``Figures``.

    ``b`` = min(requests, sequences of ``P + O'`` tokens that fit the KV memory), ``O' = O (1 + Δ)``;
    all requests arrive at once, ``b`` are in flight, each is prefilled once (one at a time) and then
    decoded at the mean context ``P + O'/2``::

        cycle(b) = b t_prefill(P) + O' t_decode(b)         tokens/s = b O' / cycle(b)
        TTFT(b)  = (b + 1)/2 t_prefill(P)   (half the batch's prefills go first)
        E2E(b)   = cycle(b),  TPOT(b) = (E2E - TTFT) / (O' - 1)
        goodput  = max over b' <= b meeting every SLO of b' / cycle(b')  (requests/s)
    """
    out = []
    for cost in costs:
        lc = (length_change or {}).get(cost.method, 0.0) or 0.0
        o = max(1.0, workload.output * (1 + lc))
        final = int(math.ceil(workload.prompt + o))
        fit = cost.max_batch(final, kv_memory, prompt=workload.prompt)
        b = min(workload.requests, fit, max_batch)
        f = Figures(method=cost.method, kind=PREDICTED, origin=f"roofline {cost.hw.name}",
                    bytes_per_token=cost.st.bytes_per_token(final, workload.prompt),
                    compression=cost.st.compression(final, workload.prompt), e2e_includes_drift=True,
                    length_change=(length_change or {}).get(cost.method),
                    assumptions=[f"serving closed form: {b} in flight (of {workload.requests}; {fit} fit), "
                                 f"output {o:.0f} tokens (length change {lc:+.1%})"])
        if b < 1:
            f.assumptions.append("not one sequence fits the KV memory")
            out.append(f)
            continue
        t_pf = cost.prefill_s(workload.prompt)
        kept = cost.st.mean_kept_tokens(int(workload.prompt + o / 2), workload.prompt)
        cycle, ttft, tpot, tput = _closed_form(cost, b, t_pf, o, kept)
        f.throughput_tok_s, f.ttft_s, f.tpot_s, f.e2e_s = tput, ttft, tpot, cycle
        if slo:
            def ok(n: int, t_pf=t_pf, o=o, kept=kept, cost=cost) -> bool:
                c, t1, tp, _ = _closed_form(cost, n, t_pf, o, kept)
                return all({"ttft": t1, "tpot": tp, "e2el": c}[k] * 1000 <= v for k, v in slo.items())

            lo, hi = 0, b  # the largest feasible batch (TTFT, TPOT and E2E grow with it)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
            f.goodput_req_s = lo / _closed_form(cost, lo, t_pf, o, kept)[0] if lo else 0.0
            f.assumptions.append(f"goodput at {lo} in flight (the most meeting the SLO)")
        out.append(f)
    return out


def _closed_form(cost, n: int, t_pf: float, o: float, kept: float) -> tuple[float, float, float, float]:
    """(cycle = E2E, TTFT, TPOT, output tokens/s) with ``n`` in flight (``roofline_figures``' equations)."""
    cycle = n * t_pf + o * cost.decode_s(n, n * kept)
    ttft = (n + 1) / 2 * t_pf
    return cycle, ttft, (cycle - ttft) / max(o - 1, 1), n * o / cycle


# ------------------------------------------------------------------------------------------ combining


@dataclass
class Row:
    method: str
    cells: dict[str, Cell]
    group: int = 1  # 0: negative rate within the limit, 1: unknown, 2: over the limit
    rank: int = 0
    pareto: bool = False

    def v(self, k: str) -> float | None:
        return self.cells[k].value


def combine(figures: Sequence[Figures], workload: Workload | None = None) -> list[Row]:
    """One row per method: each metric from the first measured source, else the first predicted one;
    E2E with drift derived where no source gives it (see the module docstring)."""
    by: dict[str, list[Figures]] = {}
    for f in figures:
        by.setdefault(f.method, []).append(f)
    rows = []
    for m, fs in by.items():
        fs = sorted(fs, key=lambda f: f.kind != MEASURED)  # stable: measured first, then the given order
        cells = {}
        for k in METRICS:
            src = next((f for f in fs if getattr(f, k) is not None), None)
            cells[k] = Cell(getattr(src, k), src.kind, src.origin) if src else Cell(None)
        if m == "full" and cells["negative_rate"].value is None:
            cells["negative_rate"] = Cell(0.0, MEASURED, "the reference (0 by definition)")
        if m == "full" and cells["length_change"].value is None:
            cells["length_change"] = Cell(0.0, MEASURED, "the reference (0 by definition)")
        e2e = cells["e2e_s"]
        src = next((f for f in fs if f.e2e_s is not None), None)
        lc = cells["length_change"]
        if workload is not None and (src is None or not src.e2e_includes_drift):
            t1, tp = cells["ttft_s"], cells["tpot_s"]
            if t1.value is not None and tp.value is not None:
                d = lc.value or 0.0
                kinds = {t1.kind, tp.kind, lc.kind if lc.value is not None else PREDICTED}
                e2e = Cell(t1.value + workload.output * (1 + d) * tp.value,
                           MEASURED if kinds == {MEASURED} else PREDICTED, "TTFT + O (1 + Δ) TPOT")
        cells["e2e_drift_s"] = e2e
        rows.append(Row(m, cells))
    return rows


def rank(rows: list[Row], crit: Criteria) -> list[Row]:
    use_goodput = bool(crit.slo) and any(r.v("goodput_req_s") is not None for r in rows)
    primary = "goodput_req_s" if use_goodput else "throughput_tok_s"
    for r in rows:
        neg = r.v("negative_rate")
        r.group = 1 if neg is None else (0 if neg <= crit.max_negative + 1e-12 else 2)
    rows.sort(key=lambda r: (r.group, -(r.v(primary) if r.v(primary) is not None else -math.inf),
                             r.v("bytes_per_token") if r.v("bytes_per_token") is not None else math.inf))
    for i, r in enumerate(rows, 1):
        r.rank = i
    front = pareto_front([(r.v("throughput_tok_s"), r.v("negative_rate")) for r in rows])
    for r, on in zip(rows, front):
        r.pareto = on
    return rows


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Non-dominated points for (throughput up, negative rate down); points missing a coordinate are off."""
    out = []
    for i, (t, n) in enumerate(points):
        if t is None or n is None:
            out.append(False)
            continue
        out.append(not any(j != i and t2 is not None and n2 is not None and t2 >= t and n2 <= n
                           and (t2 > t or n2 < n) for j, (t2, n2) in enumerate(points)))
    return out


def _fmt(c: Cell, kind: str) -> str:
    if c.value is None:
        return "–"
    v = c.value
    s = {"pct": f"{100 * v:.1f}%", "signed_pct": f"{100 * v:+.1f}%", "kib": f"{v / 1024:.1f} KiB",
         "s": f"{v:.3g} s", "n": f"{v:.4g}"}[kind]
    return f"{s} ({c.mark})"


COLUMNS = (("throughput_tok_s", "throughput tok/s", "n"), ("goodput_req_s", "goodput req/s", "n"),
           ("e2e_drift_s", "E2E (drift)", "s"), ("length_change", "length change", "signed_pct"),
           ("negative_rate", "negative rate", "pct"), ("bytes_per_token", "KV bytes/token", "kib"))


def recommendation(rows: Sequence[Row], crit: Criteria) -> str:
    """One sentence: what to use and why."""
    if not rows:
        return "Nothing to recommend: no method has any figure."
    use_goodput = bool(crit.slo) and any(r.v("goodput_req_s") is not None for r in rows)
    key, what = ("goodput_req_s", "goodput under the SLO") if use_goodput else ("throughput_tok_s", "throughput")
    unit = "req/s" if use_goodput else "tok/s"
    lim = f"{100 * crit.max_negative:g}%"
    full = next((r for r in rows if r.method == "full"), None)
    top = rows[0]

    def val(r: Row) -> str:
        c = r.cells[key]
        if c.value is None:
            return f"no {what} figure"
        ratio = (f", {c.value / full.v(key):.2f}x full" if full is not None and full is not r and full.v(key)
                 else "")
        return f"{c.value:.4g} {unit} ({c.kind}{ratio})"

    faster = next((r for r in rows if r.group == 2 and r.v(key) is not None and top.v(key) is not None
                   and r.v(key) > top.v(key)), None)
    tail = (f"; {faster.method} is faster but has {100 * faster.v('negative_rate'):.1f}% negative samples"
            if faster else "")
    unknown = next((r for r in rows if r.group == 1 and r.v(key) is not None and top.v(key) is not None
                    and r.v(key) > top.v(key)), None)
    if top.group == 0 and unknown is not None:
        tail += (f"; {unknown.method} would give {val(unknown)} but its negative-sample rate is unknown "
                 f"(run `kvshrink eval` on it)")
    if top.group == 0 and top.v(key) is None:
        neg = top.cells["negative_rate"]
        return (f"Use {top.method}: within {lim} negative samples ({100 * neg.value:.1f}%, {neg.kind}), but no "
                f"method has a {what} figure to rank by (add bench results or --hardware){tail}.")
    if top.group == 0:
        neg = top.cells["negative_rate"]
        return (f"Use {top.method}: the highest {what} ({val(top)}) among methods with at most {lim} negative "
                f"samples ({100 * neg.value:.1f}%, {neg.kind}){tail}.")
    if top.group == 1:
        return (f"{top.method} has the highest {what} ({val(top)}) but no known negative-sample rate: run "
                f"`kvshrink eval` on it before relying on it{tail}.")
    return f"No method stays within {lim} negative samples; {top.method} comes closest{tail}."


def table(rows: Sequence[Row]) -> str:
    head = ["rank", "method"] + [c[1] for c in COLUMNS] + ["Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([str(r.rank), r.method] + [_fmt(r.cells[k], f) for k, _, f in COLUMNS]
                                       + ["*" if r.pareto else ""]) + " |")
    return "\n".join(lines + ["(m) measured, (p) predicted; * on the Pareto front of throughput vs negative rate"])


# -------------------------------------------------------------------------------------------- report


def plot_pareto(rows: Sequence[Row], path: Path, crit: Criteria) -> bool:
    """Throughput vs negative-sample rate; filled markers where both figures are measured. False when
    fewer than one point has both."""
    pts = [r for r in rows if r.v("throughput_tok_s") is not None and r.v("negative_rate") is not None]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in pts:
        x, y = r.v("throughput_tok_s"), 100 * r.v("negative_rate")
        measured = r.cells["throughput_tok_s"].kind == MEASURED and r.cells["negative_rate"].kind == MEASURED
        c = "tab:blue" if r.pareto else "tab:gray"
        ax.scatter([x], [y], s=50, edgecolors=c, facecolors=c if measured else "none", linewidths=1.5)
        ax.annotate(r.method, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = sorted((r for r in pts if r.pareto), key=lambda r: r.v("throughput_tok_s"))
    if len(front) > 1:
        ax.step([r.v("throughput_tok_s") for r in front], [100 * r.v("negative_rate") for r in front],
                where="pre", color="tab:blue", lw=1, alpha=0.6, label="Pareto front")
    ax.axhline(100 * crit.max_negative, color="tab:red", lw=0.8, ls="--", label=f"limit {100 * crit.max_negative:g}%")
    ax.set_xlabel("throughput (output tokens/s)")
    ax.set_ylabel("negative samples (%)")
    ax.set_title("Throughput vs negative samples (filled: measured, hollow: predicted)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _html(rows: Sequence[Row], rec: str, notes: Sequence[str], assumptions: Sequence[str], plot: str | None,
          title: str) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in ["rank", "method"] + [c[1] for c in COLUMNS] + ["Pareto"])
    body = []
    for r in rows:
        cells = [str(r.rank), esc(r.method)]
        for k, _, f in COLUMNS:
            c = r.cells[k]
            cells.append(f'<span title="{esc(c.origin)}">{esc(_fmt(c, f))}</span>')
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells + ["★" if r.pareto else ""]) + "</tr>")
    li = "".join(f"<li>{esc(x)}</li>" for x in assumptions) or "<li>none</li>"
    nl = "".join(f"<li>{esc(x)}</li>" for x in notes) or "<li>none</li>"
    img = f'<img src="{esc(plot)}" alt="Pareto front">' if plot else "<p>No method has both figures to plot.</p>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#f3f3f3}</style></head><body>"
            f"<h1>{esc(title)}</h1><p><b>{esc(rec)}</b></p><table><thead><tr>{head}</tr></thead><tbody>"
            f"{''.join(body)}</tbody></table><p>(m) measured, (p) predicted; hover a figure for its source.</p>"
            f"<h2>Pareto front</h2>{img}<h2>Assumptions of the predictions</h2><ul>{li}</ul>"
            f"<h2>Notes</h2><ul>{nl}</ul></body></html>")


def write_report(out: str | Path, config: dict, rows: Sequence[Row], rec: str, notes: Sequence[str],
                 assumptions: Sequence[str], crit: Criteria) -> Path:
    """``config.json``, ``summary.json``, ``pareto.png`` and ``report.html`` (kvshrink's results format)."""
    from kvshrink.results import open_run, write_json_atomic

    run = open_run(out, {"kind": "advise", **config})
    has_plot = plot_pareto(rows, run / "pareto.png", crit)
    summary = {"kind": "advise", "config": config, "recommendation": rec, "notes": list(notes),
               "assumptions": list(assumptions),
               "rows": [{"rank": r.rank, "method": r.method, "group": r.group, "pareto": r.pareto,
                         **{k: asdict(c) for k, c in r.cells.items()}} for r in rows]}
    write_json_atomic(run / "summary.json", summary)
    (run / "report.html").write_text(_html(rows, rec, notes, assumptions, "pareto.png" if has_plot else None,
                                           f"kvshrink advise: {config.get('model')} / {config.get('workload')}"))
    return run


def advise(figures: Sequence[Figures], crit: Criteria, workload: Workload | None = None) -> tuple[list[Row], str]:
    """Rows ranked and the recommendation, from any mix of measured and predicted ``Figures``."""
    rows = rank(combine(figures, workload), crit)
    return rows, recommendation(rows, crit)


__all__ = ["Cell", "Criteria", "Figures", "Row", "Workload", "advise", "combine", "load_results", "parse_fraction", "plot_pareto",
           "parse_slo", "parse_workload", "pareto_front", "rank", "recommendation", "roofline_figures", "table",
           "write_report"]
