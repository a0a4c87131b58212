"""The shared quantiser: min/max (asymmetric) and absmax (symmetric) uniform quantisation over
groups, and bit-packing of low-bit codes into bytes.

Every quantising codec (KIVI, int8/int4, GEAR) builds on these functions and on
``GroupQuantEncoder`` (grouped quantisation of a ``[B, H, T, D]`` chunk, bit-packed); none of them
re-implements rounding or packing.

Asymmetric, for a group ``x`` with ``b`` bits (KIVI eq. 1):
    ``z = min(x)``, ``s = (max(x) - min(x)) / (2^b - 1)``, ``q = round((x - z) / s)``, ``x' = q * s + z``
so ``|x - x'| <= s / 2``.
Symmetric: ``s = max|x| / (2^(b-1) - 1)``, ``q = round(x / s)`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``,
so ``|x - x'| <= s / 2``.
"""

from __future__ import annotations

import torch

from kvshrink.methods.base import Encoder, FieldLayout, Payload, RowFormat

SCALE_DTYPE = torch.float16  # scales and zero points, as KIVI and llama.cpp store them
_TINY = 1e-8


def quantize_asym(
    x: torch.Tensor, bits: int, dim: int | tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise with one (scale, zero) per group reduced over ``dim``. Returns uint8 codes (unpacked),
    scale and zero (``SCALE_DTYPE``, keepdim)."""
    xf = x.float()
    mn = xf.amin(dim=dim, keepdim=True)
    mx = xf.amax(dim=dim, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).to(SCALE_DTYPE)
    zero = mn.to(SCALE_DTYPE)
    # Quantise against the stored (rounded) scale and zero, so the error bound holds for what is kept.
    s = scale.float().clamp_min(_TINY)
    q = ((xf - zero.float()) / s).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return q, scale, zero


def dequantize_asym(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale + zero`` in ``dtype``; ``q`` may already be float codes (then one fused op)."""
    return torch.addcmul(zero.to(dtype), q.to(dtype), scale.to(dtype))


def quantize_sym(x: torch.Tensor, bits: int, dim: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantisation; codes are stored offset by ``2^(b-1)`` as uint8."""
    xf = x.float()
    qmax = 2 ** (bits - 1) - 1
    scale = (xf.abs().amax(dim=dim, keepdim=True) / qmax).to(SCALE_DTYPE)
    s = scale.float().clamp_min(_TINY)
    q = (xf / s).round_().clamp_(-qmax, qmax).add_(qmax + 1).to(torch.uint8)
    return q, scale


def dequantize_sym(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(dtype) - (2 ** (bits - 1))).mul_(scale.to(dtype))


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes of ``bits`` (1, 2, 4 or 8) along the last dim, ``8 // bits`` codes per byte.
    The last dim must be a multiple of ``8 // bits``."""
    if bits == 8:
        return q.to(torch.uint8)
    per = 8 // bits
    if bits not in (1, 2, 4) or q.shape[-1] % per:
        raise ValueError(f"cannot pack {q.shape[-1]} codes of {bits} bits")
    q = q.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
    return (q << shifts).sum(-1, dtype=torch.uint8)


def unpack(p: torch.Tensor, bits: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of ``pack``: codes as ``dtype`` (uint8, or a float type for dequantisation), last dim
    ``8 // bits`` times longer. Each code position is one scalar shift/mask written straight into
    the output (a broadcast shift tensor is ~25x slower on CPU, and a separate cast costs a pass)."""
    if bits == 8:
        return p.to(dtype)
    per, mask = 8 // bits, 2**bits - 1
    out = torch.empty(*p.shape, per, dtype=dtype, device=p.device)
    for i in range(per):
        code = p >> (i * bits) if i else p
        out[..., i] = code & mask if i < per - 1 else code
    return out.view(*p.shape[:-1], p.shape[-1] * per)


# ------------------------------------------------------------------------------------ grouped encoder


def channel_group(group: int, head_dim: int) -> int:
    """The channel group a per-token quantiser uses: ``group`` when it divides ``head_dim``, else
    the whole head dim (``group=0`` also means the whole head dim)."""
    return group if group and head_dim % group == 0 else head_dim


class GroupQuantEncoder(Encoder):
    """Uniform quantisation of ``[B, H, T, D]`` in groups, codes bit-packed along the head dim.

    - ``along="tokens"``: a group is ``group`` consecutive tokens of one channel, so each channel
      has its own scale/zero per group (KIVI's per-channel keys). ``chunk = group``.
    - ``along="channels"``: a group is ``group`` consecutive channels of one token
      (``channel_group``: the whole head dim when ``group`` does not divide it). ``chunk = 1``.

    Payload, leading dims ``[B, H]``: ``q`` packed codes ``[B, H, T, D * bits / 8]`` uint8;
    ``scale`` (and ``zero`` when asymmetric) ``SCALE_DTYPE``, ``[B, H, T / group, D]`` along tokens
    or ``[B, H, T, D / group]`` along channels.
    """

    def __init__(self, bits: int, group: int, along: str, symmetric: bool = False):
        if along not in ("tokens", "channels"):
            raise ValueError(f"along must be 'tokens' or 'channels', got {along!r}")
        if along == "tokens" and group < 1:
            raise ValueError("a token group needs group >= 1")
        self.bits, self.group, self.along, self.symmetric = bits, group, along, symmetric
        self.chunk = group if along == "tokens" else 1

    def _grouped(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        B, H, T, D = x.shape
        if self.along == "tokens":
            return x.reshape(B, H, T // self.group, self.group, D), -2
        g = channel_group(self.group, D)
        return x.reshape(B, H, T, D // g, g), -1

    def encode(self, x: torch.Tensor) -> Payload:
        B, H, T, D = x.shape
        if self.along == "tokens" and T % self.group:
            raise ValueError(f"encode needs a multiple of {self.group} tokens, got {T}")
        xg, dim = self._grouped(x)
        if self.symmetric:
            q, scale = quantize_sym(xg, self.bits, dim)
            p = {"scale": scale.squeeze(dim)}
        else:
            q, scale, zero = quantize_asym(xg, self.bits, dim)
            p = {"scale": scale.squeeze(dim), "zero": zero.squeeze(dim)}
        p["q"] = pack(q.reshape(B, H, T, D), self.bits)
        return p

    def layout(self, heads: int, head_dim: int, dtype: torch.dtype) -> list[FieldLayout]:
        c = self.chunk
        if self.along == "tokens":  # one scale row per group of `group` tokens
            meta = (heads, c // self.group, head_dim)
        else:
            meta = (heads, c, head_dim // channel_group(self.group, head_dim))
        names = ["scale"] if self.symmetric else ["scale", "zero"]
        fields = [FieldLayout(n, meta, 1, SCALE_DTYPE) for n in names]
        return fields + [FieldLayout("q", (heads, c, head_dim * self.bits // 8), 1, torch.uint8)]

    def decode(self, p: Payload, dtype: torch.dtype) -> torch.Tensor:
        # unpack straight to the compute dtype (fp32 for half caches on CPU, which lacks fast half math)
        work = dtype if dtype == torch.float32 or p["q"].device.type != "cpu" else torch.float32
        q = unpack(p["q"], self.bits, work)
        qg, dim = self._grouped(q)
        scale = p["scale"].unsqueeze(dim)
        if self.symmetric:
            x = dequantize_sym(qg, scale, self.bits, work)
        else:
            x = dequantize_asym(qg, scale, p["zero"].unsqueeze(dim), work)
        return x.reshape(q.shape).to(dtype)

    def row_format(self, head_dim: int) -> RowFormat:
        per_channel = self.along == "tokens"
        group = self.group if per_channel else channel_group(self.group, head_dim)
        return RowFormat(self.bits, group, per_channel, self.symmetric)

    def bytes_per_token(self, head_dim: int, dtype_bytes: int) -> float:
        tensors = 1 if self.symmetric else 2
        meta_bytes = torch.finfo(SCALE_DTYPE).bits // 8
        if self.along == "tokens":
            groups_per_token = head_dim / self.group
        else:
            groups_per_token = head_dim // channel_group(self.group, head_dim)
        return head_dim * self.bits / 8 + tensors * meta_bytes * groups_per_token
