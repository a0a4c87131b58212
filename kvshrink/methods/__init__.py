"""Compression methods: one file per selector or codec, registered by name.

Importing this package registers every built-in method.
"""

from kvshrink.methods import full  # noqa: F401  (registers full, fp)
from kvshrink.methods.base import (
    Codec,
    CodecState,
    CompressionMethod,
    Encoder,
    SelectionInput,
    Selector,
    SpecError,
    StreamPolicy,
)
from kvshrink.methods.registry import build, parse, register, registered

# Each import below registers its methods; keep this list sorted.
for _mod in ("gear", "h2o", "intq", "kivi", "kvcrush", "pyramidkv", "snapkv", "streamingllm"):
    try:
        __import__(f"kvshrink.methods.{_mod}")
    except ModuleNotFoundError as e:  # a method file not written yet must not break the others
        if e.name != f"kvshrink.methods.{_mod}":
            raise

__all__ = [
    "Codec",
    "CodecState",
    "CompressionMethod",
    "Encoder",
    "SelectionInput",
    "Selector",
    "SpecError",
    "StreamPolicy",
    "build",
    "parse",
    "register",
    "registered",
]
