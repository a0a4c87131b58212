"""Eviction while decoding (H2O, StreamingLLM): when a layer of a sequence has grown ``evict_every``
tokens past its hold, the selector cuts it back to the hold in one selection.

Every (sequence, layer) due with the same counters is cut in one batch, across layers as well as
sequences (a sequence's layers are usually due together with one layout): the selector chooses
through each layer's state, the pairs' blocks are freed and the kept tokens are stored afresh *in
the code domain* (``methods.base.plan_cut``, as the HF path's ``CodecState.keep``): a kept token's
codes and metadata are copied from the old blocks, never decoded and re-encoded, so a token is
quantised at most once in its life. On a codec that groups tokens (KIVI's keys, GEAR) whole groups
are kept and the cut may keep up to ``group - 1`` tokens fewer than the hold. The layout a cut
leaves is a function of the counters alone, so ``cut_accounting`` (the simulator's cut) is exact.
"""

from __future__ import annotations

import torch

from kvshrink.engine.attention import stored_tokens
from kvshrink.engine.pool import KVStore
from kvshrink.methods.base import CutLayout, gather_payload, merge_payloads


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def evict_due(store: KVStore, slots: torch.Tensor, evict_every: int, cut=None) -> int:
    """Cut back every (slot, layer) of ``slots`` that is due; returns how many were cut. ``cut``
    (slots, layers, hold, n: pairs of one layout) does the cutting (default: select and re-store;
    the simulator passes one that only does the accounting)."""
    st = store
    cut_fn = cut or _cut
    hold = st.hold[slots]  # [b, L]
    c = st.counters
    stored = c.stored[slots]
    due = (hold >= 0) & (stored >= hold + evict_every)
    if not bool(due.any()):
        return 0
    rows, layers = due.nonzero(as_tuple=True)  # the due pairs, slot-major
    s = slots[rows]
    # pairs whose cut has one layout: same hold, length and encoded counts
    keys = torch.stack([hold[rows, layers], stored[rows, layers], c.encoded_k[s, layers], c.encoded_v[s, layers]], 1)
    for key in keys.unique(dim=0):
        same = (keys == key).all(1)
        cut_fn(st, s[same], layers[same], int(key[0]), int(key[1]))
    return len(rows)


def cut_accounting(st: KVStore, slots: torch.Tensor, layers: torch.Tensor, hold: int, n: int) -> CutLayout:
    """What a cut does to the pool: the pairs' blocks go back and the kept tokens are stored afresh,
    each stream encoding what the cut's layout says."""
    layout = st.cut_layout(int(slots[0]), int(layers[0]), hold)
    st.free_layers(slots, layers)
    st.record_stored(slots, layers, layout.kept, (layout.encoded_k, layout.encoded_v))
    return layout


def _cut(st: KVStore, slots: torch.Tensor, layers: torch.Tensor, hold: int, n: int) -> None:
    layout = st.cut_layout(int(slots[0]), int(layers[0]), hold)
    rows, layers_d = slots.to(st.device), layers.to(st.device)
    idx = torch.empty(len(slots), st.H, layout.kept, dtype=torch.long, device=st.device)
    for layer in layers.unique().tolist():  # each layer's selector state chooses for its pairs
        here = layers_d == layer
        state = st.selector_states[layer]
        valid = torch.ones(int(here.sum()), st.H, n, dtype=torch.bool, device=st.device)
        idx[here] = chosen = state.select_cut(rows[here], valid, layout)
        state.keep(rows[here], chosen)
    old_tables = st.table[slots, layers].to(st.device)
    nb = int(st.counters.blocks[slots, layers].max())
    kept = {}
    for side, encoded in (("k", layout.encoded_k), ("v", layout.encoded_v)):
        old_encoded = int((st.counters.encoded_k if side == "k" else st.counters.encoded_v)[slots[0], layers[0]])
        fp = _take(stored_tokens(st, side, slots, layers, n), idx)  # the kept tokens, decoded
        payload = None
        if encoded:
            head = idx[..., :encoded]
            enc, fields, chunk = st.encoder(side), st.fields(side), (st.k if side == "k" else st.v).chunk
            old = head < old_encoded
            codes = st.slot_payload(side, old_tables[:, :nb]) if old_encoded else None
            if bool(old.all()):
                payload = gather_payload(fields, chunk, codes, head)
            else:  # chunk-1 stream: residual tokens landing in the encoded part are encoded now, once
                payload = enc.encode(fp[:, :, :encoded].contiguous())
                if bool(old.any()):
                    payload = merge_payloads(fields, gather_payload(fields, chunk, codes, head.clamp(max=old_encoded - 1)),
                                             payload, old)
        kept[side] = (payload, fp[:, :, encoded:])
    cut_accounting(st, slots, layers, hold, n)
    tables = st.table[slots, layers].to(st.device)
    zero = torch.zeros(len(slots), dtype=torch.long, device=st.device)
    for side, encoded in (("k", layout.encoded_k), ("v", layout.encoded_v)):
        payload, res = kept[side]
        if payload is not None:
            st.write_payload(side, tables, zero, payload, encoded)
        ring = st.kres if side == "k" else st.vres
        if ring is not None and res.shape[2]:
            ring[layers_d, rows, :, : res.shape[2]] = res
