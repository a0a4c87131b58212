"""A request's life inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvshrink.engine.types import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted: it will prefill prompt + output again)
    RUNNING = "running"  # holds a slot and its blocks
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    arrival: float = field(default_factory=time.perf_counter)
    status: RequestStatus = RequestStatus.WAITING
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    order: int = 0  # admission order; the largest is the youngest
    finish_reason: str | None = None
    error: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    generator: torch.Generator | None = None
    new_tokens: list[int] = field(default_factory=list)  # produced in the current step
    prefills: int = 0
    # the prefill in progress: ``prefill_len`` context tokens (prompt + output, fixed at admission),
    # ``prefilled`` of them scheduled so far; it decodes once they are equal
    prefill_len: int = 0
    prefilled: int = 0
    # full-precision keys/values of the chunks of a split prompt that ran (``batch.PrefillStaging``),
    # outside the pool, from its first chunk to its last; dropped on preemption and finish
    staging: object | None = None

    @property
    def context(self) -> list[int]:
        return self.prompt + self.output

    @property
    def prefilling(self) -> bool:
        """Admitted, and part of its context still to prefill (a chunked prompt in flight)."""
        return self.prefilled < self.prefill_len

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
