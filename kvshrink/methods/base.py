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


class _Stream:
    """One tensor's storage: encoded chunks (oldest first) followed by a full-precision residual."""

    def __init__(self, enc: Encoder, policy: StreamPolicy):
        self.enc, self.policy = enc, policy
        self.chunks: list[Payload] = []
        self.n_encoded = 0
        self.residual: torch.Tensor | None = None
        self._decoded: torch.Tensor | None = None  # cache of decoded chunks, for simulation speed only

    def __len__(self) -> int:
        return self.n_encoded + (0 if self.residual is None else self.residual.shape[-2])

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

    def nbytes(self) -> int:
        res = 0 if self.residual is None else self.residual.numel() * self.residual.element_size()
        return sum(payload_bytes(p) for p in self.chunks) + res

    def reset(self) -> None:
        self.chunks, self.n_encoded, self.residual, self._decoded = [], 0, None, None


class CodecState:
    """A codec's storage for one layer of a batch: keys and values as two streams.

    ``keep`` (eviction after tokens were stored) decodes, gathers and re-encodes: a token that
    survives an eviction may be re-quantised with new group statistics. Selectors that evict
    once at prefill (SnapKV, PyramidKV, KVCrush) select before anything is encoded and never pay this.
    """

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

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only tokens ``idx`` ([B, H, n], ascending) in that order."""
        k, v = self.get()
        g = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
        k, v = k.gather(2, g), v.gather(2, g)
        self.k.reset()
        self.v.reset()
        self.append(k, v)

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
    - ``select``: which tokens, given the state's statistics.
    """

    kind: ClassVar = "selector"

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

    def select(self, inp: SelectionInput, budget: int) -> torch.Tensor:
        """Indices ``[B, H_kv, budget]`` (ascending) of the tokens to keep."""
        raise NotImplementedError

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
