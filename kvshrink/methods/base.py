"""The two words every part of kvshrink speaks: a *selector* (which tokens stay) and a *codec*
(how a kept token is stored).

Tensors follow Hugging Face's cache layout: ``[batch, kv_heads, tokens, head_dim]``.
Nothing here knows about engines or HF caches; both drive these objects.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

Payload = dict[str, torch.Tensor]


class SpecError(ValueError):
    """A method spec or parameter is invalid; the message names the problem."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecError(msg)


@dataclass
class Method:
    """Base of every registered method: a dataclass whose fields are its spec parameters."""

    name: ClassVar[str] = ""
    kind: ClassVar[Literal["selector", "codec"]]

    def params(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        defaults = type(self)()
        changed = {k: v for k, v in self.params().items() if getattr(defaults, k) != v}
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in changed.items()) if changed else "")


# --------------------------------------------------------------------------------------------- codecs


@dataclass(frozen=True)
class FieldLayout:
    """One payload field of one chunk of tokens: its shape (batch dim dropped), which dimension
    grows with the token count, and its dtype. The engine's blocks are laid out from these."""

    name: str
    per_chunk: tuple[int, ...]
    tok_dim: int
    dtype: torch.dtype

    def block_shape(self, chunks: int) -> tuple[int, ...]:
        """Shape of ``chunks`` chunks of this field side by side along the token dimension."""
        s = self.per_chunk
        return (*s[: self.tok_dim], chunks, *s[self.tok_dim :])


@dataclass(frozen=True)
class RowFormat:
    """How one stored token of one head lies in a payload, for kernels that read blocks in place
    without decoding them (``kvshrink.engine.kernels``).

    ``bits=0``: the token as-is, field ``x`` ``[.., H, T, D]``. Otherwise codes ``q`` ``[.., H, T, D*bits/8]``
    bit-packed along the head dim (``methods.quant.pack``) with float16 ``scale`` (and ``zero`` unless
    ``symmetric``) per group: ``group`` tokens of one channel (``per_channel``, ``[.., H, T/group, D]``)
    or ``group`` channels of one token (``[.., H, T, D/group]``)."""

    bits: int = 0
    group: int = 0
    per_channel: bool = False
    symmetric: bool = False


class Encoder:
    """Encodes a chunk of tokens of one tensor (keys or values) and decodes it back.

    ``encode`` takes ``[B, H, T, D]`` with ``T`` a multiple of ``chunk``; the payload is a dict of
    tensors whose bytes are the real storage cost.
    """

    chunk: int = 1

    def layout(self, heads: int, head_dim: int, dtype: torch.dtype) -> list[FieldLayout]:
        """The payload's fields for one chunk. Built-in encoders declare it; this default reads it
        off two encodings (one chunk and two), so that a new encoder works without declaring."""
        g = torch.Generator().manual_seed(0)
        one = self.encode(torch.randn(1, heads, self.chunk, head_dim, generator=g).to(dtype))
        two = self.encode(torch.randn(1, heads, 2 * self.chunk, head_dim, generator=g).to(dtype))
        fields = []
        for name, t in one.items():
            s1, s2 = tuple(t.shape[1:]), tuple(two[name].shape[1:])
            grows = [i for i in range(len(s1)) if s1[i] != s2[i]]
            if len(grows) != 1 or s2[grows[0]] != 2 * s1[grows[0]]:
                raise ValueError(f"payload field {name!r} has no single token dimension ({s1} vs {s2})")
            fields.append(FieldLayout(name, s1, grows[0], t.dtype))
        return fields

    def encode(self, x: torch.Tensor) -> Payload:
        raise NotImplementedError

    def decode(self, p: Payload, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def bytes_per_token(self, head_dim: int, dtype_bytes: int) -> float:
        """Steady-state storage of one token of one head, in bytes (codes + amortised metadata)."""
        raise NotImplementedError

    def row_format(self, head_dim: int) -> RowFormat | None:
        """The payload's layout if it is one a block kernel reads in place; None (the default): the
        engine decodes blocks with ``decode`` before attending."""
        return None


@dataclass(frozen=True)
class StreamPolicy:
    """When tokens leave the full-precision residual for the encoder.

    - ``flush="full"``: once the residual holds ``residual`` tokens, all of them are encoded
      (KIVI's keys: the residual is flushed in whole groups, never partially).
    - ``flush="overflow"``: the oldest tokens beyond ``residual`` are encoded as new ones arrive
      (KIVI's values), in multiples of the encoder's chunk.
    ``residual=0`` encodes every token at once.
    """

    residual: int = 0
    flush: Literal["full", "overflow"] = "overflow"

    def n_to_encode(self, n_residual: int, chunk: int) -> int:
        if self.residual == 0:
            return n_residual - n_residual % chunk
        if self.flush == "full":
            return (n_residual // self.residual) * self.residual
        over = max(0, n_residual - self.residual)
        return over - over % chunk


@dataclass
class Codec(Method):
    """How a kept token is stored: one encoder and stream policy for keys, one for values."""

    kind: ClassVar = "codec"

    def key_encoder(self) -> Encoder:
        raise NotImplementedError

    def value_encoder(self) -> Encoder:
        raise NotImplementedError

    def key_policy(self) -> StreamPolicy:
        return StreamPolicy()

    def value_policy(self) -> StreamPolicy:
        return StreamPolicy()

    @property
    def lossless(self) -> bool:
        return False

    def bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> float:
        """Theoretical bytes of one token across all layers and KV heads (residual window excluded)."""
        per_head = self.key_encoder().bytes_per_token(head_dim, dtype_bytes) + self.value_encoder().bytes_per_token(
            head_dim, dtype_bytes
        )
        return per_head * num_layers * num_kv_heads

    def new_state(self) -> CodecState:
        return CodecState(self)


def payload_bytes(p: Payload) -> int:
    return sum(t.numel() * t.element_size() for t in p.values())


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def concat_payloads(fields: list[FieldLayout], parts: list[Payload]) -> Payload:
    """Payloads of consecutive token runs as one (every field joined along its token dimension)."""
    if len(parts) == 1:
        return parts[0]
    return {f.name: torch.cat([p[f.name] for p in parts], dim=1 + f.tok_dim) for f in fields}


def gather_payload(fields: list[FieldLayout], chunk: int, p: Payload, idx: torch.Tensor) -> Payload:
    """The payload of tokens ``idx`` ``[B, H, n]`` of ``p`` (``[B, H, ...]`` per field), in the code
    domain: codes and metadata are copied, nothing is decoded or re-encoded.

    With ``chunk == 1`` every token is its own chunk and any tokens may be taken. With ``chunk > 1``
    ``idx`` must list whole chunks (``c`` consecutive tokens starting at a multiple of ``c``, as a cut
    on a grouped stream keeps them); each chunk's rows of every field are copied."""
    B, H, n = idx.shape
    if chunk > 1 and n % chunk:
        raise ValueError(f"a grouped payload is gathered in whole chunks of {chunk}, got {n} tokens")
    units = idx[..., ::chunk] // chunk  # [B, H, n / chunk]
    out = {}
    for f in fields:
        if f.tok_dim < 1 or f.per_chunk[0] != H:
            raise ValueError(f"payload field {f.name!r} is not laid out [heads, ...tokens...]: {f.per_chunk}")
        d, r = 1 + f.tok_dim, f.per_chunk[f.tok_dim]
        t = p[f.name].movedim(d, 2)  # [B, H, rows, *rest]
        rows = (units[..., None] * r + torch.arange(r, device=idx.device)).reshape(B, H, -1)
        g = rows.view(B, H, -1, *([1] * (t.dim() - 3))).expand(B, H, rows.shape[-1], *t.shape[3:])
        out[f.name] = t.gather(2, g).movedim(2, d)
    return out


def merge_payloads(fields: list[FieldLayout], old: Payload, new: Payload, use_old: torch.Tensor) -> Payload:
    """Per token (``use_old`` ``[B, H, n]``, chunk-1 payloads): ``old``'s codes where True, ``new``'s elsewhere."""
    out = {}
    for f in fields:
        d, r = 1 + f.tok_dim, f.per_chunk[f.tok_dim]
        m = use_old.repeat_interleave(r, dim=2) if r > 1 else use_old  # [B, H, rows]
        t_old, t_new = old[f.name].movedim(d, 2), new[f.name].movedim(d, 2)
        m = m.view(*m.shape, *([1] * (t_old.dim() - 3)))
        out[f.name] = torch.where(m, t_old, t_new.to(t_old.dtype)).movedim(2, d)
    return out


def slice_payload(fields: list[FieldLayout], chunk: int, p: Payload, start: int) -> Payload:
    """``p`` without its first ``start`` tokens (a multiple of ``chunk``)."""
    out = {}
    for f in fields:
        r = f.per_chunk[f.tok_dim]
        out[f.name] = p[f.name].narrow(1 + f.tok_dim, start // chunk * r,
                                       p[f.name].shape[1 + f.tok_dim] - start // chunk * r)
    return out


class _Stream:
    """One tensor's storage: encoded tokens (oldest first) followed by a full-precision residual.

    A token is encoded once: ``keep`` and ``drop_front`` move codes and metadata in the code domain."""

    def __init__(self, enc: Encoder, policy: StreamPolicy):
        self.enc, self.policy = enc, policy
        self.chunks: list[Payload] = []
        self.n_encoded = 0
        self.residual: torch.Tensor | None = None
        self._decoded: torch.Tensor | None = None  # decoded codes, for simulation speed only
        self._fields: list[FieldLayout] | None = None

    def __len__(self) -> int:
        return self.n_encoded + (0 if self.residual is None else self.residual.shape[-2])

    def fields(self, like: torch.Tensor) -> list[FieldLayout]:
        if self._fields is None:
            self._fields = self.enc.layout(like.shape[1], like.shape[-1], like.dtype)
        return self._fields

    def codes(self, like: torch.Tensor) -> Payload:
        """Every encoded token as one payload."""
        if len(self.chunks) > 1:
            self.chunks = [concat_payloads(self.fields(like), self.chunks)]
        return self.chunks[0]

    def append(self, x: torch.Tensor) -> None:
        self.residual = x if self.residual is None else torch.cat([self.residual, x], dim=-2)
        n = self.policy.n_to_encode(self.residual.shape[-2], self.enc.chunk)
        if n > 0:
            p = self.enc.encode(self.residual[..., :n, :])
            self.chunks.append(p)
            dec = self.enc.decode(p, x.dtype)
            self._decoded = dec if self._decoded is None else torch.cat([self._decoded, dec], dim=-2)
            self.n_encoded += n
            self.residual = self.residual[..., n:, :]

    def get(self) -> torch.Tensor:
        parts = [t for t in (self._decoded, self.residual) if t is not None and t.shape[-2] > 0]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def keep(self, idx: torch.Tensor, n_encoded: int) -> None:
        """Keep tokens ``idx`` ``[B, H, n]`` (ascending); the first ``n_encoded`` of them are stored
        encoded afterwards: their own codes when they were encoded already (whole chunks of a grouped
        encoder), else encoded now for the first time (chunk-1 encoders only); the rest stay in full
        precision. ``plan_cut`` chooses ``idx`` and ``n_encoded`` so that no encoded token ever goes
        back to the residual (where it would be encoded again)."""
        x = self.get()
        kept = _take(x, idx)
        E, c = self.n_encoded, self.enc.chunk
        head, tail = idx[..., :n_encoded], idx[..., n_encoded:]
        if bool((tail < E).any()):
            raise AssertionError("an encoded token would return to the full-precision residual")
        p = None
        if n_encoded:
            old = head < E
            if bool(old.all()):
                p = gather_payload(self.fields(x), c, self.codes(x), head)
            elif c > 1:
                raise AssertionError("a grouped stream keeps whole encoded chunks only")
            else:
                p = self.enc.encode(kept[..., :n_encoded, :])
                if bool(old.any()):
                    fresh = gather_payload(self.fields(x), c, self.codes(x), head.clamp(max=E - 1))
                    p = merge_payloads(self.fields(x), fresh, p, old)
        self.chunks = [p] if p is not None else []
        self._decoded = self.enc.decode(p, x.dtype) if p is not None else None
        self.n_encoded = n_encoded
        self.residual = kept[..., n_encoded:, :]

    def droppable(self, n: int) -> int:
        """How many of the first ``n`` tokens can be dropped alone (whole chunks of the encoded part;
        all of it or nothing for an encoder with irregular chunks)."""
        if n > self.n_encoded:
            return n
        if not getattr(self.enc, "regular", True):
            return n if n == self.n_encoded else 0
        return n - n % self.enc.chunk

    def drop_front(self, n: int) -> None:
        """Drop the first ``n`` tokens (``droppable(n) == n``), in the code domain."""
        if n <= 0:
            return
        x = self.get()
        if n <= self.n_encoded:
            if n < self.n_encoded:
                self.chunks = [slice_payload(self.fields(x), self.enc.chunk, self.codes(x), n)]
                self._decoded = self._decoded[..., n:, :]
            else:
                self.chunks, self._decoded = [], None
            self.n_encoded -= n
        else:
            self.residual = self.residual[..., n - self.n_encoded :, :]
            self.chunks, self._decoded, self.n_encoded = [], None, 0

    def nbytes(self) -> int:
        res = 0 if self.residual is None else self.residual.numel() * self.residual.element_size()
        return sum(payload_bytes(p) for p in self.chunks) + res

    def reset(self) -> None:
        self.chunks, self.n_encoded, self.residual, self._decoded = [], 0, None, None


@dataclass(frozen=True)
class CutLayout:
    """Where a cut back to ``hold`` tokens leaves a layer's two streams. Every count is a function of
    the counters before the cut only (the engine's pool and its simulator account a cut without
    seeing any tensor).

    ``unit``: 1 when both encoders take single tokens (the selector's tokens are kept exactly,
    ``kept == hold``); else the chunk of the grouped encoder (KIVI's keys, GEAR): its encoded
    region ``[0, grouped)`` is kept in ``groups`` whole chunks, the tokens after it one by one
    (``kept = tokens + groups * unit <= hold``). ``encoded_k``/``encoded_v``: tokens each stream
    holds encoded after the cut."""

    n: int
    hold: int
    kept: int
    unit: int
    grouped: int
    groups: int
    encoded_k: int
    encoded_v: int


def plan_cut(n: int, hold: int, encoded: tuple[int, int], chunks: tuple[int, int]) -> CutLayout:
    """The layout of a cut of ``n`` stored tokens to ``hold``; ``encoded``/``chunks``: (keys, values).

    Code-domain eviction: a kept token keeps its codes and its chunk's metadata; an encoded token is
    never decoded back into the residual. For chunk-1 streams the first ``min(kept, encoded)`` kept
    tokens stay (or become, if they were still in the residual) encoded. A grouped stream keeps
    whole chunks: every token after its encoded region is kept (up to ``hold``), and the rest of the
    hold buys whole chunks (see ``round_to_units``)."""
    (ek, ev), (ck, cv) = encoded, chunks
    hold = min(hold, n)
    grouped = [(e, c) for e, c in ((ek, ck), (ev, cv)) if c > 1]
    if not grouped:
        return CutLayout(n, hold, hold, 1, 0, 0, min(hold, ek), min(hold, ev))
    if len(grouped) == 2 and (ck != cv or ek != ev):
        raise SpecError(f"eviction needs the key and value encoders grouped alike (chunks {ck}/{cv}, "
                        f"encoded {ek}/{ev})")
    E, c = grouped[0]
    tokens = min(n - E, hold)
    groups = min(E // c, (hold - tokens) // c)
    kept = tokens + groups * c
    enc_k = groups * c if ck > 1 else min(kept, ek)
    enc_v = groups * c if cv > 1 else min(kept, ev)
    return CutLayout(n, hold, kept, c, E, groups, enc_k, enc_v)


def check_cut(codec: Codec) -> None:
    """Raise (at set-up) if a rolling selector could not evict from this codec in the code domain."""
    for enc in (codec.key_encoder(), codec.value_encoder()):
        if not getattr(enc, "per_head", True) or not getattr(enc, "regular", True):
            raise SpecError(f"{codec.spec()}: a selector that evicts while decoding needs per-head, fixed-size "
                            f"chunks (a cut keeps different tokens per head, in the code domain); use a one-shot "
                            f"selector or the codec's default settings")
    ck, cv = int(codec.key_encoder().chunk), int(codec.value_encoder().chunk)
    if ck > 1 and cv > 1 and (ck != cv or codec.key_policy() != codec.value_policy()):
        raise SpecError(f"{codec.name}: a selector that evicts while decoding needs the key and value "
                        f"encoders grouped alike (chunks {ck}/{cv}); use a one-shot selector")


def round_to_units(idx: torch.Tensor, priority: torch.Tensor | None, valid: torch.Tensor,
                   layout: CutLayout) -> torch.Tensor:
    """The tokens a cut keeps ``[B, H, kept]`` (ascending), from the selector's ``idx`` ``[B, H, hold]``.

    ``unit == 1``: ``idx`` itself. Otherwise every token after the grouped region competes for the
    ``kept - groups * unit`` single places, and whole chunks of the grouped region for ``groups``:
    a token ranks by (selected, ``priority``, position); a chunk by its best token, then by how many of
    its tokens were selected. Padding ranks last."""
    if layout.unit == 1:
        return idx
    B, H, n = valid.shape
    dev = idx.device
    selected = torch.zeros(B, H, n, dtype=torch.bool, device=dev).scatter_(2, idx, True)
    prio = (torch.arange(n, device=dev, dtype=torch.float32).expand(B, H, n) if priority is None
            else priority.float())
    rank = prio.argsort(dim=-1, stable=True).argsort(dim=-1)  # 0..n-1, ties by position
    key = torch.where(valid, selected.long() * n + rank, torch.full_like(rank, -1))
    E, c, g = layout.grouped, layout.unit, layout.groups
    t = layout.kept - g * c
    parts = []
    if t:
        parts.append(key[..., E:].topk(t, dim=-1).indices + E)
    if g:
        gk = key[..., :E].view(B, H, E // c, c)
        score = gk.amax(-1) * (c + 1) + selected[..., :E].view(B, H, E // c, c).sum(-1)
        top = score.topk(g, dim=-1).indices  # [B, H, g]
        parts.append((top[..., None] * c + torch.arange(c, device=dev)).reshape(B, H, g * c))
    return torch.cat(parts, dim=-1).sort(dim=-1).values


class CodecState:
    """A codec's storage for one layer of a batch: keys and values as two streams.

    Eviction after tokens were stored (``keep``) works on the stored codes: a token is quantised at
    most once in its life (see ``plan_cut``). Selectors that evict once at prefill (SnapKV,
    PyramidKV, KVCrush) select before anything is encoded."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self.k = _Stream(codec.key_encoder(), codec.key_policy())
        self.v = _Stream(codec.value_encoder(), codec.value_policy())

    def __len__(self) -> int:
        return len(self.k)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.append(k)
        self.v.append(v)

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.get(), self.v.get()

    def plan_cut(self, hold: int) -> CutLayout:
        return plan_cut(len(self), hold, (self.k.n_encoded, self.v.n_encoded),
                        (int(self.k.enc.chunk), int(self.v.enc.chunk)))

    def keep(self, idx: torch.Tensor, layout: CutLayout | None = None) -> None:
        """Keep only tokens ``idx`` ([B, H, n], ascending, as ``round_to_units`` returns for ``layout``;
        default: the layout of a cut to ``n``) in that order, in the code domain."""
        layout = layout or self.plan_cut(idx.shape[-1])
        if idx.shape[-1] != layout.kept:
            raise ValueError(f"keep: {idx.shape[-1]} tokens for a layout that keeps {layout.kept}")
        self.k.keep(idx, layout.encoded_k)
        self.v.keep(idx, layout.encoded_v)

    def droppable(self, n: int) -> int:
        """Of the first ``n`` tokens, how many both streams can drop (a sliding window moving on)."""
        return min(self.k.droppable(n), self.v.droppable(n))

    def drop_front(self, n: int) -> None:
        self.k.drop_front(n)
        self.v.drop_front(n)

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()


# ------------------------------------------------------------------------------------------ selectors


@dataclass
class SelectionInput:
    """What a selector sees for one layer.

    ``scores``: ``[B, H_kv, T]`` attention each stored token received from the queries the selector
    asked to observe, averaged over a KV head's query group; None when it observes none. ``valid``: ``[B, H_kv, T]`` False for padding.
    ``head_scores``: ``[B, H_q, T]`` the same statistic per query head before the group average
    (KVCrush builds its head-behaviour signatures from it).
    """

    length: int
    layer: int
    num_layers: int
    valid: torch.Tensor
    scores: torch.Tensor | None = None
    head_scores: torch.Tensor | None = None


@dataclass
class Selector(Method):
    """Which tokens stay. The hooks below are the whole protocol; the HF path (``cache.py``) and the
    engine call them the same way, through a :class:`SelectorState` per layer:

    - ``prefill_queries``: how many of the prompt's last queries must have their attention observed
      (SnapKV: its window; H2O: all; position-based selectors: none);
    - ``observes_decode``: whether every decode step's attention is observed too (H2O);
    - ``budget``: tokens kept at the end of prefill; ``decode_hold``: tokens the cache is held at
      while decoding (None: it grows freely after prefill);
    - ``select``: which tokens, given the state's statistics; ``priority``: optionally, the score it
      ranks tokens by (a cut on a grouped codec rounds the selection to whole chunks by it).

    Sliding-window layers: a selector runs on the layers whose attention spans the whole context
    (``on_sliding = "window"``, every built-in selector): a sliding layer keeps its window (at most
    ``window - 1`` stored tokens plus storage granularity), its codec still applies, and the selector
    neither observes nor evicts there. Budgets (``ratio=``) resolve against the prompt as for any
    layer; ``layer``/``num_layers`` count every layer, sliding ones included.
    """

    kind: ClassVar = "selector"
    on_sliding: ClassVar[str] = "window"

    def prefill_queries(self, length: int, layer: int, num_layers: int) -> int:
        return 0

    def observes_decode(self) -> bool:
        return False

    def budget(self, length: int, layer: int, num_layers: int) -> int | None:
        """Tokens kept per sequence and KV head for a prompt of ``length``; None keeps everything."""
        return None

    def decode_hold(self, length: int, layer: int, num_layers: int) -> int | None:
        """Tokens per sequence and KV head the cache is cut back to while decoding; None: no eviction."""
        return None

    def evicts_while_decoding(self) -> bool:
        """Whether ``decode_hold`` may cut stored (encoded) tokens (H2O, StreamingLLM)."""
        return False

    def select(self, inp: SelectionInput, budget: int) -> torch.Tensor:
        """Indices ``[B, H_kv, budget]`` (ascending) of the tokens to keep."""
        raise NotImplementedError

    def stored_heads(self, kv_heads: int, query_heads: int) -> int:
        """Heads the cache stores per layer where this selector selects: ``kv_heads`` (one selection per
        KV head, shared by its query group), or ``query_heads`` (keys and values repeated per query head
        before a selection per query head, as SnapKV's reference does after ``repeat_kv``)."""
        return kv_heads

    def priority(self, inp: SelectionInput, budget: int) -> torch.Tensor | None:
        """``[B, H_kv, T]`` the score ``select`` keeps the top of (forced tokens ``+inf``), or None."""
        return None

    def new_state(self, layer: int, num_layers: int, rows: int) -> SelectorState:
        return SelectorState(self, layer, num_layers, rows)


class SelectorState:
    """A selector's memory of one layer's stored tokens, for ``rows`` sequences (the HF path's batch,
    or the engine's slots), column ``j`` being the ``j``-th stored token of a row.

    ``observe`` takes attention summed over queries, ``[b, H_q, T]`` over a row's first ``T`` stored
    tokens. A selector that observes decoding (H2O) accumulates it for the life of the sequence;
    for the others the prefill statistics live only until the ``select`` they feed.
    """

    def __init__(self, selector: Selector, layer: int, num_layers: int, rows: int):
        self.selector, self.layer, self.num_layers, self.rows = selector, layer, num_layers, rows
        self.persistent = selector.observes_decode()
        self.scores: torch.Tensor | None = None  # [rows, H_q, capacity] float32
        self._transient: torch.Tensor | None = None

    def observe(self, rows: torch.Tensor, scores: torch.Tensor) -> None:
        if not self.persistent:
            self._transient = scores.float()
            return
        T = scores.shape[-1]
        if self.scores is None:
            self.scores = scores.new_zeros(self.rows, scores.shape[1], T, dtype=torch.float32)
        elif self.scores.shape[-1] < T:  # grow by at least half, so a decode loop reallocates rarely
            grow = max(T, self.scores.shape[-1] * 3 // 2) - self.scores.shape[-1]
            self.scores = torch.cat([self.scores, self.scores.new_zeros(*self.scores.shape[:2], grow)], dim=-1)
        self.scores[rows, :, :T] += scores.float()

    def selection_input(self, rows: torch.Tensor, valid: torch.Tensor) -> SelectionInput:
        """What ``select`` sees for ``rows`` whose stored tokens are ``valid`` ``[b, H_kv, T]``."""
        T, H = valid.shape[-1], valid.shape[1]
        head = self._transient if not self.persistent else None
        if self.persistent and self.scores is not None:
            head = self.scores[rows, :, :T]
            if head.shape[-1] < T:
                head = torch.cat([head, head.new_zeros(*head.shape[:2], T - head.shape[-1])], dim=-1)
        self._transient = None
        scores = None
        if head is not None:
            B, Hq, _ = head.shape
            scores = head.view(B, H, Hq // H, T).mean(2)
        return SelectionInput(length=T, layer=self.layer, num_layers=self.num_layers, valid=valid,
                              scores=scores, head_scores=head)

    def select(self, rows: torch.Tensor, valid: torch.Tensor, budget: int) -> torch.Tensor:
        return self.selector.select(self.selection_input(rows, valid), budget)

    def select_cut(self, rows: torch.Tensor, valid: torch.Tensor, layout: CutLayout) -> torch.Tensor:
        """The tokens a cut with ``layout`` keeps: the selector's choice of ``layout.hold``, rounded to
        the codec's chunks where it groups tokens (``round_to_units``)."""
        inp = self.selection_input(rows, valid)
        idx = self.selector.select(inp, layout.hold)
        if layout.unit == 1:
            return idx
        return round_to_units(idx, self.selector.priority(inp, layout.hold), valid, layout)

    def keep(self, rows: torch.Tensor, idx: torch.Tensor) -> None:
        """The rows' stored tokens became ``idx`` ``[b, H_kv, n]``: carry their statistics along."""
        if self.scores is None:
            return
        b, H, n = idx.shape
        Hq = self.scores.shape[1]
        kept = self.scores[rows].gather(2, idx.repeat_interleave(Hq // H, dim=1))
        self.scores[rows] = 0.0
        self.scores[rows, :, :n] = kept

    def clear(self, rows: torch.Tensor) -> None:
        """The rows' sequences are gone (engine slots freed)."""
        if self.scores is not None:
            self.scores[rows] = 0.0


@dataclass
class BudgetSelector(Selector):
    """Shared budget logic: ``budget=N`` tokens per sequence and KV head, or ``ratio=r`` removed.

    Exactly one of them is set; ``ratio`` resolves against the prompt length as
    ``ceil(length * (1 - ratio))``. Subclasses declare ``min_budget`` (tokens that are always kept).
    """

    budget_tokens: int = 0  # spec name: budget
    ratio: float = 0.0

    SPEC_ALIASES: ClassVar[dict[str, str]] = {"budget": "budget_tokens"}
    rolling: ClassVar[bool] = False  # re-applies its rule at every decode step (H2O, StreamingLLM)

    def __post_init__(self) -> None:
        check(self.budget_tokens >= 0, f"{self.name}: budget must be >= 0, got {self.budget_tokens}")
        check(0.0 <= self.ratio < 1.0, f"{self.name}: ratio must be in [0, 1), got {self.ratio}")
        check(
            not (self.budget_tokens and self.ratio),
            f"{self.name}: give either budget=N or ratio=r, not both",
        )
        if self.budget_tokens:
            check(
                self.budget_tokens >= self.min_budget(),
                f"{self.name}: budget={self.budget_tokens} is smaller than the tokens this method always "
                f"keeps ({self.min_budget()}); raise budget or shrink the window/sinks",
            )

    def min_budget(self) -> int:
        return 0

    def base_budget(self, length: int) -> int | None:
        if self.budget_tokens:
            return self.budget_tokens if length > self.budget_tokens else None
        if self.ratio:
            b = max(self.min_budget(), math.ceil(length * (1.0 - self.ratio)))
            return b if b < length else None
        return None

    def budget(self, length: int, layer: int, num_layers: int) -> int | None:
        return self.base_budget(length)

    def observed_queries(self, length: int) -> int:
        """Prompt queries (the last ones) whose attention the rule reads; 0: it reads positions only."""
        return 0

    def prefill_queries(self, length: int, layer: int, num_layers: int) -> int:
        selects = (self.budget(length, layer, num_layers) is not None
                   or self.decode_hold(length, layer, num_layers) is not None)
        return self.observed_queries(length) if selects else 0

    def decode_hold(self, length: int, layer: int, num_layers: int) -> int | None:
        return self.rolling_hold(length, layer, num_layers) if self.rolling else None

    def evicts_while_decoding(self) -> bool:
        return self.rolling

    def rolling_hold(self, length: int, layer: int, num_layers: int) -> int | None:
        """A rolling rule holds the prompt's budget, or ``budget=N`` once a short prompt grew to N."""
        b = self.budget(length, layer, num_layers)
        return b if b is not None else (self.budget_tokens or None)

    def spec(self) -> str:
        return super().spec().replace("budget_tokens=", "budget=")


@dataclass
class CompressionMethod:
    """A parsed spec: one selector and one codec."""

    selector: Selector
    codec: Codec

    @property
    def spec(self) -> str:
        parts = [p.spec() for p in (self.selector, self.codec) if p.name not in ("full", "fp")]
        return "+".join(parts) or "full"

    def __str__(self) -> str:
        return self.spec
