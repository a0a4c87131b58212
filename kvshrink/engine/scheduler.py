"""Who runs next: continuous batching, first come first served.

- **Admission** by free blocks: the head of the waiting queue is admitted when the pool holds the
  blocks its prompt needs under the method (selected tokens, encoded, residual window reserved) plus
  a watermark of one block per layer for every running sequence's next growth. Methods that evict
  while decoding hold their budget (their sequences stop growing); the others grow by their bytes
  per token, which the per-step plan accounts exactly. FCFS: a request that does not fit blocks the
  ones behind it (no overtaking). At most ``max_prefill_tokens`` prompt tokens are prefilled per step
  (at least one request), so decoding sequences are not starved by a burst of arrivals.
- **Preemption by recompute**: when a decode step needs more blocks than are free, the youngest
  running sequence (last admitted) loses all its blocks and goes back to the head of the waiting
  queue; when re-admitted it prefills prompt + generated tokens and continues.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kvshrink.engine.attention import StepPlan
from kvshrink.engine.pool import KVStore
from kvshrink.engine.types import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    arrival: float = field(default_factory=time.perf_counter)
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

    @property
    def context(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, store: KVStore, max_batch: int, max_prefill_tokens: int):
        self.store = store
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self._order = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues and give its blocks back."""
        if req in self.running:
            self.running.remove(req)
        try:
            self.waiting.remove(req)
        except ValueError:
            pass
        if req.slot is not None:
            self.store.close_slot(req.slot)
            req.slot = None

    def admit(self) -> tuple[list[Request], list[Request]]:
        """Requests to prefill this step (now running, slots open), and requests that can never fit."""
        st = self.store
        out: list[Request] = []
        never: list[Request] = []
        budget = self.max_prefill_tokens
        promised = 0  # blocks the requests admitted in this loop will take at prefill
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            n = len(req.context)
            if out and n > budget:
                break
            prompt_blocks = st.blocks_for_prompt(n)
            need = prompt_blocks + st.L * len(self.running)
            if prompt_blocks + st.L > st.num_blocks:  # grown past what the pool can ever hold
                self.waiting.popleft()
                never.append(req)
                continue
            if need > st.pool.num_free - promised or not st._free_slots:
                break
            promised += prompt_blocks - st.residual_blocks  # open_slot takes the residual blocks now
            self.waiting.popleft()
            req.slot = st.open_slot()
            self._order += 1
            req.order = self._order
            self.running.append(req)
            out.append(req)
            budget -= n
        return out, never

    def preempt(self, req: Request) -> None:
        self.remove(req)
        req.new_tokens = []
        self.waiting.appendleft(req)
        self.preemptions += 1

    def plan_decode(self, batch: list[Request]) -> tuple[list[Request], StepPlan | None, list[Request]]:
        """Blocks for one decode step of ``batch``; preempts the youngest running sequences until they
        fit. Returns (batch, plan, requests that cannot grow even alone)."""
        st = self.store
        stuck: list[Request] = []
        while batch:
            plan = StepPlan(st, [r.slot for r in batch], new_token=True)
            need = int(plan.blocks_needed().sum())
            if need <= st.pool.num_free:
                plan.allocate()
                return batch, plan, stuck
            victim = max(self.running, key=lambda r: r.order)
            if len(self.running) == 1:  # alone and still no room: it can never grow
                stuck.append(victim)
                self.remove(victim)
                batch = [r for r in batch if r is not victim]
                continue
            self.preempt(victim)
            batch = [r for r in batch if r is not victim]
        return batch, None, stuck
