"""Per-operator step-cost models fitted to raw profile points, with their fit quality.

The points are the records of a PROFILE directory as ``kvshrink profile`` writes them (kvshrink's
results format: ``config.json``, ``records.jsonl`` with one raw point a line, ``summary.json``)::

    {"kind": "prefill", "method": SPEC, "tokens": T, "seconds": t}
    {"kind": "decode",  "method": SPEC, "batch": B, "kv_tokens": K, "seconds": t}   (K: stored tokens read
                                                                                     per layer, all sequences)
    {"kind": "evict",   "method": SPEC, "cuts": n, "seconds": t}

Each operator's time is linear in its features with non-negative coefficients (time never falls as
work grows)::

    prefill_s(T)   = c0 + c1 T + c2 T²        (one prompt; attention is quadratic)
    decode_s(B, K) = c0 + c1 B + c2 K
    evict_s(n)     = c1 n                      (no intercept)

fitted by non-negative least squares on *relative* residuals (rows scaled by ``1/t``: a 1 ms and a
1 s point weigh the same, the fit minimises Σ ((t - t̂)/t)²). Any other ``kind`` can be fitted with
``fit_operator(points, features)``. ``FittedCost`` answers ``prefill_s``/``decode_s``/``evict_s``, the
``StepCosts`` protocol of ``kvshrink.predict.simulate``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

OPERATORS: dict[str, tuple[str, ...]] = {
    "prefill": ("tokens", "tokens_sq"),
    "decode": ("batch", "kv_tokens"),
    "evict": ("cuts",),
}
INTERCEPT = {"prefill": True, "decode": True, "evict": False}


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
    """A point's features, with the derived ones (``tokens_sq = tokens²``)."""
    out = {k: float(v) for k, v in point.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "tokens" in out:
        out.setdefault("tokens_sq", out["tokens"] ** 2)
    return out


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

    def predict(self, x: Mapping[str, float]) -> float:
        return max(0.0, self.intercept + sum(self.coef[f] * float(x.get(f, 0.0)) for f in self.features))

    def to_dict(self) -> dict:
        return {**asdict(self), "features": list(self.features)}

    @classmethod
    def from_dict(cls, d: Mapping) -> OperatorFit:
        return cls(op=d["op"], features=tuple(d["features"]), intercept=float(d["intercept"]),
                   coef={k: float(v) for k, v in d["coef"].items()}, n=int(d["n"]),
                   mean_rel_error=float(d["mean_rel_error"]), max_rel_error=float(d["max_rel_error"]),
                   r2=float(d["r2"]))


def fit_operator(points: Sequence[Mapping], features: Sequence[str] | None = None, op: str | None = None,
                 intercept: bool | None = None) -> OperatorFit:
    """Fit ``t = c0 + Σ c_j x_j`` (c >= 0) to ``points`` (dicts with the features and ``seconds``)."""
    if op is None:
        op = str(points[0].get("kind", "?")) if points else "?"
    feats = tuple(features or OPERATORS.get(op, ()))
    if not feats:
        raise ValueError(f"operator {op!r}: no features given (known operators: {', '.join(OPERATORS)})")
    icpt = INTERCEPT.get(op, True) if intercept is None else intercept
    pts = [features_of(p) for p in points if p.get("seconds") is not None and float(p["seconds"]) > 0]
    if len(pts) < len(feats) + icpt:
        raise ValueError(f"operator {op!r}: {len(pts)} points with time > 0 cannot fit "
                         f"{len(feats) + icpt} parameters")
    for f in feats:
        if any(f not in p for p in pts):
            raise ValueError(f"operator {op!r}: a point lacks feature {f!r}")
    X = np.array([[p[f] for f in feats] for p in pts])
    y = np.array([p["seconds"] for p in pts])
    A = np.hstack([np.ones((len(y), 1)), X]) if icpt else X
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0  # an all-zero feature keeps coefficient 0
    c = nnls(A / scale / y[:, None], np.ones_like(y)) / scale  # unit-range columns, relative-error rows
    pred = A @ c
    rel = np.abs(y - pred) / y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    coefs = c[1:] if icpt else c
    return OperatorFit(op=op, features=feats, intercept=float(c[0]) if icpt else 0.0,
                       coef={f: float(v) for f, v in zip(feats, coefs)}, n=len(y),
                       mean_rel_error=float(rel.mean()), max_rel_error=float(rel.max()), r2=r2)


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

    def decode_s(self, batch: int, kv_tokens: int) -> float:
        return self._t("decode", batch=batch, kv_tokens=kv_tokens)

    def evict_s(self, cuts: int) -> float:
        return self._t("evict", cuts=cuts)

    def to_dict(self) -> dict:
        return {"method": self.method, "fits": {op: f.to_dict() for op, f in self.fits.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> FittedCost:
        return cls(d["method"], {op: OperatorFit.from_dict(f) for op, f in d["fits"].items()})


def fit_points(points: Iterable[Mapping]) -> dict[str, FittedCost]:
    """``{method: FittedCost}`` over raw points of the ``OPERATORS`` kinds (others are skipped;
    evict points with no cut-backs carry no information and are dropped)."""
    groups: dict[str, dict[str, list[Mapping]]] = {}
    for p in points:
        kind = str(p.get("kind", p.get("op", "")))
        if kind not in OPERATORS or (kind == "evict" and not p.get("cuts")):
            continue
        groups.setdefault(str(p["method"]), {}).setdefault(kind, []).append(p)
    return {m: FittedCost(m, {op: fit_operator(pts, op=op) for op, pts in ops.items()}) for m, ops in groups.items()}


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
