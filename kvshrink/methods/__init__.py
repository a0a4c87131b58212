"""Compression methods: one file per selector or codec, registered by name.

Importing this package registers every built-in method.
"""

# Importing a method's module registers it; adding a method = one file here + one line below.
from kvshrink.methods import (  # noqa: F401
    full,
    gear,
    h2o,
    intq,
    kivi,
    kvcrush,
    pyramidkv,
    snapkv,
    streamingllm,
)
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
