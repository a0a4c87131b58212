"""Eviction while decoding (H2O, StreamingLLM): when a layer of a sequence has grown ``evict_every``
tokens past its hold, the selector cuts it back to the hold in one selection.

Per layer, every sequence due with the same counters is cut in one batch: the selector chooses
through its state, the layer's blocks are freed and the kept tokens are stored afresh *in the code
domain* (``methods.base.plan_cut``, as the HF path's ``CodecState.keep``): a kept token's codes and
metadata are copied from the old blocks, never decoded and re-encoded, so a token is quantised at
most once in its life. On a codec that groups tokens (KIVI's keys, GEAR) whole groups are kept and
the cut may keep up to ``group - 1`` tokens fewer than the hold. The layout a cut leaves is a
function of the counters alone, so ``cut_accounting`` (the simulator's cut) is exact.
"""

from __future__ import annotations

import torch

from kvshrink.engine.attention import gather_tokens
from kvshrink.engine.batch import DecodeBatch
from kvshrink.engine.pool import Growth, KVStore
from kvshrink.methods.base import CutLayout, gather_payload, merge_payloads


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def evict_due(store: KVStore, slots: torch.Tensor, evict_every: int, cut=None) -> int:
    """Cut back every (slot, layer) of ``slots`` that is due; returns how many were cut. ``cut``
    (slots, layer, hold, n) does the cutting (default: select and re-store; the simulator passes one
    that only does the accounting)."""
    st = store
    cut_fn = cut or _cut
    hold = st.hold[slots]  # [b, L]
    c = st.counters
    stored = c.stored[slots]
    due = (hold >= 0) & (stored >= hold + evict_every)
    if not bool(due.any()):
        return 0
    done = 0
    for layer in due.any(0).nonzero().flatten().tolist():
        rows = due[:, layer].nonzero().flatten()
        s = slots[rows]
        # sequences whose cut has one layout: same hold, length and encoded counts
        keys = torch.stack([hold[rows, layer], stored[rows, layer], c.encoded_k[s, layer], c.encoded_v[s, layer]], 1)
        for key in keys.unique(dim=0):
            same = rows[(keys == key).all(1)]
            cut_fn(st, slots[same], layer, int(key[0]), int(key[1]))
            done += len(same)
    return done


def cut_accounting(st: KVStore, slots: torch.Tensor, layer: int, hold: int, n: int) -> CutLayout:
    """What a cut does to the pool: the layer's blocks go back and the kept tokens are stored afresh,
    each stream encoding what the cut's layout says."""
    layout = st.cut_layout(int(slots[0]), layer, hold)
    st.free_layers(slots, torch.tensor([layer]))
    st.record_stored(slots, layer, layout.kept, (layout.encoded_k, layout.encoded_v))
    return layout


def _cut(st: KVStore, slots: torch.Tensor, layer: int, hold: int, n: int) -> None:
    layout = st.cut_layout(int(slots[0]), layer, hold)
    nothing = torch.zeros(len(slots), st.L, dtype=torch.long)
    batch = DecodeBatch(st, Growth(slots, nothing, nothing, nothing))
    rows = slots.to(st.device)
    state = st.selector_states[layer]
    valid = torch.ones(len(slots), st.H, n, dtype=torch.bool, device=st.device)
    idx = state.select_cut(rows, valid, layout)
    state.keep(rows, idx)
    nb = batch.blocks[layer]
    kept = {}
    for side, encoded in (("k", layout.encoded_k), ("v", layout.encoded_v)):
        old_encoded = int(st.counters.encoded_k[slots[0], layer] if side == "k" else st.counters.encoded_v[slots[0], layer])
        fp = _take(gather_tokens(st, batch, side, layer, n), idx)  # the kept tokens, decoded
        payload = None
        if encoded:
            head = idx[..., :encoded]
            enc, fields, chunk = st.encoder(side), st.fields(side), (st.k if side == "k" else st.v).chunk
            old = head < old_encoded
            codes = st.slot_payload(side, batch.tables[:, layer, :nb]) if old_encoded else None
            if bool(old.all()):
                payload = gather_payload(fields, chunk, codes, head)
            else:  # chunk-1 stream: residual tokens landing in the encoded part are encoded now, once
                payload = enc.encode(fp[:, :, :encoded].contiguous())
                if bool(old.any()):
                    payload = merge_payloads(fields, gather_payload(fields, chunk, codes, head.clamp(max=old_encoded - 1)),
                                             payload, old)
        kept[side] = (payload, fp[:, :, encoded:])
    cut_accounting(st, slots, layer, hold, n)
    tables = st.table[slots, layer].to(st.device)
    zero = torch.zeros(len(slots), dtype=torch.long, device=st.device)
    for side, encoded in (("k", layout.encoded_k), ("v", layout.encoded_v)):
        payload, res = kept[side]
        if payload is not None:
            st.write_payload(side, tables, zero, payload, encoded)
        ring = st.kres if side == "k" else st.vres
        if ring is not None and res.shape[2]:
            ring[layer, rows, :, : res.shape[2]] = res
