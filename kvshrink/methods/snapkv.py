"""``snapkv``: the last prompt tokens vote, once, on which earlier tokens stay."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.methods.base import BudgetSelector, SelectionInput, check
from kvshrink.methods.registry import register
from kvshrink.methods.scoring import pool, recent_mask, topk_keep


@register
@dataclass
class SnapKV(BudgetSelector):
    """SnapKV, Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
    arXiv 2404.14469.

    With the observation window of the last ``W`` prompt queries, prompt length ``T`` and budget
    ``N``, per sequence and KV head ``h`` (query heads ``g ∈ G(h)`` of its group)::

        C[j]  = mean_{g ∈ G(h)} Σ_{i = T−W}^{T−1} softmax(q_i^g K^T / √d)[j]     for j < T − W
        S     = pool_k(C)                  (1-D max/avg pooling, kernel k, 'same' zero padding,
                                            over the prefix j < T − W only)
        keep  = {T − W, …, T − 1}  ∪  top_{N − W}(S)

    One shot at the end of prefill; the cache grows freely while decoding.

    Defaults ``window=32, kernel=7, pool=max`` are the SnapKV repository's LongBench configs
    (``ablation_c*_w32_k7_maxpool.json``); its ``init_snapkv`` fallbacks are kernel 5, avg pooling
    (``pool=avg,kernel=5``). As in the reference, average pooling counts the zero padding.

    Granularity under GQA (``granularity=``):

    - ``kv_head`` (default): one selection per KV head, its query heads' votes averaged *before*
      pooling (KVCache-Factory's ``kv_head`` mode with ``gqa_score_agg='mean'``). The cache keeps
      ``H_kv`` heads: what saves memory on GQA models.
    - ``query_head``: the reference's choice. FasterDecoding/SnapKV's Llama/Mistral hijacks call
      ``repeat_kv`` before ``SnapKVCluster.update_kv`` and keep one selection per *query* head, and
      KVCache-Factory's default granularity is ``query_head``: keys and values are repeated to ``H_q``
      heads and each query head votes alone, so the cache holds ``H_q`` heads (``H_q / H_kv`` times the
      memory of ``kv_head``, which ``cache_bytes`` and the engine's pool report). In the engine every
      layer (sliding ones too) is stored with ``H_q`` heads; the HF path repeats only the layers it
      selects on.

    Other deviations from the reference: left padding gets no vote and is never kept ahead of a real
    token. Sliding-window layers are left to their window (``Selector.on_sliding``).
    """

    name = "snapkv"

    window: int = 32
    kernel: int = 7
    pool: str = "max"
    granularity: str = "kv_head"

    def __post_init__(self) -> None:
        check(self.granularity in ("kv_head", "query_head"),
              f"{self.name}: granularity must be one of kv_head, query_head; got {self.granularity!r}")
        check(self.window >= 1, f"{self.name}: window must be >= 1, got {self.window}")
        check(self.kernel >= 1, f"{self.name}: kernel must be >= 1, got {self.kernel}")
        check(self.pool in ("max", "avg"), f"{self.name}: pool must be one of max, avg; got {self.pool!r}")
        if self.budget_tokens:
            check(
                self.budget_tokens > self.window,
                f"{self.name}: budget={self.budget_tokens} < window+1={self.window + 1} (budget < window): the "
                f"observation window is always kept and at least one earlier token must be selected",
            )
        super().__post_init__()

    def observed_queries(self, length: int) -> int:
        return min(self.window, length)

    def stored_heads(self, kv_heads: int, query_heads: int) -> int:
        return query_heads if self.granularity == "query_head" else kv_heads

    def min_budget(self) -> int:
        return self.window + 1

    def vote(self, inp: SelectionInput) -> torch.Tensor:
        """Pooled window votes ``[B, H_kv, T]`` for the prefix; +inf on the observation window."""
        if inp.scores is None:
            raise ValueError(
                f"{self.name} needs observation-window attention (run through kvshrink's attention)"
            )
        w = min(self.window, inp.length)
        prefix = pool(inp.scores[..., : inp.length - w], self.kernel, self.pool)
        return torch.cat([prefix, prefix.new_full((*prefix.shape[:-1], w), float("inf"))], dim=-1)

    def protected(self, inp: SelectionInput, budget: int) -> torch.Tensor:
        """``[B, H_kv, T]`` the tokens this rule always keeps: the observation window."""
        return recent_mask(inp.valid, min(self.window, inp.length)) & inp.valid

    def select(self, inp: SelectionInput, budget: int) -> torch.Tensor:
        w = min(self.window, inp.length)
        return topk_keep(self.vote(inp), budget, inp.valid, forced=recent_mask(inp.valid, w))
