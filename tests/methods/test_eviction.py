"""Eviction in the code domain: a token is quantised at most once in its life, however often the
selector cuts the cache around it (``CodecState.keep``, ``plan_cut``, ``round_to_units``)."""

import pytest
import torch

from kvshrink.methods import parse
from kvshrink.methods.base import SpecError, check_cut, plan_cut, round_to_units
from tests.conftest import tiny_model

B, H, D = 2, 2, 16


def _run_cuts(codec_spec: str, steps: int, hold: int, seed: int = 0):
    """Append one Gaussian key per step and cut back to ``hold`` with a random selection (an H2O-like
    scattered choice); returns (max error against each token's first decoding, tokens checked, kept)."""
    g = torch.Generator().manual_seed(seed)
    state = parse(codec_spec).codec.new_state()
    ids = torch.zeros(B, H, 0, dtype=torch.long)  # which token each stored column is
    first: dict[tuple[int, int, int], torch.Tensor] = {}  # (b, h, token) -> decoded right after encoding
    worst, checked, next_id = 0.0, 0, 0

    def record():
        nonlocal worst, checked
        k = state.k.get()
        for b in range(B):
            for h in range(H):
                for j in range(state.k.n_encoded):
                    key = (b, h, int(ids[b, h, j]))
                    if key in first:
                        worst = max(worst, float((k[b, h, j] - first[key]).abs().max()))
                        checked += 1
                    else:
                        first[key] = k[b, h, j].clone()

    for _ in range(steps):
        x = torch.randn(B, H, 1, D, generator=g)
        state.append(x, x)
        ids = torch.cat([ids, torch.full((B, H, 1), next_id)], dim=-1)
        next_id += 1
        record()
        if len(state) > hold:
            layout = state.plan_cut(hold)
            n = len(state)
            valid = torch.ones(B, H, n, dtype=torch.bool)
            idx = torch.rand(B, H, n, generator=g).topk(hold, dim=-1).indices.sort(-1).values
            idx = round_to_units(idx, torch.rand(B, H, n, generator=g), valid, layout)
            state.keep(idx, layout)
            ids = ids.gather(2, idx)
            assert len(state) == layout.kept and state.k.n_encoded == layout.encoded_k
            record()
    return worst, checked, len(state)


@pytest.mark.parametrize("spec", ["kivi:bits=2,group=8,residual=16", "kivi:bits=4,group=4,residual=8",
                                  "int4", "int8", "gear:buffer=8,rank=2"])
def test_kept_tokens_decode_as_right_after_their_own_quantisation(spec):
    """After 100 cuts, every kept token decodes exactly (bit for bit) to what it decoded to when it was
    first quantised."""
    worst, checked, kept = _run_cuts(spec, steps=130, hold=40)
    assert checked > 1000 and worst == 0.0
    assert 40 - 8 < kept <= 40


def test_chunk1_cut_keeps_the_exact_hold_and_encodes_residual_tokens_once():
    layout = plan_cut(50, 30, encoded=(40, 40), chunks=(1, 1))
    assert (layout.kept, layout.encoded_k, layout.unit) == (30, 30, 1)
    layout = plan_cut(50, 30, encoded=(10, 20), chunks=(1, 1))
    assert (layout.encoded_k, layout.encoded_v) == (10, 20)


def test_grouped_cut_keeps_whole_groups():
    """KIVI-style keys (groups of 8, 32 encoded, 18 in the residual): the residual is kept, the rest of
    the hold buys whole groups, chosen by their best-ranked token."""
    layout = plan_cut(50, 36, encoded=(32, 42), chunks=(8, 1))
    assert (layout.kept, layout.groups, layout.grouped, layout.encoded_k, layout.encoded_v) == (34, 2, 32, 16, 34)
    n = 50
    valid = torch.ones(1, 1, n, dtype=torch.bool)
    sel = torch.tensor([[[0, 1, 2, 3] + list(range(18, 50))]])  # sinks + recent, as StreamingLLM
    prio = torch.arange(n, dtype=torch.float32).view(1, 1, n).clone()
    prio[..., :4] = float("inf")
    idx = round_to_units(sel, prio, valid, layout)
    assert idx[0, 0].tolist() == list(range(0, 8)) + list(range(24, 50))  # the sinks' group + the latest


def test_mismatched_groups_refused_at_set_up():
    from kvshrink.methods.base import Codec, StreamPolicy
    from kvshrink.methods.quant import GroupQuantEncoder

    class Odd(Codec):
        name = "odd"

        def key_encoder(self):
            return GroupQuantEncoder(4, 8, along="tokens")

        def value_encoder(self):
            return GroupQuantEncoder(4, 4, along="tokens")

        def key_policy(self):
            return StreamPolicy(8, "full")

    with pytest.raises(SpecError, match="grouped alike"):
        check_cut(Odd())


def _requantised_rms(keys: torch.Tensor, steps: int, code_domain: bool) -> tuple[float, float]:
    """RMS error of the kept keys against the originals after ``steps`` StreamingLLM-like cuts (sinks 4 +
    recent), KIVI 2-bit without residual; ``code_domain=False`` re-encodes the kept tokens (the old
    ``CodecState.keep``). Returns (after the cuts, one quantisation of the same tokens)."""
    from kvshrink.methods.base import _take

    codec = parse("kivi:bits=2,group=32,residual=32").codec
    state = codec.new_state()
    T0, hold = keys.shape[2] - steps, keys.shape[2] - steps
    ids = torch.arange(T0).expand(1, keys.shape[1], T0)
    state.append(keys[:, :, :T0], keys[:, :, :T0])
    for t in range(T0, T0 + steps):
        state.append(keys[:, :, t : t + 1], keys[:, :, t : t + 1])
        ids = torch.cat([ids, torch.full((1, keys.shape[1], 1), t)], dim=-1)
        n = len(state)
        if n <= hold:
            continue
        keep = torch.cat([torch.arange(4), torch.arange(n - hold + 4, n)]).expand(1, keys.shape[1], hold)
        if code_domain:
            layout = state.plan_cut(hold)
            prio = torch.arange(n, dtype=torch.float32).expand(1, keys.shape[1], n).clone()
            prio[..., :4] = float("inf")
            idx = round_to_units(keep, prio, torch.ones(1, keys.shape[1], n, dtype=torch.bool), layout)
            state.keep(idx, layout)
        else:
            idx = keep
            k, v = state.get()
            state.k.reset()
            state.v.reset()
            state.append(_take(k, idx), _take(v, idx))
        ids = ids.gather(2, idx)
    k = state.k.get()
    orig = keys.gather(2, ids.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
    once = codec.new_state()
    once.append(orig, orig)
    enc = state.k.n_encoded
    rms = float((k[..., :enc, :] - orig[..., :enc, :]).pow(2).mean().sqrt())
    rms_once = float((once.k.get()[..., :enc, :] - orig[..., :enc, :]).pow(2).mean().sqrt())
    return rms, rms_once


def test_code_domain_eviction_does_not_compound_error():
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 256, 16)
    before, _ = _requantised_rms(keys, 100, code_domain=False)
    after, once = _requantised_rms(keys, 100, code_domain=True)
    print(f"rms before {before:.4f} after {after:.4f} one quantisation {once:.4f}")
    assert after < 0.8 * before and abs(after / once - 1) < 0.1


def test_engine_rolling_cut_on_kivi_equals_hf_path():
    """Engine (evict_every=1) and HF path run the same code-domain cut on KIVI's grouped keys."""
    from kvshrink.engine import Engine, SamplingParams
    from tests.engine.test_engine import agree_until_tie, prompts

    model = tiny_model("llama")
    spec = "h2o:budget=24+kivi:bits=4,group=4,residual=8"
    ps = prompts((40, 19))
    eng = Engine(model, method=spec, kv_memory="8MiB", block_size=8, evict_every=1)
    res = eng.generate(ps, SamplingParams(max_tokens=20))
    for p, r in zip(ps, res):
        agree_until_tie(model, p, r["token_ids"], 20, spec=spec)
    assert eng.stats().blocks_used == 0
