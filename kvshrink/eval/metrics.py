"""Metrics: one function per metric, all returning a float in [0, 1].

LongBench's per-task metrics follow THUDM/LongBench ``LongBench/metrics.py`` and ``eval.py``
(rewritten here, no dependency on ``rouge``/``fuzzywuzzy``/``jieba``):

- ``normalize_answer``, ``qa_f1``: SQuAD-style normalisation (lower case, drop punctuation, drop
  articles a/an/the, collapse whitespace), then bag-of-words F1.
- ``longbench_rouge_l``: the ``rouge`` package's (pltrdy) default ROUGE-L as LongBench calls it:
  texts split into sentences at ``.``, words at spaces, *summary-level* union-LCS, and the word
  counts ``m``/``n`` and the union taken over *sets* of words (``exclusive=True``); any error
  (an empty text) scores 0, as LongBench's bare ``except`` does. Difference: LongBench's
  recursive LCS reconstruction raises ``RecursionError`` on very long sentences and so scores 0
  there; ours is iterative and scores them.
- ``classification``: classes whose name occurs in the prediction; a matched class that is a
  substring of the gold class (and not equal) is dropped; 1/len(matches) when the gold is among them.
- ``retrieval``: the gold's ``Paragraph N`` (``段落N`` for zh) against every number in the prediction:
  share of numbers equal to N.
- ``count``: share of numbers in the prediction equal to the gold count.
- ``code_sim``: the first prediction line without a backtick, ``#`` or ``//``; then
  ``fuzz.ratio / 100``: ``round(100 * SequenceMatcher ratio) / 100``, 0 when either side is empty
  (fuzzywuzzy uses python-Levenshtein's ratio when installed, which can differ slightly).
- Chinese tasks (``*_zh``, dureader, vcsum, lsht) segment with jieba in LongBench; here into
  characters (jieba is not a dependency), so their scores are close but not identical.
- ``score_longbench``: trec, triviaqa, samsum, lsht score the prediction's first line only; the
  best score over all references counts.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

# ------------------------------------------------------------------------------------ normalisation


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (LongBench/SQuAD)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_CN_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."


def normalize_zh_answer(s: str) -> str:
    punct = set(string.punctuation + _CN_PUNCT)
    return "".join("".join(ch for ch in s.lower() if ch not in punct).split())


# ------------------------------------------------------------------------------------------ scores


def f1_tokens(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(ground_truth)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(prediction), same / len(ground_truth)
    return 2 * p * r / (p + r)


def qa_f1(prediction: str, ground_truth: str, **_) -> float:
    """LongBench's ``qa_f1_score``: token F1 after ``normalize_answer``."""
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(s: str) -> list[str]:
    return [t for t in (normalize_zh_answer(c) for c in s) if t]


def qa_f1_zh(prediction: str, ground_truth: str, **_) -> float:
    return f1_tokens(_zh_tokens(prediction), _zh_tokens(ground_truth))


def contains(prediction: str, ground_truth: str, **_) -> float:
    """1 when the normalised reference occurs in the normalised prediction."""
    g = normalize_answer(ground_truth)
    return float(bool(g) and g in normalize_answer(prediction))


def exact_match(prediction: str, ground_truth: str, **_) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def string_match(prediction: str, ground_truth: str, **_) -> float:
    """RULER's string match: the exact reference string occurs in the output (case-insensitive)."""
    return float(ground_truth.strip().lower() in prediction.lower())


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> list[str]:
    """One longest common subsequence of x and y (the words of x), reconstructed as the ``rouge``
    package does (ties prefer moving along y)."""
    n, m = len(x), len(y)
    t = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], t[i], t[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out: list[str] = []
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif t[i - 1][j] > t[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def longbench_rouge_l(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F as LongBench computes it with the ``rouge`` package (see module docstring)."""
    hyp = [" ".join(s.split()) for s in prediction.split(".") if len(s) > 0]
    ref = [" ".join(s.split()) for s in ground_truth.split(".") if len(s) > 0]
    if not hyp or not ref:
        return 0.0
    m = len({w for s in ref for w in s.split(" ")})
    n = len({w for s in hyp for w in s.split(" ")})
    union: set[str] = set()
    for r in ref:
        rw = r.split(" ")
        for h in hyp:
            union |= set(_lcs_words(rw, h.split(" ")))
    llcs = len(union)
    if m == 0 or n == 0:
        return 0.0
    r_lcs, p_lcs = llcs / m, llcs / n
    return 2.0 * (p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8)


def longbench_rouge_zh(prediction: str, ground_truth: str, **_) -> float:
    return longbench_rouge_l(" ".join(prediction), " ".join(ground_truth))


_ROUGE = None


def rouge_l(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F-measure of the ``rouge-score`` package (Porter stemming), used by built-in tasks."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if not prediction.strip() and not reference.strip():
        return 1.0
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def classification(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_) -> float:
    matches = [c for c in all_classes if c in prediction]
    # LongBench removes while iterating the same list (so a removal skips the next element): kept as is.
    for term in matches:
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == str(target) for n in numbers) / len(numbers)


def retrieval(prediction: str, ground_truth: str, **_) -> float:
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    return _number_share(prediction, found[0]) if found else 0.0


def retrieval_zh(prediction: str, ground_truth: str, **_) -> float:
    found = re.findall(r"段落(\d+)", ground_truth)
    return _number_share(prediction, found[0]) if found else 0.0


def count(prediction: str, ground_truth: str, **_) -> float:
    return _number_share(prediction, str(ground_truth))


def fuzz_ratio(a: str, b: str) -> int:
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim(prediction: str, ground_truth: str, **_) -> float:
    pred = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            pred = line
            break
    return fuzz_ratio(pred, ground_truth) / 100


# --------------------------------------------------------------------------------------- registry

METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "contains": contains,
    "exact_match": exact_match,
    "string_match": string_match,
    "rouge_l": rouge_l,
    "lb_rouge_l": longbench_rouge_l,
    "lb_rouge_zh": longbench_rouge_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}

LONGBENCH_METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "lb_rouge_zh",
    "gov_report": "lb_rouge_l",
    "qmsum": "lb_rouge_l",
    "multi_news": "lb_rouge_l",
    "vcsum": "lb_rouge_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "lb_rouge_l",
    "lsht": "classification",
    "passage_retrieval_en": "retrieval",
    "passage_count": "count",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}
FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def score(metric: str, prediction: str, references: Sequence[str], metadata: dict | None = None) -> float | None:
    """Best score of ``prediction`` over ``references`` under ``metric``; ``None`` without references
    (no gold) or with the metric ``none``. ``metadata['first_line']`` scores the first line only;
    ``metadata['all_classes']`` feeds classification."""
    if metric == "none" or not references:
        return None
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
    meta = metadata or {}
    if meta.get("first_line"):
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = METRICS[metric]
    classes = meta.get("all_classes") or ()
    return max(float(fn(prediction, str(ref), all_classes=classes)) for ref in references)
