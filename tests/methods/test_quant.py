"""The shared quantiser: error bounds from each group's statistics, exact bit packing, and the
grouped encoder's layout and byte count."""

import pytest
import torch

from kvshrink.methods.base import payload_bytes
from kvshrink.methods.quant import (
    SCALE_DTYPE,
    GroupQuantEncoder,
    channel_group,
    pack,
    quantize_asym,
    quantize_sym,
    unpack,
)


def group_bound(xg: torch.Tensor, bits: int, dim: int, symmetric: bool = False) -> torch.Tensor:
    """Largest error a group may have: half a step of its ideal scale plus the slack from storing
    scale (and zero) in float16, from the group's own min/max (keepdim over ``dim``)."""
    xf = xg.double()
    mn, mx = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    eps = 1e-6 * xf.abs().amax(dim, keepdim=True) + 1e-7
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = torch.maximum(mx.abs(), mn.abs()) / qmax
        ds = (s.to(SCALE_DTYPE).double() - s).abs()
        return s / 2 + (qmax + 0.5) * ds + eps
    levels = 2**bits - 1
    s = (mx - mn) / levels
    ds = (s.to(SCALE_DTYPE).double() - s).abs()
    dz = (mn.to(SCALE_DTYPE).double() - mn).abs()
    return s / 2 + dz + (levels + 0.5) * ds + eps


def assert_within_bound(xg, xhatg, bits, dim, symmetric=False):
    err = (xg.double() - xhatg.double()).abs()
    bound = group_bound(xg, bits, dim, symmetric)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    # and the bound is not vacuous: the error reaches a sizeable share of the half step somewhere
    assert err.max() > 0.1 * bound.max() or bits == 8


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_roundtrip_exact(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (2, 3, 5, 16), generator=g, dtype=torch.uint8)
    p = pack(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (2, 3, 5, 16 * bits // 8)
    assert torch.equal(unpack(p, bits), q)


def test_pack_layout_and_errors():
    q = torch.tensor([1, 2, 3, 0], dtype=torch.uint8)
    assert pack(q, 2).tolist() == [1 | 2 << 2 | 3 << 4]  # first code in the low bits
    with pytest.raises(ValueError):
        pack(torch.zeros(3, dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asym_error_bound(bits):
    x = torch.randn(4, 8, 32) * torch.linspace(0.1, 10, 32)
    q, s, z = quantize_asym(x, bits, dim=-2)
    assert q.max() <= 2**bits - 1 and s.dtype == z.dtype == SCALE_DTYPE
    xhat = q.float() * s.float() + z.float()
    assert_within_bound(x, xhat, bits, -2)


@pytest.mark.parametrize("bits", [4, 8])
def test_sym_error_bound(bits):
    x = torch.randn(4, 8, 32) * 3
    q, s = quantize_sym(x, bits, dim=-1)
    xhat = (q.float() - 2 ** (bits - 1)) * s.float()
    assert_within_bound(x, xhat, bits, -1, symmetric=True)


def test_constant_group_decodes_exactly():
    x = torch.full((1, 1, 8, 16), 0.5)
    enc = GroupQuantEncoder(2, 8, along="tokens")
    assert torch.equal(enc.decode(enc.encode(x), torch.float32), x)


def test_channel_group_fallback():
    assert channel_group(32, 64) == 32 and channel_group(32, 16) == 16 and channel_group(0, 64) == 64


@pytest.mark.parametrize(
    "along,group,symmetric", [("tokens", 8, False), ("channels", 8, False), ("channels", 0, True)]
)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_group_encoder_layout_bound_and_bytes(along, group, symmetric, bits):
    B, H, T, D = 2, 3, 16, 32
    x = torch.randn(B, H, T, D) * torch.linspace(0.5, 4, D)
    enc = GroupQuantEncoder(bits, group, along=along, symmetric=symmetric)
    p = enc.encode(x)
    assert all(t.shape[:2] == (B, H) for t in p.values())
    assert p["q"].dtype == torch.uint8 and p["q"].shape == (B, H, T, D * bits // 8)
    xhat = enc.decode(p, torch.float32)
    if along == "tokens":
        shape, dim = (B, H, T // group, group, D), -2
    else:
        g = channel_group(group, D)
        shape, dim = (B, H, T, D // g, g), -1
    assert_within_bound(x.reshape(shape), xhat.reshape(shape), bits, dim, symmetric)
    assert payload_bytes(p) == enc.bytes_per_token(D, 4) * B * H * T
