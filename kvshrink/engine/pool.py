"""Blocks of codec bytes.

Storage model
-------------
A *block* holds ``block_size`` token positions of one sequence for one layer and all KV heads, in the
codec's real storage: for each payload field of the key encoder and of the value encoder, one slice
of a preallocated tensor with a leading block dimension. Block ids are global: every layer draws
from one pool, so a layer that keeps fewer tokens (PyramidKV's deep layers) uses fewer blocks.
Block 0 is a null block that is never handed out (padding in block tables points at it).

Keys and values are separate *streams* (their own encoded count and full-precision residual, as the
codec's ``StreamPolicy`` says), but share the block: the key part of block ``j`` holds encoded keys
of positions ``[j*bs, (j+1)*bs)`` and the value part the same positions' values; a block is taken when
either stream first needs it.

Payload fields are stored chunk by chunk (``encoder.chunk`` tokens), so a stream can write a
partial block (KIVI's values leave the residual one token at a time). The field layout is
discovered by encoding a dummy chunk of ``chunk`` and ``2*chunk`` tokens: each field must have exactly
one dimension that grows with the token count.

Full-precision residuals (KIVI's window) live in per-slot ring buffers; their bytes are counted by
reserving ``residual_blocks`` pool blocks per admitted sequence, so ``kv_bytes_used`` is exact. (The
ring buffers themselves are preallocated next to the pool; the reserved block ids stay unused.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from kvshrink.methods import CompressionMethod
from kvshrink.methods.base import Encoder, StreamPolicy

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
    """Free list of block ids ``1..num_blocks`` (0 is the null block). Exact: a double free or a
    foreign id raises."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks, 0, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"need {n} blocks, {len(self._free)} free")
        ids = [self._free.pop() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids) -> None:
        for i in ids:
            if i not in self._used:
                raise AssertionError(f"block {i} freed but not in use")
            self._used.remove(i)
            self._free.append(i)


@dataclass
class FieldLayout:
    name: str
    per_chunk: tuple[int, ...]  # payload shape of one chunk, batch dim dropped
    tok_dim: int  # the dimension (in per_chunk) that grows with tokens
    dtype: torch.dtype

    def block_shape(self, nch: int) -> tuple[int, ...]:
        s = self.per_chunk
        return (*s[: self.tok_dim], nch, *s[self.tok_dim :])


class StreamLayout:
    """Where one encoder's payload fields live inside a block."""

    def __init__(self, enc: Encoder, policy: StreamPolicy, heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype):
        self.enc, self.policy = enc, policy
        c = self.chunk = int(getattr(enc, "chunk", 1))
        if block_size % c:
            raise ValueError(f"block_size={block_size} must be a multiple of the codec's chunk ({c})")
        if policy.residual and policy.residual % c:
            raise ValueError(f"residual {policy.residual} is not a multiple of the encoder chunk {c}")
        self.nch = block_size // c
        g = torch.Generator().manual_seed(0)
        p1 = enc.encode(torch.randn(1, heads, c, head_dim, generator=g).to(dtype))
        p2 = enc.encode(torch.randn(1, heads, 2 * c, head_dim, generator=g).to(dtype))
        self.fields: list[FieldLayout] = []
        for name, t1 in p1.items():
            s1, s2 = tuple(t1.shape[1:]), tuple(p2[name].shape[1:])
            diff = [i for i in range(len(s1)) if s1[i] != s2[i]]
            if len(diff) != 1 or s2[diff[0]] != 2 * s1[diff[0]]:
                raise ValueError(f"payload field {name!r} has no single token dimension ({s1} vs {s2})")
            self.fields.append(FieldLayout(name, s1, diff[0], t1.dtype))
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
        # n_to_encode as a lookup table over residual lengths 0..ring
        self.lut = [policy.n_to_encode(n, c) if self.ring else n for n in range(max(self.ring, 1) + 2)]

    def n_to_encode(self, n_residual: int) -> int:
        if not self.ring:
            return n_residual
        return self.policy.n_to_encode(n_residual, self.chunk)


class KVStore:
    """The pool's tensors and every sequence's storage metadata, indexed by *slot* (one per admitted
    sequence). Python lists are the source of truth for counts; tensors are built per step."""

    def __init__(self, config, method: CompressionMethod, kv_memory: int, block_size: int, max_slots: int,
                 dtype: torch.dtype, device: torch.device):
        self.method = method
        self.L = config.num_hidden_layers
        self.H = config.num_key_value_heads
        self.Hq = config.num_attention_heads
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
        self.fp_token_bytes = 2 * self.L * self.H * self.D * esize  # what an uncompressed cache stores per token
        self.pool = BlockPool(self.num_blocks)
        per_seq = max(1, self.residual_blocks + self.L)
        self.max_slots = max(1, min(max_slots, self.num_blocks // per_seq))
        nb = self.num_blocks + 1
        self.kf = {f.name: torch.zeros(nb, *f.block_shape(self.k.nch), dtype=f.dtype, device=device)
                   for f in self.k.fields}
        self.vf = {f.name: torch.zeros(nb, *f.block_shape(self.v.nch), dtype=f.dtype, device=device)
                   for f in self.v.fields}
        S = self.max_slots
        self.kres = (torch.zeros(self.L, S, self.H, self.k.ring, self.D, dtype=dtype, device=device)
                     if self.k.ring else None)
        self.vres = (torch.zeros(self.L, S, self.H, self.v.ring, self.D, dtype=dtype, device=device)
                     if self.v.ring else None)
        self._free_slots = list(range(S - 1, -1, -1))
        max_ctx = int(getattr(config, "max_position_embeddings", 0) or 1 << 15)
        self.max_blocks_per_layer = min(-(-max_ctx // block_size) + 2, self.num_blocks + 1)
        self.table = torch.zeros(S, self.L, self.max_blocks_per_layer, dtype=torch.long)  # block ids, 0 = null
        # per slot, per layer: encoded counts, ring start and length, block lists
        self.meta: dict[int, SlotMeta] = {}

    # -------------------------------------------------------------------------------- accounting
    @property
    def bytes_total(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def bytes_used(self) -> int:
        return self.pool.num_used * self.block_bytes

    def kept_per_layer(self, length: int) -> list[int]:
        sel = self.method.selector
        out = []
        for layer in range(self.L):
            b = sel.budget(length, layer, self.L)
            out.append(length if b is None or b >= length else b)
        return out

    def blocks_for(self, kept: list[int]) -> int:
        """Blocks a freshly stored sequence with ``kept[l]`` tokens per layer takes (residual included)."""
        total = self.residual_blocks
        for n in kept:
            enc = max(self.k.n_to_encode(n), self.v.n_to_encode(n))
            total += -(-enc // self.bs)
        return total

    def blocks_for_prompt(self, length: int) -> int:
        return self.blocks_for(self.kept_per_layer(length))

    # ------------------------------------------------------------------------------------- slots
    def open_slot(self) -> int:
        if not self._free_slots:
            raise PoolExhausted("no free sequence slot")
        if self.pool.num_free < self.residual_blocks:
            raise PoolExhausted("no room for the residual window")
        s = self._free_slots.pop()
        self.meta[s] = SlotMeta(self.L, self.pool.alloc(self.residual_blocks))
        return s

    def close_slot(self, s: int) -> None:
        m = self.meta.pop(s, None)
        if m is None:
            return
        for blocks in m.blocks:
            self.pool.free(blocks)
        self.table[s] = 0
        self.pool.free(m.reserved)
        self._free_slots.append(s)

    def free_layer(self, s: int, layer: int) -> None:
        m = self.meta[s]
        self.pool.free(m.blocks[layer])
        m.blocks[layer] = []
        self.table[s, layer] = 0
        m.nk[layer] = m.nv[layer] = m.ks[layer] = m.kl[layer] = m.vs[layer] = m.vl[layer] = m.n[layer] = 0

    # ------------------------------------------------------------------------------------- writes
    def ensure_blocks(self, s: int, layer: int, upto: int) -> None:
        m = self.meta[s]
        need = -(-upto // self.bs) - len(m.blocks[layer])
        if need > 0:
            have = len(m.blocks[layer])
            if have + need > self.max_blocks_per_layer:
                raise PoolExhausted("sequence longer than the model context")
            ids = self.pool.alloc(need)
            m.blocks[layer].extend(ids)
            self.table[s, layer, have : have + need] = torch.tensor(ids)

    def write_encoded(self, side: str, slots: list[int], layer: int, starts: list[int], x: torch.Tensor) -> None:
        """Encode ``x`` [G, H, n, D] (n a multiple of the chunk) and write it at token positions
        ``starts[g] ..`` of each slot's blocks of ``layer`` (blocks must exist)."""
        lay, fields = (self.k, self.kf) if side == "k" else (self.v, self.vf)
        G, _, n, _ = x.shape
        if n == 0:
            return
        c = lay.chunk
        nchunks = n // c
        payload = lay.enc.encode(x)
        bs = self.bs
        if G * nchunks <= 256:
            blk_l, sl_l = [], []
            for s, p0 in zip(slots, starts):
                blocks = self.meta[s].blocks[layer]
                for p in range(p0, p0 + n, c):
                    blk_l.append(blocks[p // bs])
                    sl_l.append((p % bs) // c)
            blk = torch.tensor(blk_l, device=self.device)
            sl = torch.tensor(sl_l, device=self.device)
        else:
            pos = torch.tensor(starts).view(G, 1) + torch.arange(0, n, c).view(1, nchunks)
            tab = self.table[torch.tensor(slots), layer]
            blk = tab.gather(1, pos // bs).view(-1).to(self.device)
            sl = ((pos % bs) // c).view(-1).to(self.device)
        for f in lay.fields:
            t = payload[f.name]
            d = f.tok_dim
            s = f.per_chunk
            piece = t.reshape(G, *s[:d], nchunks, s[d], *s[d + 1 :]).movedim(1 + d, 1)
            piece = piece.reshape(G * nchunks, *s)
            fields[f.name].movedim(1 + d, 1)[blk, sl] = piece.to(fields[f.name].dtype)

    def store(self, s: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` [1, H, T, D] into an empty layer of slot ``s`` (prefill, or a compaction)."""
        m = self.meta[s]
        T = k.shape[-2]
        nk, nv = self.k.n_to_encode(T), self.v.n_to_encode(T)
        self.ensure_blocks(s, layer, max(nk, nv))
        self.write_encoded("k", [s], layer, [0], k[:, :, :nk])
        self.write_encoded("v", [s], layer, [0], v[:, :, :nv])
        if self.kres is not None and T > nk:
            self.kres[layer, s, :, : T - nk] = k[0, :, nk:]
        if self.vres is not None and T > nv:
            self.vres[layer, s, :, : T - nv] = v[0, :, nv:]
        m.nk[layer], m.nv[layer], m.n[layer] = nk, nv, T
        m.ks[layer], m.kl[layer], m.vs[layer], m.vl[layer] = 0, T - nk, 0, T - nv

    # -------------------------------------------------------------------------------------- reads
    def read_blocks(self, side: str, ids: torch.Tensor) -> torch.Tensor:
        """Decode blocks ``ids`` [N] -> [N, H, block_size, D]."""
        lay, fields = (self.k, self.kf) if side == "k" else (self.v, self.vf)
        payload = {}
        for f in lay.fields:
            g = fields[f.name].index_select(0, ids)
            s, d = f.per_chunk, f.tok_dim
            payload[f.name] = g.view(ids.shape[0], *s[:d], lay.nch * s[d], *s[d + 1 :])
        return lay.enc.decode(payload, self.dtype)


class SlotMeta:
    """One admitted sequence's storage: per layer, blocks and the two streams' counters."""

    def __init__(self, L: int, reserved: list[int]):
        self.reserved = reserved
        self.blocks: list[list[int]] = [[] for _ in range(L)]
        self.nk = [0] * L  # keys encoded into blocks
        self.nv = [0] * L
        self.ks = [0] * L  # key residual ring: start, length
        self.kl = [0] * L
        self.vs = [0] * L
        self.vl = [0] * L
        self.n = [0] * L  # tokens stored (= nk + kl = nv + vl)
        self.acc: torch.Tensor | None = None  # [L, Hq, cap] accumulated attention (H2O)
        self.hold: list[int | None] = [None] * L
