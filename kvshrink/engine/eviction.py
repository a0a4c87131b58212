"""Eviction while decoding (H2O, StreamingLLM): when a layer of a sequence has grown ``evict_every``
tokens past its hold, the selector cuts it back to the hold in one selection.

Per layer, every sequence due at the same length is cut in one batch: decode its tokens, let the
selector choose through its state, free the layer's blocks and store the kept tokens afresh. The
kept tokens are decoded and re-encoded (as the HF path's ``CodecState.keep``): with a lossy codec a
surviving token may be quantised again with new group statistics.
"""

from __future__ import annotations

import torch

from kvshrink.engine.attention import gather_tokens
from kvshrink.engine.batch import DecodeBatch
from kvshrink.engine.pool import Growth, KVStore


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def evict_due(store: KVStore, slots: torch.Tensor, evict_every: int, cut=None) -> int:
    """Cut back every (slot, layer) of ``slots`` that is due; returns how many were cut. ``cut``
    (slots, layer, hold, n) does the cutting (default: select and re-store; the simulator passes one
    that only does the accounting)."""
    st = store
    cut_fn = cut or _cut
    hold = st.hold[slots]  # [b, L]
    stored = st.counters.stored[slots]
    due = (hold >= 0) & (stored >= hold + evict_every)
    if not bool(due.any()):
        return 0
    done = 0
    for layer in due.any(0).nonzero().flatten().tolist():
        rows = due[:, layer].nonzero().flatten()
        keys = torch.stack([hold[rows, layer], stored[rows, layer]], dim=1)
        for h, n in keys.unique(dim=0).tolist():
            same = rows[(keys == torch.tensor([h, n])).all(1)]
            cut_fn(st, slots[same], layer, h, n)
            done += len(same)
    return done


def cut_accounting(st: KVStore, slots: torch.Tensor, layer: int, hold: int, n: int) -> None:
    """What a cut does to the pool: the layer's blocks go back, ``hold`` tokens are stored afresh."""
    st.free_layers(slots, torch.tensor([layer]))
    st.record_stored(slots, layer, hold)


def _cut(st: KVStore, slots: torch.Tensor, layer: int, hold: int, n: int) -> None:
    nothing = torch.zeros(len(slots), st.L, dtype=torch.long)
    batch = DecodeBatch(st, Growth(slots, nothing, nothing, nothing))
    keys = gather_tokens(st, batch, "k", layer, n)
    values = gather_tokens(st, batch, "v", layer, n)
    rows = slots.to(st.device)
    state = st.selector_states[layer]
    valid = torch.ones(len(slots), st.H, n, dtype=torch.bool, device=st.device)
    idx = state.select(rows, valid, hold)
    state.keep(rows, idx)
    st.free_layers(slots, torch.tensor([layer]))
    st.store(slots, layer, _take(keys, idx).contiguous(), _take(values, idx).contiguous())
