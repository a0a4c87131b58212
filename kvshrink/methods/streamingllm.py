"""``streamingllm``: attention sinks + a rolling window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.methods.base import BudgetSelector, SelectionInput, check
from kvshrink.methods.registry import register
from kvshrink.methods.scoring import first_valid_mask, ranked, topk_keep


@register
@dataclass
class StreamingLLM(BudgetSelector):
    """StreamingLLM, Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
    arXiv 2309.17453.

    Rule, per sequence and KV head, for a budget ``N`` and ``S = sinks``::

        keep = {first S real tokens}  ∪  {the N − S most recent tokens}

    so the recent window is ``W = N − S`` (as KVCache-Factory sets ``window_sizes =
    max_capacity_prompts − 4``). Re-applied at every decode step, so the window rolls and the cache
    holds ``N`` tokens.

    Deviations from mit-han-lab/streaming-llm (``StartRecentKVCache``): the sinks are the first
    *real* tokens of each row, skipping left padding (the reference runs batch 1, unpadded); a row
    with fewer than ``N`` real tokens keeps padding only after every real token (padding is masked out
    of attention). Positions are not re-assigned inside the cache (the reference's "rolling RoPE"):
    kept tokens keep their original RoPE positions, as in KVCache-Factory and kvpress. On a codec that
    groups tokens (KIVI's keys, GEAR) a cut keeps whole groups (the sinks' group first), so the cache
    may hold up to ``group - 1`` tokens fewer than ``N``; kept tokens are never re-quantised.

    Sliding-window layers are left to their window (a window is already a recent window; their
    attention has no sinks to keep beyond it); ``N`` applies to the full-attention layers.
    """

    name = "streamingllm"
    rolling = True

    sinks: int = 4

    def __post_init__(self) -> None:
        check(self.sinks >= 0, f"{self.name}: sinks must be >= 0, got {self.sinks}")
        if self.budget_tokens:
            check(
                self.budget_tokens > self.sinks,
                f"{self.name}: budget={self.budget_tokens} leaves no recent window after sinks={self.sinks} "
                f"(budget < sinks + window with window >= 1); raise budget or lower sinks",
            )
        super().__post_init__()

    def min_budget(self) -> int:
        return self.sinks + 1

    def select(self, inp: SelectionInput, budget: int) -> torch.Tensor:
        # Recency as the score: the most recent real tokens fill what the sinks leave of the budget.
        pos = torch.arange(inp.length, device=inp.valid.device, dtype=torch.float32).expand(inp.valid.shape)
        return topk_keep(pos, budget, inp.valid, forced=first_valid_mask(inp.valid, self.sinks))

    def priority(self, inp: SelectionInput, budget: int) -> torch.Tensor:
        pos = torch.arange(inp.length, device=inp.valid.device, dtype=torch.float32).expand(inp.valid.shape)
        return ranked(pos, inp.valid, forced=first_valid_mask(inp.valid, self.sinks))
