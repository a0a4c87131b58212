"""Attention over paged compressed blocks: gather, attend, commit. Nothing here allocates or plans.

Decode, per layer (``decode_attention``): gather the batch's blocks with one ``index_select`` per
payload field and decode them in one vectorised call into ``[B, nb, H, bs, D]``; score them in that
layout (batched matmul), score the full-precision residual ring and the new token apart, and run the
softmax over the small ``[B, Hq, L]`` logits in *stored order* (blocks, then residual). Attention does
not care about order, and it is the order the selectors see. A selector that observes decoding (H2O)
gets these probabilities. Then ``commit`` stores the new token.

Prefill (``prefill_attention``): one sequence's prompt ``[1, T]``, or one chunk of it, causal SDPA
over its own full-precision keys (a chunk's earlier chunks wait in a ``PrefillStaging`` outside the
pool); at the prompt's end the selector observes the queries it asks for, selects, and the kept
tokens go through the codec's stream policy into blocks and the residual ring.

Layer types, as the model's attention module passes them (``sliding_window``, ``softcap``, ``s_aux``):
a sliding layer attends to the last ``window`` positions (prefill: a windowed causal mask; decode:
the stored columns before ``stored - (window - 1)`` are masked; a sliding layer's stored order is
position order, as no selector runs there) and stores only its window's need; logits are soft-capped
(``c * tanh(x / c)``, after the scaling, before the mask) and sink logits join the softmax as one
more column per query head, as in transformers' eager attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvshrink.engine.batch import DecodeBatch, PrefillSegment, PrefillStaging
from kvshrink.engine.pool import KVStore
from kvshrink.engine.timers import timed
from kvshrink.methods.scoring import attention_scores, cap, eager_attention, window_mask


def ring_positions(batch: DecodeBatch, side: str, layer: int, ring: int, scratch: int) -> torch.Tensor:
    """[B, ring]: the token position (stored order) of each residual-ring slot, ``scratch`` if empty."""
    k = side == "k"
    return ring_columns((batch.ring_k_start if k else batch.ring_v_start)[:, layer],
                        (batch.ring_k_len if k else batch.ring_v_len)[:, layer],
                        (batch.encoded_k if k else batch.encoded_v)[:, layer], ring, scratch)


def ring_columns(start: torch.Tensor, length: torch.Tensor, base: torch.Tensor, ring: int, scratch: int) -> torch.Tensor:
    """[R, ring]: per row (ring start, length, tokens in blocks before it), each ring slot's position."""
    rel = (torch.arange(ring, device=start.device)[None, :] - start[:, None]) % ring
    return torch.where(rel < length[:, None], base[:, None] + rel, torch.full_like(rel, scratch))


def ring_rows(batch: DecodeBatch, layer: int) -> torch.Tensor:
    """[B, 1]: the batch's residual rings of ``layer`` as blocks of the pool's ring readers."""
    return (batch.slots_d + layer * batch.store.max_slots)[:, None]


def ring_full(batch: DecodeBatch, ring: int) -> torch.Tensor:
    return torch.full((batch.B,), ring, dtype=torch.long, device=batch.slots_d.device)


def stored_tokens(store: KVStore, side: str, slots: torch.Tensor, layers: torch.Tensor, n: int) -> torch.Tensor:
    """[R, H, n, D]: the first ``n`` stored tokens of layer ``layers[r]`` of slot ``slots[r]`` (host
    index tensors, any non-empty set of pairs) in stored order (blocks, then ring), decoded."""
    st, c = store, store.counters
    R, H, D, bs = len(slots), st.H, st.D, st.bs
    nb = int(c.blocks[slots, layers].max())
    width = max(nb * bs, int(c.stored[slots, layers].max()) + 1)
    out = torch.zeros(R, H, width + 1, D, dtype=st.dtype, device=st.device)
    if nb:
        tables = st.table[slots, layers, :nb].to(st.device)
        dec = st.read_blocks(side, tables.reshape(-1))  # [R*nb, H, bs, D]
        out[:, :, : nb * bs].view(R, H, nb, bs, D).copy_(dec.view(R, nb, H, bs, D).transpose(1, 2))
    ring = st.k.ring if side == "k" else st.v.ring
    if ring:
        k = side == "k"
        res = (st.kres if k else st.vres)[layers.to(st.device), slots.to(st.device)]  # [R, H, ring, D]
        counts = (c.ring_k_start, c.ring_k_len, c.encoded_k) if k else (c.ring_v_start, c.ring_v_len, c.encoded_v)
        tgt = ring_columns(*(t[slots, layers].to(st.device) for t in counts), ring, width)
        out.scatter_(2, tgt[:, None, :, None].expand(R, H, ring, D), res)
    return out[:, :, :n]


def commit(batch: DecodeBatch, layer: int, key: torch.Tensor, value: torch.Tensor,
           written: tuple[bool, bool] = (False, False), flushed: tuple[bool, bool] = (False, False)) -> None:
    """Store this step's token of every sequence (``key``/``value`` [B, H, 1, D]) for ``layer``:
    straight into blocks, or into the residual ring and out of it as the stream policy says.
    ``written``/``flushed``: per side, the decode kernel stored the new token / encoded the rows
    leaving the ring already."""
    st = batch.store
    tables = batch.tables[:, layer]
    for side, x, done, flush_done in (("k", key, written[0], flushed[0]), ("v", value, written[1], flushed[1])):
        lay = st.k if side == "k" else st.v
        encoded = (batch.encoded_k if side == "k" else batch.encoded_v)[:, layer]
        if not lay.ring:
            if not done:
                st.write_encoded(side, tables, encoded, x)
            continue
        ring_t = (st.kres if side == "k" else st.vres)[layer]
        start = (batch.ring_k_start if side == "k" else batch.ring_v_start)[:, layer]
        length = (batch.ring_k_len if side == "k" else batch.ring_v_len)[:, layer]
        if not done:
            ring_t[batch.slots_d, :, (start + length) % lay.ring] = x[:, :, 0]
        if flush_done:
            continue
        for group in (batch.commits_k if side == "k" else batch.commits_v)[layer]:
            rows = group.rows
            pos = (start[rows, None] + torch.arange(group.n, device=rows.device)[None, :]) % lay.ring
            leaving = ring_t[batch.slots_d[rows, None], :, pos]  # [G, n, H, D]
            st.write_encoded(side, tables[rows], encoded[rows], leaving.transpose(1, 2))


def attend_causal(query, key, value, scaling, window=None, softcap=None, sinks=None, past: int = 0):
    """Causal self-attention of one sequence's prompt over its own keys: SDPA (``is_causal``, or a
    windowed mask), transformers' eager formula with a soft-cap or sinks. ``query`` ``[1, Hq, q, D]``
    holds the last ``q`` of the ``T = past + q`` key positions (``past > 0``: a prefill chunk, whose
    earlier positions come first in ``key``; SDPA's ``is_causal`` aligns top-left, so a mask then)."""
    T = key.shape[-2]
    if window is None and softcap is None and sinks is None and not past:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    pos = torch.arange(T, device=query.device)
    mask = window_mask(pos[past:], pos, window)[None, None]
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return eager_attention(query, key, value, mask, scaling, softcap, sinks)


def decode_attention(batch: DecodeBatch, module, query, key, value, scaling, window=None, softcap=None,
                     sinks=None):
    """Paged attention for one new token per sequence, without assembling a ``[B, H, L, D]`` cache.

    Keys and values are scored where they lie: the gathered (decoded) blocks ``[B, nb, H, bs, D]``
    by one batched matmul, the full-precision residual ring and the new token by small ones. Only the
    logits (``[B, Hq, L]``, tiny) are laid out in stored order, where the softmax runs; the values
    are then weighted in their own layout. Keys and values may split between blocks and ring at
    different points (KIVI), so each side maps its own columns to token positions.
    """
    st = batch.store
    layer = module.layer_idx
    if st.expand > 1:  # KV stored per query head
        key, value = key.repeat_interleave(st.expand, dim=1), value.repeat_interleave(st.expand, dim=1)
    B, Hq, _, D = query.shape
    H, bs = st.H, st.bs
    g = Hq // H
    q = query.view(B, H, g, D)
    if st.decode_kernel is not None:
        return _fused_decode(batch, layer, q, key, value, scaling, window, softcap, sinks)
    nb, width = batch.blocks[layer], batch.width[layer]
    n = batch.stored[:, layer]
    kread, vread = st.k_reader, st.v_reader
    if nb:
        tables = batch.tables[:, layer, :nb]
        with timed("decode.gather_dequant"):  # only what no kernel reads in place
            ids = tables.reshape(-1)
            kb = st.read_blocks("k", ids).view(B, nb, H, bs, D) if kread is None else None
            vb = st.read_blocks("v", ids).view(B, nb, H, bs, D) if vread is None else None
    with timed("decode.attend"):
        # scaled (and soft-capped) logits in stored order, a scratch column, and a sink column if any
        extra = 2 if sinks is not None else 1
        logits = torch.full((B, H, g, width + extra), float("-inf"), dtype=torch.float32, device=q.device)
        pos = torch.arange(nb * bs, device=q.device)
        if nb:
            kvalid = pos[None, :] < batch.encoded_k[:, layer, None]
            if kread is not None:  # scaled logits straight into place, -inf past each row's blocks
                kread.scores(q, tables, batch.encoded_k[:, layer], logits, scaling)
                if softcap is not None:
                    logits[..., : nb * bs] = cap(logits[..., : nb * bs], softcap).masked_fill(
                        ~kvalid[:, None, None, :], float("-inf"))
            else:
                block_logits = torch.matmul(q[:, None], kb.transpose(-1, -2)).float()  # [B, nb, H, g, bs]
                block_logits = cap(block_logits.permute(0, 2, 3, 1, 4).reshape(B, H, g, nb * bs) * scaling, softcap)
                logits[..., : nb * bs] = block_logits.masked_fill(~kvalid[:, None, None, :], float("-inf"))
        if st.k.ring:
            tk = ring_positions(batch, "k", layer, st.k.ring, width)
            if st.kres_reader is not None:  # every ring slot, in place; empty ones go to the scratch column
                ring_logits = torch.empty(B, H, g, st.k.ring, dtype=torch.float32)
                st.kres_reader.scores(q, ring_rows(batch, layer), ring_full(batch, st.k.ring), ring_logits, scaling)
                ring_logits = cap(ring_logits, softcap)
            else:
                kr = st.kres[layer].index_select(0, batch.slots_d)  # [B, H, ring, D]
                ring_logits = cap(torch.matmul(q, kr.transpose(-1, -2)).float() * scaling, softcap)
            logits.scatter_(3, tk[:, None, None, :].expand(B, H, g, -1), ring_logits)
        new_logit = cap((q * key).sum(-1, dtype=torch.float32) * scaling, softcap)  # [B, H, g]: the new token's key
        logits.scatter_(3, n[:, None, None, None].expand(B, H, g, 1), new_logit[..., None])
        logits[..., width] = float("-inf")  # the scratch column took the empty ring slots
        if window is not None:  # stored order is position order on a sliding layer
            cols = torch.arange(width, device=q.device)
            seen = cols[None, :] >= (n - (window - 1))[:, None]  # [B, width]; the new token is column n
            logits[..., :width] = logits[..., :width].masked_fill(~seen[:, None, None, :], float("-inf"))
        if sinks is not None:
            logits[..., width + 1] = sinks.float().view(H, g)
        probs = torch.softmax(logits, dim=-1)  # [B, H, g, width + extra]
        if batch.observe and st.selects[layer]:
            st.selector_states[layer].observe(batch.slots_d, probs[..., :width].reshape(B, Hq, width))
        p = probs.to(value.dtype)
        out = p.gather(3, n[:, None, None, None].expand(B, H, g, 1)) * value  # [B, H, g, D]
        if nb and vread is not None:
            out = out + vread.values(probs, tables, batch.encoded_v[:, layer]).to(out.dtype)
        elif nb:
            vvalid = pos[None, :] < batch.encoded_v[:, layer, None]
            pb = p[..., : nb * bs].masked_fill(~vvalid[:, None, None, :], 0.0)
            pb = pb.view(B, H, g, nb, bs).permute(0, 3, 1, 2, 4)  # [B, nb, H, g, bs]
            out = out + torch.matmul(pb, vb).sum(1)
        if st.v.ring:
            tv = ring_positions(batch, "v", layer, st.v.ring, width)
            pr = p.gather(3, tv[:, None, None, :].expand(B, H, g, -1))  # empty slots read the scratch (0)
            if st.vres_reader is not None:
                out = out + st.vres_reader.values(pr, ring_rows(batch, layer), ring_full(batch, st.v.ring)).to(out.dtype)
            else:
                out = out + torch.matmul(pr, st.vres[layer].index_select(0, batch.slots_d))
    with timed("decode.commit"):
        commit(batch, layer, key, value)
    return out.view(B, Hq, 1, D).transpose(1, 2).contiguous()


def _fused_decode(batch: DecodeBatch, layer: int, q, key, value, scaling, window, softcap, sinks):
    """``decode_attention`` in one kernel call per layer (``KVStore.decode_kernel``), then the commit's
    remaining work (flushes out of the rings, encoding of a quantised token)."""
    st, kern = batch.store, batch.store.decode_kernel
    B, H, g, D = q.shape
    width = batch.width[layer]
    observe = batch.observe and st.selects[layer]
    with timed("decode.attend"):
        counters = ((batch.encoded_k[:, layer], batch.ring_k_start[:, layer], batch.ring_k_len[:, layer],
                     batch.encode_k[:, layer]),
                    (batch.encoded_v[:, layer], batch.ring_v_start[:, layer], batch.ring_v_len[:, layer],
                     batch.encode_v[:, layer]))
        out, probs = kern(q.float(), key.float(), value.float(), layer, batch.tables[:, layer, : max(batch.blocks[layer], 1)],
                          batch.slots_d, batch.stored[:, layer], counters, scaling, softcap, window, sinks,
                          probs_width=width if observe else 0)
        if observe:
            st.selector_states[layer].observe(batch.slots_d, probs.view(B, H * g, width))
    with timed("decode.commit"):
        commit(batch, layer, key, value, written=kern.write_new, flushed=kern.flush)
    return out.to(value.dtype).view(B, H * g, 1, D).transpose(1, 2).contiguous()


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def prefill_attention(store: KVStore, seg: PrefillSegment, module, query, key, value, scaling, window=None,
                      softcap=None, sinks=None):
    """One sequence's prompt, or one chunk ``[start, end)`` of it (``seg``; ``query``/``key``/``value``
    ``[1, H, end - start, D]``): causal attention over its own full-precision keys, then, at the
    prompt's end, observe, select and store (a sliding layer stores its window's need, unselected).

    A chunk of a split prompt writes its keys, values (and the queries the selector observes) into
    the prompt's ``PrefillStaging`` and attends over the staged positions ``< end``: what the whole
    prompt's attention computes for those rows. The last chunk selects and stores from the staged
    prompt, so the selector and codec see exactly what an unchunked prefill gives them."""
    layer = module.layer_idx
    if seg.whole:
        with timed("prefill.sdpa"):
            out = attend_causal(query, key, value, scaling, window, softcap, sinks)
        with timed("prefill.select_store"):
            _select_store(store, seg.slot, layer, query, key, value, scaling, window, softcap, sinks)
        return out.transpose(1, 2).contiguous()
    stg: PrefillStaging = seg.staging
    s, e = seg.start, seg.end
    stg.k[layer, :, s:e], stg.v[layer, :, s:e] = key[0], value[0]
    q_from = max(s, stg.q_start[layer])  # the observed queries are the prompt's last ones
    if q_from < e:
        stg.q[layer][:, q_from - stg.q_start[layer] : e - stg.q_start[layer]] = query[0, :, q_from - s :]
    with timed("prefill.sdpa"):
        k0 = max(0, s - (window - 1)) if window else 0  # a sliding layer's chunk sees no key before
        out = attend_causal(query, stg.k[None, layer, :, k0:e], stg.v[None, layer, :, k0:e], scaling, window,
                            softcap, sinks, past=s - k0)
    if seg.last:
        with timed("prefill.select_store"):
            _select_store(store, seg.slot, layer, stg.q[layer][None], stg.k[None, layer], stg.v[None, layer],
                          scaling, window, softcap, sinks)
    return out.transpose(1, 2).contiguous()


def _select_store(st: KVStore, slot: int, layer: int, query, key, value, scaling, window, softcap, sinks) -> None:
    """A whole prompt's keys and values ``[1, H, T, D]`` of ``layer`` into ``slot``: the selector observes
    the last queries it asks for (``query`` holds at least those), selects, and the kept go to the pool."""
    sel = st.method.selector
    T = key.shape[-2]
    if st.expand > 1:  # KV stored per query head
        key, value = key.repeat_interleave(st.expand, dim=1), value.repeat_interleave(st.expand, dim=1)
    k, v = key, value
    if not st.selects[layer]:
        keep = st.types[layer].needed(T)
        st.store(torch.tensor([slot]), layer, key[:, :, T - keep :], value[:, :, T - keep :])
        return
    rows = torch.tensor([slot], device=key.device)
    state = st.selector_states[layer]
    observed = sel.prefill_queries(T, layer, st.L)
    if observed:
        state.observe(rows, attention_scores(query[..., -observed:, :], key, scaling, softcap=softcap,
                                             sinks=sinks, window=window))
    budget = sel.budget(T, layer, st.L)
    if budget is not None and budget < T:
        valid = torch.ones(1, st.H, T, dtype=torch.bool, device=key.device)
        idx = state.select(rows, valid, budget)
        k, v = _take(key, idx), _take(value, idx)
        state.keep(rows, idx)
    st.store(torch.tensor([slot]), layer, k, v)
