"""Packs a batch and runs an unmodified HF decoder through transformers' attention interface.

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

from kvshrink.engine.attention import StepPlan, decode_attention, prefill_attention, timed
from kvshrink.engine.pool import KVStore
from kvshrink.errors import CompressionNotInEffect, untested_transformers

ATTN_NAME = "kvshrink_paged"


@dataclass
class PrefillContext:
    store: KVStore
    slot: int
    acc_cap: int
    mode: str = "prefill"
    layers_run: int = 0


@dataclass
class DecodeContext:
    plan: StepPlan
    needs_acc: bool
    mode: str = "decode"
    layers_run: int = 0


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctx = kwargs.get("kvshrink_batch")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if ctx is None:  # called outside the engine: plain causal attention, nothing stored
        out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling,
                                             enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    ctx.layers_run += 1
    if ctx.mode == "prefill":
        return prefill_attention(ctx, module, query, key, value, scaling), None
    return decode_attention(ctx.plan, module, query, key, value, scaling, ctx.needs_acc), None


AttentionInterface.register(ATTN_NAME, paged_attention)


class ModelRunner:
    def __init__(self, model, store: KVStore, evict_every: int):
        self.model, self.store, self.evict_every = model, store, evict_every
        self.device = store.device
        sel = store.method.selector
        self.needs_acc = sel.needs == "accumulated" and sel.evicts_in_decode

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

    def acc_cap(self, length: int) -> int:
        sel = self.store.method.selector
        holds = [sel.budget(length, layer, self.store.L) for layer in range(self.store.L)]
        top = max([h for h in holds if h is not None] + [getattr(sel, "budget_tokens", 0) or 0, length])
        return top + self.evict_every + 1

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
        ctx = PrefillContext(self.store, slot, self.acc_cap(len(token_ids)))
        with timed("prefill.forward"):
            out = self.model(input_ids=ids, position_ids=pos, kvshrink_batch=ctx, use_cache=False, logits_to_keep=1)
        self._check_every_layer_ran(ctx)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, plan: StepPlan, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each sequence of the plan; returns logits [B, V]."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)[:, None]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[:, None]
        if self.needs_acc:
            accs = [self.store.meta[s].acc for s in plan.slots]
            present = [a for a in accs if a is not None]
            if present:
                st = self.store
                cap = max(a.shape[-1] for a in present)
                plan.acc = torch.zeros(len(accs), st.L, st.Hq, cap, dtype=torch.float32, device=self.device)
                for b, a in enumerate(accs):
                    if a is not None:
                        plan.acc[b, :, :, : a.shape[-1]] = a
        ctx = DecodeContext(plan, self.needs_acc and plan.acc is not None)
        with timed("decode.forward"):
            out = self.model(input_ids=ids, position_ids=pos, kvshrink_batch=ctx, use_cache=False, logits_to_keep=1)
        self._check_every_layer_ran(ctx)
        plan.finish()
        return out.logits[:, -1].float()
