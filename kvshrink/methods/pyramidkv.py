"""``pyramidkv``: SnapKV's selection with budgets that shrink from the first layer to the last."""

from __future__ import annotations

from dataclasses import dataclass

from kvshrink.methods.base import check
from kvshrink.methods.registry import register
from kvshrink.methods.snapkv import SnapKV


@register
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV, Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling", arXiv 2406.02069.

    Selection is SnapKV's (see :class:`~kvshrink.methods.snapkv.SnapKV`); only the budget differs per
    layer. With the average budget ``C`` per layer (``budget=`` or resolved from ``ratio=``), window
    ``W``, prompt length ``T``, ``L`` layers, layer ``l`` (integer arithmetic, as KVCache-Factory's
    ``PyramidKVCluster``)::

        min = (C − W) // β,   max = 2(C − W) − min
        if max ≥ T − W:  max = T − W,  min = 2(C − W) − max
        step = (max − min) // (L − 1)
        N_l  = W + (max − l · step)        if T ≥ 2(C − W)
        N_l  = C                           otherwise (short prompts: uniform, like SnapKV)

    Defaults ``window=8, kernel=7, pool=max, beta=20`` are KVCache-Factory's ``run_longbench.py``.

    Deviations from the reference: ``L = 1`` (no pyramid to build) keeps ``C`` tokens; ``T`` is the
    longest real prompt of the batch (the reference runs batch 1); under GQA one selection per KV head
    with the group's votes averaged before pooling (KVCache-Factory's ``kv_head`` mode,
    ``gqa_score_agg='mean'``) by default; ``granularity=query_head`` reproduces the reference's default
    (a selection per query head after ``repeat_kv``, ``H_q`` heads cached; see SnapKV). ``L`` and ``l``
    count every layer; sliding-window layers are left to their window (their budget unused).
    """

    name = "pyramidkv"

    window: int = 8
    kernel: int = 7
    pool: str = "max"
    beta: int = 20

    def __post_init__(self) -> None:
        check(self.beta >= 1, f"{self.name}: beta must be >= 1, got {self.beta}")
        super().__post_init__()

    def budget(self, length: int, layer: int, num_layers: int) -> int | None:
        C = self.base_budget(length)
        if C is None:
            return None
        W = self.window
        span = C - W
        if length < 2 * span or num_layers < 2:
            return C
        lo = span // self.beta
        hi = 2 * span - lo
        if hi >= length - W:
            hi = length - W
            lo = 2 * span - hi
        step = (hi - lo) // (num_layers - 1)
        return W + hi - layer * step
