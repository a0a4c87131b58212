"""Blocks of codec bytes, and every sequence's storage counters: the bottom layer of the engine.

Storage model
-------------
A *block* holds ``block_size`` token positions of one sequence for one layer and all KV heads, in the
codec's real storage: for each payload field its encoder declares (``Encoder.layout``), one slice of a
preallocated tensor with a leading block dimension. Block ids are global: every layer draws from one
pool, so a layer that keeps fewer tokens (PyramidKV's deep layers) uses fewer blocks. Block 0 is a
null block that is never handed out (padding in block tables points at it).

Keys and values are separate *streams* (their own encoded count and full-precision residual, as the
codec's ``StreamPolicy`` says) but share the block: the key part of block ``j`` holds encoded keys of
positions ``[j*bs, (j+1)*bs)`` and the value part the same positions' values.

Full-precision residuals (KIVI's window) live in per-slot ring buffers; their bytes are counted by
reserving ``residual_blocks`` pool blocks per admitted sequence, so ``bytes_used`` is exact.

Layer types (``kvshrink.layer_types``, from the config): a sliding-window layer stores what its window
needs. At prefill only the prompt's last ``window - 1`` tokens are stored; while decoding, ``advance``
frees a layer's oldest block once none of its tokens is visible to the next query (and both streams
have encoded it), and shifts the block table: a sliding layer holds at most ``window - 1 + block_size``
tokens (plus what a codec's residual keeps back), and counters count from its oldest stored block.
The selector (and its decode hold) applies to full layers only (``Selector.on_sliding``).

Counters are tensors ``[slots, layers]`` on the host (``SlotCounters``), so a step's bookkeeping is a
few tensor ops over the batch and every layer at once; ``allocate`` answers a step's need for blocks
with the growth it planned, or ``None`` (a refusal) when the pool cannot hold it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch

from kvshrink.engine.kernels import DecodeKernel, block_reader
from kvshrink.layer_types import layer_types
from kvshrink.methods import CompressionMethod
from kvshrink.methods.base import (
    CutLayout,
    Encoder,
    FieldLayout,
    Payload,
    RowFormat,
    SpecError,
    StreamPolicy,
    check_cut,
    plan_cut,
)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "t": 1000**4, "tb": 1000**4}


def parse_bytes(x: int | str) -> int:
    """``1073741824``, ``"1GiB"``, ``"512MiB"``, ``"1.5GB"`` -> bytes."""
    if isinstance(x, bool):
        raise ValueError(f"kv_memory must be bytes or a size string, got {x!r}")
    if isinstance(x, (int, float)):
        n = int(x)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(x))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"kv_memory: cannot parse {x!r}; use bytes or e.g. '512MiB', '1GiB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"kv_memory must be > 0 bytes, got {x!r}")
    return n


class PoolExhausted(RuntimeError):
    pass


class BlockPool:
    """Free stack of block ids ``1..num_blocks`` (0 is the null block), as tensors. Exact: a double
    free or a foreign id raises."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._stack = torch.arange(num_blocks, 0, -1, dtype=torch.long)
        self._top = num_blocks  # ids [0, top) of the stack are free
        self._in_use = torch.zeros(num_blocks + 1, dtype=torch.bool)

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._top

    def alloc(self, n: int) -> torch.Tensor:
        if n > self._top:
            raise PoolExhausted(f"need {n} blocks, {self._top} free")
        ids = self._stack[self._top - n : self._top].clone()
        self._top -= n
        self._in_use[ids] = True
        return ids

    def free(self, ids: torch.Tensor | list[int]) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() == 0:
            return
        if not bool(self._in_use[ids].all()) or ids.unique().numel() != ids.numel():
            raise AssertionError(f"blocks freed but not in use: {ids.tolist()}")
        self._in_use[ids] = False
        self._stack[self._top : self._top + ids.numel()] = ids
        self._top += ids.numel()


class StreamLayout:
    """Where one encoder's payload fields live inside a block, and its residual ring's size."""

    def __init__(self, enc: Encoder, policy: StreamPolicy, heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype):
        self.enc, self.policy = enc, policy
        c = self.chunk = int(enc.chunk)
        if block_size % c:
            raise ValueError(f"block_size={block_size} must be a multiple of the codec's chunk ({c})")
        if policy.residual and policy.residual % c:
            raise ValueError(f"residual {policy.residual} is not a multiple of the encoder chunk {c}")
        self.nch = block_size // c
        self.fields = enc.layout(heads, head_dim, dtype)
        self.block_bytes = sum(
            math.prod(f.block_shape(self.nch)) * torch.empty(0, dtype=f.dtype).element_size() for f in self.fields
        )
        # Residual ring: the most tokens it holds during a step (after the new token, before a flush).
        r = policy.residual
        if r == 0 and c == 1:
            self.ring = 0  # every token goes straight into blocks
        elif r == 0:
            self.ring = c
        elif policy.flush == "full":
            self.ring = r
        else:
            self.ring = r + c
        # tokens encoded out of a residual of n tokens, as a table over n = 0..ring+1
        self.lut = torch.tensor([policy.n_to_encode(n, c) if self.ring else n for n in range(max(self.ring, 1) + 2)])

    def n_to_encode(self, n_residual: int) -> int:
        return self.policy.n_to_encode(n_residual, self.chunk) if self.ring else n_residual


@dataclass
class SlotCounters:
    """Per slot and layer (``[slots, layers]`` long tensors): what each stream holds."""

    encoded_k: torch.Tensor  # keys encoded into blocks
    encoded_v: torch.Tensor
    ring_k_start: torch.Tensor  # key residual ring: first slot and length
    ring_k_len: torch.Tensor
    ring_v_start: torch.Tensor
    ring_v_len: torch.Tensor
    stored: torch.Tensor  # tokens stored (= encoded + ring length, for each stream)
    blocks: torch.Tensor  # blocks held

    @classmethod
    def zeros(cls, slots: int, layers: int) -> SlotCounters:
        return cls(*(torch.zeros(slots, layers, dtype=torch.long) for _ in fields(cls)))

    def rows(self, slots: torch.Tensor) -> SlotCounters:
        return SlotCounters(*(getattr(self, f.name)[slots] for f in fields(self)))

    def stacked(self) -> torch.Tensor:
        """``[7, b, L]``: every counter but ``blocks`` in one tensor, for one host-to-device copy."""
        return torch.stack([getattr(self, f.name) for f in fields(self)][:7])


@dataclass
class Growth:
    """One decode step's plan for a batch of slots (``[b, L]`` host tensors): tokens each stream
    encodes out of its residual, and the blocks each layer needs first."""

    slots: torch.Tensor
    encode_k: torch.Tensor
    encode_v: torch.Tensor
    new_blocks: torch.Tensor

    @property
    def blocks_needed(self) -> int:
        return int(self.new_blocks.sum())


class KVStore:
    """The pool's tensors and every sequence's storage, indexed by *slot* (one per admitted sequence)."""

    def __init__(self, config, method: CompressionMethod, kv_memory: int, block_size: int, max_slots: int,
                 dtype: torch.dtype, device: torch.device, paged_kernels: bool = False):
        self.method = method
        self.types = layer_types(config)
        for enc in (method.codec.key_encoder(), method.codec.value_encoder()):
            if not getattr(enc, "regular", True):
                raise SpecError(f"{method.codec.spec()}: the engine stores fixed-size encoder chunks; this "
                                f"setting (one irregular chunk per prompt) runs on the HF path only")
        if method.selector.evicts_while_decoding():
            check_cut(method.codec)
        self.L = config.num_hidden_layers
        # per layer: its sliding window (0: full attention), and whether the selector runs there
        self.window = torch.tensor([t.window or 0 for t in self.types], dtype=torch.long)
        self.selects = [not t.sliding or method.selector.on_sliding != "window" for t in self.types]
        self.H = config.num_key_value_heads
        self.Hq = config.num_attention_heads
        # a query-head selector (snapkv:granularity=query_head) stores every layer's KV repeated per query head
        self.expand = 1
        if method.selector.stored_heads(self.H, self.Hq) != self.H:
            self.expand, self.H = self.Hq // self.H, self.Hq
        self.D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.bs, self.dtype, self.device = block_size, dtype, device
        codec = method.codec
        self.k = StreamLayout(codec.key_encoder(), codec.key_policy(), self.H, self.D, block_size, dtype)
        self.v = StreamLayout(codec.value_encoder(), codec.value_policy(), self.H, self.D, block_size, dtype)
        self.block_bytes = self.k.block_bytes + self.v.block_bytes
        self.num_blocks = kv_memory // self.block_bytes
        esize = torch.empty(0, dtype=dtype).element_size()
        self.residual_bytes = self.L * self.H * self.D * esize * (self.k.ring + self.v.ring)
        self.residual_blocks = math.ceil(self.residual_bytes / self.block_bytes)
        if self.num_blocks < self.L + self.residual_blocks:
            raise ValueError(
                f"kv_memory={kv_memory} bytes holds {self.num_blocks} blocks of {self.block_bytes} bytes; one "
                f"sequence needs at least {self.L + self.residual_blocks}; raise kv_memory or lower block_size"
            )
        kv_heads = self.H // self.expand
        self.fp_token_bytes = 2 * self.L * kv_heads * self.D * esize  # an uncompressed token in every layer
        self._fp_layer_bytes = 2 * kv_heads * self.D * esize
        self.pool = BlockPool(self.num_blocks)
        per_seq = max(1, self.residual_blocks + self.L)
        self.max_slots = S = max(1, min(max_slots, self.num_blocks // per_seq))
        nb = self.num_blocks + 1
        self.kf = {f.name: torch.zeros(nb, *f.block_shape(self.k.nch), dtype=f.dtype, device=device)
                   for f in self.k.fields}
        self.vf = {f.name: torch.zeros(nb, *f.block_shape(self.v.nch), dtype=f.dtype, device=device)
                   for f in self.v.fields}
        self.kres = (torch.zeros(self.L, S, self.H, self.k.ring, self.D, dtype=dtype, device=device)
                     if self.k.ring else None)
        self.vres = (torch.zeros(self.L, S, self.H, self.v.ring, self.D, dtype=dtype, device=device)
                     if self.v.ring else None)
        # kernels that attend over blocks in place (None: gather and decode them)
        # (the residual rings too: ring r of slot s in layer l is "block" l * S + s of ring-sized blocks)
        self.k_reader = self.v_reader = self.kres_reader = self.vres_reader = None
        if paged_kernels:
            self.k_reader = block_reader(self.k.enc.row_format(self.D), self.kf, self.H, self.D, block_size, dtype,
                                         device)
            self.v_reader = block_reader(self.v.enc.row_format(self.D), self.vf, self.H, self.D, block_size, dtype,
                                         device)
            if self.v_reader is not None and not self.v_reader.can_weight:
                self.v_reader = None
            for side, ring in (("k", self.kres), ("v", self.vres)):
                if ring is not None:
                    rows = {"x": ring.view(self.L * S, self.H, ring.shape[3], self.D)}
                    setattr(self, f"{side}res_reader",
                            block_reader(RowFormat(), rows, self.H, self.D, ring.shape[3], dtype, device))
        # one call per layer for the whole decode attention, where every part of it has a kernel
        self.decode_kernel = None
        rings_read = all(r is None or rr is not None for r, rr in ((self.kres, self.kres_reader),
                                                                   (self.vres, self.vres_reader)))
        if self.k_reader is not None and self.v_reader is not None and rings_read:
            # the kernel stores the new token into a ring, or into blocks it can store into; and it
            # encodes the rows leaving a ring one at a time (KIVI's values), where it can store them
            sides = ((self.k, self.k_reader), (self.v, self.v_reader))
            write_new = tuple(lay.ring > 0 or reader.can_store for lay, reader in sides)
            flush = tuple(lay.ring > 0 and lay.chunk == 1 and reader.can_store for lay, reader in sides)
            self.decode_kernel = DecodeKernel(self.k_reader, self.v_reader, (self.kres, self.vres), write_new, flush)
        self._free_slots = list(range(S - 1, -1, -1))
        max_ctx = int(getattr(config, "max_position_embeddings", 0) or 1 << 15)
        self.max_blocks_per_layer = min(-(-max_ctx // block_size) + 2, self.num_blocks + 1)
        self.table = torch.zeros(S, self.L, self.max_blocks_per_layer, dtype=torch.long)  # block ids, 0 = null
        self.counters = SlotCounters.zeros(S, self.L)
        self.reserved: dict[int, torch.Tensor] = {}  # slot -> blocks that pay for its residual ring
        self.hold = torch.full((S, self.L), -1, dtype=torch.long)  # decode hold per layer, -1: none
        sel = method.selector
        self.selector_states = [sel.new_state(layer, self.L, rows=S) for layer in range(self.L)]

    # -------------------------------------------------------------------------------- accounting
    @property
    def bytes_total(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def bytes_used(self) -> int:
        return self.pool.num_used * self.block_bytes

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def fp_bytes(self, length: int) -> int:
        """What an uncompressed cache (transformers' ``DynamicCache``) holds for a ``length``-token
        context: every token in full layers, ``window - 1`` in sliding ones."""
        return self._fp_layer_bytes * sum(t.needed(length) for t in self.types)

    def kept_per_layer(self, length: int) -> list[int]:
        """Tokens each layer stores after a prefill of ``length``: the selector's budget on the layers
        it runs on, the window's need on sliding ones."""
        sel = self.method.selector
        out = []
        for layer, t in enumerate(self.types):
            if not self.selects[layer]:
                out.append(t.needed(length))
                continue
            b = sel.budget(length, layer, self.L)
            out.append(length if b is None or b >= length else b)
        return out

    def blocks_for(self, kept: list[int]) -> int:
        """Blocks a freshly stored sequence with ``kept[l]`` tokens per layer takes (residual included)."""
        return self.residual_blocks + sum(self._layer_blocks(n) for n in kept)

    def _layer_blocks(self, n: int) -> int:
        return -(-max(self.k.n_to_encode(n), self.v.n_to_encode(n)) // self.bs)

    def blocks_for_prompt(self, length: int) -> int:
        return self.blocks_for(self.kept_per_layer(length))

    # ------------------------------------------------------------------------------------- slots
    def open_slot(self, length: int, keep_free: int = 0) -> int | None:
        """A slot with every block a prompt of ``length`` tokens takes once stored, or None (a
        refusal) when that would leave fewer than ``keep_free`` blocks free."""
        kept = self.kept_per_layer(length)
        if not self._free_slots or self.blocks_for(kept) + keep_free > self.pool.num_free:
            return None
        s = self._free_slots.pop()
        self.reserved[s] = self.pool.alloc(self.residual_blocks)
        self._grow(torch.tensor([s]), torch.tensor([[self._layer_blocks(n) for n in kept]]))
        sel = self.method.selector
        self.hold[s] = torch.tensor([h if self.selects[layer] and (h := sel.decode_hold(length, layer, self.L))
                                     is not None else -1 for layer in range(self.L)])
        return s

    def close_slot(self, s: int) -> None:
        if s not in self.reserved:
            return
        self.pool.free(self.reserved.pop(s))
        self.free_layers(torch.tensor([s]), torch.arange(self.L))
        self.hold[s] = -1
        rows = torch.tensor([s], device=self.device)
        for state in self.selector_states:
            state.clear(rows)
        self._free_slots.append(s)

    def free_layers(self, slots: torch.Tensor, layers: torch.Tensor) -> None:
        """Give back every block of layer ``layers[i]`` of slot ``slots[i]`` (index tensors that
        broadcast: pairs, or one slot and many layers) and zero their counters."""
        c = self.counters
        sub = self.table[slots, layers]  # [..., maxb]
        held = torch.arange(sub.shape[-1]) < c.blocks[slots, layers][..., None]
        self.pool.free(sub[held])
        self.table[slots, layers] = 0
        for f in fields(c):
            getattr(c, f.name)[slots, layers] = 0

    def _grow(self, slots: torch.Tensor, new_blocks: torch.Tensor) -> None:
        """Append ``new_blocks[b, l]`` fresh blocks to layer ``l`` of ``slots[b]`` (the pool has them)."""
        if not bool(new_blocks.any()):  # most decode steps: every sequence fits its blocks
            return
        b, L = new_blocks.shape
        self._grow_pairs(slots.repeat_interleave(L), torch.arange(L).repeat(b), new_blocks.reshape(-1))

    def _grow_pairs(self, slots: torch.Tensor, layers: torch.Tensor, counts: torch.Tensor) -> None:
        """Append ``counts[i]`` fresh blocks to layer ``layers[i]`` of slot ``slots[i]`` (distinct pairs)."""
        total = int(counts.sum())
        if total == 0:
            return
        have = self.counters.blocks[slots, layers]
        if int((have + counts).max()) > self.max_blocks_per_layer:
            raise PoolExhausted("sequence longer than the model context")
        ids = self.pool.alloc(total)
        cell = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # which pair each id goes to
        first = torch.cumsum(counts, 0) - counts
        col = have[cell] + torch.arange(total) - first[cell]
        self.table[slots[cell], layers[cell], col] = ids
        self.counters.blocks[slots, layers] = have + counts

    # ----------------------------------------------------------------------------- decode growth
    def plan_growth(self, slots: torch.Tensor) -> Growth:
        """What one more token per sequence makes each stream encode, and the blocks that takes."""
        c = self.counters.rows(slots)
        ek = self.k.lut[c.ring_k_len + 1] if self.k.ring else torch.ones_like(c.encoded_k)
        ev = self.v.lut[c.ring_v_len + 1] if self.v.ring else torch.ones_like(c.encoded_v)
        upto = torch.maximum(c.encoded_k + ek, c.encoded_v + ev)
        new_blocks = ((upto + self.bs - 1) // self.bs - c.blocks).clamp_min(0)
        return Growth(slots, ek, ev, new_blocks)

    def allocate(self, growth: Growth) -> bool:
        """Take the blocks ``growth`` needs; False (nothing taken) when the pool cannot hold them."""
        if growth.blocks_needed > self.pool.num_free:
            return False
        self._grow(growth.slots, growth.new_blocks)
        return True

    def advance(self, growth: Growth) -> None:
        """After the step's forward: the counters of one token more per sequence and layer; sliding
        layers then give back the blocks that fell out of their window."""
        c, s = self.counters, growth.slots
        c.encoded_k[s] += growth.encode_k
        c.encoded_v[s] += growth.encode_v
        c.stored[s] += 1
        if self.k.ring:
            c.ring_k_start[s] = (c.ring_k_start[s] + growth.encode_k) % self.k.ring
            c.ring_k_len[s] += 1 - growth.encode_k
        if self.v.ring:
            c.ring_v_start[s] = (c.ring_v_start[s] + growth.encode_v) % self.v.ring
            c.ring_v_len[s] += 1 - growth.encode_v
        if bool(self.window.any()):
            self._slide(s)

    def _slide(self, slots: torch.Tensor) -> None:
        """Free, per sliding layer, the oldest blocks none of whose tokens the next query sees (it sees
        the last ``window - 1`` stored ones) and that both streams have encoded; shift the table."""
        c, bs = self.counters, self.bs
        W = self.window[None, :]
        dead = (c.stored[slots] - (W - 1)).clamp_min(0) // bs
        enc = torch.minimum(c.encoded_k[slots], c.encoded_v[slots]) // bs
        d = torch.where(W > 0, torch.minimum(dead, enc), torch.zeros_like(dead))  # [b, L] blocks to free
        if not bool(d.any()):
            return
        sub = self.table[slots]  # [b, L, maxb]
        col = torch.arange(sub.shape[-1])
        self.pool.free(sub[col < d[..., None]])
        shifted = sub.gather(-1, (col + d[..., None]).clamp(max=sub.shape[-1] - 1))
        held = c.blocks[slots] - d
        self.table[slots] = shifted.masked_fill(col >= held[..., None], 0)
        c.blocks[slots] = held
        for name in ("encoded_k", "encoded_v", "stored"):
            getattr(c, name)[slots] -= d * bs

    # ------------------------------------------------------------------------------------- writes
    def write_encoded(self, side: str, tables: torch.Tensor, starts: torch.Tensor, x: torch.Tensor) -> None:
        """Encode ``x`` [G, H, n, D] (n a multiple of the chunk) and write it at token positions
        ``starts[g] ..`` of the blocks ``tables[g]`` (one layer's block ids; on the pool's device)."""
        if x.shape[2]:
            self.write_payload(side, tables, starts, self.encoder(side).encode(x), x.shape[2])

    def write_payload(self, side: str, tables: torch.Tensor, starts: torch.Tensor, payload: Payload, n: int) -> None:
        """Write an encoded ``payload`` of ``n`` tokens per row (G rows) at token positions ``starts[g] ..``
        (chunk-aligned) of the blocks ``tables[g]``: codes move as they are, never re-encoded."""
        lay, store = (self.k, self.kf) if side == "k" else (self.v, self.vf)
        G = tables.shape[0]
        if n == 0:
            return
        c = lay.chunk
        nchunks = n // c
        pos = starts.view(G, 1) + torch.arange(0, n, c, device=starts.device).view(1, nchunks)
        blk = tables.gather(1, pos // self.bs).view(-1)
        within = ((pos % self.bs) // c).view(-1)
        for f in lay.fields:
            t, d, s = payload[f.name], f.tok_dim, f.per_chunk
            piece = t.reshape(G, *s[:d], nchunks, s[d], *s[d + 1 :]).movedim(1 + d, 1).reshape(G * nchunks, *s)
            store[f.name].movedim(1 + d, 1)[blk, within] = piece.to(store[f.name].dtype)

    def store(self, slots: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` [G, H, T, D] into layer ``layer`` of ``slots`` [G], which hold nothing
        there yet (a prefill, whose blocks ``open_slot`` took, or a compaction that freed the layer)."""
        T = k.shape[-2]
        nk, nv = self.record_stored(slots, layer, T)
        tables = self.table[slots, layer].to(self.device)
        zero = torch.zeros(len(slots), dtype=torch.long, device=self.device)
        self.write_encoded("k", tables, zero, k[:, :, :nk])
        self.write_encoded("v", tables, zero, v[:, :, :nv])
        rows = slots.to(self.device)
        if self.kres is not None and T > nk:
            self.kres[layer, rows, :, : T - nk] = k[:, :, nk:]
        if self.vres is not None and T > nv:
            self.vres[layer, rows, :, : T - nv] = v[:, :, nv:]

    def record_stored(self, slots: torch.Tensor, layer: int | torch.Tensor, T: int,
                      encoded: tuple[int, int] | None = None) -> tuple[int, int]:
        """The accounting half of ``store``: blocks and counters for ``T`` tokens in an empty layer
        (``layer``, or per slot ``layer[i]``; the simulator calls it alone), the streams encoding what
        their policies say, or ``encoded`` (keys, values; a cut's layout). Returns the tokens the two
        streams encode."""
        nk, nv = encoded if encoded is not None else (self.k.n_to_encode(T), self.v.n_to_encode(T))
        layers = torch.as_tensor(layer).expand(len(slots))
        need = (-(-max(nk, nv) // self.bs) - self.counters.blocks[slots, layers]).clamp_min(0)
        self._grow_pairs(slots, layers, need)
        c = self.counters
        c.encoded_k[slots, layers], c.encoded_v[slots, layers], c.stored[slots, layers] = nk, nv, T
        c.ring_k_start[slots, layers], c.ring_k_len[slots, layers] = 0, T - nk
        c.ring_v_start[slots, layers], c.ring_v_len[slots, layers] = 0, T - nv
        return nk, nv

    # -------------------------------------------------------------------------------------- reads
    def read_blocks(self, side: str, ids: torch.Tensor) -> torch.Tensor:
        """Decode blocks ``ids`` [N] -> [N, H, block_size, D]."""
        return self.encoder(side).decode(self.read_payload(side, ids), self.dtype)

    def cut_layout(self, slot: int, layer: int, hold: int) -> CutLayout:
        """Where a cut of ``layer`` of ``slot`` back to ``hold`` leaves its streams (counters only)."""
        c = self.counters
        return plan_cut(int(c.stored[slot, layer]), hold, (int(c.encoded_k[slot, layer]), int(c.encoded_v[slot, layer])),
                        (self.k.chunk, self.v.chunk))

    def fields(self, side: str) -> list[FieldLayout]:
        return (self.k if side == "k" else self.v).fields

    def slot_payload(self, side: str, tables: torch.Tensor) -> Payload:
        """The payload of every token in blocks ``tables`` ``[G, nb]`` (one layer), per row ``[G, H, ...]``
        in stored order, as the encoder would have produced it for ``nb * block_size`` tokens."""
        G, nb = tables.shape
        lay = self.k if side == "k" else self.v
        flat = self.read_payload(side, tables.reshape(-1))
        out = {}
        for f in lay.fields:
            d = 1 + f.tok_dim
            t = flat[f.name]
            t = t.view(G, nb, *t.shape[1:]).movedim(1, d)  # [G, ..., nb, rows per block, ...]
            out[f.name] = t.reshape(*t.shape[:d], nb * t.shape[d + 1], *t.shape[d + 2 :])
        return out

    def read_payload(self, side: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The payload of blocks ``ids`` [N], as the encoder would have produced it for N sequences."""
        lay, store = (self.k, self.kf) if side == "k" else (self.v, self.vf)
        payload = {}
        for f in lay.fields:
            g = store[f.name].index_select(0, ids)
            s, d = f.per_chunk, f.tok_dim
            payload[f.name] = g.view(ids.shape[0], *s[:d], lay.nch * s[d], *s[d + 1 :])
        return payload

    def encoder(self, side: str) -> Encoder:
        return self.k.enc if side == "k" else self.v.enc
