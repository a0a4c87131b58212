"""The engine's public dataclasses (shared with the server): sampling parameters, per-step request
outputs and engine statistics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    """How one request samples and when it stops. ``temperature == 0`` is greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        self.stop_token_ids = tuple(int(t) for t in (self.stop_token_ids or ()))
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids!r}")


@dataclass
class RequestOutput:
    """What one request got in one ``Engine.step()``: the new tokens, and whether it finished.

    ``finish_reason``: ``"stop"`` (EOS or a stop token), ``"length"`` (max_tokens, model context or a
    pool too small for the grown sequence), ``"abort"`` or ``"error"`` (``error`` says why)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    output_tokens: int
    error: str | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_bytes_used: int
    kv_bytes_total: int
    blocks_used: int
    blocks_free: int
    preemptions: int
    compression: float  # bytes an fp cache would hold for the running contexts / bytes used (1.0 when idle)
    prompt_tokens: int  # prompt tokens prefilled so far (recomputed ones included)
    generation_tokens: int  # tokens generated so far
    evictions: int = 0  # (sequence, layer) cut-backs of a rolling selector so far
