"""kvshrink: KV-cache compression for LLM serving, measured honestly."""

from kvshrink.cache import KVShrinkCache, cache_bytes, compress
from kvshrink.errors import CompressionNotInEffect
from kvshrink.methods import CompressionMethod, SpecError, parse
from kvshrink.models import DEFAULT_MODEL, ModelError, load_model

__all__ = [
    "DEFAULT_MODEL",
    "CompressionMethod",
    "CompressionNotInEffect",
    "KVShrinkCache",
    "ModelError",
    "SpecError",
    "cache_bytes",
    "compress",
    "load_model",
    "parse",
]
__version__ = "0.1.0"
