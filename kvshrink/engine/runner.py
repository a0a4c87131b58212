"""One forward per call, through an unmodified HF decoder and transformers' attention interface.

``AttentionInterface.register("kvshrink_paged", paged_attention)``; the model is called with
``kvshrink_batch=<context>`` and ``use_cache=False``: transformers forwards the kwarg down to every
attention call, and since ``kvshrink_paged`` has no mask function registered, no mask is built (the
attention function builds its own). No per-architecture code.

A forward is one packed sequence ``[1, N]`` (the varlen layout of vLLM and transformers' continuous
batching): first one token for each of the decode batch's ``B`` sequences, then the step's prefill
segments, each a contiguous run of one prompt's positions. Everything but attention is per token,
so only ``paged_attention`` needs to know: it splits queries, keys and values along the sequence,
views the decode part as ``[B, H, 1, D]`` for ``decode_attention`` and gives each segment to
``prefill_attention``; logits are computed only at the rows that sample (``logits_to_keep``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvshrink.engine.attention import attend_causal, decode_attention, prefill_attention
from kvshrink.engine.batch import DecodeBatch, PrefillSegment
from kvshrink.engine.linear import PackedLinears
from kvshrink.engine.pool import KVStore
from kvshrink.errors import CompressionNotInEffect, untested_transformers
from kvshrink.layer_types import check_call
from kvshrink.methods.scoring import eager_attention

ATTN_NAME = "kvshrink_paged"


@dataclass
class StepContext:
    """One forward's layout: the decode batch's ``B`` tokens first (none if ``batch`` is None), then
    the prefill ``segments`` in order."""

    store: KVStore
    batch: DecodeBatch | None
    segments: list[PrefillSegment]
    layers_run: int = 0


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctx = kwargs.get("kvshrink_batch")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    window, softcap, sinks = kwargs.get("sliding_window") or None, kwargs.get("softcap"), kwargs.get("s_aux")
    if ctx is None:  # called outside the engine: plain causal attention (of the layer's type), nothing stored
        if query.shape[2] == 1:
            out = eager_attention(query, key, value, None, scaling, softcap, sinks) if (softcap or sinks is not None) \
                else F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)
        else:
            out = attend_causal(query, key, value, scaling, window, softcap, sinks)
        return out.transpose(1, 2).contiguous(), None
    ctx.layers_run += 1
    check_call(ctx.store.types[module.layer_idx], module.layer_idx, window, "engine")
    outs = []  # [1, n, Hq, D] per part, in packed order
    B = ctx.batch.B if ctx.batch is not None else 0
    if B:  # [1, H, B, D] -> [B, H, 1, D]: one token per sequence
        q, k, v = (x[0, :, :B].transpose(0, 1).unsqueeze(2).contiguous() for x in (query, key, value))
        out = decode_attention(ctx.batch, module, q, k, v, scaling, window, softcap, sinks)
        outs.append(out.reshape(1, B, *out.shape[2:]))
    # one call per prompt segment: they differ in length (no varlen SDPA on every backend), and a
    # step holds few of them (chunks of at most max_prefill_tokens tokens in all)
    for seg in ctx.segments:
        cols = slice(seg.offset, seg.offset + seg.end - seg.start)
        outs.append(prefill_attention(ctx.store, seg, module, query[:, :, cols], key[:, :, cols], value[:, :, cols],
                                      scaling, window, softcap, sinks))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), None


AttentionInterface.register(ATTN_NAME, paged_attention)


def _attention_configs(model) -> list:
    """Every config object the model's attention reads its implementation from, parents first.

    ``set_attn_implementation`` (once, here: it validates the name and the model's support for it)
    walks every module on each call, ~1 ms a call on a 30-layer model, twice per engine step. What it
    changes is the ``_attn_implementation`` of these configs, so the steps set just those."""
    prev = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        configs, seen = [], set()
        queue = [model.config] + [getattr(m, "config", None) for m in model.modules()]
        while queue:
            c = queue.pop(0)
            if c is None or id(c) in seen or not hasattr(c, "_attn_implementation"):
                continue
            seen.add(id(c))
            configs.append(c)
            queue += [getattr(c, key, None) for key in getattr(c, "sub_configs", {})]
        return [c for c in configs if c._attn_implementation == ATTN_NAME]
    finally:
        model.set_attn_implementation(prev)


class ModelRunner:
    def __init__(self, model, store: KVStore, linears: PackedLinears | None = None):
        self.model, self.store, self.linears = model, store, linears
        self.device = store.device
        self._configs: list | None = None  # the configs whose attention implementation a step sets

    @contextlib.contextmanager
    def attention(self):
        """The engine's attention function, and the packed linear layers if any, for the duration
        (the model serves other callers between steps: the HF path, a comparison against it)."""
        if self._configs is None:
            self._configs = _attention_configs(self.model)
        prev = [c._attn_implementation for c in self._configs]
        for c in self._configs:
            c._attn_implementation = ATTN_NAME
        try:
            with self.linears.active() if self.linears is not None else contextlib.nullcontext():
                yield
        finally:
            for c, impl in zip(self._configs, prev):  # parents first: a parent's setter also sets its sub-configs
                c._attn_implementation = impl

    def _check_every_layer_ran(self, ctx: StepContext) -> None:
        if ctx.layers_run != self.store.L:
            raise CompressionNotInEffect(
                f"the engine's attention function ran in {ctx.layers_run} of {self.store.L} layers "
                f"(attention implementation {self.model.config._attn_implementation!r}); {untested_transformers()}"
            )

    @torch.inference_mode()
    def forward(self, batch: DecodeBatch | None, segments: list[PrefillSegment], token_ids: list[int],
                positions: list[int], keep: list[int]) -> torch.Tensor:
        """One packed forward: ``token_ids``/``positions`` ``[N]`` laid out as ``batch`` (its ``B``
        decode tokens) then ``segments``; each decode token's KV is committed and each prompt whose
        last segment runs is stored. Returns the logits ``[len(keep), V]`` at packed rows ``keep``."""
        N = len(token_ids)
        dev = torch.tensor(token_ids + positions + keep, dtype=torch.long).to(self.device)  # one copy
        ctx = StepContext(self.store, batch, segments)
        out = self.model(input_ids=dev[None, :N], position_ids=dev[None, N : 2 * N], kvshrink_batch=ctx,
                         use_cache=False, logits_to_keep=dev[2 * N :])
        self._check_every_layer_ran(ctx)
        return out.logits[0].float()
