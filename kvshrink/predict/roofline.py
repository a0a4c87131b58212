"""Roofline estimate of each operator's cost in one engine step, per method, on described hardware.

``RooflineCost`` answers ``prefill_s(tokens)``, ``decode_s(batch, kv_tokens)`` and ``evict_s(cuts)``:
the ``StepCosts`` protocol of ``kvshrink.predict.simulate``, so the simulator runs on it as on a
measured profile. For an operator moving ``B`` bytes and doing ``F`` FLOPs::

    t_op = max(B / (bandwidth * eff_bw), F / (peak * eff_flops) + F_vec / (vector_peak * eff_vector))

and a step is the sum of its operators (no overlap between operators). ``H``/``K`` query/KV heads,
``d`` head dim, ``s`` dtype bytes, ``L`` layers, ``P_l`` the layers' matmul parameters, ``V h`` the
LM head; ``N`` tokens through the model, ``S`` sequences in the step::

    linear   B = (P_l + V h) s                  F = 2 P_l N + 2 V h S     (weights read once per step;
                                                                          logits only for the last token)
    prefill  B = L T 2 (K + H) d s              F = Σ_l 4 H d pairs_l     (flash attention, one pass;
                                                                          pairs causal, window-capped)
    decode   kv_tokens = k stored tokens per layer over the batch (``MethodStorage.mean_kept_tokens``);
             r_k = min(k, S R_k) of them in the full-precision residual (R_k residual tokens a sequence)
             B = L K [(k - r_k) e_k + (k - r_v) e_v + (r_k + r_v) d s]      F = 4 H d k L
    dequant  E = L K d (2k - r_k - r_v) encoded elements read
             fused (in the attention kernel): attention becomes max(B/bw, F/peak + ops_dq E/vpeak);
             ``dequant`` is the increase over attention alone
             unfused (a kernel writing a full-precision copy): max((B + E s)/bw, ops_dq E/vpeak), and
             attention then reads the copy: B = 2 L K k d s
    encode   F_vec = ops_enc N 2 K d L
    score    observed prompt queries q_l (SnapKV: its window; H2O: all) give E_l = q_l T probabilities
             (causal pairs when all are observed), recomputed outside flash attention:
             F = Σ_l 2 H d E_l, B = Σ_l 2*4 H E_l (fp32 written and read); a selector observing decode
             (H2O) reads and writes an fp32 score per kept token and query head: B = 2*4 H k L

``e_k``, ``e_v`` (encoded bytes per token and head), ``R`` and ``kept`` come from
``kvshrink.predict.storage``. Not modelled: activations' traffic, kernel launch and framework overhead
(``step_overhead_s`` adds a constant), GEAR's low-rank/sparse terms beyond the quantised codes, the
cost of top-k eviction (``evict_s`` is 0), communication (one device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from kvshrink.predict.hardware import Hardware
from kvshrink.predict.modelconfig import ModelShape
from kvshrink.predict.storage import MethodStorage, storage


@dataclass(frozen=True)
class OpTime:
    seconds: float
    bound: str = ""  # "memory" | "compute" | "fixed"


@dataclass(frozen=True)
class Assumptions:
    bw_efficiency: float = 0.8  # achieved / peak memory bandwidth for streaming reads (typical of tuned kernels)
    flops_efficiency: float = 0.6  # achieved / peak tensor FLOP/s (typical large-GEMM MFU in serving)
    vector_efficiency: float = 0.5  # achieved / peak vector FLOP/s for element-wise kernels
    dequant: str = "fused"  # "fused": KV decoded in the attention kernel; "unfused": decoded to a copy first
    dequant_ops: float = 4.0  # per encoded element: shift, mask, multiply by scale, add zero point
    encode_ops: float = 8.0  # per element: min, max, scale, subtract, divide, round, clamp, pack
    step_overhead_s: float = 0.0  # per step, constant (launches, scheduling)
    memory_reserve: float = 0.1  # share of device memory left for activations and workspace

    def __post_init__(self) -> None:
        for k in ("bw_efficiency", "flops_efficiency", "vector_efficiency"):
            if not 0 < getattr(self, k) <= 1:
                raise ValueError(f"{k} must be in (0, 1], got {getattr(self, k)}")
        if self.dequant not in ("fused", "unfused"):
            raise ValueError(f"dequant must be 'fused' or 'unfused', got {self.dequant!r}")
        if not 0 <= self.memory_reserve < 1:
            raise ValueError(f"memory_reserve must be in [0, 1), got {self.memory_reserve}")

    def lines(self, hw: Hardware) -> list[str]:
        v = hw.vector_flops or hw.flops
        return [
            f"hardware {hw.name}: {hw.mem_bytes / 1e9:.0f} GB, {hw.bandwidth / 1e12:.3g} TB/s, "
            f"{hw.flops / 1e12:.4g} TFLOP/s tensor, {v / 1e12:.4g} TFLOP/s vector"
            + ("" if hw.vector_flops else " (no vector peak given: the tensor peak)")
            + (f" [{hw.source}]" if hw.source else ""),
            f"efficiency: {self.bw_efficiency:.0%} of bandwidth, {self.flops_efficiency:.0%} of tensor peak, "
            f"{self.vector_efficiency:.0%} of vector peak",
            f"dequantisation {self.dequant}: {self.dequant_ops:g} vector ops per stored element read"
            + (", plus writing and re-reading a full-precision copy" if self.dequant == "unfused"
               else " inside the attention kernel (no extra memory traffic)"),
            f"encoding: {self.encode_ops:g} vector ops per new element; attention: flash-style, one pass over KV; "
            f"weights read once per step",
            "selector scores: observed prompt queries' attention recomputed and materialised in fp32; H2O's "
            "accumulators read and written every decode step; top-k eviction, activations, launch overhead "
            "not modelled"
            + (f" (constant {self.step_overhead_s * 1e3:g} ms per step added)" if self.step_overhead_s else ""),
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def _causal_pairs(n: int, c: int, window: int | None) -> int:
    """Σ over the chunk's queries at positions c+1..c+n of the keys each sees (at most ``window``)."""
    if window is None or c + n <= window:
        return n * c + n * (n + 1) // 2
    if c >= window:
        return n * window
    full = window - c  # queries at positions c+1..window see all their predecessors
    return full * c + full * (full + 1) // 2 + (n - full) * window


@dataclass
class RooflineCost:
    """Step costs from bytes moved and FLOPs (see the module docstring)."""

    st: MethodStorage
    hw: Hardware
    assume: Assumptions = Assumptions()

    @property
    def method(self) -> str:
        return self.st.spec

    @property
    def shape(self) -> ModelShape:
        return self.st.shape

    def _t(self, nbytes: float, flops: float, vector: float = 0.0) -> OpTime:
        a, hw = self.assume, self.hw
        tb = nbytes / (hw.bandwidth * a.bw_efficiency)
        tf = flops / (hw.flops * a.flops_efficiency) + vector / ((hw.vector_flops or hw.flops) * a.vector_efficiency)
        return OpTime(max(tb, tf), "memory" if tb >= tf else "compute")

    def _linear(self, tokens: int, seqs: int) -> OpTime:
        m = self.shape
        layer_mm = m.matmul_params - m.lm_head_params
        return self._t(m.matmul_params * m.dtype_bytes, 2 * layer_mm * tokens + 2 * m.lm_head_params * seqs)

    def _encode(self, tokens: int) -> dict[str, OpTime]:
        m = self.shape
        if self.st.lossless:
            return {}
        return {"encode": self._t(0.0, 0.0, self.assume.encode_ops * tokens * 2 * m.kv_heads * m.head_dim * m.layers)}

    def _overhead(self) -> dict[str, OpTime]:
        return {"overhead": OpTime(self.assume.step_overhead_s, "fixed")} if self.assume.step_overhead_s else {}

    def prefill_ops(self, tokens: int) -> dict[str, OpTime]:
        """One prompt of ``tokens`` tokens from an empty cache, per operator."""
        if tokens <= 0:
            return {}
        m, st = self.shape, self.st
        H, K, d, s, L = m.heads, m.kv_heads, m.head_dim, m.dtype_bytes, m.layers
        pairs = [_causal_pairs(tokens, 0, m.window(i)) for i in range(L)]
        out = {"linear": self._linear(tokens, 1),
               "prefill": self._t(L * tokens * 2 * (K + H) * d * s, sum(4 * H * d * p for p in pairs)),
               **self._encode(tokens)}
        probs = 0.0  # attention probabilities the selector needs outside flash attention, over layers
        for i in range(L):
            q = st.prefill_queries(tokens, i)
            probs += 0 if q <= 0 else (pairs[i] if q >= tokens else q * tokens)
        if probs:
            out["score"] = self._t(2 * 4 * H * probs, 2 * H * d * probs)
        return {**out, **self._overhead()}

    def decode_ops(self, batch: int, kv_tokens: float) -> dict[str, OpTime]:
        """One decode step of ``batch`` sequences reading ``kv_tokens`` stored tokens per layer in all."""
        if batch <= 0:
            return {}
        m, st, a = self.shape, self.st, self.assume
        H, K, d, s, L = m.heads, m.kv_heads, m.head_dim, m.dtype_bytes, m.layers
        k = float(kv_tokens)
        out = {"linear": self._linear(batch, batch)}
        flops = 4 * H * d * k * L
        if st.lossless:
            out["decode"] = self._t(L * K * 2 * k * d * s, flops)
        else:
            rk, rv = min(k, batch * st.key_residual), min(k, batch * st.value_residual)
            kv = L * K * ((k - rk) * st.key_bytes + (k - rv) * st.value_bytes + (rk + rv) * d * s)
            el = L * K * d * (2 * k - rk - rv)
            if a.dequant == "fused":
                attn = self._t(kv, flops)
                fused = self._t(kv, flops, a.dequant_ops * el)
                out["decode"] = attn
                out["dequant"] = OpTime(fused.seconds - attn.seconds, fused.bound)
            else:
                out["dequant"] = self._t(kv + el * s, 0.0, a.dequant_ops * el)
                out["decode"] = self._t(L * K * 2 * k * d * s, flops)
        out.update(self._encode(batch))
        if st.observes_decode:
            out["score"] = self._t(2 * 4 * H * k * L, 0.0)
        return {**out, **self._overhead()}

    def prefill_s(self, tokens: int) -> float:
        return sum(t.seconds for t in self.prefill_ops(tokens).values())

    def decode_s(self, batch: int, kv_tokens: float) -> float:
        return sum(t.seconds for t in self.decode_ops(batch, kv_tokens).values())

    def evict_s(self, cuts: int) -> float:
        return 0.0  # top-k over kept scores: not modelled (stated in the assumptions)

    def kv_bytes(self, length: int, prompt: int | None = None) -> float:
        return self.st.seq_bytes(length, prompt)

    def kv_memory(self, kv_memory: float | None = None) -> float:
        """KV pool bytes: ``kv_memory`` when given, else (device memory x (1 - reserve)) - weights."""
        if kv_memory is not None:
            return float(kv_memory)
        return self.hw.mem_bytes * (1 - self.assume.memory_reserve) - self.shape.weight_bytes

    def max_batch(self, length: int, kv_memory: float | None = None, prompt: int | None = None) -> int:
        return max(int(self.kv_memory(kv_memory) // max(self.kv_bytes(length, prompt), 1.0)), 0)


def project(shape: ModelShape, hw: Hardware, methods: Sequence[str], context: int, batch: int | None = None,
            kv_memory: float | None = None, assume: Assumptions | None = None, max_batch: int = 1024) -> dict:
    """A decode step at ``batch`` sequences of ``context`` tokens per method (``batch`` None: as many as
    fit the KV memory, at most ``max_batch``), and a prefill of ``context`` tokens; ratios to ``full``."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    assume = assume or Assumptions()
    specs = list(dict.fromkeys(["full", *methods]))
    rows = []
    for spec in specs:
        cost = RooflineCost(storage(spec, shape), hw, assume)
        fit = cost.max_batch(context, kv_memory)
        b = batch if batch is not None else max(min(fit, max_batch), 1)
        dec = cost.decode_ops(b, b * cost.st.mean_kept_tokens(context))
        step = sum(t.seconds for t in dec.values())
        pre = cost.prefill_s(context)
        rows.append({
            "method": cost.method, "family": cost.st.family, "bytes_per_token": cost.st.bytes_per_token(context),
            "compression": cost.st.compression(context), "kv_bytes_per_seq": cost.kv_bytes(context),
            "storage_by_layer_type": cost.st.by_layer_type(context), "max_batch": fit, "batch": b,
            "fits": b <= fit, "decode_step_ms": step * 1e3, "decode_tokens_per_s": b / step,
            "tpot_ms": step * 1e3, "prefill_ms": pre * 1e3,
            "ops_ms": {k: round(t.seconds * 1e3, 6) for k, t in dec.items()},
            "bound": {k: t.bound for k, t in dec.items()},
        })
    base = rows[0]
    for r in rows:
        r["throughput_ratio_to_full"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    kvm = RooflineCost(storage("full", shape), hw, assume).kv_memory(kv_memory)
    notes = []
    if shape.weight_bytes > hw.mem_bytes:
        notes.append(f"the weights ({shape.weight_bytes / 1e9:.0f} GB) do not fit {hw.name}'s "
                     f"{hw.mem_bytes / 1e9:.0f} GB: one device cannot hold this model")
    if kvm <= 0:
        notes.append("no memory left for KV after the weights")
    return {"model": shape.name, "params": shape.params, "weight_bytes": shape.weight_bytes, "hardware": hw.to_dict(),
            "context": context, "batch": batch, "kv_memory": kvm, "assumptions": assume.to_dict(),
            "assumption_lines": assume.lines(hw), "rows": rows, "notes": notes}


def format_projection(p: dict) -> str:
    head = ["method", "B/token", "compr.", "max batch", "batch", "step ms", "tok/s", "x full", "prefill ms",
            "linear", "attn", "dequant", "other", "attn bound"]
    lines = [f"{p['model']} ({p['params'] / 1e9:.2f}B params, {p['weight_bytes'] / 1e9:.1f} GB weights) on "
             f"{p['hardware']['name']}, context {p['context']}, KV memory {p['kv_memory'] / 1e9:.1f} GB",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in p["rows"]:
        ops = r["ops_ms"]
        other = sum(v for k, v in ops.items() if k not in ("linear", "decode", "dequant"))
        lines.append("| " + " | ".join([
            r["method"], f"{r['bytes_per_token'] / 1024:.1f} KiB", f"{r['compression']:.2f}x", str(r["max_batch"]),
            str(r["batch"]) + ("" if r["fits"] else " (!)"), f"{r['decode_step_ms']:.2f}",
            f"{r['decode_tokens_per_s']:.0f}", f"{r['throughput_ratio_to_full']:.2f}", f"{r['prefill_ms']:.1f}",
            f"{ops.get('linear', 0):.2f}", f"{ops.get('decode', 0):.2f}", f"{ops.get('dequant', 0):.3f}",
            f"{other:.3f}", r["bound"].get("decode", "-")]) + " |")
    lines += ["", "columns: per-operator ms of one decode step; (!) batch exceeds what fits the KV memory",
              "assumptions:"] + [f"  - {x}" for x in p["assumption_lines"]] + [f"NOTE {n}" for n in p["notes"]]
    return "\n".join(lines)
