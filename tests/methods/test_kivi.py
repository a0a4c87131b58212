"""KIVI: per-channel keys / per-token values within their error bounds, real bit-packed bytes, the
reference's residual pattern, and generation through the HF cache."""

import importlib.util

import pytest
import torch

from kvshrink.methods import SpecError, parse
from kvshrink.methods.base import CodecState, payload_bytes
from kvshrink.methods.kivi import KIVI
from tests.conftest import generate_with
from tests.methods.test_quant import assert_within_bound

B, H, D = 2, 3, 64


@pytest.mark.parametrize("bits", [2, 4])
def test_keys_per_channel_values_per_token_within_bound(bits):
    c = KIVI(bits=bits, group=8, residual=16)
    x = torch.randn(B, H, 32, D) * torch.linspace(0.2, 5, D)  # channel scales differ, as keys' do
    kenc, venc = c.key_encoder(), c.value_encoder()
    assert kenc.chunk == 8 and venc.chunk == 1
    kp = kenc.encode(x)
    assert kp["scale"].shape == (B, H, 4, D)  # one scale per channel per 8 tokens
    k = kenc.decode(kp, torch.float32)
    assert_within_bound(x.reshape(B, H, 4, 8, D), k.reshape(B, H, 4, 8, D), bits, dim=-2)
    vp = venc.encode(x)
    assert vp["scale"].shape == (B, H, 32, D // 8)  # one scale per token per 8 channels
    v = venc.decode(vp, torch.float32)
    assert_within_bound(x.reshape(B, H, 32, D // 8, 8), v.reshape(B, H, 32, D // 8, 8), bits, dim=-1)
    for p in (kp, vp):
        assert p["q"].dtype == torch.uint8 and p["q"].shape == (B, H, 32, D * bits // 8)


def test_value_group_falls_back_to_head_dim():
    v = KIVI(group=32).value_encoder().encode(torch.randn(1, 2, 5, 16))
    assert v["scale"].shape == (1, 2, 5, 1)


@pytest.mark.parametrize("bits,group", [(2, 32), (4, 32), (2, 16)])
def test_bytes_per_token_formula_and_measured(bits, group):
    c = KIVI(bits=bits, group=group, residual=2 * group)
    codes = D * bits / 8
    key = codes + 2 * 2 * D / group
    value = codes + 2 * 2 * (D // group)
    assert c.bytes_per_token(30, 3, D, 4) == (key + value) * 30 * 3
    # a long stream: prefill then decode steps; measured payload bytes per encoded token
    st = CodecState(c)
    st.append(torch.randn(B, H, 301, D), torch.randn(B, H, 301, D))
    for _ in range(50):
        st.append(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D))
    for s, per in ((st.k, key), (st.v, value)):
        assert s.n_encoded > 0
        measured = sum(payload_bytes(p) for p in s.chunks) / (B * H * s.n_encoded)
        assert measured == per
    total = sum(payload_bytes(p) for p in st.k.chunks) / st.k.n_encoded / B
    total += sum(payload_bytes(p) for p in st.v.chunks) / st.v.n_encoded / B
    assert total == c.bytes_per_token(1, H, D, 4)


def test_embedded_model_shape_bytes():
    # 30 layers, 3 KV heads, head_dim 64, float32: 2-bit KIVI is (16 + 8) * 2 bytes per head
    assert parse("kivi").codec.bytes_per_token(30, 3, 64, 4) == 48 * 90
    assert parse("fp").codec.bytes_per_token(30, 3, 64, 4) == 512 * 90


@pytest.mark.parametrize("prefill", [3, 8, 13, 16, 21])
def test_residual_pattern_as_reference(prefill):
    R = 8
    c = KIVI(bits=2, group=4, residual=R)
    st = CodecState(c)
    ks, vs = torch.randn(1, 2, prefill + 20, 16), torch.randn(1, 2, prefill + 20, 16)
    st.append(ks[:, :, :prefill], vs[:, :, :prefill])
    n = prefill
    while True:
        fp_k, fp_v = st.k.residual.shape[-2], st.v.residual.shape[-2]
        assert fp_k == n % R  # keys: whole residual flushed at R (prefill: first L - L % R quantised)
        assert fp_v == min(n, R)  # values: the oldest beyond R quantised one at a time
        assert st.k.n_encoded == n - fp_k and st.v.n_encoded == n - fp_v
        # the full-precision tokens come back exactly; the rest are what the chunks decode to
        k, v = st.get()
        assert torch.equal(k[:, :, n - fp_k :], ks[:, :, n - fp_k : n])
        assert torch.equal(v[:, :, n - fp_v :], vs[:, :, n - fp_v : n])
        if st.k.chunks:
            dec = torch.cat([c.key_encoder().decode(p, torch.float32) for p in st.k.chunks], dim=-2)
            assert torch.equal(k[:, :, : n - fp_k], dec)
        if n == prefill + 20:
            break
        st.append(ks[:, :, n : n + 1], vs[:, :, n : n + 1])
        n += 1


def test_key_scores_against_codes():
    c = KIVI(bits=2, group=8, residual=0)
    enc = c.key_encoder()
    p = enc.encode(torch.randn(B, H, 24, D))
    q = torch.randn(B, H, 5, D)
    ref = q @ enc.decode(p, torch.float32).transpose(-1, -2)
    torch.testing.assert_close(c.key_scores(q, p), ref, rtol=1e-4, atol=1e-4)


def _generate(model, spec, sample):
    return generate_with(model, spec, sample)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize(
    "spec", ["kivi", "kivi:bits=4,group=8,residual=16", "kivi:bits=2,group=4,residual=8"]
)
def test_generate(model, spec, sample):
    out, cache = _generate(model, spec, sample)
    assert out.sequences.shape == (3, 46)
    assert all(torch.isfinite(x).all() for x in out.logits)
    c = parse(spec).codec
    n = 40 + 6 - 1  # the last generated token is never stored
    for layer in cache.layers:
        assert layer.state.k.residual.shape[-2] == n % c.residual
        assert layer.state.v.residual.shape[-2] == min(n, c.residual)
    # real bytes: full-precision residual + encoded tokens at exactly bytes_per_token
    kb, vb = c.key_encoder().bytes_per_token(16, 4), c.value_encoder().bytes_per_token(16, 4)
    fp_tokens = n % c.residual + min(n, c.residual)
    expected = 3 * 2 * (fp_tokens * 16 * 4 + (n - n % c.residual) * kb + (n - min(n, c.residual)) * vb)
    assert cache.nbytes() == expected * len(cache.layers)


@pytest.mark.skipif(
    importlib.util.find_spec("kvshrink.methods.streamingllm") is None, reason="no streamingllm"
)
@pytest.mark.parametrize(
    "spec", ["streamingllm:budget=24+kivi:bits=4", "streamingllm:budget=24+kivi:group=4,residual=8"]
)
def test_with_streamingllm(model, spec):
    """A cut keeps KIVI's grouped keys in whole groups (code-domain eviction): the cache holds the
    budget, or up to group - 1 tokens less."""
    out, cache = _generate(model, spec, sample=False)
    assert out.sequences.shape == (3, 46)
    group = parse(spec).codec.group
    assert all(24 - group < len(layer.state) <= 24 for layer in cache.layers)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("kivi:bits=3", "bits must be 2 or 4"),
        ("kivi:residual=100", r"residual must be a multiple of group \(32\)"),
        ("kivi:group=0", "group must be >= 1"),
        ("kivi:groups=8", "unknown parameter 'groups'"),
        ("kivi:bits=x", "bits must be int"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(SpecError, match=message):
        parse(spec)
