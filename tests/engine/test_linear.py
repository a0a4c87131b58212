"""Packed linear layers: every plain nn.Linear packed, same products inside ``active()``, stock
forward (bitwise) outside, and the engine's greedy tokens unchanged by packing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvshrink.engine import Engine, SamplingParams
from kvshrink.engine.config import EngineConfig
from kvshrink.engine.linear import PackedLinears, packing_available
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(not packing_available(torch.device("cpu")),
                                reason="this torch build has no oneDNN linear packing")


def linears(model):
    return [m for m in model.modules() if type(m) is nn.Linear]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v projections carry a bias
def test_packs_every_linear_and_computes_the_same_product(arch):
    model = tiny_model(arch)
    mods = linears(model)
    packed = PackedLinears(model, rows_hint=4)
    assert len(packed) == len(mods)
    assert packed.nbytes == sum(m.weight.numel() * 4 for m in mods)
    assert any(m.bias is not None for m in mods) == (arch == "qwen2")
    x = torch.randn(3, 5, 64)
    for m in mods:
        xi = torch.randn(3, 5, m.in_features)
        with packed.active():
            got = m(xi)
        ref = F.linear(xi, m.weight, m.bias)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(m(xi), ref), "stock forward not restored outside active()"
    with packed.active():
        h = model.model.layers[0].self_attn.q_proj(x)
    torch.testing.assert_close(h, F.linear(x, model.model.layers[0].self_attn.q_proj.weight,
                                           model.model.layers[0].self_attn.q_proj.bias), rtol=1e-5, atol=1e-5)


def test_products_of_few_rows_take_stock_f_linear_the_rest_the_packed_weights(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 32))
    packed = PackedLinears(model, rows_hint=4, stock_rows=2)
    w, b = model[0].weight, model[0].bias
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:  # torch.ops.mkldnn's ops cannot be replaced one by one: count calls through a proxy
        def __getattr__(self, name):
            if name == "_linear_pointwise":
                return lambda *a: calls.append(a[0].shape) or real(*a)
            return getattr(torch.ops.mkldnn, name)

    import kvshrink.engine.linear as linear

    monkeypatch.setattr(linear.torch.ops, "mkldnn", Spy(), raising=False)
    with packed.active():
        for shape in [(1, 64), (2, 64), (1, 2, 64), (3, 64), (2, 2, 64)]:
            x = torch.randn(shape)
            got = model[0](x)
            if x.numel() // 64 <= 2:
                assert torch.equal(got, F.linear(x, w, b))  # stock: bit for bit
            else:
                torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert calls == [torch.Size([3, 64]), torch.Size([2, 2, 64])]  # only the products of 3+ rows went packed


def test_stock_rows_are_measured_when_not_given():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 16))
    measured = PackedLinears(model, rows_hint=4).stock_rows
    assert 0 <= measured <= 8 and isinstance(measured, int)
    assert PackedLinears(model, rows_hint=4, stock_rows=0).stock_rows == 0
    assert PackedLinears(nn.Sequential(nn.ReLU()), rows_hint=4).stock_rows == 0  # nothing packed, nothing timed


def test_restored_after_an_exception_and_skips_subclasses():
    class Quantised(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), Quantised(8, 8), nn.Linear(8, 4, bias=False).to(torch.float64))
    packed = PackedLinears(model, rows_hint=1)
    assert len(packed) == 1  # the subclass and the fp64 layer stay stock
    with pytest.raises(RuntimeError), packed.active():
        assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
        raise RuntimeError
    assert "forward" not in model[0].__dict__


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_tokens_do_not_depend_on_packing(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (30, 9, 51)]
    runs = {}
    for on in (True, False):
        eng = Engine(model, method="full", kv_memory="8MiB", block_size=16, packed_linear=on)
        assert (eng.runner.linears is not None) == on
        runs[on] = [r["token_ids"] for r in eng.generate(ps, SamplingParams(max_tokens=16, ignore_eos=True))]
    # Float rounding differs (blocked vs stock GEMM); tiny random models have wide logit margins.
    assert runs[True] == runs[False]
    assert all(type(m).forward is m.forward.__func__ for m in linears(model))


def test_config_rejects_a_non_bool():
    from kvshrink.methods import parse

    with pytest.raises(ValueError, match="packed_linear must be a bool"):
        EngineConfig(packed_linear=1).resolved(parse("full").codec)
