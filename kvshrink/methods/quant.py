"""The shared quantiser: min/max (asymmetric) and absmax (symmetric) uniform quantisation over
groups, and bit-packing of low-bit codes into bytes.

Every quantising codec (KIVI, int8/int4, GEAR) builds on these three functions; none of them
re-implements rounding or packing.

Asymmetric, for a group ``x`` with ``b`` bits (KIVI eq. 1):
    ``z = min(x)``, ``s = (max(x) - min(x)) / (2^b - 1)``, ``q = round((x - z) / s)``, ``x' = q * s + z``
so ``|x - x'| <= s / 2``.
Symmetric: ``s = max|x| / (2^(b-1) - 1)``, ``q = round(x / s)`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``,
so ``|x - x'| <= s / 2``.
"""

from __future__ import annotations

import torch

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
    return (q.to(dtype) * scale.to(dtype) + zero.to(dtype)).to(dtype)


def quantize_sym(x: torch.Tensor, bits: int, dim: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantisation; codes are stored offset by ``2^(b-1)`` as uint8."""
    xf = x.float()
    qmax = 2 ** (bits - 1) - 1
    scale = (xf.abs().amax(dim=dim, keepdim=True) / qmax).to(SCALE_DTYPE)
    s = scale.float().clamp_min(_TINY)
    q = (xf / s).round_().clamp_(-qmax, qmax).add_(qmax + 1).to(torch.uint8)
    return q, scale


def dequantize_sym(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    return ((q.to(dtype) - (2 ** (bits - 1))) * scale.to(dtype)).to(dtype)


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


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 codes, last dim ``8 // bits`` times longer."""
    if bits == 8:
        return p
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=p.device)
    q = (p.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return q.reshape(*p.shape[:-1], p.shape[-1] * (8 // bits))
