"""``kvcrush``: an importance selector plus representatives of the tokens it evicts, chosen by
head-behaviour signatures."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.methods.base import BudgetSelector, SelectionInput, check
from kvshrink.methods.h2o import H2O
from kvshrink.methods.registry import register
from kvshrink.methods.snapkv import SnapKV

BASES: dict[str, type[BudgetSelector]] = {"snapkv": SnapKV, "h2o": H2O}
ANCHORS = ("random", "zeros", "ones", "mean", "alternate")


def head_signatures(head_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary signature of every token across query heads: ``[B, H_q, T]`` bool, bit ``h`` set when
    the token is among the top ``⌊n/2⌋`` of head ``h``'s scores over the row's ``n`` real tokens."""
    s = head_scores.float().masked_fill(~valid, float("-inf"))
    rank = s.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    half = valid.sum(-1, keepdim=True) // 2
    return (rank < half) & valid


@register
@dataclass
class KVCrush(BudgetSelector):
    """KVCrush, Jha et al., "KVCrush: Key value cache size-reduction using similarity in
    head-behaviour", arXiv 2503.00022.

    Budget ``N`` per sequence and KV head splits into ``R = ⌊share · N⌋`` representatives and
    ``N − R`` tokens chosen by the importance selector ``base`` (SnapKV or H2O, default parameters).
    For token ``j`` with per-query-head scores ``a_h[j]`` (over all ``H_q`` query heads of the
    layer) and anchor ``α ∈ {0,1}^{H_q}``::

        σ(j)_h = 1  iff  a_h[j] is among the top ⌊n/2⌋ of head h          (n real tokens)
        d(j)   = Hamming(σ(j), α)
        E      = tokens the base selector evicts, sorted by (d, position)
        keep   = base(N − R)  ∪  { E[i · ⌊|E| / R⌋] : i = 0 … R − 1 }

    Anchors: ``random`` (bits drawn from a generator seeded with ``seed + layer``), ``zeros``,
    ``ones``, ``mean`` (the majority bit of each head over the row's real tokens), ``alternate``
    (0, 1, 0, 1, …). Default ``random``, as OpenVINO GenAI's ``KVCrushConfig``.

    The paper gives no public reference code; the authors' implementation is OpenVINO GenAI's paged
    ``KVCrushAlgorithm`` (``kvcrush.cpp``), which works on blocks (a block's signature is the bits of
    its tokens under the layer score). This is the paper's token-level form; from the reference it
    takes the "top half" bit rule, the anchors and the evenly spaced picks ``i · ⌊|E|/R⌋`` (a stride
    from the closest signature, rather than a linspace that would also hit the farthest). The
    representatives are chosen per KV head from that head's evicted set; the signatures span all
    query heads and are shared by the layer's KV heads. If fewer than ``R`` real tokens were evicted,
    the remaining picks are padding (masked out of attention).
    """

    name = "kvcrush"

    base: str = "snapkv"
    share: float = 0.25
    anchor: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.base in BASES, f"{self.name}: base must be one of {', '.join(BASES)}; got {self.base!r}")
        check(0.0 <= self.share < 1.0, f"{self.name}: share must be in [0, 1), got {self.share}")
        check(
            self.anchor in ANCHORS,
            f"{self.name}: anchor must be one of {', '.join(ANCHORS)}; got {self.anchor!r}",
        )
        self._base = BASES[self.base]()
        super().__post_init__()

    # The base selector decides what the cache observes and whether eviction repeats.
    def observed_queries(self, length: int) -> int:
        return self._base.observed_queries(length)

    def observes_decode(self) -> bool:
        return self._base.observes_decode()

    def decode_hold(self, length: int, layer: int, num_layers: int) -> int | None:
        return self.rolling_hold(length, layer, num_layers) if self._base.rolling else None

    def representatives(self, budget: int) -> int:
        return int(budget * self.share)

    def min_budget(self) -> int:
        b = self._base.min_budget()
        while b - self.representatives(b) < self._base.min_budget():
            b += 1
        return b

    def anchor_bits(self, sig: torch.Tensor, valid: torch.Tensor, layer: int) -> torch.Tensor:
        """Anchor signature ``[B, H_q]`` (as the signatures' dtype)."""
        B, Hq, _ = sig.shape
        if self.anchor == "random":
            g = torch.Generator().manual_seed(self.seed + layer)
            a = torch.randint(0, 2, (Hq,), generator=g).bool()
        elif self.anchor == "zeros":
            a = torch.zeros(Hq, dtype=torch.bool)
        elif self.anchor == "ones":
            a = torch.ones(Hq, dtype=torch.bool)
        elif self.anchor == "alternate":
            a = torch.arange(Hq) % 2 == 1
        else:  # mean: majority bit per head over real tokens
            n = valid.sum(-1).clamp(min=1)
            return sig.sum(-1) / n > 0.5
        return a.to(sig.device).expand(B, Hq)

    def select(self, inp: SelectionInput, budget: int) -> torch.Tensor:
        R = self.representatives(budget)
        kept = self._base.select(inp, budget - R)
        if R == 0:
            return kept
        if inp.head_scores is None:
            raise ValueError("kvcrush needs per-head attention scores (run through kvshrink's attention)")
        B, H, T = inp.valid.shape
        Hq = inp.head_scores.shape[1]
        valid_q = inp.valid[:, :1].expand(B, Hq, T)
        sig = head_signatures(inp.head_scores, valid_q)
        alpha = self.anchor_bits(sig, valid_q, inp.layer)
        dist = (sig != alpha[..., None]).sum(1)  # [B, T]

        is_kept = torch.zeros_like(inp.valid).scatter_(2, kept, True)
        evicted = inp.valid & ~is_kept
        # Sort key: evicted real tokens by distance, then unkept padding, then the base's tokens.
        key = torch.where(evicted, dist[:, None, :].expand(B, H, T), Hq + 1)
        key = key.masked_fill(is_kept, Hq + 2)
        order = key.argsort(dim=-1, stable=True)
        stride = (evicted.sum(-1, keepdim=True) // R).clamp(min=1)
        picks = order.gather(-1, torch.arange(R, device=order.device) * stride)
        return torch.cat([kept, picks], dim=-1).sort(dim=-1).values
