"""Attention statistics shared by the score-based selectors (H2O, SnapKV, PyramidKV, KVCrush),
and the top-k-with-forced-tokens rule they all end with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_QUERY_CHUNK = 256  # bound the [B, H, q, T] probability tensor during long prefills


def _expand_mask(mask: torch.Tensor, n_heads: int) -> torch.Tensor:
    if mask.shape[1] not in (1, n_heads):
        mask = mask.repeat_interleave(n_heads // mask.shape[1], dim=1)
    return mask


def cap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Attention logit soft-capping (Gemma-2): ``c * tanh(logits / c)``, as transformers' eager attention."""
    if softcap is None:
        return logits
    return torch.tanh(logits / softcap) * softcap


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[..., q, T]`` bool: causal (``k <= q``) and, with a ``window``, ``q - k < window`` (transformers'
    ``sliding_window_overlay``). Positions broadcast: ``q_pos`` ``[..., q]``, ``k_pos`` ``[..., T]``."""
    d = q_pos[..., :, None] - k_pos[..., None, :]
    m = d >= 0
    return m if window is None else m & (d < window)


def with_sinks(logits: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Append gpt-oss's per-query-head sink logit (``s_aux`` ``[Hq]``) as a last column of ``[B, Hq, q, T]``."""
    if sinks is None:
        return logits
    B, Hq, q, _ = logits.shape
    return torch.cat([logits, sinks.to(logits.dtype).view(1, Hq, 1, 1).expand(B, Hq, q, 1)], dim=-1)


def eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention as transformers' eager functions compute it (logits in the model dtype, soft-capped,
    masked, sinks appended, softmax in float32): ``[B, Hq, q, D]``. ``mask``: bool (True = attend) or
    additive, broadcastable to ``[B, Hq, q, T]``; None: no mask."""
    Hq, Hkv = query.shape[1], key.shape[1]
    if Hq != Hkv:
        key, value = key.repeat_interleave(Hq // Hkv, dim=1), value.repeat_interleave(Hq // Hkv, dim=1)
    w = cap(torch.matmul(query, key.transpose(-1, -2)) * scaling, softcap)
    if mask is not None:
        mask = _expand_mask(mask, Hq)
        w = w.masked_fill(~mask, torch.finfo(w.dtype).min) if mask.dtype == torch.bool else w + mask
    w = with_sinks(w, sinks)
    if sinks is not None:
        w = w - w.amax(-1, keepdim=True)
    p = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    if sinks is not None:
        p = p[..., :-1]
    return torch.matmul(p, value)


def attention_scores(
    query: torch.Tensor, key: torch.Tensor, scaling: float, mask: torch.Tensor | None = None,
    softcap: float | None = None, sinks: torch.Tensor | None = None, window: int | None = None,
) -> torch.Tensor:
    """Softmax attention of ``query`` ``[B, Hq, q, D]`` over ``key`` ``[B, Hkv, T, D]``, summed over
    the q queries: ``[B, Hq, T]``. Queries are the last q positions (bottom-right causal, within
    ``window`` when given, when no mask is given); ``mask`` is bool (True = attend)
    ``[B, 1 or Hkv or Hq, q, T]``. ``softcap`` and attention ``sinks`` enter the softmax as in the
    model's own attention (a sink takes its share of probability but is no token)."""
    B, Hq, q, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    k = key.repeat_interleave(Hq // Hkv, dim=1) if Hq != Hkv else key
    if mask is None:
        mask = window_mask(torch.arange(T - q, T, device=query.device), torch.arange(T, device=query.device),
                           window)[None, None]
    mask = _expand_mask(mask, Hq)
    out = query.new_zeros(B, Hq, T, dtype=torch.float32)
    for s in range(0, q, _QUERY_CHUNK):
        logits = cap(torch.matmul(query[:, :, s : s + _QUERY_CHUNK].float(), k.float().transpose(-1, -2)) * scaling,
                     softcap)
        logits = with_sinks(logits.masked_fill(~mask[..., s : s + _QUERY_CHUNK, :], float("-inf")), sinks)
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        out += (probs[..., :T] if sinks is not None else probs).sum(-2)
    return out


def pool(scores: torch.Tensor, kernel: int, kind: str = "max") -> torch.Tensor:
    """1-D pooling along tokens with 'same' padding (SnapKV's clustering of votes).

    As in SnapKV's and KVCache-Factory's reference code (``F.avg_pool1d`` with its default
    ``count_include_pad=True``), average pooling counts the zero padding at both ends, so edge tokens
    are averaged over ``kernel`` slots; max pooling ignores the padding."""
    if kernel <= 1:
        return scores
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    if kind == "max":
        y = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        y = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return y[..., : shape[-1]].reshape(shape)


def topk_keep(scores: torch.Tensor, k: int, valid: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``[B, H, k]`` (ascending) of the k best tokens; ``forced`` tokens always win, invalid
    (padding) tokens always lose."""
    idx = ranked(scores, valid, forced).topk(k, dim=-1).indices
    return idx.sort(dim=-1).values


def ranked(scores: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
    """The score ``topk_keep`` ranks by: ``+inf`` on forced tokens, ``-inf`` on padding."""
    s = scores.float().masked_fill(~valid, float("-inf"))
    if forced is not None:
        s = s.masked_fill(forced & valid, float("inf"))
    return s


def recent_mask(valid: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, H, T]`` True on the last ``n`` stored positions: the most recent tokens, as the cache keeps
    tokens in position order and pads on the left (``topk_keep`` never forces a padding token)."""
    T = valid.shape[-1]
    pos = torch.arange(T, device=valid.device)
    return (pos >= T - n).expand_as(valid)


def first_valid_mask(valid: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, H, T]`` True on the first ``n`` *real* tokens of each row (left padding is skipped)."""
    return valid & (valid.long().cumsum(-1) <= n)
