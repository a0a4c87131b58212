"""A method's output length for a prompt, learnt from the length-drift records of ``kvshrink eval``.

Pairs: every record of a method ``m`` with the reference (``full``) record of the same prompt (same
run directory, task and id). With ``r`` the reference's output tokens and ``y`` the method's, the
model is a ridge regression (closed form) of the log length ratio::

    t = log(max(y, 1) / max(r, 1)) = o_m + w · x,      ŷ = clip(max(r, 1) exp(o_m + w · x), 1, max_new_tokens)

    o_m = mean of t over the method's pairs,   w = argmin ||X w - (t - o)||² + λ ||w||²
    (standardised features, unpenalised intercept)

λ is chosen by 3-fold validation over the training prompts among a grid whose top (1e9) leaves only
``o_m`` (the method's geometric-mean ratio), next to "same length as full": a set too small for the
features falls back to the better of those. An unseen method takes the mean ``o`` of its family.

Pairs whose reference stopped at the token limit are left out of the ratio model's training (their
ratio is censored) and predicted by it, then clipped at the limit. Features ``x``: intercept;
log(1 + prompt tokens); log(1 + r); r / limit;
task one-hot; selector and codec one-hot (the method family); c = log2(compression) (uncompressed /
stored KV bytes); c and log(1 + r) each by selector and by codec; c x log(1 + r); cheap prompt features when the run's ``samples.jsonl``
has the prompt (log(1 + lines), a question mark). Without a reference length a second model fits
``log(1 + y)`` from the same features minus the reference terms.

Baselines: "same length as full" (``ŷ = r``) and "full times the method's mean ratio"
(``ŷ = r * mean(y / max(r, 1))`` over the method's training pairs). Evaluation is K-fold over
*prompts*: a prompt's records of every method are held out together.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REFERENCE = "full"


@dataclass
class Pair:
    method: str
    task: str
    prompt: str  # key of the prompt: run directory, task, id
    prompt_tokens: int
    ref_tokens: int
    ref_at_limit: bool
    max_new_tokens: int
    compression: float
    output_tokens: int
    selector: str = "full"
    codec: str = "fp"
    prompt_lines: int = 0
    question: bool = False


def _names(spec: str) -> tuple[str, str]:
    try:
        from kvshrink.methods import parse

        m = parse(spec)
        return m.selector.name, m.codec.name
    except Exception:  # noqa: BLE001 - a spec from an older registry: its part names are still informative
        names = [p.split(":")[0] for p in spec.split("+")]
        return names[0], (names[1] if len(names) > 1 else "fp")


def _prompt_text(s: Mapping) -> str:
    p = s.get("prompt", "")
    return p if isinstance(p, str) else "\n".join(str(m.get("content", "")) for m in p)


def pairs_from_records(records: Iterable[Mapping], run: str = "", samples: Mapping[tuple, Mapping] | None = None,
                       reference: str = REFERENCE) -> list[Pair]:
    """Method/reference pairs of one run's records (the last record of a key wins, as in eval)."""
    by: dict[tuple, Mapping] = {}
    for r in records:
        if r.get("output_tokens") is None or "method" not in r:
            continue
        by[(r["method"], r["task"], r["id"])] = r
    names: dict[str, tuple[str, str]] = {}
    out = []
    for (m, task, sid), r in by.items():
        ref = by.get((reference, task, sid))
        if m == reference or ref is None:
            continue
        if m not in names:
            names[m] = _names(m)
        limit = int(r.get("max_new_tokens") or ref.get("max_new_tokens") or max(r["output_tokens"], 1))
        kv, kvf = r.get("kv_bytes"), r.get("kv_bytes_full")
        text = _prompt_text(samples[(task, sid)]) if samples and (task, sid) in samples else ""
        out.append(Pair(
            method=m, task=task, prompt=f"{run}|{task}|{sid}", prompt_tokens=int(r.get("prompt_tokens") or 0),
            ref_tokens=int(ref["output_tokens"]), ref_at_limit=ref.get("finish_reason") == "length",
            max_new_tokens=limit, compression=float(kvf) / float(kv) if kv and kvf else 1.0,
            output_tokens=int(r["output_tokens"]), selector=names[m][0], codec=names[m][1],
            prompt_lines=text.count("\n") + 1 if text else 0, question="?" in text,
        ))
    return out


def load_pairs(run_dirs: Sequence[str | Path]) -> list[Pair]:
    """Pairs from eval run directories (each with ``records.jsonl``; ``samples.jsonl`` when present)."""
    from kvshrink.results import Records

    out: list[Pair] = []
    for d in run_dirs:
        d = Path(d)
        if not (d / "records.jsonl").is_file():
            raise FileNotFoundError(f"{d}: no records.jsonl (give an eval run directory)")
        samples = {}
        if (d / "samples.jsonl").is_file():
            for s in Records(d / "samples.jsonl"):
                samples[(s.get("task"), s.get("id"))] = s
        out += pairs_from_records(Records(d / "records.jsonl"), str(d), samples)
    return out


# ------------------------------------------------------------------------------------------ features


@dataclass
class Vocab:
    tasks: list[str]
    selectors: list[str]
    codecs: list[str]

    @classmethod
    def of(cls, pairs: Sequence[Pair]) -> Vocab:
        return cls(sorted({p.task for p in pairs}), sorted({p.selector for p in pairs}),
                   sorted({p.codec for p in pairs}))

    def names(self, with_ref: bool) -> list[str]:
        ref = ["log_ref", "ref_over_limit", "log2c_x_log_ref"] if with_ref else ["log_limit"]
        fam = [f"sel={s}" for s in self.selectors] + [f"codec={c}" for c in self.codecs]
        return (["log_prompt", *ref, "log2c", "prompt_lines", "question"] + [f"task={t}" for t in self.tasks]
                + fam + [f"log2c_x_{f}" for f in fam] + ([f"log_ref_x_{f}" for f in fam] if with_ref else []))


def _row(p: Pair, v: Vocab, with_ref: bool) -> list[float]:
    c = math.log2(max(p.compression, 1.0))
    lr = math.log1p(p.ref_tokens)
    ref = ([lr, p.ref_tokens / max(p.max_new_tokens, 1), c * lr] if with_ref
           else [math.log1p(p.max_new_tokens)])
    fam = [float(p.selector == s) for s in v.selectors] + [float(p.codec == k) for k in v.codecs]
    return ([math.log1p(p.prompt_tokens), *ref, c, math.log1p(p.prompt_lines), float(p.question)]
            + [float(p.task == t) for t in v.tasks] + fam + [c * f for f in fam]
            + ([lr * f for f in fam] if with_ref else []))


def _target(p: Pair, with_ref: bool) -> float:
    return math.log(max(p.output_tokens, 1) / max(p.ref_tokens, 1)) if with_ref else math.log1p(p.output_tokens)


LAMBDAS = (0.3, 3.0, 30.0, 300.0, 1e9)  # 1e9: the features' weights vanish, the method's mean ratio is left


@dataclass
class Ridge:
    """``t ≈ b + Σ w_j (x_j - μ_j) / σ_j``, ``(w, b) = argmin ||X̃w + b - t||² + λ||w||²`` (closed form)."""

    names: list[str]
    mean: list[float]
    std: list[float]
    coef: list[float]
    intercept: float
    lam: float

    @classmethod
    def fit(cls, X: np.ndarray, t: np.ndarray, names: list[str], lam: float = 1.0) -> Ridge:
        mu, sd = X.mean(axis=0), X.std(axis=0)
        sd[sd < 1e-12] = 1.0  # a constant column (e.g. a one-hot never set) stays at weight 0
        Z = (X - mu) / sd
        b = float(t.mean())
        w = np.linalg.solve(Z.T @ Z + lam * np.eye(Z.shape[1]), Z.T @ (t - b))
        return cls(names, mu.tolist(), sd.tolist(), w.tolist(), b, lam)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.intercept + ((X - np.array(self.mean)) / np.array(self.std)) @ np.array(self.coef)


def _folds(pairs: Sequence[Pair], k: int, seed: int) -> list[tuple[list[Pair], list[Pair]]]:
    """K (train, test) splits over prompts: a prompt's records of every method go to one side."""
    prompts = sorted({p.prompt for p in pairs})
    random.Random(seed).shuffle(prompts)
    k = max(2, min(k, len(prompts)))
    fold = {pr: i % k for i, pr in enumerate(prompts)}
    return [([p for p in pairs if fold[p.prompt] != f], [p for p in pairs if fold[p.prompt] == f]) for f in range(k)]


@dataclass
class LengthPredictor:
    vocab: Vocab
    with_ref: Ridge
    without_ref: Ridge
    compression: dict[str, float]  # method -> mean compression in training (when a query gives none)
    mean_ratio: dict[str, float] = field(default_factory=dict)  # method -> mean y / r (baseline)
    offsets: dict[str, float] = field(default_factory=dict)  # method -> mean log ratio (the ridge fits the rest)
    offset_default: float = 0.0
    mode: str = "ridge"  # "ridge" | "same" (inner validation found nothing better than full's length)

    @classmethod
    def fit(cls, pairs: Sequence[Pair], lam: float | None = None, seed: int = 0) -> LengthPredictor:
        """Fit on ``pairs``; ``lam=None`` chooses λ (or "same as full") by 3-fold validation over the
        training prompts, so a small or noisy set falls back to the method's mean ratio or to full."""
        if len(pairs) < 2:
            raise ValueError(f"need at least 2 method/reference pairs to fit, got {len(pairs)}")
        mode = "ridge"
        if lam is None:
            lam, mode = cls._select(pairs, seed)
        v = Vocab.of(pairs)
        # a reference cut at the limit only bounds the ratio (the method might have gone on): such pairs
        # would teach "ratio 1" to every method, so the ratio model learns from the others
        free = [p for p in pairs if not p.ref_at_limit] or list(pairs)
        by: dict[str, list[Pair]] = {}
        for p in free:
            by.setdefault(p.method, []).append(p)
        offsets = {m: float(np.mean([_target(p, True) for p in ps])) for m, ps in by.items()}
        default = float(np.mean([_target(p, True) for p in free]))
        X = np.array([_row(p, v, True) for p in free])
        t = np.array([_target(p, True) - offsets[p.method] for p in free])
        with_ref = Ridge.fit(X, t, v.names(True), lam)
        X = np.array([_row(p, v, False) for p in pairs])
        without = Ridge.fit(X, np.array([_target(p, False) for p in pairs]), v.names(False), lam)
        allm: dict[str, list[Pair]] = {}
        for p in pairs:
            allm.setdefault(p.method, []).append(p)
        return cls(v, with_ref, without, {m: float(np.mean([p.compression for p in ps])) for m, ps in allm.items()},
                   {m: float(np.mean([p.output_tokens / max(p.ref_tokens, 1) for p in ps])) for m, ps in allm.items()},
                   offsets, default, mode)

    @classmethod
    def _select(cls, pairs: Sequence[Pair], seed: int) -> tuple[float, str]:
        if len({p.prompt for p in pairs}) < 3:
            return 30.0, "ridge"
        y = []
        preds: dict[tuple[str, float], list[float]] = {("same", 0.0): []} | {("ridge", x): [] for x in LAMBDAS}
        for train, test in _folds(pairs, 3, seed + 1):
            if not test or len(train) < 2:
                continue
            y += [p.output_tokens for p in test]
            preds[("same", 0.0)] += baseline_same(test).tolist()
            for x in LAMBDAS:
                preds[("ridge", x)] += cls.fit(train, x).predict_pairs(test).tolist()
        err = {k: float(np.mean(np.abs(np.array(v) - np.array(y)))) for k, v in preds.items()}
        best = min(err.values())
        # the simplest candidate within 0.1% of the best: "same", then the largest λ
        for k in [("same", 0.0), *(("ridge", x) for x in reversed(LAMBDAS))]:
            if err[k] <= best * 1.001:
                return k[1] or 30.0, k[0]
        return 30.0, "ridge"  # pragma: no cover

    def _offset(self, p: Pair) -> float:
        if p.method in self.offsets:
            return self.offsets[p.method]
        # an unseen method: the mean offset of methods of the same family, else of all
        same = [o for m, o in self.offsets.items() if _names(m) == (p.selector, p.codec)]
        return float(np.mean(same)) if same else self.offset_default

    def predict_pairs(self, pairs: Sequence[Pair], use_ref: bool = True) -> np.ndarray:
        """Predicted output tokens for each pair (its ``output_tokens`` is not read)."""
        if not pairs:
            return np.zeros(0)
        X = np.array([_row(p, self.vocab, use_ref) for p in pairs])
        if use_ref:
            r = np.array([max(p.ref_tokens, 1) for p in pairs], dtype=float)
            if self.mode == "same":
                y = r
            else:
                y = r * np.exp(self.with_ref.predict(X) + np.array([self._offset(p) for p in pairs]))
        else:
            y = np.expm1(self.without_ref.predict(X))
        return np.clip(y, 1, np.array([p.max_new_tokens for p in pairs]))

    def predict(self, method: str, prompt_tokens: int, task: str, max_new_tokens: int,
                reference_tokens: int | None = None, reference_at_limit: bool | None = None,
                compression: float | None = None) -> float:
        """One prompt's expected output tokens under ``method`` (the simulator's per-request length)."""
        if method == REFERENCE and reference_tokens is not None:
            return float(reference_tokens)
        sel, codec = _names(method)
        comp = compression if compression is not None else self.compression.get(method, 1.0)
        r = int(reference_tokens) if reference_tokens is not None else 0
        at = bool(reference_at_limit) if reference_at_limit is not None else r >= max_new_tokens
        p = Pair(method, task, "", prompt_tokens, r, at, max_new_tokens, comp, 0, sel, codec)
        return float(self.predict_pairs([p], use_ref=reference_tokens is not None)[0])

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"kind": "length_predictor", **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> LengthPredictor:
        return cls(Vocab(**d["vocab"]), Ridge(**d["with_ref"]), Ridge(**d["without_ref"]), dict(d["compression"]),
                   dict(d.get("mean_ratio") or {}), dict(d.get("offsets") or {}), float(d.get("offset_default", 0.0)),
                   str(d.get("mode", "ridge")))

    @classmethod
    def load(cls, path: str | Path) -> LengthPredictor:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------- evaluation


def baseline_same(pairs: Sequence[Pair]) -> np.ndarray:
    return np.array([float(p.ref_tokens) for p in pairs])


def baseline_ratio(train: Sequence[Pair], test: Sequence[Pair]) -> np.ndarray:
    ratio: dict[str, list[float]] = {}
    for p in train:
        ratio.setdefault(p.method, []).append(p.output_tokens / max(p.ref_tokens, 1))
    mean = {m: float(np.mean(v)) for m, v in ratio.items()}
    return np.array([p.ref_tokens * mean.get(p.method, 1.0) for p in test])


def evaluate(pairs: Sequence[Pair], folds: int = 5, seed: int = 0, lam: float | None = None) -> dict:
    """Held-out MAE (tokens) per method and overall: the model (with and without the reference length)
    against the two baselines, by K-fold over prompts."""
    prompts = {p.prompt for p in pairs}
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 prompts with a reference and a method record, got {len(prompts)}")
    splits = _folds(pairs, folds, seed)
    preds: dict[str, list[float]] = {"model": [], "model_no_ref": [], "same_as_full": [], "full_x_mean_ratio": []}
    held: list[Pair] = []
    for train, test in splits:
        if not test or len(train) < 2:
            continue
        lp = LengthPredictor.fit(train, lam, seed)
        preds["model"] += lp.predict_pairs(test).tolist()
        preds["model_no_ref"] += lp.predict_pairs(test, use_ref=False).tolist()
        preds["same_as_full"] += baseline_same(test).tolist()
        preds["full_x_mean_ratio"] += baseline_ratio(train, test).tolist()
        held += test
    y = np.array([p.output_tokens for p in held], dtype=float)
    methods = sorted({p.method for p in held})

    def mae(sel: np.ndarray) -> dict[str, float]:
        return {k: float(np.mean(np.abs(np.array(v)[sel] - y[sel]))) for k, v in preds.items()}

    per = {m: {"n": int(s.sum()), "mean_output_tokens": float(y[s].mean()), **mae(s)}
           for m in methods for s in [np.array([p.method == m for p in held])]}
    return {"folds": len(splits), "prompts": len(prompts), "pairs": len(held),
            "overall": {"n": len(held), "mean_output_tokens": float(y.mean()), **mae(np.ones(len(held), bool))},
            "methods": per}


def format_evaluation(ev: dict) -> str:
    head = ["method", "n", "mean tokens", "MAE model", "MAE model (no ref.)", "MAE same as full",
            "MAE full x mean ratio"]
    lines = [f"held-out MAE in output tokens, {ev['folds']}-fold over {ev['prompts']} prompts", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in [*ev["methods"].items(), ("all", ev["overall"])]:
        lines.append("| " + " | ".join([name, str(e["n"]), f"{e['mean_output_tokens']:.1f}"] + [
            f"{e[k]:.2f}" for k in ("model", "model_no_ref", "same_as_full", "full_x_mean_ratio")]) + " |")
    return "\n".join(lines)
