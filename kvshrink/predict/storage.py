"""What a method stores for a model: tokens kept per layer and bytes per kept token.

Every use of ``kvshrink.methods`` by the predictors is in this file (``parse`` for the spec; the
selector's ``budget``, ``decode_hold``, ``prefill_queries`` and ``observes_decode``; the codec's
encoders' ``bytes_per_token`` and stream policies' ``residual``), all read-only, so a change of the
method protocol is adapted here (``_Selector`` also reads the older ``needs``/``evicts_in_decode``).

For a sequence of ``n`` tokens whose prompt had ``p`` tokens, layer ``l`` keeps::

    b      = selector.budget(p, l, L)                       (None: keep everything at prefill)
    h      = selector.decode_hold(p, l, L)                  (None: no eviction while decoding)
    kept   = min(n, h)                        if h is not None (held while decoding: H2O, StreamingLLM)
           = min(n, b + (n - p))              elif b is not None (selected once at prefill, grows after)
           = n                                otherwise
    kept   = min(kept, sliding_window)        on sliding_attention layers

and stores ``kept - r`` encoded tokens plus ``r = min(kept, residual)`` full-precision ones (per K
and V stream; KIVI's keys flush whole groups, so ``r`` is an upper bound for them)::

    bytes_l = K * [(kept - r_k) * e_k + r_k * d * s + (kept - r_v) * e_v + r_v * d * s]

with ``e_k``, ``e_v`` the encoders' bytes per token and head, ``d`` the head dim, ``s`` dtype bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvshrink.predict.modelconfig import ModelShape


@dataclass(frozen=True)
class MethodStorage:
    spec: str  # canonical spec
    selector: str
    codec: str
    observes_decode: bool  # every decode step's attention feeds the selector (H2O)
    lossless: bool
    key_bytes: float  # encoded bytes of one token of one KV head (keys)
    value_bytes: float
    key_residual: int  # tokens kept in full precision before encoding
    value_residual: int
    shape: ModelShape
    _method: object  # the parsed CompressionMethod (its selector's budget is called)

    @property
    def family(self) -> str:
        """``snapkv``, ``kivi``, ``snapkv+kivi``, ``full``."""
        parts = [n for n in (self.selector, self.codec) if n not in ("full", "fp")]
        return "+".join(parts) or "full"

    def budget(self, prompt: int, layer: int) -> int | None:
        return self._method.selector.budget(prompt, layer, self.shape.layers)

    def hold(self, prompt: int, layer: int) -> int | None:
        sel = self._method.selector
        if hasattr(sel, "decode_hold"):
            return sel.decode_hold(prompt, layer, self.shape.layers)
        return self.budget(prompt, layer) if getattr(sel, "evicts_in_decode", False) else None

    def prefill_queries(self, prompt: int, layer: int) -> int:
        """The prompt's last queries whose attention the selector reads (0: positions only)."""
        sel = self._method.selector
        if hasattr(sel, "prefill_queries"):
            return int(sel.prefill_queries(prompt, layer, self.shape.layers))
        needs = getattr(sel, "needs", "none")
        return prompt if needs == "accumulated" else min(prompt, int(getattr(sel, "observation_window", 0) or 0))

    def kept_tokens(self, layer: int, length: int, prompt: int | None = None) -> int:
        p = length if prompt is None else min(prompt, length)
        h = self.hold(p, layer)
        b = self.budget(p, layer)
        if h is not None:
            kept = min(length, h)
        elif b is not None:
            kept = min(length, b + (length - p))
        else:
            kept = length
        w = self.shape.window(layer)
        return min(kept, w) if w else kept

    def layer_bytes(self, layer: int, length: int, prompt: int | None = None) -> float:
        n = self.kept_tokens(layer, length, prompt)
        fp = self.shape.head_dim * self.shape.dtype_bytes
        rk, rv = min(n, self.key_residual), min(n, self.value_residual)
        return self.shape.kv_heads * ((n - rk) * self.key_bytes + rk * fp + (n - rv) * self.value_bytes + rv * fp)

    def seq_bytes(self, length: int, prompt: int | None = None) -> float:
        """Stored KV bytes of one sequence of ``length`` tokens."""
        return sum(self.layer_bytes(i, length, prompt) for i in range(self.shape.layers))

    def bytes_per_token(self, length: int, prompt: int | None = None) -> float:
        """Stored bytes per token of context at ``length`` (all layers): ``seq_bytes / length``."""
        return self.seq_bytes(length, prompt) / max(length, 1)

    def compression(self, length: int, prompt: int | None = None) -> float:
        return self.shape.fp_bytes_per_token() * length / max(self.seq_bytes(length, prompt), 1e-9)

    def mean_kept_tokens(self, length: int, prompt: int | None = None) -> float:
        """Tokens attention reads per layer, averaged over layers (the cost models' ``context`` feature)."""
        return sum(self.kept_tokens(i, length, prompt) for i in range(self.shape.layers)) / self.shape.layers

    def encoded_elements(self, length: int, prompt: int | None = None) -> float:
        """K and V elements stored encoded (what a decode step dequantises), over all layers."""
        if self.lossless:
            return 0.0
        tot = 0.0
        for i in range(self.shape.layers):
            n = self.kept_tokens(i, length, prompt)
            tot += (2 * n - min(n, self.key_residual) - min(n, self.value_residual))
        return tot * self.shape.kv_heads * self.shape.head_dim

    def by_layer_type(self, length: int, prompt: int | None = None) -> dict[str, dict]:
        """Per layer type: layers, tokens kept per layer, bytes per context token."""
        out: dict[str, dict] = {}
        for i in range(self.shape.layers):
            e = out.setdefault(self.shape.layer_type(i), {"layers": 0, "kept_tokens": 0.0, "bytes": 0.0})
            e["layers"] += 1
            e["kept_tokens"] += self.kept_tokens(i, length, prompt)
            e["bytes"] += self.layer_bytes(i, length, prompt)
        for e in out.values():
            e["kept_tokens"] /= e["layers"]
            e["bytes_per_token"] = e.pop("bytes") / max(length, 1)
        return out


def canonical(spec: str) -> str:
    """The registry's canonical spelling of a spec (``kivi:bits=2`` and ``kivi`` are the same method)."""
    from kvshrink.methods import parse

    return parse(spec).spec


def storage(spec: str, shape: ModelShape) -> MethodStorage:
    """Parse ``spec`` (raises ``SpecError``) and read its storage numbers for ``shape``."""
    from kvshrink.methods import parse

    m = parse(spec)
    sel, codec = m.selector, m.codec
    d, s = shape.head_dim, shape.dtype_bytes
    try:
        kb = float(codec.key_encoder().bytes_per_token(d, s))
        vb = float(codec.value_encoder().bytes_per_token(d, s))
        kr = int(codec.key_policy().residual)
        vr = int(codec.value_policy().residual)
    except (AttributeError, NotImplementedError):  # a codec without per-stream encoders: its total, no residual
        kb = vb = float(codec.bytes_per_token(1, 1, d, s)) / 2
        kr = vr = 0
    lossless = bool(getattr(codec, "lossless", codec.name == "fp"))
    if hasattr(sel, "observes_decode"):
        observes = bool(sel.observes_decode())
    else:
        observes = getattr(sel, "needs", "none") == "accumulated"
    return MethodStorage(
        spec=m.spec, selector=sel.name, codec=codec.name, observes_decode=observes, lossless=lossless,
        key_bytes=kb, value_bytes=vb, key_residual=kr, value_residual=vr, shape=shape, _method=m,
    )
