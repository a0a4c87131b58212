"""Who runs next: continuous batching, first come first served. Imports only the pool.

Each step, in this order (as vLLM's scheduler: running sequences first, then the queue):
- **Decode** every running sequence whose prefill is done: the pool is asked for the blocks one more
  token takes (``KVStore.plan_growth`` then ``allocate``: a plan, or a refusal). On a refusal the
  youngest running sequence (last admitted) is *preempted by recompute*: it gives back every block
  and goes to the head of the queue; when re-admitted it prefills prompt + generated tokens and
  continues. A sequence that cannot grow even alone finishes with ``length``.
- **Continue** the prompts in flight (chunked prefill: admitted, not yet wholly prefilled), oldest
  first, within the step's ``max_prefill_tokens``.
- **Admit** from the head of the queue while a slot is free and the pool holds the blocks the prompt
  takes under the method (selected tokens, encoded, residual window reserved) plus a watermark of
  one block per layer for every running sequence's next growth. Methods that evict while decoding
  hold their budget (their sequences stop growing); the others grow by their bytes per token. FCFS:
  a request that does not fit blocks the ones behind it (no overtaking). A prompt's blocks are all
  taken at admission, whether it then runs whole or in chunks.

``max_prefill_tokens`` bounds the prompt tokens of a step. Chunked (the default): the last prompt
admitted takes what is left of it and continues in the next steps, so a step's cost is bounded and
a long prompt never stalls the decoding sequences. Unchunked: prompts are admitted whole while they
fit, at least one per step. A prompt's token is sampled in the step its last chunk runs
(``SchedulerOutput.prefill``). The scheduler advances ``Request.prefilled`` as it plans (as vLLM's
``num_computed_tokens``), so a prompt in flight is never in the decode batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from kvshrink.engine.pool import Growth, KVStore
from kvshrink.engine.request import Request, RequestStatus


@dataclass
class PrefillChunk:
    """Context tokens ``[start, end)`` of ``req``'s prefill (of ``req.prefill_len`` tokens) run this step."""

    req: Request
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == self.req.prefill_len


@dataclass
class SchedulerOutput:
    decode: list[Request] = field(default_factory=list)  # one token each, blocks taken (``growth``)
    growth: Growth | None = None
    chunks: list[PrefillChunk] = field(default_factory=list)  # the step's prefill work, in order
    prefill: list[Request] = field(default_factory=list)  # prefill ends this step: they sample a token
    too_long: list[Request] = field(default_factory=list)  # can never fit the pool: to finish


class Scheduler:
    def __init__(self, store: KVStore, max_batch: int, max_prefill_tokens: int, chunked: bool = True):
        self.store = store
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.chunked = chunked
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self._order = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues and give its blocks back (and a split prompt's staging)."""
        req.staging, req.prefilled, req.prefill_len = None, 0, 0
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
        budget = self._continue(out, self.max_prefill_tokens)
        self._admit(out, budget)
        out.prefill = [c.req for c in out.chunks if c.last]
        return out

    def _schedule_decode(self, out: SchedulerOutput) -> None:
        st = self.store
        batch = [r for r in self.running if not r.prefilling]
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

    def _chunk(self, out: SchedulerOutput, req: Request, budget: int) -> int:
        """Plan the next chunk of ``req`` (all of what is left, unchunked); returns the budget left."""
        n = req.prefill_len - req.prefilled
        if self.chunked:
            n = min(n, budget)
        out.chunks.append(PrefillChunk(req, req.prefilled, req.prefilled + n))
        req.prefilled += n
        return budget - n

    def _continue(self, out: SchedulerOutput, budget: int) -> int:
        for req in sorted((r for r in self.running if r.prefilling), key=lambda r: r.order):
            if budget <= 0:
                break
            budget = self._chunk(out, req, budget)
        return budget

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        st = self.store
        while self.waiting and len(self.running) < self.max_batch and (budget > 0 or not out.chunks):
            req = self.waiting[0]
            n = len(req.context)
            if out.chunks and n > budget and not self.chunked:
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
            req.prefill_len, req.prefilled = n, 0
            self._order += 1
            req.order = self._order
            self.running.append(req)
            budget = self._chunk(out, req, budget)
