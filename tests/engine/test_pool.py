import random

import pytest
import torch

from kvshrink.engine.pool import BlockPool, KVStore, PoolExhausted, parse_bytes
from kvshrink.methods import parse
from tests.conftest import tiny_model
from tests.engine._codec import method


def assert_blocks_accounted(st: KVStore) -> None:
    """Every block in use is held exactly once: by a slot's table (within its count) or its reserve."""
    held = [st.table[s, layer, : int(st.counters.blocks[s, layer])] for s in st.reserved for layer in range(st.L)]
    ids = torch.cat(held + list(st.reserved.values())) if st.reserved else torch.zeros(0, dtype=torch.long)
    assert ids.numel() == ids.unique().numel() == st.pool.num_used
    assert bool(st.pool._in_use[ids].all()) and int(st.pool._in_use.sum()) == st.pool.num_used
    free = torch.ones(st.max_slots, dtype=torch.bool)
    free[list(st.reserved)] = False
    assert int(st.counters.blocks[free].sum()) == 0 and int(st.table[free].count_nonzero()) == 0


def test_parse_bytes():
    assert parse_bytes("1GiB") == 1 << 30
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes(1000) == 1000
    assert parse_bytes("2kb") == 2000
    for bad in ("x", "-1", 0, "1 parsecs"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_block_pool_exact():
    p = BlockPool(10)
    a = p.alloc(4)
    assert len(set(a.tolist())) == 4 and 0 not in a.tolist() and p.num_free == 6
    with pytest.raises(PoolExhausted):
        p.alloc(7)
    p.free(a)
    assert p.num_free == 10
    with pytest.raises(AssertionError):
        p.free(a[:1])
    with pytest.raises(AssertionError):
        p.free(torch.tensor([3, 3]))


def _read_back(st: KVStore, s: int, layer: int, T: int):
    from kvshrink.engine.attention import stored_tokens

    slots, layers = torch.tensor([s]), torch.tensor([layer])
    return stored_tokens(st, "k", slots, layers, T), stored_tokens(st, "v", slots, layers, T)


@pytest.mark.parametrize("spec", ["full", "q8"])
def test_store_roundtrip_and_no_leak(spec):
    model = tiny_model("llama")
    m = method() if spec == "q8" else parse("full")
    st = KVStore(model.config, m, 1 << 20, 8, 16, torch.float32, torch.device("cpu"))
    rng = random.Random(0)
    live = []
    for _ in range(60):
        if live and rng.random() < 0.4:
            st.close_slot(live.pop(rng.randrange(len(live))))
            assert_blocks_accounted(st)
            continue
        T = rng.randint(1, 40)
        s = st.open_slot(T)
        if s is None:  # a refusal takes nothing
            assert_blocks_accounted(st)
            continue
        k, v = torch.randn(1, st.H, T, st.D), torch.randn(1, st.H, T, st.D)
        before = st.pool.num_used
        for layer in range(st.L):
            st.store(torch.tensor([s]), layer, k, v)
        assert st.pool.num_used == before  # open_slot took every block the prompt needs
        live.append(s)
        assert_blocks_accounted(st)
        K, V = _read_back(st, s, 1, T)
        tol = 0 if spec == "full" else 0.05
        assert torch.allclose(K, k, atol=tol) and torch.allclose(V, v, atol=tol)
    for s in live:
        st.close_slot(s)
    assert st.pool.num_used == 0 and st.pool.num_free == st.num_blocks


def test_growth_plan_or_refusal():
    """``allocate`` takes exactly the blocks the plan says, or nothing."""
    model = tiny_model("llama")
    st = KVStore(model.config, parse("full"), 8 * 2 * 2 * 2 * 16 * 4 * 6, 8, 4, torch.float32, torch.device("cpu"))
    assert st.num_blocks == 12 and st.residual_blocks == 0
    s = st.open_slot(16)  # 2 blocks per layer
    st.store(torch.tensor([s]), 0, *[torch.randn(1, st.H, 16, st.D)] * 2)
    st.store(torch.tensor([s]), 1, *[torch.randn(1, st.H, 16, st.D)] * 2)
    g = st.plan_growth(torch.tensor([s]))
    assert g.new_blocks.tolist() == [[1, 1]] and g.encode_k.tolist() == [[1, 1]]
    assert st.allocate(g) and st.pool.num_used == 6
    st.advance(g)
    assert st.counters.stored[s].tolist() == [17, 17]
    t = st.open_slot(30)  # 4 blocks per layer: 8 > 6 free
    assert t is None and st.pool.num_used == 6
    t = st.open_slot(24, keep_free=1)  # 6 blocks, leaving 0 < 1
    assert t is None
    t = st.open_slot(24)
    assert t is not None and st.pool.num_free == 0
    for layer in range(st.L):
        st.store(torch.tensor([t]), layer, *[torch.randn(1, st.H, 24, st.D)] * 2)
    assert st.plan_growth(torch.tensor([s, t])).new_blocks.tolist() == [[0, 0], [1, 1]]
    assert not st.allocate(st.plan_growth(torch.tensor([s, t])))  # no room: refused, nothing taken
    assert st.pool.num_free == 0
    assert_blocks_accounted(st)


def test_residual_counted_in_bytes():
    model = tiny_model("llama")
    st = KVStore(model.config, method(residual=8), 1 << 20, 8, 16, torch.float32, torch.device("cpu"))
    assert st.residual_blocks > 0
    s = st.open_slot(1)
    assert st.pool.num_used == st.residual_blocks == st.blocks_for_prompt(1)  # one token stays in the ring
    st.close_slot(s)
    assert st.pool.num_used == 0
