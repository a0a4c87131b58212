"""Attention over paged compressed blocks, and the per-layer store/select/encode that follows it.

Decode, per layer (``decode_attention``): gather the batch's blocks with one ``index_select`` per
payload field and decode them in one vectorised call into ``[B, nb, H, bs, D]`` for this layer only;
score them in that layout (batched matmul), score the full-precision residual ring and the new
token apart, and run the softmax over the small ``[B, Hq, L]`` logits in *stored order* (blocks,
then residual). Attention does not care about order, and it is the order the selectors see.
``gather_tokens`` builds the contiguous ``[B, H, L, D]`` view only where eviction needs every token.

Prefill (``prefill_attention``): one sequence ``[1, T]``, causal SDPA over its own full-precision
keys; the selector's statistics (``scoring.attention_scores``) only when it needs them; the kept
tokens go through the codec's stream policy into blocks and the residual ring.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from kvshrink.engine.pool import KVStore
from kvshrink.methods.base import SelectionInput
from kvshrink.methods.scoring import attention_scores

TIMERS: dict[str, float] = defaultdict(float)


class _Timer:
    def __init__(self, name: str, sync: bool = False):
        self.name, self.sync = name, sync

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        TIMERS[self.name] += time.perf_counter() - self.t


def timed(name: str) -> _Timer:
    return _Timer(name)


class StepPlan:
    """Index tensors for a batch of slots, built once per step (or once per compaction)."""

    def __init__(self, store: KVStore, slots: list[int], new_token: bool):
        self.store, self.slots, self.B = store, slots, len(slots)
        self.new_token = new_token
        st = store
        metas = [st.meta[s] for s in slots]
        self.slots_t = torch.tensor(slots, dtype=torch.long)
        self.nk = torch.tensor([m.nk for m in metas], dtype=torch.long)  # [B, L]
        self.nv = torch.tensor([m.nv for m in metas], dtype=torch.long)
        self.ks = torch.tensor([m.ks for m in metas], dtype=torch.long)
        self.kl = torch.tensor([m.kl for m in metas], dtype=torch.long)
        self.vs = torch.tensor([m.vs for m in metas], dtype=torch.long)
        self.vl = torch.tensor([m.vl for m in metas], dtype=torch.long)
        self.n = torch.tensor([m.n for m in metas], dtype=torch.long)
        self.ek = self.ev = None
        if new_token:
            self._plan_growth(metas)
        nblk = torch.tensor([[len(b) for b in m.blocks] for m in metas], dtype=torch.long)
        self.nb = nblk.amax(0).tolist()  # per layer
        extra = 1 if new_token else 0
        self.lcap = torch.maximum(nblk * st.bs, self.n + extra).amax(0).tolist()
        nbmax = max(self.nb) if self.nb else 0
        dev = st.device
        self.tables = st.table[self.slots_t, :, : max(nbmax, 1)].to(dev)
        self.slots_d = self.slots_t.to(dev)
        self.nk_d, self.nv_d, self.ks_d, self.kl_d = (t.to(dev) for t in (self.nk, self.nv, self.ks, self.kl))
        self.vs_d, self.vl_d, self.n_d = (t.to(dev) for t in (self.vs, self.vl, self.n))
        self.acc: torch.Tensor | None = None

    def _plan_growth(self, metas) -> None:
        """How many tokens each stream encodes this step, per sequence and layer; blocks are taken now."""
        st = self.store
        if st.k.ring:
            self.ek = torch.tensor(st.k.lut)[self.kl + 1]
        else:
            self.ek = torch.ones_like(self.nk)
        if st.v.ring:
            self.ev = torch.tensor(st.v.lut)[self.vl + 1]
        else:
            self.ev = torch.ones_like(self.nv)
        upto = torch.maximum(self.nk + self.ek, self.nv + self.ev)
        self.upto = upto

    def blocks_needed(self) -> torch.Tensor:
        """[B] blocks each sequence needs this step."""
        st = self.store
        have = torch.tensor([[len(b) for b in st.meta[s].blocks] for s in self.slots], dtype=torch.long)
        return ((self.upto + st.bs - 1) // st.bs - have).clamp_min(0).sum(1)

    def allocate(self) -> None:
        st = self.store
        for b, s in enumerate(self.slots):
            for layer, upto in enumerate(self.upto[b].tolist()):
                st.ensure_blocks(s, layer, upto)
        # tables may have grown
        nblk = torch.tensor([[len(b) for b in st.meta[s].blocks] for s in self.slots], dtype=torch.long)
        self.nb = nblk.amax(0).tolist()
        self.lcap = torch.maximum(nblk * st.bs, self.n + 1).amax(0).tolist()
        self.tables = st.table[self.slots_t, :, : max(max(self.nb), 1)].to(st.device)

    def finish(self) -> None:
        """Write the step's new counters back to the slots' metadata."""
        st = self.store
        nk = self.nk + self.ek
        nv = self.nv + self.ev
        n = self.n + 1
        if st.k.ring:
            kl = self.kl + 1 - self.ek
            ks = (self.ks + self.ek) % st.k.ring
        else:
            kl, ks = self.kl, self.ks
        if st.v.ring:
            vl = self.vl + 1 - self.ev
            vs = (self.vs + self.ev) % st.v.ring
        else:
            vl, vs = self.vl, self.vs
        cols = [t.tolist() for t in (nk, nv, ks, kl, vs, vl, n)]
        for b, s in enumerate(self.slots):
            m = st.meta[s]
            m.nk, m.nv, m.ks, m.kl, m.vs, m.vl, m.n = (c[b] for c in cols)
        if self.acc is not None:
            for b, s in enumerate(self.slots):
                a = st.meta[s].acc
                if a is not None:
                    a.copy_(self.acc[b, :, :, : a.shape[-1]])


def gather_tokens(plan: StepPlan, side: str, layer: int) -> torch.Tensor:
    """[B, H, Lcap + 1, D]: the stored tokens of ``layer`` in stored order (blocks, then residual),
    zeros or stale values beyond each sequence's count (masked), the last column a scratch slot."""
    st = plan.store
    B, H, D, bs = plan.B, st.H, st.D, st.bs
    nb, Lc = plan.nb[layer], plan.lcap[layer]
    out = torch.empty(B, H, Lc + 1, D, dtype=st.dtype, device=st.device)
    if nb:  # only eviction (``compact``, timed there) reads the whole cache this way
        ids = plan.tables[:, layer, :nb].reshape(-1)
        dec = st.read_blocks(side, ids)  # [B*nb, H, bs, D]
        out[:, :, : nb * bs].view(B, H, nb, bs, D).copy_(dec.view(B, nb, H, bs, D).transpose(1, 2))
    out[:, :, nb * bs :].zero_()
    ring = st.k.ring if side == "k" else st.v.ring
    if ring:
        res_t = st.kres if side == "k" else st.vres
        res = res_t[layer].index_select(0, plan.slots_d)  # [B, H, ring, D]
        tgt = _ring_positions(plan, side, layer, ring, Lc)
        out.scatter_(2, tgt[:, None, :, None].expand(B, H, ring, D), res)
    return out


def commit_decode(plan: StepPlan, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Store this step's token of every sequence (``key``/``value`` [B, H, 1, D]) for ``layer``."""
    st = plan.store
    for side, x in (("k", key), ("v", value)):
        lay = st.k if side == "k" else st.v
        enc_counts = (plan.ek if side == "k" else plan.ev)[:, layer]
        base = (plan.nk if side == "k" else plan.nv)[:, layer].tolist()
        if not lay.ring:
            st.write_encoded(side, plan.slots, layer, base, x)
            continue
        res_t = st.kres if side == "k" else st.vres
        start_d = (plan.ks_d if side == "k" else plan.vs_d)[:, layer]
        len_d = (plan.kl_d if side == "k" else plan.vl_d)[:, layer]
        res_t[layer][plan.slots_d, :, (start_d + len_d) % lay.ring] = x[:, :, 0]
        counts = enc_counts.tolist()
        if not any(counts):
            continue
        starts = (plan.ks if side == "k" else plan.vs)[:, layer].tolist()
        groups: dict[int, list[int]] = defaultdict(list)
        for b, c in enumerate(counts):
            if c:
                groups[c].append(b)
        for n, rows in groups.items():
            slots = [plan.slots[b] for b in rows]
            pos = (torch.tensor([starts[b] for b in rows])[:, None] + torch.arange(n)[None, :]) % lay.ring
            xs = res_t[layer][torch.tensor(slots, device=st.device)[:, None], :, pos.to(st.device)]  # [G, n, H, D]
            st.write_encoded(side, slots, layer, [base[b] for b in rows], xs.transpose(1, 2))


def _ring_positions(plan: StepPlan, side: str, layer: int, ring: int, scratch: int) -> torch.Tensor:
    """[B, ring]: the token position (stored order) of each residual-ring slot, ``scratch`` if empty."""
    start = (plan.ks_d if side == "k" else plan.vs_d)[:, layer]
    length = (plan.kl_d if side == "k" else plan.vl_d)[:, layer]
    base = (plan.nk_d if side == "k" else plan.nv_d)[:, layer]
    rel = (torch.arange(ring, device=start.device)[None, :] - start[:, None]) % ring
    return torch.where(rel < length[:, None], base[:, None] + rel, torch.full_like(rel, scratch))


def decode_attention(plan: StepPlan, module, query, key, value, scaling, needs_acc: bool):
    """Paged attention for one new token per sequence, without assembling a ``[B, H, L, D]`` cache.

    Keys and values are scored where they lie: the gathered (decoded) blocks ``[B, nb, H, bs, D]``
    by one batched matmul, the full-precision residual ring and the new token by small ones. Only the
    logits (``[B, Hq, L]``, tiny) are laid out in stored order, where the softmax runs; the values
    are then weighted in their own layout. This saves the transposing copy and the ring scatter that
    an SDPA call over a contiguous cache needs, which cost more than the attention itself on CPU.
    Keys and values may split between blocks and ring at different points (KIVI), so each side maps
    its own columns to token positions.
    """
    st = plan.store
    layer = module.layer_idx
    B, Hq, _, D = query.shape
    H, bs = st.H, st.bs
    g = Hq // H
    nb, Lc = plan.nb[layer], plan.lcap[layer]
    n = plan.n_d[:, layer]
    q = query.view(B, H, g, D)
    if nb:
        with timed("decode.gather_dequant"):
            ids = plan.tables[:, layer, :nb].reshape(-1)
            kb = st.read_blocks("k", ids).view(B, nb, H, bs, D)
            vb = st.read_blocks("v", ids).view(B, nb, H, bs, D)
    with timed("decode.attend"):
        logits = torch.full((B, H, g, Lc + 1), float("-inf"), dtype=torch.float32, device=q.device)
        pos = torch.arange(nb * bs, device=q.device)
        if nb:
            # [B, nb, H, g, bs]: one small GEMM per (sequence, block, head)
            kl = torch.matmul(q[:, None], kb.transpose(-1, -2)).float()
            kl = kl.permute(0, 2, 3, 1, 4).reshape(B, H, g, nb * bs)
            kvalid = pos[None, :] < plan.nk_d[:, layer, None]
            logits[..., : nb * bs] = kl.masked_fill(~kvalid[:, None, None, :], float("-inf"))
        if st.k.ring:
            kr = st.kres[layer].index_select(0, plan.slots_d)  # [B, H, ring, D]
            tk = _ring_positions(plan, "k", layer, st.k.ring, Lc)
            rl = torch.matmul(q, kr.transpose(-1, -2)).float()  # [B, H, g, ring]
            logits.scatter_(3, tk[:, None, None, :].expand(B, H, g, -1), rl)
        new_l = (q * key).sum(-1, dtype=torch.float32)  # [B, H, g]: the new token's own key
        logits.scatter_(3, n[:, None, None, None].expand(B, H, g, 1), new_l[..., None])
        logits[..., Lc] = float("-inf")  # the scratch column took the empty ring slots
        probs = torch.softmax(logits * scaling, dim=-1)  # [B, H, g, Lc + 1]
        if needs_acc and plan.acc is not None:
            w = min(Lc, plan.acc.shape[-1])
            plan.acc[:, layer, :, :w] += probs[..., :w].reshape(B, Hq, w)
        p = probs.to(value.dtype)
        out = p.gather(3, n[:, None, None, None].expand(B, H, g, 1)) * value  # [B, H, g, D]
        if nb:
            vvalid = pos[None, :] < plan.nv_d[:, layer, None]
            pb = p[..., : nb * bs].masked_fill(~vvalid[:, None, None, :], 0.0)
            pb = pb.view(B, H, g, nb, bs).permute(0, 3, 1, 2, 4)  # [B, nb, H, g, bs]
            out = out + torch.matmul(pb, vb).sum(1)
        if st.v.ring:
            vr = st.vres[layer].index_select(0, plan.slots_d)
            tv = _ring_positions(plan, "v", layer, st.v.ring, Lc)
            pr = p.gather(3, tv[:, None, None, :].expand(B, H, g, -1))  # empty slots read the scratch (0)
            out = out + torch.matmul(pr, vr)
    with timed("decode.commit"):
        commit_decode(plan, layer, key, value)
    return out.view(B, Hq, 1, D).transpose(1, 2).contiguous()


def _selection_input(valid, head_scores, layer, num_layers, H):
    scores = None
    if head_scores is not None:
        B, Hq, T = head_scores.shape
        scores = head_scores.view(B, H, Hq // H, T).mean(2)
    return SelectionInput(length=valid.shape[-1], layer=layer, num_layers=num_layers, valid=valid,
                          scores=scores, head_scores=head_scores)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def prefill_attention(ctx, module, query, key, value, scaling):
    """One sequence: causal SDPA over its own keys, then select and store (see module docstring)."""
    st: KVStore = ctx.store
    layer = module.layer_idx
    slot = ctx.slot
    sel = st.method.selector
    T = key.shape[-2]
    with timed("prefill.sdpa"):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    with timed("prefill.select_store"):
        budget = sel.budget(T, layer, st.L)
        hold = budget if budget is not None else (getattr(sel, "budget_tokens", 0) or None)
        if not sel.evicts_in_decode:
            hold = None
        head_scores = None
        prune = budget is not None and budget < T
        if sel.needs == "window" and prune:
            w = min(sel.observation_window, T)
            head_scores = attention_scores(query[..., -w:, :], key, scaling)
        elif sel.needs == "accumulated" and (prune or hold is not None):
            head_scores = attention_scores(query, key, scaling)
        k, v = key, value
        if prune:
            valid = torch.ones(1, st.H, T, dtype=torch.bool, device=key.device)
            idx = sel.select(_selection_input(valid, head_scores, layer, st.L, st.H), budget)
            k, v = _take(key, idx), _take(value, idx)
            if head_scores is not None and sel.needs == "accumulated":
                head_scores = head_scores.gather(2, idx.repeat_interleave(st.Hq // st.H, dim=1))
        st.store(slot, layer, k, v)
        m = st.meta[slot]
        m.hold[layer] = hold
        if hold is not None and sel.needs == "accumulated":
            if m.acc is None:
                cap = ctx.acc_cap
                m.acc = torch.zeros(st.L, st.Hq, cap, dtype=torch.float32, device=key.device)
            n = k.shape[-2]
            m.acc[layer, :, :n] = head_scores[0, :, :n]
    return out.transpose(1, 2).contiguous()


def compact(store: KVStore, slot: int, layer: int) -> None:
    """Evict down to the layer's hold (H2O, StreamingLLM while decoding): decode the layer's tokens,
    let the selector choose, re-encode the kept ones into fresh blocks (as the HF path's ``keep``)."""
    st = store
    m = st.meta[slot]
    hold = m.hold[layer]
    plan = StepPlan(st, [slot], new_token=False)
    n = m.n[layer]
    K = gather_tokens(plan, "k", layer)[:, :, :n]
    V = gather_tokens(plan, "v", layer)[:, :, :n]
    sel = st.method.selector
    head_scores = m.acc[layer : layer + 1, :, :n] if m.acc is not None else None
    valid = torch.ones(1, st.H, n, dtype=torch.bool, device=K.device)
    idx = sel.select(_selection_input(valid, head_scores, layer, st.L, st.H), hold)
    k, v = _take(K, idx), _take(V, idx)
    if m.acc is not None:
        kept = head_scores.gather(2, idx.repeat_interleave(st.Hq // st.H, dim=1))[0]
        m.acc[layer].zero_()
        m.acc[layer, :, :hold] = kept
    st.free_layer(slot, layer)
    st.store(slot, layer, k.contiguous(), v.contiguous())
