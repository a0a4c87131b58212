"""Per-operator step-cost models fitted to raw profile points, with their fit quality.

The points are the records of a PROFILE directory as ``kvshrink profile`` writes them (kvshrink's
results format: ``config.json``, ``records.jsonl`` with one raw point a line, ``summary.json``)::

    {"kind": "prefill", "method": SPEC, "tokens": T, "seconds": t}
    {"kind": "decode",  "method": SPEC, "batch": B, "kv_tokens": K, "kv_read": R, "seconds": t}
    {"kind": "evict",   "method": SPEC, "cuts": n, "seconds": t}
    {"kind": "mixed",   "method": SPEC, "batch": B, "kv_tokens": K, "kv_read": R, "tokens": T, "seconds": t,
                        "prefill_seconds": t_T, "decode_seconds": t_B}   (the prompt alone, the batch alone)
    {"kind": "chunk",   "method": SPEC, "start": S, "tokens": N, "seconds": t}   (tokens [S, S+N) of a prompt)

(K: stored tokens of the batch per layer; R: the columns decode attention scores per layer, every
sequence padded to the batch's widest, ``simulate.decode_read``.) Each operator's time is linear in
its features with non-negative coefficients (no term can make more work cheaper)::

    prefill_s(T)   = c0 + c1 T + c2 T²        (one prompt; attention is quadratic)
    decode_s(B, R) = w(B) + c R                (w: piecewise linear through per-batch-size weights)
    evict_s(n)     = c1 n                      (no intercept)
    mixed_s(B, R, T) = prefill_s(T) + k decode_s(B, R)
    chunk_s(S, N)  = c0' + prefill_s(S+N) - prefill_s(S) + d N S

A *chunk* is the part [S, S+N) of a prompt split by ``max_prefill_tokens``, whose first S tokens are
already in the pool. ``prefill_s(S+N) - prefill_s(S)`` is its linear work and its attention over
itself and the prefix as a whole prompt would do them; measured, such a chunk costs more (on
2026-12-04, bf16, 624 tokens after 722: 10-14% more, every method), since its attention reads the
prefix from the pool's blocks. ``d`` (per token x prefix token) and the step's own fixed cost
``c0'`` are fitted to chunk points (``fit_chunk``); a profile without them charges the difference.

A *mixed* step is a decode batch and a prompt in one forward (chunked prefill packs them): the
weights are read once for all its rows, so the decode costs less than alone. How much less is
measured, not assumed (a first guess, a decode token costing a prompt token's linear work, said 90%
less; the engine on the reference machine saves 30-55%): ``k`` is fitted to the mixed points, each
timed next to the same prompt alone and the same batch alone (``fit_mixed``); a profile without
mixed points gives ``k = 1``.

``w(B)`` is what a decode step costs apart from reading the cache — the weight GEMMs, sampling, the
step's bookkeeping — at each profiled batch size ``b_j`` (the knots, ``w_j >= 0``), linearly
interpolated in between and continued past the last knot with the last segment's slope (never a
falling one). On a CPU this cost is neither linear nor monotone in the batch (a GEMM with M=4 costs
2.3x M=1 on the reference machine, and in its profiles a step of 8 or 16 sequences can cost less than
one of 7 or 15: the kernels' blocking in M), so it is measured per batch size rather than assumed. The basis is the hat functions of the knots, so the fit stays linear
and non-negative. A decode fit without knots (profiles written before them) is ``c0 + c1 B + c2 K``.

A method whose decode points all read about as many columns per sequence (an evicting selector holds
its budget at every profiled context: StreamingLLM's points read 160 columns a sequence whatever the
context) cannot tell the read term from the batch weights: any split fits its points, and the split
NNLS picks predicts nothing else. There the read coefficient is the one fitted for a method of the
same profile with the same codec whose points do vary the read (``full`` for an fp cache, ``kivi:bits=4``
for ``snapkv+kivi:bits=4``): a column costs what the codec's layout costs to read, whichever selector
chose it; the weights are fitted given it (``READ_SPREAD``; no such method: its own fit).

All fits are non-negative least squares on *relative* residuals (rows scaled by ``1/t``: a 1 ms and
a 1 s point weigh the same, the fit minimises Σ ((t - t̂)/t)²). Any other ``kind`` can be fitted with
``fit_operator(points, features)``. ``FittedCost`` answers ``prefill_s``/``decode_s``/``evict_s``, the
``StepCosts`` protocol of ``kvshrink.predict.simulate``, and ``decode_read_s`` (the padded read).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

OPERATORS: dict[str, tuple[str, ...]] = {
    "prefill": ("tokens", "tokens_sq"),
    "decode": ("kv_read",),  # plus the batch knots
    "evict": ("cuts",),
    "mixed": ("prefill_s", "decode_s"),  # derived from the method's prefill and decode fits (fit_mixed)
    "chunk": ("difference", "cross"),  # derived from the method's prefill fit (fit_chunk)
}
INTERCEPT = {"prefill": True, "decode": True, "evict": False, "mixed": False, "chunk": True}
DERIVED = ("mixed", "chunk")  # fitted after, and given, the method's prefill (and decode) fits
READ_SPREAD = 2.0  # decode points identify the read term when their columns per sequence vary this much
KNOTTED = {"decode": "batch"}  # operator -> the feature its piecewise-linear basis is over


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """``argmin ||A x - b||₂ subject to x >= 0`` (Lawson and Hanson's active-set method, 1974, ch. 23)."""
    m, n = A.shape
    passive = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    tol = 10 * np.finfo(float).eps * max(m, n) * max(np.abs(A).sum(axis=0).max(), 1.0)
    for _ in range(max_iter or 3 * n + 10):
        w = A.T @ (b - A @ x)
        if passive.all() or w[~passive].max() <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                x = z
                break
            neg = passive & (z <= tol)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def features_of(point: Mapping) -> dict[str, float]:
    """A point's features, with the derived ones (``tokens_sq = tokens²``; ``kv_read`` defaults to
    ``kv_tokens``: equal when the batch's sequences are equally long)."""
    out = {k: float(v) for k, v in point.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "tokens" in out:
        out.setdefault("tokens_sq", out["tokens"] ** 2)
    if "kv_tokens" in out:
        out.setdefault("kv_read", out["kv_tokens"])
    return out


def hat_basis(x: float, knots: Sequence[float]) -> list[float]:
    """The piecewise-linear basis of ``knots`` at ``x``: ``Σ_j w_j φ_j(x)`` interpolates the ``w_j``
    linearly between knots and continues the end segments' lines beyond them (there, one φ is
    negative; ``OperatorFit.predict`` keeps the continuation from falling)."""
    k = [float(v) for v in knots]
    phi = [0.0] * len(k)
    if len(k) == 1:
        phi[0] = 1.0
        return phi
    i = int(np.clip(np.searchsorted(k, x, side="right") - 1, 0, len(k) - 2))  # the segment [k_i, k_i+1]
    u = (x - k[i]) / (k[i + 1] - k[i])
    phi[i], phi[i + 1] = 1.0 - u, u
    return phi


def knot_name(feature: str, knot: float) -> str:
    return f"{feature}@{knot:g}"


@dataclass
class OperatorFit:
    op: str
    features: tuple[str, ...]
    intercept: float
    coef: dict[str, float]
    n: int
    mean_rel_error: float  # mean |t - t̂| / t over the points
    max_rel_error: float
    r2: float
    knot_feature: str | None = None  # the piecewise-linear term: over this feature ...
    knots: tuple[float, ...] = ()  # ... through these values, coefficient knot_name(feature, knot) each

    def _knotted(self, x: Mapping[str, float]) -> float:
        if not self.knots:
            return 0.0
        w = [self.coef[knot_name(self.knot_feature, k)] for k in self.knots]
        v = float(x.get(self.knot_feature, 0.0))
        if len(w) > 1 and not self.knots[0] <= v <= self.knots[-1]:
            # past the measured range: the end segment's slope, never a falling one (work grows)
            (a, wa), (b, wb) = ((self.knots[-2], w[-2]), (self.knots[-1], w[-1])) if v > self.knots[-1] else \
                ((self.knots[0], w[0]), (self.knots[1], w[1]))
            slope = max(0.0, (wb - wa) / (b - a))
            end, w_end = (b, wb) if v > self.knots[-1] else (a, wa)
            return max(0.0, w_end + slope * (v - end))
        return float(np.dot(w, hat_basis(v, self.knots)))

    def predict(self, x: Mapping[str, float]) -> float:
        return max(0.0, self.intercept + self._knotted(x) + sum(self.coef[f] * float(x.get(f, 0.0))
                                                                for f in self.features))

    def to_dict(self) -> dict:
        return {**asdict(self), "features": list(self.features), "knots": list(self.knots)}

    @classmethod
    def from_dict(cls, d: Mapping) -> OperatorFit:
        return cls(op=d["op"], features=tuple(d["features"]), intercept=float(d["intercept"]),
                   coef={k: float(v) for k, v in d["coef"].items()}, n=int(d["n"]),
                   mean_rel_error=float(d["mean_rel_error"]), max_rel_error=float(d["max_rel_error"]),
                   r2=float(d["r2"]), knot_feature=d.get("knot_feature"),
                   knots=tuple(float(k) for k in d.get("knots", ())))


def fit_operator(points: Sequence[Mapping], features: Sequence[str] | None = None, op: str | None = None,
                 intercept: bool | None = None, knots: Sequence[float] | None = None,
                 knot_feature: str | None = None, fixed: Mapping[str, float] | None = None) -> OperatorFit:
    """Fit ``t = c0 + w(x_knot) + Σ c_j x_j`` (every coefficient >= 0) to ``points`` (dicts with the
    features and ``seconds``). ``w`` is piecewise linear through ``knots`` of ``knot_feature``; for an
    operator of ``KNOTTED`` the knots default to the distinct values the points have (every measured
    batch size), ``knots=()`` turns them off (then the knot feature is an ordinary linear term).
    ``fixed``: coefficients given, not fitted (the rest is fitted to what they leave of each time)."""
    if op is None:
        op = str(points[0].get("kind", "?")) if points else "?"
    kf = knot_feature or KNOTTED.get(op)
    pts = [features_of(p) for p in points if p.get("seconds") is not None and float(p["seconds"]) > 0]
    if kf and knots is None:
        knots = sorted({p[kf] for p in pts if kf in p})
    knots = tuple(float(k) for k in knots or ())
    if list(knots) != sorted(set(knots)):
        raise ValueError(f"operator {op!r}: knots must be distinct and increasing, got {list(knots)}")
    feats = tuple(features if features is not None else OPERATORS.get(op, ()))
    if kf and not knots and kf not in feats:
        feats = (kf, *feats)
    if not feats and not knots:
        raise ValueError(f"operator {op!r}: no features given (known operators: {', '.join(OPERATORS)})")
    # the hats sum to 1 inside the knots' range: an intercept would be the same column again
    icpt = (INTERCEPT.get(op, True) if intercept is None else intercept) and not knots
    # every knot is a measured batch size, so the knots are determined; the other terms need points
    # beyond them (a decode profile of one context per batch size leaves the read term to NNLS, which
    # then gives it to the knots: right at that context, blind to others)
    n_params = len(feats) + icpt + len(knots)
    if len(pts) < (len(knots) if knots else n_params):
        raise ValueError(f"operator {op!r}: {len(pts)} points with time > 0 cannot fit {n_params} parameters")
    for f in (*feats, *([kf] if knots else [])):
        if any(f not in p for p in pts):
            raise ValueError(f"operator {op!r}: a point lacks feature {f!r}")
    fixed = dict(fixed or {})
    free = [f for f in feats if f not in fixed]
    cols = [[p[f] for f in free] for p in pts]
    if knots:
        cols = [hat_basis(p[kf], knots) + c for p, c in zip(pts, cols)]
    X = np.array(cols, dtype=float).reshape(len(pts), -1)
    y = np.array([p["seconds"] for p in pts])
    given = np.array([sum(v * p[f] for f, v in fixed.items()) for p in pts])  # the fixed terms' share
    A = np.hstack([np.ones((len(y), 1)), X]) if icpt else X
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0  # an all-zero feature keeps coefficient 0
    c = nnls(A / scale / y[:, None], (y - given) / y) / scale  # unit-range columns, relative-error rows
    pred = A @ c + given
    rel = np.abs(y - pred) / y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    rest = list(c[1:] if icpt else c)
    names = [knot_name(kf, k) for k in knots] + free
    coef = {f: float(v) for f, v in zip(names, rest)}
    coef.update({f: float(fixed[f]) for f in feats if f in fixed})
    return OperatorFit(op=op, features=feats, intercept=float(c[0]) if icpt else 0.0,
                       coef={k: coef[k] for k in [knot_name(kf, k) for k in knots] + list(feats)}, n=len(y),
                       mean_rel_error=float(rel.mean()), max_rel_error=float(rel.max()), r2=r2,
                       knot_feature=kf if knots else None, knots=knots)


@dataclass
class FittedCost:
    """One method's fitted step costs (the ``StepCosts`` protocol of ``kvshrink.predict.simulate``);
    an operator without points costs nothing."""

    method: str
    fits: dict[str, OperatorFit] = field(default_factory=dict)

    def _t(self, op: str, **x: float) -> float:
        f = self.fits.get(op)
        return f.predict(features_of(x)) if f is not None else 0.0

    def prefill_s(self, tokens: int) -> float:
        return self._t("prefill", tokens=tokens)

    def decode_s(self, batch: int, kv_tokens: float) -> float:
        """A decode step whose sequences are equally long (the read is the stored tokens)."""
        return self._t("decode", batch=batch, kv_tokens=kv_tokens, kv_read=kv_tokens)

    def decode_read_s(self, batch: int, kv_tokens: float, kv_read: float) -> float:
        """A decode step that reads ``kv_read`` columns per layer (``simulate.decode_read``: padded)."""
        return self._t("decode", batch=batch, kv_tokens=kv_tokens, kv_read=kv_read)

    def packed_decode_s(self, batch: int, kv_tokens: float, kv_read: float) -> float:
        """What a decode batch adds to a forward that also carries a prompt's tokens: ``k`` times
        what it costs alone (``fit_mixed``; no mixed fit: ``k = 1``, no saving)."""
        alone = self.decode_read_s(batch, kv_tokens, kv_read)
        mixed = self.fits.get("mixed")
        return alone if mixed is None else mixed.coef["decode_s"] * alone

    def chunk_s(self, start: int, end: int) -> float:
        """Tokens ``[start, end)`` of a prompt whose first ``start`` are in the pool (``fit_chunk``;
        no chunk fit: the difference of two prefills); ``start == 0`` is a whole prompt's start."""
        if start == 0:
            return self.prefill_s(end)
        fit = self.fits.get("chunk")
        x = chunk_features(self, start, end)
        return x["difference"] if fit is None else fit.predict(x)

    def evict_s(self, cuts: int) -> float:
        return self._t("evict", cuts=cuts)

    def to_dict(self) -> dict:
        return {"method": self.method, "fits": {op: f.to_dict() for op, f in self.fits.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> FittedCost:
        return cls(d["method"], {op: OperatorFit.from_dict(f) for op, f in d["fits"].items()})


def fit_points(points: Iterable[Mapping], time_key: str = "seconds") -> dict[str, FittedCost]:
    """``{method: FittedCost}`` over raw points of the ``OPERATORS`` kinds (others are skipped;
    evict points with no cut-backs carry no information and are dropped). ``time_key``: the time
    fitted (``cpu_seconds``: the profile's CPU-time samples; points without it are skipped)."""
    groups: dict[str, dict[str, list[Mapping]]] = {}
    for p in points:
        kind = str(p.get("kind", p.get("op", "")))
        if kind not in OPERATORS or (kind == "evict" and not p.get("cuts")) or p.get(time_key) is None:
            continue
        if time_key != "seconds":  # a mixed point's paired times too (prefill_cpu_seconds -> prefill_seconds)
            p = {**p, "seconds": p[time_key], **{k[: -len(time_key)] + "seconds": v for k, v in p.items()
                                                 if k.endswith("_" + time_key)}}
        groups.setdefault(str(p["method"]), {}).setdefault(kind, []).append(p)
    fits = {m: FittedCost(m, {op: fit_operator(pts, op=op) for op, pts in ops.items() if op not in DERIVED})
            for m, ops in groups.items()}
    identified = {m: read_identified(ops.get("decode", [])) for m, ops in groups.items()}
    for m, ops in groups.items():
        codec = _codec(m)
        if identified[m] or "decode" not in ops or codec is None:
            continue
        donor = next((d for d in groups if identified[d] and "decode" in fits[d].fits and _codec(d) == codec), None)
        if donor is not None:
            read = fits[donor].fits["decode"].coef["kv_read"]
            fits[m].fits["decode"] = fit_operator(ops["decode"], op="decode", fixed={"kv_read": read})
    for m, ops in groups.items():
        if ops.get("mixed") and {"prefill", "decode"} <= set(fits[m].fits):
            fits[m].fits["mixed"] = fit_mixed(fits[m], ops["mixed"])
        if ops.get("chunk") and "prefill" in fits[m].fits:
            fits[m].fits["chunk"] = fit_chunk(fits[m], ops["chunk"])
    return fits


def chunk_features(cost: FittedCost, start: int, end: int) -> dict[str, float]:
    """The chunk operator's features of tokens ``[start, end)``: the two prefills' difference and
    ``N S`` (the chunk's tokens times the prefix's)."""
    return {"difference": cost.prefill_s(end) - cost.prefill_s(start), "cross": float(end - start) * start}


def fit_chunk(cost: FittedCost, points: Sequence[Mapping]) -> OperatorFit:
    """``t = c0' + (prefill_s(S+N) - prefill_s(S)) + d N S`` over chunk points (``c0', d >= 0``; the
    difference's coefficient fixed at 1), on relative residuals."""
    derived = [{"kind": "chunk", "seconds": p["seconds"],
                **chunk_features(cost, int(p["start"]), int(p["start"]) + int(p["tokens"]))} for p in points]
    return fit_operator(derived, op="chunk", fixed={"difference": 1.0})


def fit_mixed(cost: FittedCost, points: Sequence[Mapping]) -> OperatorFit:
    """``t = prefill_s(T) + k decode_s(B, R)`` over mixed-step points, ``k >= 0`` fitted on relative
    residuals of the whole step. The prompt alone and the batch alone are the times measured next to
    each mixed step (``prefill_seconds``, ``decode_seconds``) where the point has them, else what
    the method's fits give."""
    derived = [{"kind": "mixed", "prefill_s": p.get("prefill_seconds") or cost.prefill_s(int(p["tokens"])),
                "decode_s": p.get("decode_seconds") or cost.decode_read_s(int(p["batch"]), float(p["kv_tokens"]),
                                                                          float(p["kv_read"])),
                "seconds": p["seconds"]} for p in points]
    return fit_operator(derived, op="mixed", fixed={"prefill_s": 1.0})


def read_identified(points: Sequence[Mapping]) -> bool:
    """Whether decode points vary the columns read per sequence enough to fit the read term."""
    per_seq = [features_of(p)["kv_read"] / p["batch"] for p in points if p.get("batch") and
               ("kv_read" in p or "kv_tokens" in p)]
    return bool(per_seq) and max(per_seq) >= READ_SPREAD * min(per_seq)


def _codec(method: str) -> str | None:
    from kvshrink.methods import parse
    from kvshrink.methods.base import SpecError

    try:
        return parse(method).codec.spec()
    except SpecError:  # a name this install does not know: no donor
        return None


def load_points(profile: str | Path) -> list[dict]:
    from kvshrink.results import Records

    path = Path(profile) / "records.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{profile}: not a profile directory (no records.jsonl)")
    return Records(path).load()


def fit_report(fits: Mapping[str, FittedCost]) -> str:
    """Coefficients and fit errors per method and operator, as a Markdown table."""
    lines = ["| method | operator | n | intercept s | coefficients | mean rel. error | max rel. error | R² |",
             "|---|---|---|---|---|---|---|---|"]
    for m, fc in fits.items():
        for op, f in fc.fits.items():
            coef = ", ".join(f"{k}={v:.3g}" for k, v in f.coef.items())
            lines.append(f"| {m} | {op} | {f.n} | {f.intercept:.3g} | {coef} | {f.mean_rel_error:.1%} | "
                         f"{f.max_rel_error:.1%} | {f.r2:.3f} |")
    return "\n".join(lines)
