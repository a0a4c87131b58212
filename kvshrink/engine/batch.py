"""A decode step's index tensors for every layer, built once per step with one host-to-device copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.engine.pool import Growth, KVStore


@dataclass
class CommitGroup:
    """Sequences of one layer that encode ``n`` tokens out of their residual ring this step."""

    n: int
    rows: torch.Tensor  # [G] batch rows, on the device


class DecodeBatch:
    """One new token for each of ``growth.slots``; counters are those before the step.

    Device tensors ``[B, L]``: ``encoded_k/v``, ``ring_k/v_start``, ``ring_k/v_len``, ``stored``,
    ``encode_k/v`` (what this step encodes); ``tables`` ``[B, L, nb]``. Host: ``blocks[l]`` (the most
    blocks any sequence holds in layer ``l``) and ``width[l]`` (stored-order columns of layer ``l``,
    the new token included), and per layer the commit groups of each stream.
    """

    def __init__(self, store: KVStore, growth: Growth):
        st = self.store = store
        self.slots = growth.slots
        self.B = len(growth.slots)
        c = st.counters.rows(growth.slots)
        nb = c.blocks.amax(0)  # [L]
        self.blocks = nb.tolist()
        self.width = torch.maximum(nb * st.bs, c.stored.amax(0) + 1).tolist()
        tables = st.table[growth.slots, :, : max(max(self.blocks), 1)]
        host = torch.cat([
            torch.cat([c.stacked(), growth.encode_k[None], growth.encode_v[None]]).reshape(-1),
            tables.reshape(-1), growth.slots,
        ])
        dev = host.to(st.device)  # the step's one copy
        B, L = self.B, st.L
        n_counts = 9 * B * L
        counts = dev[:n_counts].view(9, B, L)
        (self.encoded_k, self.encoded_v, self.ring_k_start, self.ring_k_len, self.ring_v_start, self.ring_v_len,
         self.stored, self.encode_k, self.encode_v) = counts.unbind(0)
        self.tables = dev[n_counts : n_counts + tables.numel()].view(tables.shape)
        self.slots_d = dev[n_counts + tables.numel() :]
        # the rows leaving each ring, for the commits the decode kernel does not do itself
        flushed = st.decode_kernel.flush if st.decode_kernel is not None else (False, False)
        self.commits_k = _commit_groups(growth.encode_k, st.k.ring and not flushed[0], st.device)
        self.commits_v = _commit_groups(growth.encode_v, st.v.ring and not flushed[1], st.device)
        self.observe = st.method.selector.observes_decode() and bool((st.hold[growth.slots] >= 0).any())


@dataclass
class PrefillSegment:
    """Context positions ``[start, end)`` of one sequence's prefill of ``total`` tokens, at ``offset``
    in a step's packed forward. ``staging`` holds a split prompt's earlier chunks (None: it runs whole)."""

    slot: int
    start: int
    end: int
    total: int
    offset: int
    staging: PrefillStaging | None = None

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end == self.total

    @property
    def last(self) -> bool:
        return self.end == self.total


def _commit_groups(encode: torch.Tensor, flushes: bool, device) -> list[list[CommitGroup]]:
    """Per layer, the distinct non-zero counts of tokens leaving the ring (usually none or one);
    all empty where ``flushes`` is false (no ring, or the decode kernel flushes it)."""
    out: list[list[CommitGroup]] = [[] for _ in range(encode.shape[1])]
    if not flushes:
        return out
    for layer in encode.any(0).nonzero().flatten().tolist():
        col = encode[:, layer]
        out[layer] = [CommitGroup(n, (col == n).nonzero().flatten().to(device)) for n in col.unique().tolist() if n]
    return out


class PrefillStaging:
    """A split prompt's full-precision keys and values per layer (``k``, ``v`` ``[L, Hkv, T, D]``, as the
    attention modules pass them) and the last queries each layer's selector observes (``q[l]``
    ``[Hq, n_l, D]``, positions ``q_start[l] ..``), filled chunk by chunk until its last chunk stores
    the prompt into its pool blocks.

    It lives *outside* the pool (the pool's blocks for the prompt are taken at admission, as for an
    unchunked one, and hold encoded bytes only): one such buffer per prompt in flight, held by its
    ``Request`` and dropped when its prefill ends, it is preempted, or it finishes. The scheduler
    continues a prompt in flight before it admits another, so at most one is in flight at a time:
    the extra memory is bounded by one prompt's full-precision KV (plus observed queries)."""

    def __init__(self, store: KVStore, total: int):
        st, sel = store, store.method.selector
        self.total = total
        kv_heads = st.H // st.expand
        self.k = torch.empty(st.L, kv_heads, total, st.D, dtype=st.dtype, device=st.device)
        self.v = torch.empty_like(self.k)
        n_obs = [min(total, sel.prefill_queries(total, layer, st.L)) if st.selects[layer] else 0
                 for layer in range(st.L)]
        self.q = [torch.empty(st.Hq, n, st.D, dtype=st.dtype, device=st.device) for n in n_obs]
        self.q_start = [total - n for n in n_obs]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, *self.q))
