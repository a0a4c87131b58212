"""Who runs next: continuous batching, first come first served. Imports only the pool.

Each step, in this order (as vLLM's scheduler: running sequences first, then the queue):
- **Decode** every running sequence: the pool is asked for the blocks one more token takes
  (``KVStore.plan_growth`` then ``allocate``: a plan, or a refusal). On a refusal the youngest running
  sequence (last admitted) is *preempted by recompute*: it gives back every block and goes to the
  head of the queue; when re-admitted it prefills prompt + generated tokens and continues. A sequence
  that cannot grow even alone finishes with ``length``.
- **Admit** from the head of the queue while a slot is free and the pool holds the blocks the prompt
  takes under the method (selected tokens, encoded, residual window reserved) plus a watermark of
  one block per layer for every running sequence's next growth. Methods that evict while decoding
  hold their budget (their sequences stop growing); the others grow by their bytes per token. FCFS:
  a request that does not fit blocks the ones behind it (no overtaking). At most
  ``max_prefill_tokens`` prompt tokens are admitted per step (at least one request).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from kvshrink.engine.pool import Growth, KVStore
from kvshrink.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    decode: list[Request] = field(default_factory=list)  # one token each, blocks taken (``growth``)
    growth: Growth | None = None
    prefill: list[Request] = field(default_factory=list)  # admitted: slot open, prompt blocks taken
    too_long: list[Request] = field(default_factory=list)  # can never fit the pool: to finish


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

    def preempt(self, req: Request) -> None:
        self.remove(req)
        req.new_tokens = []
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._schedule_decode(out)
        self._admit(out)
        return out

    def _schedule_decode(self, out: SchedulerOutput) -> None:
        st = self.store
        batch = list(self.running)
        while batch:
            growth = st.plan_growth(torch.tensor([r.slot for r in batch]))
            if st.allocate(growth):
                out.decode, out.growth = batch, growth
                return
            victim = max(self.running, key=lambda r: r.order)
            if len(self.running) == 1:  # alone and still no room: it can never grow
                self.remove(victim)
                out.too_long.append(victim)
            else:
                self.preempt(victim)
            batch = [r for r in batch if r is not victim]

    def _admit(self, out: SchedulerOutput) -> None:
        st = self.store
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            n = len(req.context)
            if out.prefill and n > budget:
                break
            if st.blocks_for_prompt(n) + st.L > st.num_blocks:  # grown past what the pool can ever hold
                self.waiting.popleft()
                out.too_long.append(req)
                continue
            slot = st.open_slot(n, keep_free=st.L * len(self.running))
            if slot is None:
                break
            self.waiting.popleft()
            req.slot, req.status = slot, RequestStatus.RUNNING
            self._order += 1
            req.order = self._order
            self.running.append(req)
            out.prefill.append(req)
            budget -= n
