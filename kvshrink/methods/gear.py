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
    outliers.
    """

    def __init__(self, bits: int, rank: int, outlier: float, buffer: int, loop: int, along: str):
        self.bits, self.rank, self.outlier, self.loop, self.along = bits, rank, outlier, loop, along
        self.buffer = self.chunk = buffer
        group = buffer if along == "tokens" else 0
        self.quant = GroupQuantEncoder(bits, group, along=along)

    def _k(self, n: int) -> int:
        """Outliers kept on each side (largest and smallest) of one channel or token of ``n`` entries."""
        return math.ceil(self.outlier * n / 2) if self.outlier > 0 else 0

    def _dim(self) -> int:
        return -2 if self.along == "tokens" else -1  # outlier axis in the [B, H, C, Tb, D] chunk view

    def encode(self, x: torch.Tensor) -> Payload:
        B, H, T, D = x.shape
        if T % self.buffer:
            raise ValueError(f"gear encodes chunks of {self.buffer} tokens, got {T}")
        if self.rank > D:
            raise ValueError(f"gear: rank={self.rank} exceeds the head dim {D}")
        C, Tb, dim = T // self.buffer, self.buffer, self._dim()
        xf = x.float().reshape(B, H, C, Tb, D)
        k = self._k(xf.shape[dim])
        idx = None
        if k:
            # GEAR's gears_channelQ / gears_tokenQ: the k smallest and k largest of each channel
            # (keys) or token (values) are replaced by its mean before quantisation, kept exactly.
            lo = xf.topk(k, dim=dim, largest=False).indices
            hi = xf.topk(k, dim=dim, largest=True).indices
            idx = torch.cat([lo, hi], dim=dim)
            mean = xf.mean(dim, keepdim=True).expand_as(idx)
            p = self.quant.encode(xf.scatter(dim, idx, mean).reshape(B, H, T, D))
            ov = x.reshape(B, H, C, Tb, D).gather(dim, idx)
        else:
            p = self.quant.encode(x)
        deq = self.quant.decode(p, torch.float32).reshape(B, H, C, Tb, D)
        if idx is not None:
            deq.scatter_(dim, idx, ov.float())
            if self.along == "tokens":
                p["ov"], p["oi"] = ov, idx.to(INDEX_DTYPE)  # [B, H, C, 2k, D]
            else:
                p["ov"], p["oi"] = ov.reshape(B, H, T, 2 * k), idx.reshape(B, H, T, 2 * k).to(INDEX_DTYPE)
        if self.rank:
            u, v = low_rank(xf - deq, self.rank, self.loop)
            p["u"] = u.reshape(B, H, T, self.rank).to(SCALE_DTYPE)  # one row per token
            p["v"] = v.to(SCALE_DTYPE)  # [B, H, C, D, rank]
        return p

    def decode(self, p: Payload, dtype: torch.dtype) -> torch.Tensor:
        x = self.quant.decode(p, dtype)
        B, H, T, D = x.shape
        C, Tb = T // self.buffer, self.buffer
        x = x.reshape(B, H, C, Tb, D)
        if "ov" in p:
            ov, oi = p["ov"].to(dtype), p["oi"].long()
            if self.along == "channels":
                ov, oi = ov.reshape(B, H, C, Tb, -1), oi.reshape(B, H, C, Tb, -1)
            x = x.scatter(self._dim(), oi, ov)
        if "u" in p:
            u = p["u"].to(dtype).reshape(B, H, C, Tb, self.rank)
            x = x + u @ p["v"].to(dtype).transpose(-1, -2)
        return x.reshape(B, H, T, D)

    def bytes_per_token(self, head_dim: int, dtype_bytes: int) -> float:
        meta = torch.finfo(SCALE_DTYPE).bits // 8
        idx = torch.iinfo(INDEX_DTYPE).bits // 8
        quant = self.quant.bytes_per_token(head_dim, dtype_bytes)
        lowrank = self.rank * (self.buffer + head_dim) * meta / self.buffer
        if self.along == "tokens":  # 2k per channel per chunk
            sparse = head_dim * 2 * self._k(self.buffer) * (dtype_bytes + idx) / self.buffer
        else:  # 2k per token
            sparse = 2 * self._k(head_dim) * (dtype_bytes + idx)
        return quant + lowrank + sparse


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

    Deviations from the reference code:
    - the prefill is compressed in chunks of ``buffer`` tokens with one rank ``rank``; the
      reference compresses the whole prefill (minus ``L % gap``) as one matrix with
      ``prefill_rank`` and later gaps with ``rank`` (a fixed chunk keeps bytes per token exact and
      blocks storable).
    - per KV head: values' quantisation group and outliers are per token *per head* (the reference
      flattens all heads of a token: one group and one top-k over ``H*D``).
    - outlier count: the reference's ``int(numel * s / B / T / 2)`` per channel is ``H*D*s/2`` per
      key channel whatever the chunk length (over half the tokens of a 64-token gap with
      ``H*D = 4096``); here ``ceil(s * n / 2)`` per side, so roughly a fraction ``s`` (at least one
      pair per channel/token when ``s > 0``).
    - power iteration starts from a fixed-seed generator (the reference draws ``torch.rand`` from the
      global RNG, which would perturb sampling) and orthonormalises every round (the reference only
      in the last round; same subspace, no overflow).
    - the reference's ``quantize_bit ** 2 - 1`` levels equal ``2**bits - 1`` only for 2 and 4 bits;
      here always ``2**bits - 1``.
    """

    name = "gear"

    bits: int = 4
    rank: int = 4
    outlier: float = 0.02
    buffer: int = 64
    loop: int = 3

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

    def _encoder(self, along: str) -> GearEncoder:
        return GearEncoder(self.bits, self.rank, self.outlier, self.buffer, self.loop, along)

    def key_encoder(self) -> Encoder:
        return self._encoder("tokens")

    def value_encoder(self) -> Encoder:
        return self._encoder("channels")

    def key_policy(self) -> StreamPolicy:
        return StreamPolicy(residual=self.buffer, flush="full")

    def value_policy(self) -> StreamPolicy:
        return StreamPolicy(residual=self.buffer, flush="full")
