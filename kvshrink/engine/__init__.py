"""A continuous-batching engine over compressed KV blocks: pool -> scheduler -> runner -> attention.

    from kvshrink.engine import Engine, SamplingParams
    eng = Engine(model, tok, method="kivi:bits=4", kv_memory="512MiB")
    eng.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from kvshrink.engine.engine import Engine, reset_timers, timers
from kvshrink.engine.pool import parse_bytes
from kvshrink.engine.types import EngineStats, RequestOutput, SamplingParams

__all__ = ["Engine", "EngineStats", "RequestOutput", "SamplingParams", "parse_bytes", "reset_timers", "timers"]
