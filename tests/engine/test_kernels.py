"""The paged CPU kernels against the eager reference: scores and weighted values read in place from
encoded blocks equal those of the decoded blocks, never read past a row's valid tokens, and the
engine's tokens do not depend on them."""

import pytest
import torch

from kvshrink.engine import Engine, SamplingParams
from kvshrink.engine.kernels import DecodeKernel, block_reader, library
from kvshrink.methods import parse
from tests.conftest import tiny_model

H, G, D, BS = 2, 3, 64, 32
CPU = torch.device("cpu")


def test_the_kernels_build_here():
    assert library() is not None, "g++ and torch's headers are on every machine this project runs on"


def encoded_blocks(enc, n_blocks, seed=0):
    """Blocks 0..n_blocks-1 as the pool lays them out (an encoder's payload of a [N, H, bs, D] batch
    is the pool's [N, block] layout), block 0 poisoned with NaN: tables point there past each row's end."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, H, BS, D, generator=g) * torch.linspace(0.2, 3, D)  # channel outliers, as keys have
    fields = {k: v.contiguous() for k, v in enc.encode(x).items()}
    decoded = enc.decode(fields, torch.float32)
    for t in fields.values():
        t[0] = float("nan") if t.is_floating_point() else t[0]
    decoded[0] = float("nan")
    if "scale" not in fields:
        fields["x"][0] = float("nan")
    return fields, decoded


CASES = ["full", "kivi:bits=4", "kivi:bits=2", "int8", "int4", "int4:group=32"]


@pytest.mark.parametrize("spec", CASES)
@pytest.mark.parametrize("side", ["k", "v"])
def test_reads_blocks_in_place_as_the_decoded_reference(spec, side):
    codec = parse(spec).codec
    enc = codec.key_encoder() if side == "k" else codec.value_encoder()
    fields, decoded = encoded_blocks(enc, 9)
    reader = block_reader(enc.row_format(D), fields, H, D, BS, torch.float32, CPU)
    assert reader is not None and (side == "k" or reader.can_weight)
    B, nb = 3, 3
    tables = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 0, 0]])  # rows of 96, 50 and 7 valid tokens
    valid = torch.tensor([96, 50, 7])
    ref_kv = decoded[tables.clamp_min(0)].transpose(1, 2).reshape(B, H, nb * BS, D)  # [B, H, T, D]
    live = torch.arange(nb * BS)[None, :] < valid[:, None]  # [B, T]
    g = torch.Generator().manual_seed(1)
    if side == "k":
        q = torch.randn(B, H, G, D, generator=g)
        out = torch.full((B, H, G, nb * BS + 2), 7.0)
        reader.scores(q, tables, valid, out, 0.125)
        ref = torch.einsum("bhgd,bhtd->bhgt", q, torch.nan_to_num(ref_kv)) * 0.125
        ref = ref.masked_fill(~live[:, None, None, :], float("-inf"))
        torch.testing.assert_close(out[..., : nb * BS], ref, rtol=1e-4, atol=1e-4)
        assert (out[..., nb * BS :] == 7.0).all(), "wrote past the block columns"
    else:
        p = torch.softmax(torch.randn(B, H, G, nb * BS + 2, generator=g), -1)  # weight on dead columns too
        got = reader.values(p, tables, valid)
        ref = torch.einsum("bhgt,bhtd->bhgd", p[..., : nb * BS] * live[:, None, None, :],
                           torch.nan_to_num(ref_kv))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", ["k", "v"])
def test_reads_half_precision_rows_in_place(dtype, side):
    """A half-precision model's plain blocks are read as they lie, widened exactly to fp32: scores
    and weighted sums equal fp32 arithmetic on the same stored values."""
    fields, _ = encoded_blocks(parse("full").codec.key_encoder(), 5)
    fields = {"x": fields["x"].to(dtype)}
    reader = block_reader(parse("full").codec.key_encoder().row_format(D), fields, H, D, BS, dtype, CPU)
    assert reader is not None
    tables, valid = torch.tensor([[1, 2], [3, 4], [4, 0]]), torch.tensor([64, 40, 1])  # block 0: NaN, never read
    ref_kv = fields["x"].float()[tables].transpose(1, 2).reshape(3, H, 2 * BS, D)
    live = torch.arange(2 * BS)[None, :] < valid[:, None]
    g = torch.Generator().manual_seed(1)
    if side == "k":
        q = torch.randn(3, H, G, D, generator=g)
        out = torch.empty(3, H, G, 2 * BS)
        reader.scores(q, tables, valid, out, 0.125)
        ref = (torch.einsum("bhgd,bhtd->bhgt", q, torch.nan_to_num(ref_kv)) * 0.125)
        torch.testing.assert_close(out, ref.masked_fill(~live[:, None, None, :], float("-inf")), rtol=1e-4, atol=1e-4)
    else:
        p = torch.softmax(torch.randn(3, H, G, 2 * BS, generator=g), -1)
        ref = torch.einsum("bhgt,bhtd->bhgd", p * live[:, None, None, :], torch.nan_to_num(ref_kv))
        torch.testing.assert_close(reader.values(p, tables, valid), ref, rtol=1e-4, atol=1e-5)


def test_layouts_the_kernels_do_not_read_fall_back():
    gear = parse("gear").codec.key_encoder()
    assert gear.row_format(D) is None
    fields, _ = encoded_blocks(parse("fp").codec.key_encoder(), 2)
    plain = parse("fp").codec.key_encoder().row_format(D)
    assert block_reader(plain, {"x": fields["x"].double()}, H, D, BS, torch.float64, CPU) is None
    assert block_reader(plain, {"x": fields["x"].bfloat16()}, H, D, BS, torch.float32, CPU) is None  # not the model's
    assert block_reader(plain, fields, H, D, BS, torch.float32, torch.device("meta")) is None
    assert block_reader(plain, {"x": torch.zeros(2, H, BS, 36)}, H, 36, BS, torch.float32, CPU) is None


def recording(runner) -> list[torch.Tensor]:
    """Every logits tensor ``runner.forward`` returns from now on."""
    seen, forward = [], runner.forward

    def record(*args, **kwargs):
        seen.append(forward(*args, **kwargs))
        return seen[-1]

    runner.forward = record
    return seen


@pytest.mark.parametrize("spec", ["full", "kivi:bits=4,residual=32", "kivi:bits=2,residual=32", "int8", "int4",
                                  "h2o:ratio=0.5+kivi:bits=4,residual=32", "streamingllm:ratio=0.5"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_oss"])  # gemma2: sliding layers, soft-cap; gpt-oss: sinks
def test_engine_does_not_depend_on_the_kernels(spec, arch):
    """Three paths, the same logits at every step: one fused kernel call per layer, the per-side
    readers (what runs where one part has no kernel), and eager PyTorch."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (70, 9, 151)]
    tokens, logits = {}, {}
    for path in ("fused", "readers", "eager"):
        eng = Engine(model, method=spec, kv_memory="8MiB", block_size=32, paged_kernels=path != "eager")
        st = eng.store
        assert (st.k_reader is not None) == (path != "eager") and (st.v_reader is not None) == (path != "eager")
        assert (st.decode_kernel is not None) == (path != "eager")
        if path == "readers":
            st.decode_kernel = None
        logits[path] = recording(eng.runner)
        tokens[path] = [r["token_ids"] for r in eng.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))]
    assert tokens["fused"] == tokens["readers"] == tokens["eager"]
    for path in ("fused", "readers"):
        assert len(logits[path]) == len(logits["eager"]) >= 40, "every step's logits recorded"
        for got, ref in zip(logits[path], logits["eager"]):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", ["full", "int8", "int4", "int4:group=32", "kivi:bits=2", "kivi:bits=4"])
def test_the_decode_kernel_stores_tokens_as_the_encoder_does(spec, dtype):
    """Bit for bit: a new token stored straight into quantised blocks (int8/int4 keys and values), and
    the row leaving a one-token-at-a-time residual ring (KIVI's values) encoded into the blocks, hold
    the codes, scales and zeros ``Encoder.encode`` gives (the Python commit's path); the new token
    goes to the ring's next free row; nothing else is written. In a half-precision pool, plain rows
    and ring rows hold the token rounded as torch rounds it (to nearest even), and a row leaving a
    half-precision ring is encoded from its stored value."""
    codec = parse(spec).codec
    ring = 5 if spec.startswith("kivi") else 0  # a residual of 4 tokens, chunk 1: R + 1 rows
    encoders = []
    for enc in (codec.key_encoder(), codec.value_encoder()):
        stores = enc.row_format(D).per_channel is False and not ring
        encoders.append(enc if stores or enc is codec.value_encoder() else parse("fp").codec.key_encoder())
    readers, fields = [], []
    for i, enc in enumerate(encoders):
        f, _ = encoded_blocks(enc, 4, seed=i)
        if "x" in f:
            f["x"] = f["x"].to(dtype)
        fields.append(f)
        readers.append(block_reader(enc.row_format(D), f, H, D, BS, dtype, CPU))
    before = [{k: t.clone() for k, t in f.items()} for f in fields]
    g = torch.Generator().manual_seed(2)
    rings = (None, torch.randn(1, 2, H, ring, D, generator=g).to(dtype) if ring else None)
    kern = DecodeKernel(readers[0], readers[1], rings, write_new=(True, True), flush=(False, bool(ring)))
    B = 2
    tables = torch.tensor([[1, 2], [3, 0]])
    encoded = torch.tensor([[40], [5]])  # tokens in blocks: the next one lands in block 2 row 8, block 3 row 5
    start, length = torch.tensor([[3], [0]]), torch.tensor([[4], [3]])  # row 0's ring wraps
    leaving = torch.tensor([[1], [0]])  # row 0's oldest ring row (ring row 3) leaves this step
    zeros = torch.zeros(B, 1, dtype=torch.long)
    stored = encoded + (length if ring else 0)
    q = torch.randn(B, H, G, D, generator=g)
    key, value = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
    ring_before = rings[1].clone() if ring else None
    kern(q, key, value, 0, tables, torch.tensor([0, 1]), stored[:, 0],
         ((encoded[:, 0], zeros[:, 0], zeros[:, 0], zeros[:, 0]),
          (encoded[:, 0], start[:, 0], length[:, 0], leaving[:, 0])), 0.125, None, None, None)
    expected = [{k: t.clone() for k, t in b.items()} for b in before]
    for side, (enc, x) in enumerate(zip(encoders, (key, value))):
        if side == 1 and ring:  # the leaving row of sequence 0 goes to its position 40; the new ones to the ring
            x, rows = ring_before[0, 0, :, 3][None, :, None], [(0, 40)]
        else:
            rows = [(0, 40), (1, 5)]
        for b, pos in rows:
            payload = enc.encode(x[b : b + 1])
            blk = int(tables[b, pos // BS])
            for name, t in payload.items():
                expected[side][name][blk, :, pos % BS] = t[0, :, 0]
    for side in range(2):
        for name, t in fields[side].items():
            assert torch.equal(t.nan_to_num(), expected[side][name].nan_to_num()), (side, name)
    if ring:
        want = ring_before.clone()
        want[0, 0, :, (3 + 4) % ring] = value[0, :, 0]
        want[0, 1, :, 3] = value[1, :, 0]
        assert torch.equal(rings[1], want)


@pytest.mark.parametrize("spec", ["full", "kivi:bits=4,residual=32", "int8", "h2o:ratio=0.5+kivi:bits=4,residual=32",
                                  "streamingllm:ratio=0.5"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_half_precision_model_runs_the_fused_kernel(spec, arch):
    """A bf16 model's pool holds bf16 rows (plain blocks, residual rings): one fused kernel call per
    layer serves it, and its logits follow the eager path's within bf16 rounding (the kernel works in
    fp32 where eager PyTorch rounds products and probabilities to bf16). A random tiny model's top two
    logits are often that close, so the paths are compared step by step up to the first step whose
    tokens differ, which must be a near-tie in the eager logits."""
    model = tiny_model(arch).to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (70, 9, 151)]
    logits = {}
    for path in ("fused", "eager"):
        eng = Engine(model, method=spec, kv_memory="8MiB", block_size=32, paged_kernels=path == "fused")
        assert (eng.store.decode_kernel is not None) == (path == "fused")
        logits[path] = recording(eng.runner)
        eng.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    compared = 0
    for got, ref in zip(logits["fused"], logits["eager"]):
        got, ref = got.float().reshape(-1, got.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=0.05)
        compared += 1
        differ = got.argmax(-1) != ref.argmax(-1)
        if differ.any():
            top2 = ref[differ].topk(2, dim=-1).values
            assert (top2[:, 0] - top2[:, 1] < 0.05).all(), "tokens differ where eager's choice was clear"
            break
    assert compared >= 2, "the prefill and at least one decode step through the kernel"
