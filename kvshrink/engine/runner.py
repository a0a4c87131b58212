"""One forward per call, through an unmodified HF decoder and transformers' attention interface.

``AttentionInterface.register("kvshrink_paged", paged_attention)``; the model is called with
``kvshrink_batch=<context>`` and ``use_cache=False``: transformers forwards the kwarg down to every
attention call, and since ``kvshrink_paged`` has no mask function registered, no mask is built (the
attention function builds its own). No per-architecture code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvshrink.engine.attention import attend_causal, decode_attention, prefill_attention
from kvshrink.engine.batch import DecodeBatch
from kvshrink.engine.pool import KVStore
from kvshrink.engine.timers import timed
from kvshrink.errors import CompressionNotInEffect, untested_transformers
from kvshrink.layer_types import check_call
from kvshrink.methods.scoring import eager_attention

ATTN_NAME = "kvshrink_paged"


@dataclass
class PrefillContext:
    store: KVStore
    slot: int
    layers_run: int = 0


@dataclass
class DecodeContext:
    batch: DecodeBatch
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
    store = ctx.store if isinstance(ctx, PrefillContext) else ctx.batch.store
    check_call(store.types[module.layer_idx], module.layer_idx, window, "engine")
    if isinstance(ctx, PrefillContext):
        return prefill_attention(ctx.store, ctx.slot, module, query, key, value, scaling, window, softcap, sinks), None
    return decode_attention(ctx.batch, module, query, key, value, scaling, window, softcap, sinks), None


AttentionInterface.register(ATTN_NAME, paged_attention)


class ModelRunner:
    def __init__(self, model, store: KVStore):
        self.model, self.store = model, store
        self.device = store.device

    @contextlib.contextmanager
    def attention(self):
        prev = self.model.config._attn_implementation
        if prev != ATTN_NAME:
            self.model.set_attn_implementation(ATTN_NAME)
        try:
            yield
        finally:
            if prev != ATTN_NAME:
                self.model.set_attn_implementation(prev)

    def _check_every_layer_ran(self, ctx: PrefillContext | DecodeContext) -> None:
        if ctx.layers_run != self.store.L:
            raise CompressionNotInEffect(
                f"the engine's attention function ran in {ctx.layers_run} of {self.store.L} layers "
                f"(attention implementation {self.model.config._attn_implementation!r}); {untested_transformers()}"
            )

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        """Run the prompt of one sequence; store its (selected, encoded) KV; return last logits [V]."""
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        pos = torch.arange(len(token_ids), device=self.device)[None]
        ctx = PrefillContext(self.store, slot)
        with timed("prefill.forward"):
            out = self.model(input_ids=ids, position_ids=pos, kvshrink_batch=ctx, use_cache=False, logits_to_keep=1)
        self._check_every_layer_ran(ctx)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each sequence of the batch; returns logits [B, V]."""
        ids_pos = torch.tensor([token_ids, positions], dtype=torch.long).to(self.device)
        ctx = DecodeContext(batch)
        with timed("decode.forward"):
            out = self.model(input_ids=ids_pos[0, :, None], position_ids=ids_pos[1, :, None], kvshrink_batch=ctx,
                             use_cache=False, logits_to_keep=1)
        self._check_every_layer_ran(ctx)
        return out.logits[:, -1].float()
