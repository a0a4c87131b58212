"""Each layer's attention type, read from a model's config (never from its modelling code).

Both the HF path (``cache.py``) and the engine (``engine/pool.py``) build their per-layer storage from
:func:`layer_types`; the attention functions then check that what the model's attention module passes
at run time (``sliding_window=``, ``softcap=``, ``s_aux=``) agrees with it.

- ``config.layer_types`` (Gemma-2/3, Qwen2/3, gpt-oss, ...): ``"full_attention"`` or
  ``"sliding_attention"`` per layer, the window being ``config.sliding_window``.
- no ``layer_types`` but a ``sliding_window`` (Mistral-7B-v0.1, Phi-3 style): every layer slides.
- ``config.attn_logit_softcapping`` (Gemma-2): logits are ``c * tanh(logits / c)`` before the softmax.
  The value used is the one the module passes (Gemma-3 keeps the field but passes none).
- attention sinks (gpt-oss ``s_aux``): a learned per-head logit joins the softmax; they cost no storage
  and are read at run time only.

Window semantics are transformers' (``sliding_window_overlay``): the query at position ``i`` attends to
positions ``j`` with ``i - window < j <= i``, so after a step a sliding layer needs its last
``window - 1`` tokens (what ``DynamicSlidingWindowLayer`` keeps).

What stays unsupported raises :class:`UnsupportedModel` (one line naming the model type and the
feature) when a method or the engine is set up.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL = "full_attention"
SLIDING = "sliding_attention"


class UnsupportedModel(ValueError):
    """The model uses an attention feature kvshrink does not implement."""


@dataclass(frozen=True)
class LayerType:
    """One layer's attention: full causal, or causal over a sliding ``window`` of positions."""

    window: int | None = None
    softcap: float | None = None

    @property
    def sliding(self) -> bool:
        return self.window is not None

    @property
    def name(self) -> str:
        return SLIDING if self.sliding else FULL

    def needed(self, length: int) -> int:
        """Tokens of a ``length``-token context the next query can still attend to (besides itself)."""
        return length if self.window is None else min(length, self.window - 1)


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _model_type(config) -> str:
    return getattr(config, "model_type", None) or type(config).__name__


def check_supported(config) -> None:
    """Raise :class:`UnsupportedModel` for an attention feature kvshrink cannot store faithfully."""
    text = text_config(config)
    mt = _model_type(text)

    def no(feature: str) -> None:
        raise UnsupportedModel(f"kvshrink does not support {mt!r} models: {feature}")

    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        no("encoder-decoder (cross-attention) caches")
    if getattr(text, "kv_lora_rank", None):
        no("multi-head latent attention (compressed latent KV, kv_lora_rank)")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    qk = getattr(text, "qk_head_dim", None) or head_dim
    v = getattr(text, "v_head_dim", None)
    if v is not None and v != qk:
        no(f"value head dim {v} differs from key head dim {qk}")
    if getattr(text, "num_kv_shared_layers", 0):
        no("cross-layer KV sharing (num_kv_shared_layers)")
    if getattr(text, "attention_chunk_size", None):
        no("chunked attention (attention_chunk_size)")
    if getattr(text, "use_bidirectional_attention", False):
        no("bidirectional attention")
    for t in set(getattr(text, "layer_types", None) or ()):
        if t not in (FULL, SLIDING):
            no(f"layer type {t!r} (only {FULL!r} and {SLIDING!r} are)")
    window = getattr(text, "sliding_window", None)
    if any(t == SLIDING for t in getattr(text, "layer_types", None) or ()) and not window:
        no("sliding_attention layers without a sliding_window")


def layer_types(config) -> list[LayerType]:
    """Every layer's type, from the config alone (see the module docstring)."""
    check_supported(config)
    text = text_config(config)
    L = text.num_hidden_layers
    window = getattr(text, "sliding_window", None) or None
    softcap = getattr(text, "attn_logit_softcapping", None) or None
    types = getattr(text, "layer_types", None)
    if types is None:
        types = [SLIDING if window else FULL] * L
    types = list(types)[:L]
    return [LayerType(window if t == SLIDING else None, softcap) for t in types]


def check_call(lt: LayerType, layer: int, sliding_window, where: str) -> None:
    """The module passed ``sliding_window`` at run time; it must be what the config said."""
    passed = sliding_window or None
    if passed != lt.window:
        raise UnsupportedModel(
            f"{where}: layer {layer} was set up as {lt.name} (window {lt.window}) from the config, but its "
            f"attention module passes sliding_window={sliding_window!r}"
        )
