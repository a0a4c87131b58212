"""GEAR: quantisation + low-rank residual + sparse outliers, exact bytes, streaming buffer, generation."""

import math

import pytest
import torch

from kvshrink.methods import SpecError, parse
from kvshrink.methods.base import CodecState, payload_bytes
from kvshrink.methods.gear import GEAR, low_rank
from kvshrink.methods.quant import GroupQuantEncoder
from tests.conftest import generate_with
from tests.methods.test_quant import assert_within_bound

B, H, D, T = 2, 3, 32, 16


def _x(seed=0, T=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=g) * torch.linspace(0.2, 4, D)


@pytest.mark.parametrize("bits", [2, 4])
def test_without_lowrank_and_outliers_is_kcvt_quantisation(bits):
    c = GEAR(bits=bits, rank=0, outlier=0.0, buffer=T)
    x = _x()
    k = c.key_encoder().decode(c.key_encoder().encode(x), torch.float32)
    v = c.value_encoder().decode(c.value_encoder().encode(x), torch.float32)
    # keys: per channel over the chunk's tokens; values: per token over the head dim
    assert_within_bound(x, k, bits, dim=-2)
    assert_within_bound(x, v, bits, dim=-1)
    assert torch.equal(
        k,
        GroupQuantEncoder(bits, T, "tokens").decode(
            GroupQuantEncoder(bits, T, "tokens").encode(x), torch.float32
        ),
    )


@pytest.mark.parametrize("which", ["key", "value"])
def test_outliers_kept_exactly_and_shrink_the_range(which):
    x = _x()
    x[0, 1, 5, 7] = 80.0  # spikes: the largest of their channel and of their token
    x[1, 2, 9, 3] = -60.0
    plain = GEAR(bits=2, rank=0, outlier=0.0, buffer=T)
    sparse = GEAR(bits=2, rank=0, outlier=0.1, buffer=T)
    enc_p, enc_s = getattr(plain, f"{which}_encoder")(), getattr(sparse, f"{which}_encoder")()
    ps = enc_s.encode(x)
    xs = enc_s.decode(ps, torch.float32)
    xp = enc_p.decode(enc_p.encode(x), torch.float32)
    assert xs[0, 1, 5, 7] == 80.0 and xs[1, 2, 9, 3] == -60.0
    assert ps["oi"].dtype == torch.int16 and ps["ov"].dtype == x.dtype
    # the spike's group (its channel for keys, its token for values) is quantised far more finely
    sel = (0, 1, slice(None), 7) if which == "key" else (0, 1, 5, slice(None))
    keep = torch.ones_like(x[sel], dtype=torch.bool)
    keep[5 if which == "key" else 7] = False
    assert (x - xs)[sel][keep].abs().max() < 0.25 * (x - xp)[sel][keep].abs().max()
    # outliers per side: ceil(0.1 * n / 2) of each channel (keys, n = T) or token (values, n = D)
    k = math.ceil(0.1 * (T if which == "key" else D) / 2)
    assert ps["ov"].numel() == B * H * 2 * k * (D if which == "key" else T)


@pytest.mark.parametrize("which", ["key", "value"])
def test_lowrank_reduces_the_error(which):
    x = _x(1)
    errs = []
    for rank in (0, 2, 4):
        enc = getattr(GEAR(bits=2, rank=rank, buffer=T), f"{which}_encoder")()
        p = enc.encode(x)
        if rank:
            assert p["u"].shape == (B, H, T, rank) and p["v"].shape == (B, H, 1, D, rank)
        errs.append((x - enc.decode(p, torch.float32)).norm().item())
    assert errs[2] < errs[1] < errs[0]


def test_power_iteration_approaches_svd():
    e = torch.randn(3, 16, 8) @ torch.diag(torch.tensor([8.0, 4, 2, 1, 0.5, 0.25, 0.1, 0.05]))
    u, v = low_rank(e, 3, loop=10)
    torch.testing.assert_close(u.transpose(-1, -2) @ u, torch.eye(3).expand(3, 3, 3), atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(e)
    best = s[:, 3:].pow(2).sum(-1).sqrt()
    got = (e - u @ v.transpose(-1, -2)).norm(dim=(-2, -1))
    assert (got <= best * 1.01 + 1e-5).all()


def test_encode_is_pure_and_leaves_the_rng_alone():
    enc = GEAR(buffer=T).key_encoder()
    x = _x(2)
    torch.manual_seed(5)
    a = enc.encode(x)
    after = torch.rand(1)
    torch.manual_seed(5)
    b = enc.encode(x)
    assert torch.equal(torch.rand(1), after)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(t.shape[:2] == (B, H) for t in a.values())


def test_chunks_are_independent():
    # encoding two chunks at once equals encoding them one by one (blocks can be stored apart)
    enc = GEAR(buffer=T).value_encoder()
    x = _x(3, T=2 * T)
    both = enc.decode(enc.encode(x), torch.float32)
    one = torch.cat(
        [enc.decode(enc.encode(x[:, :, i * T : (i + 1) * T]), torch.float32) for i in range(2)], -2
    )
    torch.testing.assert_close(both, one, rtol=1e-5, atol=1e-5)


def _formula(c: GEAR, d: int, dtype_bytes: int) -> tuple[float, float]:
    codes, Tb, r = d * c.bits / 8, c.buffer, c.rank
    lowrank = r * (Tb + d) * 2 / Tb
    kk, kv = math.ceil(c.outlier * Tb / 2), math.ceil(c.outlier * d / 2)
    key = codes + 2 * 2 * d / Tb + lowrank + d * 2 * kk * (dtype_bytes + 2) / Tb
    value = codes + 2 * 2 + lowrank + 2 * kv * (dtype_bytes + 2)
    return key, value


@pytest.mark.parametrize(
    "spec", ["gear", "gear:bits=2,rank=2,buffer=16", "gear:outlier=0,rank=0", "gear:outlier=0.1"]
)
def test_bytes_formula_and_measured(spec):
    c = parse(spec).codec
    key, value = _formula(c, 64, 4)
    assert c.bytes_per_token(30, 3, 64, 4) == (key + value) * 90
    st = CodecState(c)
    st.append(torch.randn(B, H, 3 * c.buffer + 5, 64), torch.randn(B, H, 3 * c.buffer + 5, 64))
    for _ in range(c.buffer):
        st.append(torch.randn(B, H, 1, 64), torch.randn(B, H, 1, 64))
    n = 4 * c.buffer + 5
    for s, per in ((st.k, key), (st.v, value)):
        assert s.residual.shape[-2] == n % c.buffer and s.n_encoded == n - n % c.buffer
        assert sum(payload_bytes(p) for p in s.chunks) / (B * H * s.n_encoded) == per


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("spec", ["gear", "gear:buffer=8", "gear:bits=2,rank=2,buffer=16,outlier=0.1"])
def test_generate(model, spec, sample):
    out, cache = generate_with(model, spec, sample)
    assert out.sequences.shape == (3, 46)
    assert all(torch.isfinite(x).all() for x in out.logits)
    c, n = parse(spec).codec, 45
    for layer in cache.layers:
        assert layer.state.k.residual.shape[-2] == layer.state.v.residual.shape[-2] == n % c.buffer


@pytest.mark.parametrize(
    "spec,message",
    [
        ("gear:bits=3", "bits must be 2, 4 or 8"),
        ("gear:rank=-1", "rank must be in"),
        ("gear:rank=80", r"rank must be in \[0, buffer=64\]"),
        ("gear:outlier=0.7", r"outlier must be in \[0, 0.5\]"),
        ("gear:buffer=0", "buffer must be in"),
        ("gear:loop=0", "loop must be >= 1"),
        ("gear:sparsity=0.1", "unknown parameter 'sparsity'"),
        ("gear:value_group=channel", "value_group must be one of head, token"),
        ("gear:outliers=all", "outliers must be one of fraction, reference"),
        ("gear:prefill_rank=-2", "prefill_rank must be >= 0"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(SpecError, match=message):
        parse(spec)


def test_reference_value_groups_span_every_head_of_a_token():
    """value_group=token: one scale/zero and one outlier set per token over all H*D entries."""
    c = GEAR(bits=2, rank=0, outlier=0.0, buffer=T, value_group="token")
    enc = c.value_encoder()
    x = _x()
    p = enc.encode(x)
    assert p["scale"].shape == (B, 1, T, 1)
    v = enc.decode(p, torch.float32)
    flat = lambda t: t.permute(0, 2, 1, 3).reshape(B, 1, T, H * D)  # noqa: E731
    assert_within_bound(flat(x), flat(v), 2, dim=-1)
    c = GEAR(bits=4, rank=2, outlier=0.1, buffer=T, value_group="token", outliers="reference")
    st = CodecState(c)
    st.append(torch.randn(B, H, 3 * T, D), torch.randn(B, H, 3 * T, D))
    key, value = (e.bytes_per_token(D, 4, H) for e in (c.key_encoder(), c.value_encoder()))
    assert payload_bytes(st.v.chunks[0]) == value * B * H * 3 * T
    assert payload_bytes(st.k.chunks[0]) == key * B * H * 3 * T
    assert c.bytes_per_token(2, H, D, 4) == (key + value) * 2 * H
    with pytest.raises(NotImplementedError, match="depend on the number of KV heads"):
        c.value_encoder().bytes_per_token(D, 4)


def test_reference_outlier_count_per_key_channel():
    """outliers=reference: int(H*D*s/2) per side of every key channel (here 3*32*0.05/2 = 2 per side,
    on a 16-token chunk), and of every value token over its head dim."""
    c = GEAR(bits=4, rank=0, outlier=0.05, buffer=T, outliers="reference")
    pk, pv = c.key_encoder().encode(_x()), c.value_encoder().encode(_x())
    assert pk["ov"].shape == (B, H, 1, 2 * 2, D)
    assert pv["ov"].shape == (B, H, T, 2 * 2)
    wide = GEAR(bits=4, rank=0, outlier=0.5, buffer=T, outliers="reference").key_encoder().encode(_x())
    assert wide["ov"].shape[3] == T  # capped at half the chunk per side


def test_prefill_rank_compresses_the_prompt_as_one_matrix():
    """prefill_rank: the prompt's first L - L % buffer tokens are one group of that rank; later gaps
    use rank. HF path only; refused by the engine and by rolling selectors."""
    from kvshrink.engine import Engine
    from kvshrink.methods.base import check_cut
    from tests.conftest import tiny_model

    c = parse("gear:prefill_rank=4,rank=2,buffer=8").codec
    st = CodecState(c)
    x = _x(T=45)
    st.append(x, x)
    assert st.k.n_encoded == 40 and st.k.chunks[0]["u"].shape[-1] == 4 and st.k.chunks[0]["v"].shape[2] == 1
    assert st.k.chunks[0]["scale"].shape[2] == 1  # one key scale row per channel for the whole prompt
    for _ in range(3):
        st.append(_x(T=1), _x(T=1))
    assert st.k.n_encoded == 48 and st.k.chunks[1]["u"].shape[-1] == 2
    k, _ = st.get()
    assert k.shape == (B, H, 48, D) and (k[..., :40, :] - x[..., :40, :]).abs().mean() < 0.2
    out, cache = generate_with(tiny_model("llama"), "gear:prefill_rank=4,rank=2,buffer=8,value_group=token", False)
    assert all(torch.isfinite(x).all() for x in out.logits)
    with pytest.raises(SpecError, match="HF path only"):
        Engine(tiny_model("llama"), method="gear:prefill_rank=4", kv_memory="1MiB")
    for spec in ("gear:prefill_rank=4", "gear:value_group=token"):
        with pytest.raises(SpecError, match="per-head, fixed-size"):
            check_cut(parse(spec).codec)
