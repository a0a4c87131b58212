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
import inspect
from collections.abc import Iterator

import torch
import transformers
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvshrink.errors import CompressionNotInEffect, untested_transformers
from kvshrink.layer_types import (
    FULL,
    SLIDING,
    LayerType,
    check_call,
    check_supported,
    layer_types,
    text_config,
)
from kvshrink.methods import CompressionMethod, parse
from kvshrink.methods.base import SelectorState, check_cut
from kvshrink.methods.scoring import attention_scores, eager_attention, window_mask

ATTN_NAME = "kvshrink"


class KVShrinkLayer(CacheLayerMixin):
    """One layer's compressed storage: kept tokens in the codec's format, which are valid, and the
    position (column of transformers' mask) of each.

    A sliding-window layer (``ltype.window``) drops the tokens that fell out of its window, in the
    code domain and in whole encoder chunks (so it stores at most ``window - 1`` tokens plus one
    chunk), and is left to its window by the selector (``Selector.on_sliding``)."""

    def __init__(self, method: CompressionMethod, layer_idx: int, num_layers: int, ltype: LayerType | None = None):
        super().__init__()
        self.method, self.layer_idx, self.num_layers = method, layer_idx, num_layers
        self.ltype = ltype or LayerType()
        self.is_sliding = self.ltype.sliding
        self.sliding_window = self.ltype.window
        self.selects = not self.ltype.sliding or method.selector.on_sliding != "window"
        self.state = method.codec.new_state()
        self.valid: torch.Tensor | None = None  # [B, H, T] bool; False = padding or logically evicted
        self.pos: torch.Tensor | None = None  # [B, H, T] long: each stored token's position (mask column)
        self.selector_state: SelectorState | None = None  # what the selector observed (created at prefill)
        self.pruned = False  # stored tokens are no longer the mask's columns (selected, evicted, slid out)
        self.seen = 0
        self.hold: int | None = None  # budget held while decoding (evicting selectors)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.expand = 1  # > 1: KV heads stored repeated per query head (a query-head selector selected)

    # -- CacheLayerMixin -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.expand > 1:
            key_states = key_states.repeat_interleave(self.expand, dim=1)
            value_states = value_states.repeat_interleave(self.expand, dim=1)
        self.pending = (key_states, value_states)
        if len(self.state) == 0:
            return key_states, value_states
        k, v = self.state.get()
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # transformers < 5.x passes the query's cache positions, later releases its length
        query_length = query if isinstance(query, int) else query.shape[-1]
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # abstract in older 5.x releases
        return -1

    def reset(self) -> None:
        self.__init__(self.method, self.layer_idx, self.num_layers, self.ltype)

    # -- kvshrink ----------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return self.state.nbytes()

    def attention_mask(self, q_len: int, hf_mask: torch.Tensor | None) -> torch.Tensor | None:
        """HF's mask while the stored tokens are its columns; afterwards per-head validity and position
        of the stored tokens (causal, within the window on a sliding layer), then causal over the new
        ones. Shape ``[B, H_kv, q, T]`` broadcastable over query groups."""
        if not self.pruned:
            return hf_mask
        B, H, T = self.valid.shape
        qpos = self.seen + torch.arange(q_len, device=self.valid.device)
        window = self.ltype.window
        past = self.valid[:, :, None, :] & window_mask(qpos, self.pos, window)
        new = window_mask(qpos, qpos, window).expand(B, H, q_len, q_len)
        return torch.cat([past, new], dim=-1)

    def _new_valid(self, hf_mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor:
        B, H, q, _ = k.shape
        if hf_mask is None or self.pruned or self.seen > 0:
            return torch.ones(B, H, q, dtype=torch.bool, device=k.device)
        # A real key is attended by at least its own query (sliding window or not); padding by none.
        cols = hf_mask[:, 0, :, -q:]
        cols = cols if cols.dtype == torch.bool else cols == 0
        return cols.any(-2)[:, None, :].expand(B, H, q).clone()

    def commit(self, query: torch.Tensor, hf_mask: torch.Tensor | None, scaling: float,
               softcap: float | None = None, sinks: torch.Tensor | None = None) -> None:
        """Store this step's tokens; the selector observes and evicts through its state."""
        k, v = self.pending
        self.pending = None
        sel = self.method.selector
        prefill = self.seen == 0
        B, H, q, _ = k.shape
        new_valid = self._new_valid(hf_mask, k)
        new_pos = (self.seen + torch.arange(q, device=k.device)).expand(B, H, q)
        observes_decode = self.selects and sel.observes_decode() and self.hold is not None
        mask = self.attention_mask(query.shape[-2], hf_mask) if (prefill or observes_decode) else None
        self.seen += q
        valid = new_valid if self.valid is None else torch.cat([self.valid, new_valid], dim=-1)
        pos = new_pos if self.pos is None else torch.cat([self.pos, new_pos], dim=-1)
        if self.selector_state is None:
            self.selector_state = sel.new_state(self.layer_idx, self.num_layers, rows=B)
        rows = torch.arange(B, device=k.device)
        state = self.selector_state
        score = dict(softcap=softcap, sinks=sinks)

        if prefill:
            length = int(valid.sum(-1).max())
            budget = observed = None
            if self.selects:
                budget = sel.budget(length, self.layer_idx, self.num_layers)
                self.hold = sel.decode_hold(length, self.layer_idx, self.num_layers)
                observed = sel.prefill_queries(length, self.layer_idx, self.num_layers)
            if observed:
                w = min(observed, query.shape[-2])
                state.observe(rows, attention_scores(query[..., -w:, :], k, scaling, _rows(mask, w), **score))
            if budget is not None and budget < k.shape[-2]:
                Hq = query.shape[1]
                if sel.stored_heads(H, Hq) != H:  # one selection per query head: repeat KV heads first
                    self.expand = Hq // H
                    k, v = k.repeat_interleave(self.expand, dim=1), v.repeat_interleave(self.expand, dim=1)
                    valid, pos = valid.repeat_interleave(self.expand, dim=1), pos.repeat_interleave(self.expand, dim=1)
                idx = state.select(rows, valid, budget)
                k, v, valid, pos = _take(k, idx), _take(v, idx), valid.gather(2, idx), pos.gather(2, idx)
                state.keep(rows, idx)
                self.pruned = True
            self.state.append(k, v)
        else:
            if observes_decode:
                past_k = self.state.get()[0]
                state.observe(rows, attention_scores(query, torch.cat([past_k, k], dim=-2), scaling, mask, **score))
            self.state.append(k, v)
            if self.selects and self.hold is not None and len(self.state) > self.hold:
                layout = self.state.plan_cut(self.hold)
                idx = state.select_cut(rows, valid, layout)
                self.state.keep(idx, layout)
                valid, pos = valid.gather(2, idx), pos.gather(2, idx)
                state.keep(rows, idx)
                self.pruned = True
        self.valid, self.pos = valid, pos
        if self.ltype.sliding and not self.selects:
            self._slide()

    def _slide(self) -> None:
        """Drop the leading tokens the next query can no longer see (whole encoder chunks)."""
        dead = int((self.pos[0, 0] <= self.seen - self.ltype.window).sum())
        d = self.state.droppable(dead)
        if d:
            self.state.drop_front(d)
            self.valid, self.pos = self.valid[..., d:], self.pos[..., d:]
            self.pruned = True


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def _rows(mask: torch.Tensor | None, w: int) -> torch.Tensor | None:
    return None if mask is None else mask[..., -w:, :]


class KVShrinkCache(Cache):
    """A transformers ``Cache`` whose layers hold a compression method's real storage."""

    def __init__(self, method: str | CompressionMethod, num_layers: int, types: list[LayerType] | None = None):
        self.method = parse(method)
        self.layer_types = types or [LayerType()] * num_layers
        if len(self.layer_types) != num_layers:
            raise ValueError(f"{len(self.layer_types)} layer types for {num_layers} layers")
        self.seen_before_forward: list[int] = [0] * num_layers
        super().__init__(layers=[KVShrinkLayer(self.method, i, num_layers, t) for i, t in enumerate(self.layer_types)])

    @classmethod
    def for_model(cls, model: PreTrainedModel, method: str | CompressionMethod) -> KVShrinkCache:
        m = parse(method)
        check_method(model.config, m)
        return cls(m, text_config(model.config).num_hidden_layers, layer_types(model.config))

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def check_method(config, method: CompressionMethod) -> None:
    """Set-up checks: the model's attention is one kvshrink stores faithfully, and the method can evict
    in the code domain if it evicts while decoding."""
    check_supported(config)
    if method.selector.evicts_while_decoding():
        check_cut(method.codec)


def kvshrink_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention as transformers computes it (SDPA; transformers' eager formula when the module passes
    a logit soft-cap or attention sinks), over the cache's (possibly evicted, dequantised) keys and
    values; then the cache layer stores this step's tokens and scores them if its selector needs it."""
    cache = kwargs.pop("kvshrink_cache", None)
    layer = cache.layers[module.layer_idx] if isinstance(cache, KVShrinkCache) else None
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    if layer is not None:
        check_call(layer.ltype, module.layer_idx, kwargs.get("sliding_window"), "kvshrink")
    mask = attention_mask if layer is None else layer.attention_mask(query.shape[-2], attention_mask)
    if mask is not None and mask.shape[1] not in (1, query.shape[1]):  # per-KV-head validity -> query heads
        mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    repeated = getattr(module, "num_key_value_groups", 1) > 1 and key.shape[1] == query.shape[1]
    if softcap is None and sinks is None and repeated:
        # KV heads stored repeated per query head (query-head granularity): no second repeat_kv
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                               is_causal=mask is None and query.shape[2] > 1)
        out = out.transpose(1, 2).contiguous()
    elif softcap is None and sinks is None:
        out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    else:
        if mask is None:  # transformers skipped a plain causal mask
            T, q = key.shape[-2], query.shape[-2]
            mask = window_mask(torch.arange(T - q, T, device=query.device), torch.arange(T, device=query.device),
                               kwargs.get("sliding_window"))[None, None]
        out = eager_attention(query, key, value, mask, scaling, softcap, sinks).transpose(1, 2).contiguous()
    if layer is not None and layer.pending is not None:
        layer.commit(query, attention_mask, scaling, softcap, sinks)
    return out, None


AttentionInterface.register(ATTN_NAME, kvshrink_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


# transformers 5.24 renamed the cache argument of ``forward``/``generate`` from ``past_key_values``
# to ``cache`` (the old name is still accepted, with a warning). Read whichever the caller used and pass
# ours under the name this model's ``forward`` declares.
CACHE_ARGS = ("cache", "past_key_values")


def cache_argument(model: PreTrainedModel) -> str:
    """The name under which ``model.forward`` takes its KV cache."""
    params = inspect.signature(model.forward).parameters
    for name in CACHE_ARGS:
        if name in params:
            return name
    raise CompressionNotInEffect(
        f"{type(model).__name__}.forward takes none of {CACHE_ARGS}; kvshrink cannot hand it a cache "
        f"(transformers {transformers.__version__})"
    )


def output_cache(output) -> Cache | None:
    """The cache a ``forward`` or ``generate`` output carries, under either name."""
    for name in CACHE_ARGS:
        cache = getattr(output, name, None)
        if isinstance(cache, Cache):
            return cache
    return None


def _given_cache(kwargs: dict) -> Cache | None:
    """Pop every cache argument; a ``KVShrinkCache`` wins over one transformers made on its own."""
    given = [c for c in (kwargs.pop(name, None) for name in CACHE_ARGS) if c is not None]
    ours = [c for c in given if isinstance(c, KVShrinkCache)]
    return (ours or given or [None])[0]


def _pre_hook(model: PreTrainedModel, method: CompressionMethod, arg: str):
    def hook(mod, args, kwargs):
        cache = _given_cache(kwargs)
        fresh = cache is None or (isinstance(cache, DynamicCache) and cache.get_seq_length() == 0)
        if fresh and kwargs.get("use_cache", True) is not False:
            cache = KVShrinkCache.for_model(model, method)
        if cache is not None:
            kwargs[arg] = cache
        if isinstance(cache, KVShrinkCache):
            kwargs["kvshrink_cache"] = cache
            cache.seen_before_forward = [layer.seen for layer in cache.layers]
        return args, kwargs

    return hook


def _post_hook(mod, args, kwargs, output):
    cache = kwargs.get("kvshrink_cache")
    if cache is None:
        return output
    fix = untested_transformers()
    for layer, before in zip(cache.layers, cache.seen_before_forward):
        if layer.pending is not None:
            layer.pending = None
            raise CompressionNotInEffect(
                f"layer {layer.layer_idx} stored its tokens but kvshrink's attention function never ran "
                f"(attention implementation is {mod.config._attn_implementation!r}); {fix}"
            )
        if layer.seen == before:
            raise CompressionNotInEffect(
                f"the model did not use kvshrink's cache at layer {layer.layer_idx} (it was passed as "
                f"{cache_argument(mod)!r}); {fix}"
            )
    return output


@contextlib.contextmanager
def compress(model: PreTrainedModel, method: str | CompressionMethod) -> Iterator[CompressionMethod]:
    """Within the block, every forward of ``model`` (``generate`` included) uses a compressed cache.

    A ``KVShrinkCache`` passed explicitly (as ``cache`` or ``past_key_values``) is used as given. A
    forward that ends without having used kvshrink's cache and attention function in every layer
    raises ``CompressionNotInEffect`` rather than report uncompressed results as compressed."""
    m = parse(method)
    check_method(model.config, m)
    arg = cache_argument(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    handles = [
        model.register_forward_pre_hook(_pre_hook(model, m, arg), with_kwargs=True),
        model.register_forward_hook(_post_hook, with_kwargs=True),
    ]
    try:
        yield m
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)


def cache_bytes(cache: Cache, by_type: bool = False) -> int | dict[str, int]:
    """Real bytes a cache holds: codec payloads plus full-precision residuals (or a DynamicCache's
    tensors). ``by_type``: per layer type (``{"full_attention": .., "sliding_attention": ..}``)."""
    out: dict[str, int] = {}
    for layer in cache.layers:
        name = SLIDING if getattr(layer, "is_sliding", False) else FULL
        if isinstance(layer, KVShrinkLayer):
            n = layer.nbytes()
        else:
            n = sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                    if isinstance(t, torch.Tensor))
        out[name] = out.get(name, 0) + n
    return out if by_type else sum(out.values())


def theoretical_bytes(config, method: str | CompressionMethod, length: int, dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes a ``length``-token context takes per layer type, from the codec's ``bytes_per_token`` (residual
    window excluded): a full layer stores what the selector keeps of the prompt (``budget``), a sliding
    layer its window (``window - 1`` tokens, the selector leaving it alone)."""
    m = parse(method)
    text = text_config(config)
    H, Hq = text.num_key_value_heads, text.num_attention_heads
    D = getattr(text, "head_dim", None) or text.hidden_size // Hq
    per_head = m.codec.bytes_per_token(1, H, D, dtype_bytes) / H
    types = layer_types(config)
    out = {FULL: 0.0, SLIDING: 0.0}
    for i, t in enumerate(types):
        if t.sliding and m.selector.on_sliding == "window":
            n, heads = t.needed(length), H
        else:
            b = m.selector.budget(length, i, len(types))
            n = length if b is None else min(b, length)
            heads = m.selector.stored_heads(H, Hq) if b is not None and b < length else H
        out[t.name] += per_head * heads * n
    return out


def bytes_per_token(config, method: str | CompressionMethod, length: int, dtype_bytes: int = 2) -> float:
    """Theoretical KV bytes per context token at ``length`` tokens, all layers and types together."""
    return sum(theoretical_bytes(config, method, length, dtype_bytes).values()) / max(length, 1)
