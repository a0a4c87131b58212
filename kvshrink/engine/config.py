"""The engine's settings, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kvshrink.engine.pool import parse_bytes
from kvshrink.methods.base import Codec


@dataclass(frozen=True)
class EngineConfig:
    """``kv_memory``: bytes of the KV pool (or a size string, "512MiB"). ``block_size``: token
    positions per block (rounded up to a multiple of the codec's chunk). ``max_batch``: running
    sequences at most. ``max_prefill_tokens``: prompt tokens prefilled per step, counted over every
    prompt of the step, so decoding sequences are not starved by a burst of arrivals.
    ``chunked_prefill`` (default on): a prompt longer than what is left of that budget is split into
    chunks over several steps, and a step's decode tokens and prefill chunks run in one packed forward;
    off: each admitted prompt runs whole in a forward of its own after the decode forward (at least
    one prompt per step, whatever its length), the engine's behaviour before chunking.
    ``packed_linear`` (default on; CPU only): the model's linear layers run through oneDNN on weights
    packed once (``kvshrink.engine.linear``), at the cost of a packed copy of those weights; off: stock
    ``F.linear``, the kernels HF ``generate`` uses.
    ``paged_kernels`` (default on; CPU only): decode attention reads blocks in place through the
    compiled kernels of ``kvshrink.engine.kernels`` where the codec's layout allows; off: gather and
    decode the blocks in eager PyTorch (the reference path).
    ``evict_every``: decode steps between two cuts of a rolling selector (default ``block_size``;
    1 reproduces the HF path, which cuts at every step)."""

    kv_memory: int | str = "1GiB"
    block_size: int = 32
    max_batch: int = 256
    max_prefill_tokens: int = 4096
    chunked_prefill: bool = True
    packed_linear: bool = True
    paged_kernels: bool = True
    evict_every: int | None = None

    def resolved(self, codec: Codec) -> EngineConfig:
        """Checked, with bytes parsed, the block size aligned with the codec's chunks and the
        eviction cadence filled in."""
        for name in ("block_size", "max_batch", "max_prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("chunked_prefill", "packed_linear", "paged_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.evict_every is not None and (not isinstance(self.evict_every, int) or self.evict_every < 1):
            raise ValueError(f"evict_every must be an integer >= 1 or None, got {self.evict_every!r}")
        block = self.block_size
        for enc in (codec.key_encoder(), codec.value_encoder()):  # a block holds whole encoder chunks
            block = math.lcm(block, int(enc.chunk))
        return replace(self, kv_memory=parse_bytes(self.kv_memory), block_size=block,
                       evict_every=self.evict_every or block)
