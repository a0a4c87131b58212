"""``h2o``: heavy hitters by accumulated attention plus a recent window, evicting at every step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.methods.base import BudgetSelector, SelectionInput, check
from kvshrink.methods.registry import register
from kvshrink.methods.scoring import ranked, recent_mask, topk_keep


@register
@dataclass
class H2O(BudgetSelector):
    """H2O, Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", arXiv 2306.14048.

    With ``A_t[j] = Σ_{i ≤ t} softmax(q_i K^T / √d)[j]`` the attention token ``j`` has received from
    every query so far (prompt queries included), a budget ``N``, ``R = ⌊N · recent_ratio⌋`` recent
    tokens and ``N − R`` heavy hitters, per sequence and KV head::

        keep = {the R most recent tokens}  ∪  top_{N−R} { A_t[j] : j not among the R most recent }

    Re-applied at every decode step (one token evicted per step once the cache is full). The
    default ``recent_ratio = 0.5`` is the paper's equal split (``--heavy_ratio 0.1 --recent_ratio 0.1``
    in the reference scripts; ``hh_size`` = ``recent_size`` in ``utils_real_drop``).

    Deviations from FMInference/H2O (``H2OKVCache_LayerWise``): scores are kept per sequence (the
    reference sums them over the batch); under GQA the accumulated scores of a KV head's query heads
    are averaged (KVCache-Factory's ``gqa_score_agg='mean'``); left padding gets no score and is
    never kept ahead of a real token. On a codec that groups tokens (KIVI's keys, GEAR) a cut keeps
    whole groups (``methods.base.plan_cut``), so the cache may hold up to ``group - 1`` tokens fewer
    than ``N``; kept tokens are never re-quantised.

    Sliding-window layers are left to their window (no scores, no eviction there); ``N`` applies to
    the full-attention layers.
    """

    name = "h2o"
    rolling = True

    recent_ratio: float = 0.5

    def __post_init__(self) -> None:
        check(
            0.0 <= self.recent_ratio <= 1.0,
            f"{self.name}: recent_ratio must be in [0, 1], got {self.recent_ratio}",
        )
        super().__post_init__()

    def min_budget(self) -> int:
        return 1

    def observed_queries(self, length: int) -> int:
        return length

    def observes_decode(self) -> bool:
        return True

    def recent(self, budget: int) -> int:
        """Recent-window size for a budget (the rest of the budget goes to heavy hitters)."""
        return int(budget * self.recent_ratio)

    def select(self, inp: SelectionInput, budget: int) -> torch.Tensor:
        if inp.scores is None:
            raise ValueError("h2o needs accumulated attention scores (run through kvshrink's attention)")
        return topk_keep(inp.scores, budget, inp.valid, forced=recent_mask(inp.valid, self.recent(budget)))

    def protected(self, inp: SelectionInput, budget: int) -> torch.Tensor:
        """``[B, H_kv, T]`` the tokens this rule always keeps: the recent window."""
        return recent_mask(inp.valid, self.recent(budget)) & inp.valid

    def priority(self, inp: SelectionInput, budget: int) -> torch.Tensor:
        return ranked(inp.scores, inp.valid, forced=recent_mask(inp.valid, self.recent(budget)))
