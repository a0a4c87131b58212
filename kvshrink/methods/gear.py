"""``gear``: uniform quantisation + a low-rank approximation of its error + sparse outliers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvshrink.methods.base import Codec, Encoder, Payload, StreamPolicy, check
from kvshrink.methods.quant import SCALE_DTYPE, GroupQuantEncoder
from kvshrink.methods.registry import register

INDEX_DTYPE = torch.int16  # outlier positions inside a chunk (< 2^15 tokens or channels)
_SEED = 0  # power-iteration start: fixed, so encoding is a pure function and leaves torch's RNG alone


def low_rank(e: torch.Tensor, rank: int, loop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` approximation ``U @ V^T`` of each ``[n, d]`` matrix of ``e`` ``[..., n, d]`` by
    power (subspace) iteration, as GEAR's ``fake_poweriteration_group``: ``U`` orthonormal,
    ``V = E^T U``, so ``U V^T = U U^T E`` (the projection never increases the Frobenius error)."""
    *lead, n, d = e.shape
    # one start shared by every matrix (a chunk encodes the same alone or among others), drawn on
    # the CPU so every device starts from the same numbers
    g = torch.Generator().manual_seed(_SEED)
    p = torch.rand(d, rank, generator=g).to(e.device, e.dtype).expand(*lead, d, rank)
    for _ in range(loop):
        p = torch.linalg.qr(p).Q
        u = torch.linalg.qr(e @ p).Q
        p = e.transpose(-1, -2) @ u
    return u, p


class GearEncoder(Encoder):
    """One chunk of ``buffer`` tokens: ``X ≈ D + S + U V^T`` (quantised, sparse, low rank).

    ``along="tokens"`` (keys): per-channel quantisation over the chunk's tokens and per-channel
    outliers; ``along="channels"`` (values): per-token quantisation over the head dim and per-token
    outliers. ``token_group``: values grouped over all heads of a token (``H·D``, the reference's
    layout) instead of per head. ``ref_outliers``: the reference's outlier count ``int(H·D·s/2)`` per
    side (per key channel, per value token) instead of ``ceil(s·n/2)``. ``prefill_rank > 0``: the first
    encode of a stream (the prompt) is one group of all its tokens with that rank, later chunks use
    ``rank`` (the reference's whole-prompt compression); such a stream's chunks are irregular."""

    def __init__(self, bits: int, rank: int, outlier: float, buffer: int, loop: int, along: str,
                 token_group: bool = False, ref_outliers: bool = False, prefill_rank: int = 0):
        self.bits, self.rank, self.outlier, self.loop, self.along = bits, rank, outlier, loop, along
        self.buffer = self.chunk = buffer
        self.token_group = token_group and along == "channels"
        self.ref_outliers, self.prefill_rank = ref_outliers, prefill_rank
        self.per_head = not self.token_group
        self.regular = prefill_rank == 0
        self._first = True

    def _quant(self, group_tokens: int) -> GroupQuantEncoder:
        return GroupQuantEncoder(self.bits, group_tokens if self.along == "tokens" else 0, along=self.along)

    def _k(self, n: int, heads: int, head_dim: int) -> int:
        """Outliers kept on each side (largest and smallest) of one channel or token of ``n`` entries."""
        if self.outlier <= 0:
            return 0
        if self.ref_outliers:  # compress_function.py: int(numel * s / B / T / 2) = int(H * D * s / 2)
            return min(int(heads * head_dim * self.outlier / 2), n // 2)
        return math.ceil(self.outlier * n / 2)

    def _dim(self) -> int:
        return -2 if self.along == "tokens" else -1  # outlier axis in the [B, H, C, Tb, D] chunk view

    def layout(self, heads: int, head_dim: int, dtype: torch.dtype):
        first = self._first
        try:
            return super().layout(heads, head_dim, dtype)
        finally:
            self._first = first

    def encode(self, x: torch.Tensor) -> Payload:
        B, H, T, D = x.shape
        one_group = self.prefill_rank > 0 and self._first
        self._first, self._head_dim = False, D
        if self.token_group:  # [B, 1, T, H*D]: one group (and outlier set) per token over every head
            x = x.permute(0, 2, 1, 3).reshape(B, 1, T, H * D)
        p = self._encode(x, T if one_group else self.buffer, self.prefill_rank if one_group else self.rank, H, D)
        return p

    def _encode(self, x: torch.Tensor, Tb: int, rank: int, heads: int, head_dim: int) -> Payload:
        B, H, T, D = x.shape
        if T % Tb:
            raise ValueError(f"gear encodes chunks of {Tb} tokens, got {T}")
        if rank > min(D, Tb):
            raise ValueError(f"gear: rank={rank} exceeds the chunk ({Tb} x {D})")
        C, dim = T // Tb, self._dim()
        quant = self._quant(Tb)
        xf = x.float().reshape(B, H, C, Tb, D)
        k = self._k(xf.shape[dim], heads, head_dim)
        idx = None
        if k:
            # GEAR's gears_channelQ / gears_tokenQ: the k smallest and k largest of each channel
            # (keys) or token (values) are replaced by its mean before quantisation, kept exactly.
            lo = xf.topk(k, dim=dim, largest=False).indices
            hi = xf.topk(k, dim=dim, largest=True).indices
            idx = torch.cat([lo, hi], dim=dim)
            mean = xf.mean(dim, keepdim=True).expand_as(idx)
            p = quant.encode(xf.scatter(dim, idx, mean).reshape(B, H, T, D))
            ov = x.reshape(B, H, C, Tb, D).gather(dim, idx)
        else:
            p = quant.encode(x)
        deq = quant.decode(p, torch.float32).reshape(B, H, C, Tb, D)
        if idx is not None:
            deq.scatter_(dim, idx, ov.float())
            if self.along == "tokens":
                p["ov"], p["oi"] = ov, idx.to(INDEX_DTYPE)  # [B, H, C, 2k, D]
            else:
                p["ov"], p["oi"] = ov.reshape(B, H, T, 2 * k), idx.reshape(B, H, T, 2 * k).to(INDEX_DTYPE)
        if rank:
            u, v = low_rank(xf - deq, rank, self.loop)
            p["u"] = u.reshape(B, H, T, rank).to(SCALE_DTYPE)  # one row per token
            p["v"] = v.to(SCALE_DTYPE)  # [B, H, C, D, rank]
        return p

    def decode(self, p: Payload, dtype: torch.dtype) -> torch.Tensor:
        T = p["q"].shape[2]
        C = p["v"].shape[2] if "v" in p else (p["scale"].shape[2] if self.along == "tokens" else T // self.buffer)
        Tb = T // C  # a whole-prompt chunk (prefill_rank) is longer than ``buffer``
        x = self._quant(Tb).decode(p, dtype)
        B, H, T, D = x.shape
        C = T // Tb
        x = x.reshape(B, H, C, Tb, D)
        if "ov" in p:
            ov, oi = p["ov"].to(dtype), p["oi"].long()
            if self.along == "channels":
                ov, oi = ov.reshape(B, H, C, Tb, -1), oi.reshape(B, H, C, Tb, -1)
            x = x.scatter(self._dim(), oi, ov)
        if "u" in p:
            r = p["u"].shape[-1]
            u = p["u"].to(dtype).reshape(B, H, C, Tb, r)
            x = x + u @ p["v"].to(dtype).transpose(-1, -2)
        x = x.reshape(B, H, T, D)
        if self.token_group:  # back to [B, H, T, D]
            x = x.reshape(B, T, -1, self._head_dim).permute(0, 2, 1, 3)
        return x

    def bytes_per_token(self, head_dim: int, dtype_bytes: int, heads: int | None = None) -> float:
        """Per token and KV head, steady state (chunks of ``buffer`` at ``rank``). The reference
        settings (values over all heads, the reference's outlier count) depend on the number of KV
        heads: pass ``heads`` (``GEAR.bytes_per_token`` does)."""
        if heads is None:
            if self.token_group or self.ref_outliers:
                raise NotImplementedError("gear: bytes per token of value_group=token / outliers=reference depend on the "
                                 "number of KV heads; call GEAR.bytes_per_token(layers, kv_heads, head_dim, bytes)")
            heads = 1
        meta = torch.finfo(SCALE_DTYPE).bits // 8
        idx = torch.iinfo(INDEX_DTYPE).bits // 8
        D = head_dim * heads if self.token_group else head_dim  # entries of one group row
        quant = self._quant(self.buffer).bytes_per_token(D, dtype_bytes)
        lowrank = self.rank * (self.buffer + D) * meta / self.buffer
        if self.along == "tokens":  # 2k per channel per chunk
            sparse = D * 2 * self._k(self.buffer, heads, head_dim) * (dtype_bytes + idx) / self.buffer
        else:  # 2k per token
            sparse = 2 * self._k(D, heads, head_dim) * (dtype_bytes + idx)
        total = quant + lowrank + sparse
        return total / heads if self.token_group else total


@register
@dataclass
class GEAR(Codec):
    """GEAR, Kang et al., "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
    Generative Inference of LLM", arXiv 2403.05527 (reference: github opengear-project/GEAR,
    ``GEARLM/Simulated/compress_function.py``: ``gearslkivi_channelQ_new``/``gearslkivi_tokenQ_new``,
    ``gears_channelQ``/``gears_tokenQ``, ``fake_poweriteration_group``; ``TrueCompressFunction.py``).

    For a chunk ``X`` (``buffer`` tokens x head dim, per KV head)::

        S = Filter_s(X)                   k smallest + k largest of each channel (keys) / token (values)
        D = Quant_b(X with S set to the channel/token mean)   uniform asymmetric, b bits
        R = X - (D with S's entries restored)                  zero at the outliers
        L = U V^T ≈ R                     rank r, power iteration (``loop`` rounds, QR each round)
        X' = (D with S restored) + L

    (paper: ``X ≈ D + L + S``). Quantisation is KCVT, GEAR's 4-bit setting (``GEAR-KCVT``): keys per
    channel over the chunk's tokens (one scale/zero per channel per chunk), values per token over
    the head dim (one scale/zero per token per head). Outliers per side ``k = ceil(outlier * n / 2)``
    with ``n`` the chunk's tokens (keys) or the head dim (values). Streaming as the reference's
    ``--streaming --streaming_gap`` with ``stream_grouping``: tokens wait in full precision and are
    compressed ``buffer`` at a time (``StreamPolicy(buffer, flush="full")``; ``len % buffer`` tokens
    stay in full precision, keys and values alike).

    Storage per chunk and head (exact in ``bytes_per_token``): packed b-bit codes, float16
    scale/zero, float16 ``U`` (``buffer x r``) and ``V`` (``D x r``) as the reference's ``.half()``,
    outlier values in the model dtype ("full precision") with int16 positions inside the chunk.

    On a sliding-window layer the codec stores the window (whole chunks fall out as they leave it).

    Reference settings (GEAR-KCVT as ``compress_function.py`` runs it), each an option:

    - ``prefill_rank=N`` (> 0): the prompt (minus ``L % buffer``, which waits in full precision) is
      compressed as one matrix with rank ``N``, later ``buffer``-token gaps with ``rank`` (the
      reference: ``prefill_rank`` 4, ``rank`` 2). HF path only: the engine's blocks hold fixed-size
      chunks, and a stream with one irregular chunk cannot be evicted from or slid in the code domain
      (rolling selectors are refused; a sliding layer drops the prompt chunk only once it is all dead).
    - ``value_group=token``: values quantised, outlier-filtered and low-rank approximated over all
      heads of a token (one group of ``H·D`` per token) instead of per head. Refused with selectors that
      evict while decoding (a token's metadata is shared by heads that keep different tokens).
    - ``outliers=reference``: ``int(H·D·s/2)`` outliers per side of every key channel and every value
      token (the reference's ``int(numel * s / B / T / 2)``), whatever the chunk length (capped at half
      the entries; with ``H·D = 4096`` and ``s = 0.02`` that is over half the tokens of a 64-token gap).

    ``gear:prefill_rank=4,rank=2,value_group=token,outliers=reference`` is the reference's recipe.

    Defaults and why: per-head values, ``ceil(s·n/2)`` outliers per side (about a fraction ``s`` of
    the entries, at least one pair) and a fixed ``buffer`` chunk with one ``rank`` keep bytes per token
    a constant per KV head (exact in ``bytes_per_token``), make every chunk storable in the engine's
    blocks, and let any selector evict in the code domain. Bytes with ``value_group=token`` or
    ``outliers=reference`` depend on the number of KV heads (``GEAR.bytes_per_token`` passes it).

    Other deviations from the reference code:
    - power iteration starts from a fixed-seed generator (the reference draws ``torch.rand`` from the
      global RNG, which would perturb sampling) and orthonormalises every round (the reference only
      in the last round; same subspace, no overflow).
    - the reference's ``quantize_bit ** 2 - 1`` levels equal ``2**bits - 1`` only for 2 and 4 bits;
      here always ``2**bits - 1``.
    - the reference leaves the prompt uncompressed in its SDPA path (its published numbers are
      optimistic); here the prompt is stored compressed.
    """

    name = "gear"

    bits: int = 4
    rank: int = 4
    outlier: float = 0.02
    buffer: int = 64
    loop: int = 3
    prefill_rank: int = 0
    value_group: str = "head"
    outliers: str = "fraction"

    def __post_init__(self) -> None:
        check(self.bits in (2, 4, 8), f"{self.name}: bits must be 2, 4 or 8, got {self.bits}")
        check(
            1 <= self.buffer <= torch.iinfo(INDEX_DTYPE).max,
            f"{self.name}: buffer must be in [1, {torch.iinfo(INDEX_DTYPE).max}], got {self.buffer}",
        )
        check(
            0 <= self.rank <= self.buffer,
            f"{self.name}: rank must be in [0, buffer={self.buffer}], got {self.rank}",
        )
        check(0.0 <= self.outlier <= 0.5, f"{self.name}: outlier must be in [0, 0.5], got {self.outlier}")
        check(self.loop >= 1, f"{self.name}: loop must be >= 1, got {self.loop}")
        check(self.prefill_rank >= 0, f"{self.name}: prefill_rank must be >= 0, got {self.prefill_rank}")
        check(self.value_group in ("head", "token"),
              f"{self.name}: value_group must be one of head, token; got {self.value_group!r}")
        check(self.outliers in ("fraction", "reference"),
              f"{self.name}: outliers must be one of fraction, reference; got {self.outliers!r}")

    def _encoder(self, along: str) -> GearEncoder:
        return GearEncoder(self.bits, self.rank, self.outlier, self.buffer, self.loop, along,
                           token_group=self.value_group == "token", ref_outliers=self.outliers == "reference",
                           prefill_rank=self.prefill_rank)

    def key_encoder(self) -> Encoder:
        return self._encoder("tokens")

    def value_encoder(self) -> Encoder:
        return self._encoder("channels")

    def bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> float:
        per_head = (self.key_encoder().bytes_per_token(head_dim, dtype_bytes, num_kv_heads)
                    + self.value_encoder().bytes_per_token(head_dim, dtype_bytes, num_kv_heads))
        return per_head * num_layers * num_kv_heads

    def key_policy(self) -> StreamPolicy:
        return StreamPolicy(residual=self.buffer, flush="full")

    def value_policy(self) -> StreamPolicy:
        return StreamPolicy(residual=self.buffer, flush="full")
