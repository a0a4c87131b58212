"""int8 / int4: per-token per-head quantisation within bounds, exact bytes, no residual, generation."""

import pytest
import torch

from kvshrink.methods import SpecError, parse
from kvshrink.methods.base import CodecState, payload_bytes
from kvshrink.methods.intq import Int4, Int8
from tests.conftest import generate_with
from tests.methods.test_quant import assert_within_bound

B, H, D = 2, 3, 64


@pytest.mark.parametrize("cls,group", [(Int8, 0), (Int8, 32), (Int4, 0), (Int4, 16)])
def test_per_token_per_head_within_bound(cls, group):
    c = cls(group=group)
    x = torch.randn(B, H, 7, D) * torch.linspace(0.2, 5, D)
    enc = c.key_encoder()
    assert enc.chunk == 1 and c.key_policy().residual == 0 and c.value_policy().residual == 0
    p = enc.encode(x)
    g = group or D
    assert p["scale"].shape == (B, H, 7, D // g)
    assert ("zero" in p) == (cls is Int4)
    assert p["q"].shape == (B, H, 7, D * cls.bits // 8) and p["q"].dtype == torch.uint8
    xhat = enc.decode(p, torch.float32)
    shape = (B, H, 7, D // g, g)
    assert_within_bound(x.reshape(shape), xhat.reshape(shape), cls.bits, -1, symmetric=cls is Int8)


def test_bytes_formula_and_measured():
    for spec, per_head in [
        ("int8", 64 + 2),
        ("int4", 32 + 4),
        ("int8:group=32", 64 + 4),
        ("int4:group=32", 32 + 8),
    ]:
        c = parse(spec).codec
        assert c.bytes_per_token(30, 3, D, 4) == 2 * per_head * 90, spec
        st = CodecState(c)
        for n in (17, 1, 1, 5):
            st.append(torch.randn(B, H, n, D), torch.randn(B, H, n, D))
        assert st.k.residual.shape[-2] == 0 and st.k.n_encoded == 24  # every token encoded at once
        measured = sum(payload_bytes(p) for s in (st.k, st.v) for p in s.chunks) / (B * 24)
        assert measured == c.bytes_per_token(1, H, D, 4) == st.nbytes() / (B * 24)


def test_int8_is_close():
    x = torch.randn(1, 2, 9, 16)
    c = parse("int8").codec
    xhat = c.value_encoder().decode(c.value_encoder().encode(x), torch.float32)
    assert (x - xhat).abs().max() <= x.abs().amax() / 127


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("spec", ["int8", "int4", "int4:group=8"])
def test_generate(model, spec, sample):
    out, cache = generate_with(model, spec, sample)
    assert out.sequences.shape == (3, 46)
    assert all(torch.isfinite(x).all() for x in out.logits)
    n = 45
    per = parse(spec).codec.bytes_per_token(len(cache.layers), 2, 16, 4)
    assert cache.nbytes() == per * 3 * n


@pytest.mark.parametrize(
    "spec,message",
    [
        ("int4:group=7", "group must be 0 .* or a positive multiple of 8, got 7"),
        ("int8:group=-8", "group must be 0"),
        ("int8:bits=4", "unknown parameter 'bits'"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(SpecError, match=message):
        parse(spec)
