"""The shape of a dense decoder from its Hugging Face ``config.json`` (no weights needed).

Parameter counts (Llama-style gated MLP, ``d = head_dim``, ``H`` query heads, ``K`` KV heads)::

    per layer:  attention  h*H*d (q) + 2*h*K*d (k, v) + H*d*h (o)
                MLP        3*h*i        (gate, up, down; 2*h*i for a non-gated MLP)
                norms      2*h
    embeddings  V*h (input) + V*h (LM head unless tie_word_embeddings) + h (final norm)

``matmul_params`` are the weights multiplied at every step: all layers' projections and the LM head
(the input embedding is a row lookup, so it is not read whole). Llama-3.1-8B: 8.03e9 parameters,
7.50e9 of them in matrix multiplies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
               "float8_e4m3fn": 1, "fp8": 1}


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2
    tied_embeddings: bool = False
    gated_mlp: bool = True
    layer_types: tuple[str, ...] = ()  # "full_attention" / "sliding_attention" per layer ("" = all full)
    sliding_window: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "full_attention"

    def window(self, i: int) -> int | None:
        """Tokens layer ``i`` keeps at most (None: all)."""
        return self.sliding_window if self.layer_type(i) == "sliding_attention" else None

    @property
    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d + 2 * h * self.kv_heads * d + self.heads * d * h
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate
        return attn + mlp + 2 * h

    @property
    def params(self) -> int:
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.layer_params + emb + self.hidden

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def matmul_params(self) -> int:
        """Weights multiplied per token: the layers' projections (norms are negligible) and the LM head."""
        return self.layers * (self.layer_params - 2 * self.hidden) + self.lm_head_params

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights resident in memory."""
        return self.params * self.dtype_bytes

    def fp_bytes_per_token(self) -> int:
        """Uncompressed K and V of one token over all layers: ``2 * layers * K * d * dtype_bytes``."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


_UNGATED = ("gpt2", "opt", "gpt_neox", "gptj", "phi", "falcon", "bloom")  # two-matrix MLPs


def _text_config(cfg: dict) -> dict:
    # multimodal configs keep the language model's numbers under text_config
    return cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg


def _layer_types(cfg: dict, layers: int) -> tuple[str, ...]:
    lt = cfg.get("layer_types")
    if lt:
        if len(lt) != layers:
            raise ValueError(f"config: layer_types has {len(lt)} entries for {layers} layers")
        return tuple(str(t) for t in lt)
    sw = cfg.get("sliding_window")
    if sw is None or cfg.get("use_sliding_window") is False:
        return ()
    # older configs without layer_types: Qwen2-style use_sliding_window from layer max_window_layers on,
    # Mistral-style (no use_sliding_window key) every layer
    first = int(cfg.get("max_window_layers") or 0) if cfg.get("use_sliding_window") else 0
    return tuple("sliding_attention" if i >= first else "full_attention" for i in range(layers))


def shape_from_config(cfg: dict, name: str = "model", dtype: str | None = None) -> ModelShape:
    """A ``ModelShape`` from a config dict; ``dtype`` overrides the config's ``torch_dtype``/``dtype``."""
    c = _text_config(cfg)
    if any(c.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ValueError(f"{name}: mixture-of-experts configs are not supported (the roofline models dense models)")
    try:
        hidden = int(c["hidden_size"])
        layers = int(c["num_hidden_layers"])
        heads = int(c["num_attention_heads"])
        inter = int(c["intermediate_size"])
        vocab = int(c["vocab_size"])
    except KeyError as e:
        raise ValueError(f"{name}: config.json lacks {e.args[0]!r} (need hidden_size, num_hidden_layers, "
                         f"num_attention_heads, intermediate_size, vocab_size)") from None
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    dt = str(dtype or c.get("torch_dtype") or c.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    dt = dt.removeprefix("torch.")
    if dt not in DTYPE_BYTES:
        raise ValueError(f"{name}: unknown dtype {dt!r}; known: {', '.join(DTYPE_BYTES)}")
    lt = _layer_types(c, layers)
    sw = c.get("sliding_window")
    if any(t == "sliding_attention" for t in lt) and not sw:
        raise ValueError(f"{name}: sliding_attention layers but no sliding_window")
    gated = c.get("model_type") not in _UNGATED
    return ModelShape(
        name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim, intermediate=inter,
        vocab=vocab, dtype_bytes=DTYPE_BYTES[dt], tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        gated_mlp=gated, layer_types=lt, sliding_window=int(sw) if sw and lt else None,
        extra={"dtype": dt, "model_type": c.get("model_type")},
    )


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str) -> tuple[dict, Path]:
    """The config.json of a shipped config by name (``llama-3.1-8b``), a ``config.json`` path, or a
    directory holding one, as a dict, and where it was read."""
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        shipped = CONFIG_DIR / f"{name_or_path.lower().split('/')[-1].removeprefix('meta-')}.json"
        if not shipped.is_file():
            raise FileNotFoundError(f"model config {name_or_path!r} not found: give a config.json, a model "
                                    f"directory, or one of {', '.join(shipped_configs())}")
        p = shipped
    try:
        return json.loads(p.read_text()), p
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def load_shape(name_or_path: str, dtype: str | None = None) -> ModelShape:
    """A shipped config by name (``llama-3.1-8b``), a ``config.json`` path, or a directory holding one."""
    cfg, p = load_config(name_or_path)
    return shape_from_config(cfg, name=p.parent.name if p.name == "config.json" else p.stem, dtype=dtype)
