"""A method's output length for a prompt, learnt from the length-drift records of ``kvshrink eval``.

Pairs: every record of a method ``m`` with the reference (``full``) record of the same prompt (same
run directory, task and id). With ``r`` the reference's output tokens and ``y`` the method's, the
learnt models (scikit-learn) fit the log length ratio around the method's mean::

    t = log(max(y, 1) / max(r, 1)),   o_m = mean of t over the method's training pairs
    ŷ = clip(max(r, 1) exp(o_m + f(x)), 1, max_new_tokens)

Candidates for ``f``, chosen **per method** by ``GroupKFold`` over the training prompts (3 folds, a
prompt's pairs of every method held out together), on held-out MAE in tokens, by the one-standard-error
rule (Hastie, Tibshirani and Friedman, *Elements of Statistical Learning*, 7.10): the simplest
candidate whose MAE is within one standard error of the best one's wins, in this order:

- ``same``: ``ŷ = r`` (no drift);
- ``ratio``: ``f = 0`` (the method's geometric-mean ratio);
- ``ridge(α)``: ``StandardScaler`` + ``Ridge(alpha=α)`` on ``t - o_m``, α from largest to smallest;
- ``gbr``: a small ``GradientBoostingRegressor`` (depth-2 trees, absolute-error loss: the median of
  the log ratio maps to the median length, which is what MAE rewards) on ``t - o_m``.

A method never seen in training takes the candidate best over all methods and the mean ``o`` of its
family (selector, codec), else of all methods. With fewer than 3 training prompts there is nothing to
validate on: ``ridge(30)``.

Censoring: pairs whose reference stopped at the token limit only bound the ratio (the method might
have gone on), so the ratio models learn from the other pairs. Such a pair is predicted by what the
method did on its training pairs whose reference also hit the limit, ``ŷ = limit * median(y / limit)``
(the median: MAE's optimum), when it has at least ``MIN_AT_LIMIT`` of them; else by the ratio model,
clipped at the limit ("same" predicts ``r`` there too). Features ``x``: log(1 + prompt tokens); log(1 + r); r / limit; c x log(1 + r);
c = log2(compression); cheap prompt features when the run's ``samples.jsonl`` has the prompt
(log(1 + lines), a question mark); task one-hot; selector and codec one-hot (the method family);
c and log(1 + r) each by selector and by codec.

Compression ``c``: the method's stored bytes against uncompressed ones *at the reference's length*
(prompt + r), from the method's storage model when the run's model config is known
(``kvshrink.predict.storage``; ``configs/`` ships the embedded model's). A record's own ``kv_bytes``
is measured after its output, so for a budget method (StreamingLLM, H2O) it grows with the very
length being predicted; it is the fallback only for runs whose model config cannot be found.

Without a reference length a second model fits ``log(1 + y)`` from the same features minus the
reference terms (ridge or gradient boosting, chosen in the same inner validation).

Baselines: "same length as full" (``ŷ = r``) and "full times the method's mean ratio"
(``ŷ = r * mean(y / max(r, 1))`` over the method's training pairs). Evaluation is K-fold over
*prompts* (``GroupKFold``): a prompt's records of every method are held out together.

A saved predictor (``to_dict``) is data, not a pickle: its training pairs and choices; loading refits
the same scikit-learn models (deterministic for a seed).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

REFERENCE = "full"
FORMAT_VERSION = 2  # 1: the closed-form ridge of kvshrink <= 0.x (coefficients saved), 2: pairs + choices


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


def _storage_compression(shape, spec: str, prompt: int, length: int) -> float | None:
    """The method's compression at ``length`` tokens from its storage model (None: not a known spec)."""
    from kvshrink.predict.storage import storage

    try:
        return float(storage(spec, shape).compression(max(length, 1), max(min(prompt, length), 1)))
    except Exception:  # noqa: BLE001 - an unknown or older spec: the measured bytes are the fallback
        return None


def pairs_from_records(records: Iterable[Mapping], run: str = "", samples: Mapping[tuple, Mapping] | None = None,
                       reference: str = REFERENCE, shape=None) -> list[Pair]:
    """Method/reference pairs of one run's records (the last record of a key wins, as in eval).

    ``shape`` (a ``ModelShape``): compression from the method's storage at the reference's length;
    without it, the record's measured ``kv_bytes_full / kv_bytes``."""
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
        prompt = int(r.get("prompt_tokens") or 0)
        comp = None
        if shape is not None:
            comp = _storage_compression(shape, m, prompt, prompt + int(ref["output_tokens"]))
        if comp is None:
            kv, kvf = r.get("kv_bytes"), r.get("kv_bytes_full")
            comp = float(kvf) / float(kv) if kv and kvf else 1.0
        text = _prompt_text(samples[(task, sid)]) if samples and (task, sid) in samples else ""
        out.append(Pair(
            method=m, task=task, prompt=f"{run}|{task}|{sid}", prompt_tokens=prompt,
            ref_tokens=int(ref["output_tokens"]), ref_at_limit=ref.get("finish_reason") == "length",
            max_new_tokens=limit, compression=comp,
            output_tokens=int(r["output_tokens"]), selector=names[m][0], codec=names[m][1],
            prompt_lines=text.count("\n") + 1 if text else 0, question="?" in text,
        ))
    return out


def _run_shape(d: Path):
    """The model shape of an eval run (its ``config.json``'s model and dtype), or None."""
    from kvshrink.predict.modelconfig import load_shape

    try:
        cfg = json.loads((d / "config.json").read_text())
        model = cfg.get("model")
        if not model:
            return None
        # the run's dtype, else kvshrink's default on a CPU (fp32); bytes cancel out of a ratio anyway
        return load_shape(str(model), str(cfg.get("dtype") or "float32"))
    except (OSError, ValueError):
        return None


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
        out += pairs_from_records(Records(d / "records.jsonl"), str(d), samples, shape=_run_shape(d))
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


# ---------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Candidate:
    """One model of the log ratio: ``same``, ``ratio``, ``ridge`` (with ``alpha``) or ``gbr``."""

    kind: str
    alpha: float = 0.0

    @property
    def label(self) -> str:
        return f"ridge(alpha={self.alpha:g})" if self.kind == "ridge" else self.kind

    @property
    def learnt(self) -> bool:
        return self.kind in ("ridge", "gbr")


RIDGE_ALPHAS = (300.0, 30.0, 3.0, 0.3)  # the features are standardised: 300 leaves little but o_m
# simplest first: a later candidate must beat an earlier one by more than a standard error to be chosen
CANDIDATES = (Candidate("same"), Candidate("ratio"), *(Candidate("ridge", a) for a in RIDGE_ALPHAS),
              Candidate("gbr"))
NO_REF_CANDIDATES = (*(Candidate("ridge", a) for a in RIDGE_ALPHAS), Candidate("gbr"))
INNER_FOLDS = 3
FALLBACK = Candidate("ridge", 30.0)  # too few prompts to validate a choice
MIN_AT_LIMIT = 3  # training pairs with the reference at the limit before their median is trusted


def _estimator(c: Candidate, seed: int) -> Any:
    if c.kind == "ridge":
        # StandardScaler: the penalty treats every feature alike; Ridge leaves the intercept unpenalised
        return make_pipeline(StandardScaler(), Ridge(alpha=c.alpha))
    if c.kind == "gbr":
        # small on purpose (tens to hundreds of pairs): shallow trees, few of them, row subsampling
        return GradientBoostingRegressor(loss="absolute_error", n_estimators=150, max_depth=2, learning_rate=0.05,
                                         subsample=0.8, min_samples_leaf=3, random_state=seed)
    raise ValueError(f"no estimator for candidate {c.label}")


def _group_splits(pairs: Sequence[Pair], k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``GroupKFold`` splits with the prompt as the group; the group labels are a seeded permutation so
    the folds are shuffled (GroupKFold itself assigns groups in a fixed order)."""
    prompts = sorted({p.prompt for p in pairs})
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    label = {pr: order[i] for i, pr in enumerate(prompts)}
    groups = np.array([label[p.prompt] for p in pairs])
    k = max(2, min(k, len(prompts)))
    return list(GroupKFold(n_splits=k).split(np.zeros((len(pairs), 1)), groups=groups))


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else 0.0


@dataclass
class _Fitted:
    """The scikit-learn models of one training set, for the candidates asked for."""

    vocab: Vocab
    offsets: dict[str, float]
    offset_default: float
    with_ref: dict[Candidate, Any]
    without_ref: dict[Candidate, Any]
    at_limit: dict[str, float] = field(default_factory=dict)  # method -> median y / limit, reference at limit

    @classmethod
    def fit(cls, pairs: Sequence[Pair], with_ref: Iterable[Candidate], without_ref: Iterable[Candidate],
            seed: int) -> _Fitted:
        v = Vocab.of(pairs)
        free = [p for p in pairs if not p.ref_at_limit] or list(pairs)
        by: dict[str, list[float]] = {}
        for p in free:
            by.setdefault(p.method, []).append(_target(p, True))
        offsets = {m: _mean(ts) for m, ts in by.items()}
        default = _mean(_target(p, True) for p in free)
        X = np.array([_row(p, v, True) for p in free])
        t = np.array([_target(p, True) - offsets[p.method] for p in free])
        wr = {c: _estimator(c, seed).fit(X, t) for c in dict.fromkeys(with_ref) if c.learnt}
        X0 = np.array([_row(p, v, False) for p in pairs])
        t0 = np.array([_target(p, False) for p in pairs])
        nr = {c: _estimator(c, seed).fit(X0, t0) for c in dict.fromkeys(without_ref)}
        cut: dict[str, list[float]] = {}
        for p in pairs:
            if p.ref_at_limit:
                cut.setdefault(p.method, []).append(p.output_tokens / max(p.max_new_tokens, 1))
        at = {m: float(np.median(v)) for m, v in cut.items() if len(v) >= MIN_AT_LIMIT}
        return cls(v, offsets, default, wr, nr, at)

    def offset(self, p: Pair) -> float:
        if p.method in self.offsets:
            return self.offsets[p.method]
        # an unseen method: the mean offset of methods of the same family, else of all
        same = [o for m, o in self.offsets.items() if _names(m) == (p.selector, p.codec)]
        return _mean(same) if same else self.offset_default

    def predict(self, pairs: Sequence[Pair], c: Candidate) -> np.ndarray:
        """Output tokens under candidate ``c`` (using the reference length), clipped to [1, limit]."""
        r = np.array([max(p.ref_tokens, 1) for p in pairs], dtype=float)
        if c.kind == "same":
            y = r
        else:
            f = np.zeros(len(pairs))
            if c.learnt:
                f = self.with_ref[c].predict(np.array([_row(p, self.vocab, True) for p in pairs]))
            y = r * np.exp(f + np.array([self.offset(p) for p in pairs]))
            for i, p in enumerate(pairs):
                if p.ref_at_limit and p.method in self.at_limit:
                    y[i] = p.max_new_tokens * self.at_limit[p.method]
        return np.clip(y, 1, np.array([p.max_new_tokens for p in pairs]))

    def predict_no_ref(self, pairs: Sequence[Pair], c: Candidate) -> np.ndarray:
        y = np.expm1(self.without_ref[c].predict(np.array([_row(p, self.vocab, False) for p in pairs])))
        return np.clip(y, 1, np.array([p.max_new_tokens for p in pairs]))


def _simplest(abs_err: Mapping[Candidate, np.ndarray], order: Sequence[Candidate]) -> Candidate:
    """The first of ``order`` whose mean absolute error is within one standard error of the best's
    (tens of prompts a method: a smaller edge is as likely the folds' noise as a better model)."""
    mae = {c: float(e.mean()) for c, e in abs_err.items()}
    best = min(mae, key=mae.__getitem__)
    e = abs_err[best]
    se = float(e.std(ddof=1) / math.sqrt(len(e))) if len(e) > 1 else 0.0
    return next(c for c in order if c in mae and mae[c] <= mae[best] + se)


@dataclass
class LengthPredictor:
    choice: dict[str, Candidate]  # method -> candidate (with the reference length)
    default: Candidate  # for methods not in training
    no_ref: Candidate  # the model without a reference length
    train: list[Pair]
    seed: int = 0
    cv_mae: dict[str, dict[str, float]] = field(default_factory=dict)  # method|"all" -> candidate -> inner MAE
    compression: dict[str, float] = field(default_factory=dict)  # method -> mean compression in training
    mean_ratio: dict[str, float] = field(default_factory=dict)  # method -> mean y / r (the baseline's)
    _fitted: _Fitted | None = field(default=None, repr=False)

    @classmethod
    def fit(cls, pairs: Sequence[Pair], candidate: Candidate | None = None, seed: int = 0) -> LengthPredictor:
        """Fit on ``pairs``. ``candidate=None`` chooses per method by GroupKFold over the training prompts
        (see the module docstring); a given ``candidate`` is used for every method."""
        if len(pairs) < 2:
            raise ValueError(f"need at least 2 method/reference pairs to fit, got {len(pairs)}")
        methods = sorted({p.method for p in pairs})
        cv: dict[str, dict[str, float]] = {}
        if candidate is not None:
            choice, default = dict.fromkeys(methods, candidate), candidate
            no_ref = candidate if candidate.learnt else FALLBACK
        elif len({p.prompt for p in pairs}) < INNER_FOLDS:
            choice, default, no_ref = dict.fromkeys(methods, FALLBACK), FALLBACK, FALLBACK
        else:
            choice, default, no_ref, cv = cls._select(pairs, seed)
        lp = cls(choice, default, no_ref, list(pairs), seed, cv)
        by: dict[str, list[Pair]] = {}
        for p in pairs:
            by.setdefault(p.method, []).append(p)
        lp.compression = {m: _mean(p.compression for p in ps) for m, ps in by.items()}
        lp.mean_ratio = {m: _mean(p.output_tokens / max(p.ref_tokens, 1) for p in ps) for m, ps in by.items()}
        lp._fitted = _Fitted.fit(pairs, [*choice.values(), default], [no_ref], seed)
        return lp

    @staticmethod
    def _select(pairs: Sequence[Pair], seed: int) -> tuple[dict[str, Candidate], Candidate, Candidate, dict]:
        held: list[Pair] = []
        pred: dict[Candidate, list[float]] = {c: [] for c in CANDIDATES}
        pred0: dict[Candidate, list[float]] = {c: [] for c in NO_REF_CANDIDATES}
        for tr, te in _group_splits(pairs, INNER_FOLDS, seed + 1):
            train, test = [pairs[i] for i in tr], [pairs[i] for i in te]
            f = _Fitted.fit(train, CANDIDATES, NO_REF_CANDIDATES, seed)
            held += test
            for c in CANDIDATES:
                pred[c] += f.predict(test, c).tolist()
            for c in NO_REF_CANDIDATES:
                pred0[c] += f.predict_no_ref(test, c).tolist()
        y = np.array([p.output_tokens for p in held], dtype=float)

        def errors(preds: Mapping[Candidate, list[float]], sel: np.ndarray) -> dict[Candidate, np.ndarray]:
            return {c: np.abs(np.array(v)[sel] - y[sel]) for c, v in preds.items()}

        def labels(err: Mapping[Candidate, np.ndarray]) -> dict[str, float]:
            return {c.label: float(e.mean()) for c, e in err.items()}

        everything = np.ones(len(held), bool)
        cv = {"all": labels(errors(pred, everything))}
        choice = {}
        for m in sorted({p.method for p in pairs}):
            err = errors(pred, np.array([p.method == m for p in held]))
            cv[m] = labels(err)
            choice[m] = _simplest(err, CANDIDATES)
        default = _simplest(errors(pred, everything), CANDIDATES)
        err0 = errors(pred0, everything)
        cv["no_ref"] = labels(err0)
        return choice, default, _simplest(err0, NO_REF_CANDIDATES), cv

    @property
    def fitted(self) -> _Fitted:
        if self._fitted is None:
            self._fitted = _Fitted.fit(self.train, [*self.choice.values(), self.default], [self.no_ref], self.seed)
        return self._fitted

    def chosen(self, method: str) -> Candidate:
        return self.choice.get(method, self.default)

    def predict_pairs(self, pairs: Sequence[Pair], use_ref: bool = True) -> np.ndarray:
        """Predicted output tokens for each pair (its ``output_tokens`` is not read)."""
        if not pairs:
            return np.zeros(0)
        if not use_ref:
            return self.fitted.predict_no_ref(pairs, self.no_ref)
        out = np.zeros(len(pairs))
        groups: dict[Candidate, list[int]] = {}
        for i, p in enumerate(pairs):
            groups.setdefault(self.chosen(p.method), []).append(i)
        for c, idx in groups.items():
            out[idx] = self.fitted.predict([pairs[i] for i in idx], c)
        return out

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
        return {"kind": "length_predictor", "version": FORMAT_VERSION, "seed": self.seed,
                "choice": {m: asdict(c) for m, c in self.choice.items()}, "default": asdict(self.default),
                "no_ref": asdict(self.no_ref), "cv_mae": self.cv_mae, "compression": self.compression,
                "mean_ratio": self.mean_ratio, "train": [asdict(p) for p in self.train]}

    @classmethod
    def from_dict(cls, d: Mapping) -> LengthPredictor:
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"length model format {d.get('version', 1)} is not {FORMAT_VERSION} (saved by an older "
                             f"kvshrink): write it again with `kvshrink predict lengths --save FILE`")
        return cls({m: Candidate(**c) for m, c in d["choice"].items()}, Candidate(**d["default"]),
                   Candidate(**d["no_ref"]), [Pair(**p) for p in d["train"]], int(d.get("seed", 0)),
                   dict(d.get("cv_mae") or {}), dict(d.get("compression") or {}), dict(d.get("mean_ratio") or {}))

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


def evaluate(pairs: Sequence[Pair], folds: int = 5, seed: int = 0, candidate: Candidate | None = None) -> dict:
    """Held-out MAE (tokens) per method and overall: the model (with and without the reference length)
    against the two baselines, by K-fold over prompts; and which candidate each fold chose per method."""
    prompts = {p.prompt for p in pairs}
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 prompts with a reference and a method record, got {len(prompts)}")
    splits = _group_splits(pairs, folds, seed)
    preds: dict[str, list[float]] = {"model": [], "model_no_ref": [], "same_as_full": [], "full_x_mean_ratio": []}
    held: list[Pair] = []
    chosen: dict[str, Counter] = {}
    for tr, te in splits:
        train, test = [pairs[i] for i in tr], [pairs[i] for i in te]
        lp = LengthPredictor.fit(train, candidate, seed)
        preds["model"] += lp.predict_pairs(test).tolist()
        preds["model_no_ref"] += lp.predict_pairs(test, use_ref=False).tolist()
        preds["same_as_full"] += baseline_same(test).tolist()
        preds["full_x_mean_ratio"] += baseline_ratio(train, test).tolist()
        held += test
        for m in {p.method for p in test}:
            chosen.setdefault(m, Counter())[lp.chosen(m).label] += 1
    y = np.array([p.output_tokens for p in held], dtype=float)
    methods = sorted({p.method for p in held})

    def mae(sel: np.ndarray) -> dict[str, float]:
        return {k: float(np.mean(np.abs(np.array(v)[sel] - y[sel]))) for k, v in preds.items()}

    per = {m: {"n": int(s.sum()), "mean_output_tokens": float(y[s].mean()), **mae(s), "chosen": dict(chosen[m])}
           for m in methods for s in [np.array([p.method == m for p in held])]}
    return {"folds": len(splits), "prompts": len(prompts), "pairs": len(held),
            "reference_at_limit": sum(p.ref_at_limit for p in held),
            "overall": {"n": len(held), "mean_output_tokens": float(y.mean()), **mae(np.ones(len(held), bool))},
            "methods": per}


def format_evaluation(ev: dict) -> str:
    head = ["method", "n", "mean tokens", "MAE model", "MAE model (no ref.)", "MAE same as full",
            "MAE full x mean ratio", "model chosen (folds)"]
    lines = [f"held-out MAE in output tokens, {ev['folds']}-fold over {ev['prompts']} prompts "
             f"({ev.get('reference_at_limit', 0)} of {ev['pairs']} pairs with full at the token limit)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in [*ev["methods"].items(), ("all", ev["overall"])]:
        ch = ", ".join(f"{k} x{v}" for k, v in sorted(e.get("chosen", {}).items(), key=lambda kv: -kv[1]))
        lines.append("| " + " | ".join([name, str(e["n"]), f"{e['mean_output_tokens']:.1f}"] + [
            f"{e[k]:.2f}" for k in ("model", "model_no_ref", "same_as_full", "full_x_mean_ratio")] + [ch]) + " |")
    return "\n".join(lines)
