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

``validate_profile`` checks the path on a machine that can be described the same way (this CPU,
``hardware.measure_host``): the roofline for a profile's own model config against the profile's raw
step times, and its per-token and attention parts against the profile's fitted split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

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

    @classmethod
    def for_hardware(cls, hw: Hardware, **overrides) -> Assumptions:
        """The defaults for ``hw``: a measured machine's figures are already achieved rates (a large
        GEMM, a streaming read), so its efficiencies are 1; kvshrink's CPU engine decodes the KV into a
        full-precision copy before attending (``engine/attention.py``), so dequantisation is unfused
        there. A preset's figures are vendors' peaks: the class defaults."""
        base = {"bw_efficiency": 1.0, "flops_efficiency": 1.0, "dequant": "unfused"} if hw.measured else {}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


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


# ------------------------------------------------------------------------- against a measured profile

# the roofline's operators grouped as the profile's cost model splits a step (costmodel.py): work per
# token or sequence (weights, encoding; the fit's c0 + c1 T and w(B)) and work over pairs or stored
# tokens (attention and what rides on it; the fit's c2 T² and c R)
PER_TOKEN_OPS = ("linear", "encode", "overhead")
ATTENTION_OPS = ("prefill", "decode", "dequant", "score")


def _fit_parts(fit, kind: str, point: dict) -> dict[str, float]:
    """The fitted cost model's two parts at a raw point: ``attention`` is what its pairs or stored-token
    terms add (the fit with them zeroed subtracted), ``per_token`` the rest, whatever the fit's form."""
    from kvshrink.predict.costmodel import features_of

    x = features_of(point)
    quiet = {**x, "tokens_sq": 0.0} if kind == "prefill" else {**x, "kv_read": 0.0, "kv_tokens": 0.0}
    total, rest = fit.predict(x), fit.predict(quiet)
    return {"per_token": rest, "attention": total - rest}


def _rel(pred: float, meas: float) -> float | None:
    return (pred - meas) / meas if meas > 0 else None


def validate_profile(profile: str | Path, hw: Hardware, assume: Assumptions | None = None,
                     methods: Sequence[str] | None = None) -> dict:
    """Roofline step costs for the profile's own model config on ``hw`` against the profile's raw
    points (``records.jsonl``: prefill and decode steps measured through the engine) and against its
    fitted per-operator split. Errors are (roofline - measured) / measured."""
    from kvshrink.predict.costmodel import FittedCost, load_points
    from kvshrink.predict.modelconfig import shape_from_config

    d = Path(profile)
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else None
    if summary is None:
        raise FileNotFoundError(f"{profile}: not a profile directory (no summary.json); run `kvshrink profile`")
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    dtype = {4: "float32", 2: "bfloat16", 1: "fp8"}.get(int(summary.get("dtype_bytes", 4)), "float32")
    shape = shape_from_config(summary["model_config"], name=str(cfg.get("model", "model")), dtype=dtype)
    assume = assume or Assumptions.for_hardware(hw)
    fits = {m: FittedCost.from_dict(f) for m, f in summary["methods"].items()}
    rows = []
    for pt in load_points(d):
        kind, m = pt.get("kind"), pt.get("method")
        if kind not in ("prefill", "decode") or (methods and m not in methods) or not pt.get("seconds"):
            continue
        cost = RooflineCost(storage(m, shape), hw, assume)
        if kind == "prefill":
            ops, label = cost.prefill_ops(int(pt["tokens"])), f"T={pt['tokens']}"
        else:
            ops, label = cost.decode_ops(int(pt["batch"]), float(pt["kv_tokens"])), \
                f"B={pt['batch']} C={pt['context']}"
        parts = {"per_token": sum(o.seconds for k, o in ops.items() if k in PER_TOKEN_OPS),
                 "attention": sum(o.seconds for k, o in ops.items() if k in ATTENTION_OPS)}
        total = sum(o.seconds for o in ops.values())
        fit = fits.get(m).fits.get(kind) if m in fits else None
        fitted = _fit_parts(fit, kind, pt) if fit is not None else {}
        rows.append({
            "method": m, "kind": kind, "point": label, "measured_s": float(pt["seconds"]), "roofline_s": total,
            "error": _rel(total, float(pt["seconds"])),
            "ops_s": {k: o.seconds for k, o in ops.items()}, "bound": {k: o.bound for k, o in ops.items()},
            "roofline_parts_s": parts, "fitted_parts_s": fitted,
            "part_error": {k: _rel(parts[k], v) for k, v in fitted.items()},
        })

    def summarise(sel: list[dict], key) -> dict:
        errs = [e for e in (key(r) for r in sel) if e is not None]
        if not errs:
            return {"n": 0}
        return {"n": len(errs), "mean_abs_error": float(sum(abs(e) for e in errs) / len(errs)),
                "mean_error": float(sum(errs) / len(errs)), "max_abs_error": float(max(abs(e) for e in errs))}

    summary_rows = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        for kind in ("prefill", "decode"):
            sel = [r for r in rows if r["method"] == m and r["kind"] == kind]
            if not sel:
                continue
            summary_rows[f"{m}|{kind}"] = {"method": m, "kind": kind, "step": summarise(sel, lambda r: r["error"]),
                                           **{part: summarise(sel, lambda r, part=part: r["part_error"].get(part))
                                              for part in ("per_token", "attention")}}
    return {"profile": str(profile), "model": shape.name, "hardware": hw.to_dict(),
            "profile_threads": cfg.get("threads"), "assumptions": assume.to_dict(),
            "assumption_lines": assume.lines(hw), "rows": rows, "summary": list(summary_rows.values())}


def format_validation(v: dict) -> str:
    def pct(e: float | None) -> str:
        return "-" if e is None else f"{e * 100:+.0f}%"

    lines = [f"roofline ({v['hardware']['name']}) vs measured profile {v['profile']} ({v['model']}, "
             f"profiled with {v['profile_threads']} thread(s))", "",
             "| method | step | point | measured ms | roofline ms | error | roofline: per-token ms (bound) | "
             "attention ms | fitted per-token ms | fitted attention ms | per-token error | attention error |",
             "|" + "---|" * 12]
    for r in v["rows"]:
        rp, fp, pe = r["roofline_parts_s"], r["fitted_parts_s"], r["part_error"]
        lines.append("| " + " | ".join([
            r["method"], r["kind"], r["point"], f"{r['measured_s'] * 1e3:.1f}", f"{r['roofline_s'] * 1e3:.1f}",
            pct(r["error"]), f"{rp['per_token'] * 1e3:.1f} ({r['bound'].get('linear', '-')})",
            f"{rp['attention'] * 1e3:.2f}", f"{fp.get('per_token', 0) * 1e3:.1f}", f"{fp.get('attention', 0) * 1e3:.2f}",
            pct(pe.get("per_token")), pct(pe.get("attention"))]) + " |")
    lines += ["", "| method | step | n | step: mean abs error (mean, worst) | per-token part: mean abs error | "
              "attention part: mean abs error |", "|---|---|---|---|---|---|"]
    for s in v["summary"]:
        st = s["step"]

        def f(x: dict) -> str:
            return "-" if not x.get("n") else f"{x['mean_abs_error']:.0%}"

        lines.append(f"| {s['method']} | {s['kind']} | {st['n']} | {st['mean_abs_error']:.0%} "
                     f"({st['mean_error']:+.0%}, {st['max_abs_error']:.0%}) | {f(s['per_token'])} | "
                     f"{f(s['attention'])} |")
    lines += ["", "per-token: linear layers + encoding (the fit's c0 + c1 T in prefill, w(B) in decode); "
              "attention: attention + dequantisation + selector scores (the fit's c2 T², c R). The fitted "
              "split is the profile's non-negative fit, not a measurement: its parts are indicative.",
              "assumptions:"] + [f"  - {x}" for x in v["assumption_lines"]]
    return "\n".join(lines)
