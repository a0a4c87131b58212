"""This machine described as hardware, the roofline against a measured profile, and the simulator on
roofline costs: hand-computed figures for a tiny config (no timed assertions)."""

from __future__ import annotations

import json

import pytest

from kvshrink.cli import main
from kvshrink.predict.costmodel import OperatorFit
from kvshrink.predict.hardware import (
    Hardware,
    HostMeasurement,
    MeasureConfig,
    get_hardware,
    host_hardware,
    measure_host_figures,
)
from kvshrink.predict.modelconfig import load_shape, shape_from_config
from kvshrink.predict.roofline import Assumptions, RooflineCost, validate_profile
from kvshrink.predict.storage import storage

# 2 layers, 2 query heads, 1 KV head of 32, fp32: per layer 64*64 (q) + 2*64*32 (k, v) + 64*64 (o)
# + 3*64*128 (MLP) + 2*64 (norms) = 36,992; matmul parameters 2*(36,992 - 128) + 1000*64 = 137,728
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 1000,
        "tie_word_embeddings": True, "torch_dtype": "float32", "max_position_embeddings": 4096}
CPU = Hardware("cpu-1t", mem_bytes=16e9, bandwidth=1e9, flops=1e12, source="test", threads=1, measured=True)


def test_measured_hardware_round_trips_and_gets_unit_efficiencies(tmp_path):
    f = tmp_path / "cpu.json"
    f.write_text(json.dumps(CPU.to_dict()))
    assert get_hardware(spec=str(f)) == CPU  # vector_flops None and the thread count survive the file
    a = Assumptions.for_hardware(CPU)
    # measured figures are achieved rates; kvshrink's CPU engine decodes KV into a copy first
    assert (a.bw_efficiency, a.flops_efficiency, a.dequant) == (1.0, 1.0, "unfused")
    assert Assumptions.for_hardware(CPU, bw_efficiency=0.5, dequant=None).bw_efficiency == 0.5
    assert Assumptions.for_hardware(get_hardware("H100")) == Assumptions()  # a preset: vendors' peaks


def test_host_description_from_measured_figures():
    m = HostMeasurement(read_bw=6e9, copy_bw=9e9, gemv_bw=8e9, gemm_flops=7e10, threads=2, mem_bytes=3e10, cpu="x")
    hw = host_hardware(m)
    # the best read rate (matrix-vector here), the GEMM rate, no separate vector peak on a CPU
    assert (hw.name, hw.bandwidth, hw.flops, hw.vector_flops, hw.mem_bytes) == ("cpu-2t", 8e9, 7e10, None, 3e10)
    assert hw.measured and hw.threads == 2 and "copy 9.00 GB/s" in hw.source


def test_measurement_runs_with_the_threads_asked_for():
    import torch

    before = torch.get_num_threads()
    m = measure_host_figures(threads=1, cfg=MeasureConfig(stream_bytes=1 << 20, gemm_n=64, repeats=1))
    assert m.threads == 1 and torch.get_num_threads() == before  # restored afterwards
    assert min(m.read_bw, m.copy_bw, m.gemv_bw, m.gemm_flops) > 0


def _tiny_profile(tmp_path):
    d = tmp_path / "profile"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"kind": "profile", "model": "tiny", "threads": 1}))
    pre = OperatorFit(op="prefill", features=("tokens", "tokens_sq"), intercept=2e-4,
                      coef={"tokens": 3e-5, "tokens_sq": 1e-6}, n=1, mean_rel_error=0, max_rel_error=0, r2=1)
    dec = OperatorFit(op="decode", features=("kv_read",), intercept=0.0, coef={"batch@1": 9e-4, "kv_read": 2e-6},
                      n=1, mean_rel_error=0, max_rel_error=0, r2=1, knot_feature="batch", knots=(1.0,))
    (d / "summary.json").write_text(json.dumps({
        "model_config": TINY, "dtype_bytes": 4,
        "methods": {"full": {"method": "full", "fits": {"prefill": pre.to_dict(), "decode": dec.to_dict()}}}}))
    pts = [{"kind": "prefill", "method": "full", "tokens": 10, "seconds": 1e-3},
           {"kind": "decode", "method": "full", "batch": 1, "context": 100, "kv_tokens": 100.0, "seconds": 1.2e-3},
           {"kind": "evict", "method": "full", "batch": 1, "context": 100, "cuts": 0, "seconds": 0.0}]
    (d / "records.jsonl").write_text("\n".join(json.dumps(p) for p in pts) + "\n")
    return d


def test_roofline_against_a_profile_by_hand(tmp_path):
    v = validate_profile(_tiny_profile(tmp_path), CPU)
    pre, dec = v["rows"]  # the evict point is not a roofline step
    # prefill T=10: weights 137,728 x 4 B at 1 GB/s = 550.912 us (memory-bound: 1.6 MFLOP at 1 TFLOP/s);
    # attention reads L T 2 (K + H) d s = 2*10*2*3*32*4 = 15,360 B = 15.36 us
    assert pre["ops_s"]["linear"] == pytest.approx(550.912e-6)
    assert pre["ops_s"]["prefill"] == pytest.approx(15.36e-6)
    assert pre["roofline_s"] == pytest.approx(566.272e-6)
    assert pre["error"] == pytest.approx((566.272e-6 - 1e-3) / 1e-3)
    # the profile's fit at T=10: 2e-4 + 3e-5*10 per token, 1e-6*100 for attention
    assert pre["fitted_parts_s"] == pytest.approx({"per_token": 5e-4, "attention": 1e-4})
    assert pre["part_error"]["per_token"] == pytest.approx((550.912e-6 - 5e-4) / 5e-4)
    # decode B=1 over 100 stored tokens: weights again, then 2 layers x 1 head x 2 (K, V) x 100 x 32 x 4 B
    assert dec["ops_s"]["decode"] == pytest.approx(51.2e-6)
    assert dec["roofline_s"] == pytest.approx(602.112e-6)
    assert dec["fitted_parts_s"] == pytest.approx({"per_token": 9e-4, "attention": 2e-4})
    assert dec["part_error"]["attention"] == pytest.approx((51.2e-6 - 2e-4) / 2e-4)
    (s_pre, s_dec) = v["summary"]
    assert s_dec["step"]["mean_abs_error"] == pytest.approx(abs(602.112e-6 - 1.2e-3) / 1.2e-3)
    assert "100% of bandwidth" in "\n".join(v["assumption_lines"])


def test_cli_validates_and_writes_the_hardware(tmp_path, capsys):
    d = _tiny_profile(tmp_path)
    hw = tmp_path / "cpu.json"
    hw.write_text(json.dumps(CPU.to_dict()))
    saved = tmp_path / "again.json"
    assert main(["predict", "project", "--hardware-spec", str(hw), "--validate", str(d),
                 "--save-hardware", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "| full | prefill | T=10 | 1.0 | 0.6 | -43% |" in out and "unfused" in out
    assert get_hardware(spec=str(saved)) == CPU


def test_simulator_runs_on_roofline_costs(capsys):
    from transformers import PretrainedConfig

    from kvshrink.engine.config import EngineConfig
    from kvshrink.predict.simulate import SimRequest, simulate

    cost = RooflineCost(storage("full", shape_from_config(TINY, "tiny")), CPU, Assumptions.for_hardware(CPU))
    # one token: the prefill step alone
    r = simulate(PretrainedConfig.from_dict(TINY), "full", [SimRequest(10, 1)], cost, EngineConfig(kv_memory=1 << 24))
    assert r.makespan_s == pytest.approx(cost.prefill_s(10)) == pytest.approx(566.272e-6)
    assert main(["predict", "throughput", "--config", "smollm2-135m", "--hardware", "L4", "--workload",
                 "decode-heavy=4x64x8", "--kv-memory", "64MiB", "--method", "full", "--method", "kivi:bits=2",
                 "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["method"] for x in rows] == ["full", "kivi:bits=2"] and rows[0]["costs"] == "roofline L4"
    assert all(x["output_tokens_per_s"] > 0 for x in rows)
    assert main(["predict", "throughput", "--profile", "p", "--config", "smollm2-135m", "--hardware", "L4",
                 "--workload", "decode-heavy=4x64x8", "--kv-memory", "64MiB"]) == 2
    assert "not both" in capsys.readouterr().err


def test_embedded_model_config_is_shipped():
    s = load_shape("smollm2-135m")
    # SmolLM2-135M: 30 layers of 576, 9 query / 3 KV heads of 64, tied embeddings: 134,515,008 parameters
    assert (s.layers, s.heads, s.kv_heads, s.head_dim, s.dtype_bytes) == (30, 9, 3, 64, 4)
    assert s.params == 134_515_008
