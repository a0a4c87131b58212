"""The Hugging Face path: a ``transformers`` Cache that stores a method's real storage, and an
attention function that feeds the selector the attention statistics it needs.

    with kvshrink.compress(model, "snapkv:ratio=0.5+kivi:bits=4"):
        out = model.generate(**inputs, max_new_tokens=64)

How it hooks in, using only public transformers APIs:
- ``AttentionInterface.register("kvshrink", ...)``: our attention function runs SDPA exactly as
  transformers' own does, then hands the layer's queries to the cache layer for scoring/eviction.
- a forward pre-hook on the model passes the cache to the attention function as a kwarg
  (``kvshrink_cache``), which transformers forwards down to every attention call.
- the cache reports ``get_seq_length()`` as positions *seen*, so RoPE positions and HF's masks stay
  in the original position space; once a layer has evicted tokens it builds its own mask from
  per-head validity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvshrink.methods import CompressionMethod, SelectionInput, parse
from kvshrink.methods.scoring import attention_scores

ATTN_NAME = "kvshrink"


class KVShrinkLayer(CacheLayerMixin):
    """One layer's compressed storage: kept tokens in the codec's format, plus which are valid."""

    is_sliding = False

    def __init__(self, method: CompressionMethod, layer_idx: int, num_layers: int):
        super().__init__()
        self.method, self.layer_idx, self.num_layers = method, layer_idx, num_layers
        self.state = method.codec.new_state()
        self.valid: torch.Tensor | None = None  # [B, H, T] bool; False = padding or logically evicted
        self.acc: torch.Tensor | None = None  # [B, Hq, T] accumulated attention (H2O)
        self.pruned = False
        self.seen = 0
        self.hold: int | None = None  # budget held while decoding (evicting selectors)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- CacheLayerMixin -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:  # attention ran without us (another attn implementation): store as-is
            self.commit(None, None, None)
        self.pending = (key_states, value_states)
        if len(self.state) == 0:
            return key_states, value_states
        k, v = self.state.get()
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.method, self.layer_idx, self.num_layers)

    # -- kvshrink ----------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return self.state.nbytes()

    def attention_mask(self, q_len: int, hf_mask: torch.Tensor | None) -> torch.Tensor | None:
        """HF's mask while nothing was evicted; afterwards per-head validity of the stored tokens,
        then causal over the new ones. Shape ``[B, H_kv, q, T]`` broadcastable over query groups."""
        if not self.pruned:
            return hf_mask
        B, H, T = self.valid.shape
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=self.valid.device).tril()
        past = self.valid[:, :, None, :].expand(B, H, q_len, T)
        new = causal.expand(B, H, q_len, q_len)
        return torch.cat([past, new], dim=-1)

    def _new_valid(self, hf_mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor:
        B, H, q, _ = k.shape
        if hf_mask is None or self.pruned or self.seen > 0:
            return torch.ones(B, H, q, dtype=torch.bool, device=k.device)
        # The last query attends to every real key, so its mask row marks the padding.
        row = hf_mask[:, 0, -1, -q:]
        row = row if row.dtype == torch.bool else row == 0
        return row[:, None, :].expand(B, H, q).clone()

    def commit(self, query: torch.Tensor | None, hf_mask: torch.Tensor | None, scaling: float | None) -> None:
        """Store this step's tokens, updating scores and evicting as the selector says."""
        k, v = self.pending
        self.pending = None
        sel = self.method.selector
        prefill = self.seen == 0
        new_valid = self._new_valid(hf_mask, k)
        self.seen += k.shape[-2]

        head_scores = None
        if sel.needs != "none" and query is not None:
            past_k = self.state.get()[0] if len(self.state) else None
            full_k = k if past_k is None else torch.cat([past_k, k], dim=-2)
            mask = self.attention_mask(query.shape[-2], hf_mask)
            if sel.needs == "window" and prefill:
                w = min(sel.observation_window, query.shape[-2])
                head_scores = attention_scores(query[..., -w:, :], full_k, scaling, _rows(mask, w))
            elif sel.needs == "accumulated":
                step = attention_scores(query, full_k, scaling, mask)
                if self.acc is None:
                    self.acc = step
                else:
                    pad = step.new_zeros(*self.acc.shape[:2], k.shape[-2])
                    self.acc = torch.cat([self.acc, pad], dim=-1) + step
                head_scores = self.acc

        valid = new_valid if self.valid is None else torch.cat([self.valid, new_valid], dim=-1)
        if prefill:
            length = int(valid.sum(-1).max())
            budget = sel.budget(length, self.layer_idx, self.num_layers)
            self.hold = budget if budget is not None else (getattr(sel, "budget_tokens", 0) or None)
            if budget is not None and budget < k.shape[-2]:
                idx = sel.select(self._input(valid, head_scores), budget)
                k, v, valid = _take(k, idx), _take(v, idx), valid.gather(2, idx)
                self._gather_acc(idx)
                self.pruned = True
            self.state.append(k, v)
        else:
            self.state.append(k, v)
            if sel.evicts_in_decode and self.hold is not None and len(self.state) > self.hold:
                idx = sel.select(self._input(valid, head_scores), self.hold)
                self.state.keep(idx)
                valid = valid.gather(2, idx)
                self._gather_acc(idx)
                self.pruned = True
        self.valid = valid

    def _input(self, valid: torch.Tensor, head_scores: torch.Tensor | None) -> SelectionInput:
        scores = None
        if head_scores is not None:
            B, Hq, T = head_scores.shape
            H = valid.shape[1]
            scores = head_scores.view(B, H, Hq // H, T).mean(2)
        return SelectionInput(
            length=valid.shape[-1],
            layer=self.layer_idx,
            num_layers=self.num_layers,
            valid=valid,
            scores=scores,
            head_scores=head_scores,
        )

    def _gather_acc(self, idx: torch.Tensor) -> None:
        if self.acc is None:
            return
        B, Hq, T = self.acc.shape
        H = idx.shape[1]
        gi = idx.repeat_interleave(Hq // H, dim=1)
        self.acc = self.acc.gather(2, gi)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def _rows(mask: torch.Tensor | None, w: int) -> torch.Tensor | None:
    return None if mask is None else mask[..., -w:, :]


class KVShrinkCache(Cache):
    """A transformers ``Cache`` whose layers hold a compression method's real storage."""

    def __init__(self, method: str | CompressionMethod, num_layers: int):
        self.method = parse(method)
        super().__init__(layers=[KVShrinkLayer(self.method, i, num_layers) for i in range(num_layers)])

    @classmethod
    def for_model(cls, model: PreTrainedModel, method: str | CompressionMethod) -> KVShrinkCache:
        return cls(method, model.config.get_text_config().num_hidden_layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def kvshrink_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA as transformers computes it, over the cache's (possibly evicted, dequantised) keys and
    values; then the cache layer stores this step's tokens and scores them if its selector needs it."""
    cache = kwargs.pop("kvshrink_cache", None)
    layer = cache.layers[module.layer_idx] if isinstance(cache, KVShrinkCache) else None
    mask = attention_mask if layer is None else layer.attention_mask(query.shape[-2], attention_mask)
    if mask is not None and mask.shape[1] not in (1, query.shape[1]):  # per-KV-head validity -> query heads
        mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    if layer is not None and layer.pending is not None:
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        layer.commit(query, attention_mask, scaling)
    return out, None


AttentionInterface.register(ATTN_NAME, kvshrink_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _pre_hook(model: PreTrainedModel, method: CompressionMethod):
    def hook(mod, args, kwargs):
        cache = kwargs.get("past_key_values")
        fresh = cache is None or (isinstance(cache, DynamicCache) and cache.get_seq_length() == 0)
        if fresh and kwargs.get("use_cache", True) is not False:
            cache = KVShrinkCache.for_model(model, method)
            kwargs["past_key_values"] = cache
        if isinstance(cache, KVShrinkCache):
            kwargs["kvshrink_cache"] = cache
        return args, kwargs

    return hook


@contextlib.contextmanager
def compress(model: PreTrainedModel, method: str | CompressionMethod) -> Iterator[CompressionMethod]:
    """Within the block, every forward of ``model`` (``generate`` included) uses a compressed cache.

    A ``KVShrinkCache`` passed explicitly as ``past_key_values`` is used as given."""
    m = parse(method)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    handle = model.register_forward_pre_hook(_pre_hook(model, m), with_kwargs=True)
    try:
        yield m
    finally:
        handle.remove()
        model.set_attn_implementation(previous)


def cache_bytes(cache: Cache) -> int:
    """Real bytes a cache holds: codec payloads plus full-precision residuals (or a DynamicCache's tensors)."""
    if isinstance(cache, KVShrinkCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
