"""Hardware descriptions, model configs, method storage and the roofline against hand-computed figures."""

from __future__ import annotations

import json

import pytest

from kvshrink.predict.hardware import PRESETS, Hardware, get_hardware, parse_quantity
from kvshrink.predict.modelconfig import load_shape, shape_from_config
from kvshrink.predict.roofline import Assumptions, RooflineCost, project
from kvshrink.predict.storage import storage

LLAMA8 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16"}
# round numbers, every efficiency 1: the figures below are worked by hand
HW = Hardware("hand", mem_bytes=80e9, bandwidth=1e12, flops=1e15, vector_flops=1e14)
EXACT = Assumptions(bw_efficiency=1.0, flops_efficiency=1.0, vector_efficiency=1.0)


def test_quantities_and_presets(tmp_path):
    assert parse_quantity("80GB") == 80e9
    assert parse_quantity("3.35TB/s") == pytest.approx(3.35e12)
    assert parse_quantity("989T") == pytest.approx(989e12)
    assert parse_quantity("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity("fast")
    h = get_hardware("h100")
    assert (h.bandwidth, h.flops, h.mem_bytes) == (3350e9, 989e12, 80e9)
    assert {"A100-80G", "H100-80G", "H200", "L4"} <= set(PRESETS)
    assert PRESETS["L4"].bandwidth == 300e9 and PRESETS["L4"].flops == 121e12
    c = get_hardware(spec="name=mine,mem=80GB,bw=3.35TB/s,flops=989T")
    assert (c.name, c.mem_bytes, c.vector_flops) == ("mine", 80e9, None)
    (tmp_path / "hw.json").write_text(json.dumps({"name": "cpu", "mem": "128GB", "bw": "20GB/s", "flops": "1T"}))
    assert get_hardware(spec=str(tmp_path / "hw.json")).bandwidth == 20e9
    with pytest.raises(ValueError, match="A100-80G, H100-80G, H200, L4"):
        get_hardware("B200")
    with pytest.raises(ValueError, match="missing bw"):
        get_hardware(spec="name=x,mem=1GB,flops=1T")
    with pytest.raises(FileNotFoundError):
        get_hardware(spec=str(tmp_path / "nope.json"))


def test_shipped_configs_have_the_public_parameter_counts():
    s8, s70 = load_shape("llama-3.1-8b"), load_shape("meta-llama/Llama-3.1-70B")
    # per layer 4096*4096*2 + 2*4096*1024 (attention) + 3*4096*14336 (MLP) + 2*4096 = 218,112,000;
    # x32 + 2*128256*4096 (embeddings, untied) + 4096 = 8,030,261,248
    assert s8.params == 8_030_261_248
    assert s8.matmul_params == 32 * (218_112_000 - 8192) + 128256 * 4096 == 7_504_658_432
    assert round(s70.params / 1e9, 1) == 70.6
    assert s8.head_dim == 128 and s8.fp_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 131072
    with pytest.raises(FileNotFoundError, match="llama-3.1-8b"):
        load_shape("no-such-model")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        shape_from_config({**LLAMA8, "num_local_experts": 8})
    with pytest.raises(ValueError, match="hidden_size"):
        shape_from_config({"num_hidden_layers": 2})


def test_bytes_per_token_by_layer_type_and_method():
    shape = shape_from_config(LLAMA8)
    full = storage("full", shape)
    assert full.bytes_per_token(1024) == 131072
    # sliding layers store at most the window: half the layers hold 512 of 1024 tokens
    sw = shape_from_config({**LLAMA8, "sliding_window": 512,
                            "layer_types": ["sliding_attention", "full_attention"] * 16})
    st = storage("full", sw)
    per_layer_token = 2 * 8 * 128 * 2
    assert st.seq_bytes(1024) == 16 * 1024 * per_layer_token + 16 * 512 * per_layer_token
    assert st.bytes_per_token(1024) == 98304
    assert st.by_layer_type(1024)["sliding_attention"]["kept_tokens"] == 512
    assert storage("full", sw).seq_bytes(300) == 32 * 300 * per_layer_token  # below the window: everything
    # a budget selector: ratio=0.75 keeps ceil(1024 * 0.25) = 256 tokens of the prompt, then grows
    snap = storage("snapkv:ratio=0.75", shape)
    assert snap.kept_tokens(0, 1024) == 256
    assert snap.kept_tokens(0, 1024 + 100, prompt=1024) == 356
    assert snap.compression(1024) == pytest.approx(4.0)
    # KIVI-2 (group 32, residual 128): keys and values each D*b/8 + 2*2*D/32 = 32 + 16 = 48 bytes per head
    kivi = storage("kivi:bits=2", shape)
    assert (kivi.key_bytes, kivi.value_bytes, kivi.key_residual) == (48, 48, 128)
    enc, fp = 1024 - 128, 128
    assert kivi.seq_bytes(1024) == 32 * 8 * (2 * enc * 48 + 2 * fp * 256)


def test_roofline_decode_and_prefill_against_hand_figures():
    shape = shape_from_config(LLAMA8)
    full = RooflineCost(storage("full", shape), HW, EXACT)
    # decode, 8 sequences x 1024 tokens: linear reads 7,504,658,432 x 2 bytes = 15.009 ms at 1 TB/s
    # (2 x 7.5e9 x 8 FLOPs = 0.12 ms at 1 PFLOP/s: memory-bound); attention reads 8 x 1024 x 131072
    # bytes = 1.0737 ms (4 x 32 x 128 x 8192 x 32 = 4.29 GFLOP: 0.0043 ms)
    ops = full.decode_ops(8, 8 * 1024)
    assert ops["linear"].seconds == pytest.approx(15_009_316_864 / 1e12)
    assert ops["linear"].bound == "memory"
    assert ops["decode"].seconds == pytest.approx(1_073_741_824 / 1e12)
    assert full.decode_s(8, 8 * 1024) == pytest.approx((15_009_316_864 + 1_073_741_824) / 1e12)
    assert set(ops) == {"linear", "decode"}
    # prefill of 1024 tokens: FLOPs 2 x 6,979,321,856 x 1024 + 2 x 525,336,576 = 14.29 ms < 15.01 ms of
    # weights; attention 4 x 32 x 128 x (1024 x 1025 / 2) x 32 FLOPs = 0.275 ms vs
    # 32 x 1024 x 2 x (8 + 32) x 128 x 2 bytes = 0.671 ms
    pre = full.prefill_ops(1024)
    assert pre["linear"].seconds == pytest.approx(15_009_316_864 / 1e12)
    assert pre["prefill"].seconds == pytest.approx(671_088_640 / 1e12)
    assert pre["prefill"].bound == "memory"


def test_roofline_dequant_assumptions():
    shape = shape_from_config(LLAMA8)
    kv_tokens = 8 * 1024  # 8 sequences; 8 x 128 residual tokens per layer stay full precision
    kept_bytes = 32 * 8 * ((8192 - 1024) * 48 * 2 + 2 * 1024 * 256)  # 310,378,496
    elements = 32 * 8 * 128 * (2 * 8192 - 2 * 1024)  # 469,762,048 encoded elements read
    # unfused: a kernel reads the codes and writes a bf16 copy (2 bytes an element), attention reads it
    unf = RooflineCost(storage("kivi:bits=2", shape), HW, Assumptions(1.0, 1.0, 1.0, dequant="unfused"))
    ops = unf.decode_ops(8, kv_tokens)
    assert ops["dequant"].seconds == pytest.approx((kept_bytes + 2 * elements) / 1e12)
    assert ops["decode"].seconds == pytest.approx(1_073_741_824 / 1e12)
    # fused: 4 vector ops an element; at 1e14 they hide under the memory time, at 1e12 they dominate
    fused = RooflineCost(storage("kivi:bits=2", shape), HW, EXACT).decode_ops(8, kv_tokens)
    assert fused["decode"].seconds == pytest.approx(kept_bytes / 1e12)
    assert fused["dequant"].seconds == pytest.approx(0.0)
    slow = Hardware("slow-vector", 80e9, 1e12, 1e15, vector_flops=1e12)
    ops = RooflineCost(storage("kivi:bits=2", shape), slow, EXACT).decode_ops(8, kv_tokens)
    compute = 4 * 32 * 128 * kv_tokens * 32 / 1e15 + 4 * elements / 1e12
    assert ops["decode"].seconds + ops["dequant"].seconds == pytest.approx(compute)
    assert ops["dequant"].bound == "compute"
    # H2O observes every decode step: fp32 scores read and written per kept token and query head
    h2o = RooflineCost(storage("h2o:ratio=0.75", shape), HW, EXACT).decode_ops(8, 8 * 256)
    assert h2o["score"].seconds == pytest.approx(2 * 4 * 32 * 8 * 256 * 32 / 1e12)


def test_project_table_more_sequences_fit_when_compressed():
    p = project(load_shape("llama-3.1-8b"), get_hardware("H100"), ["kivi:bits=2", "snapkv:ratio=0.75"],
                context=4096, kv_memory=40e9)
    rows = {r["method"]: r for r in p["rows"]}
    assert rows["full"]["max_batch"] == int(40e9 // (4096 * 131072))
    assert rows["snapkv:ratio=0.75"]["max_batch"] == int(40e9 // (1024 * 131072))
    assert rows["kivi"]["throughput_ratio_to_full"] > 1 and rows["full"]["throughput_ratio_to_full"] == 1
    assert any("80% of bandwidth" in x for x in p["assumption_lines"])
    assert not project(load_shape("llama-3.1-70b"), get_hardware("H200"), [], context=1024, batch=1)["notes"] == []
