"""The engine API: add requests, step, read outputs. One background thread may call ``step()`` in a
loop while others call ``add_request``/``abort`` (a lock guards the state; an exception inside a step
fails the requests it concerns with ``finish_reason="error"``, never the engine).

Differences from the HF path (``kvshrink.compress``), each bounded by a test in tests/engine:
- selectors that evict while decoding (H2O, StreamingLLM) evict lazily: the cache of a layer grows to
  ``hold + evict_every`` tokens and is then cut back to ``hold`` in one selection (the HF path cuts
  one token per step). ``evict_every=1`` reproduces the HF path; the default is ``block_size``.

A step is schedule (``Scheduler.schedule``: blocks for the decoding sequences, then prefill chunks of
the prompts in flight and of admissions) -> execute (``ModelRunner.forward``: one packed forward of
the decode tokens and every prefill chunk; with ``chunked_prefill=False``, one for the decode batch
and one per admitted prompt) -> update (counters, sampling, eviction, outputs). A prompt split into
chunks (prefill) gives the same tokens as run whole, up to floating-point summation order.
- everything else (selection at the end of prefill, codec stream policies, H2O's accumulated scores)
  follows the HF path exactly; results differ only by floating-point summation order.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid

import torch

from kvshrink.engine.batch import DecodeBatch, PrefillSegment, PrefillStaging
from kvshrink.engine.config import EngineConfig
from kvshrink.engine.eviction import evict_due
from kvshrink.engine.linear import PackedLinears, packing_available
from kvshrink.engine.pool import KVStore
from kvshrink.engine.request import Request, RequestStatus
from kvshrink.engine.runner import ModelRunner
from kvshrink.engine.scheduler import PrefillChunk, Scheduler, SchedulerOutput
from kvshrink.engine.timers import reset_timers, timed, timers
from kvshrink.engine.types import EngineStats, RequestOutput, SamplingParams
from kvshrink.methods import CompressionMethod, parse

__all__ = ["Engine", "EngineConfig", "reset_timers", "timers"]


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class Engine:
    def __init__(self, model, tokenizer=None, method: str | CompressionMethod = "full",
                 kv_memory: int | str = "1GiB", block_size: int = 32, max_batch: int = 256,
                 max_prefill_tokens: int = 4096, device=None, evict_every: int | None = None,
                 config: EngineConfig | None = None, chunked_prefill: bool = True,
                 packed_linear: bool = True, paged_kernels: bool = True):
        self.method = parse(method)
        cfg = config or EngineConfig(kv_memory=kv_memory, block_size=block_size, max_batch=max_batch,
                                     max_prefill_tokens=max_prefill_tokens, evict_every=evict_every,
                                     chunked_prefill=chunked_prefill, packed_linear=packed_linear,
                                     paged_kernels=paged_kernels)
        self.cfg = cfg = cfg.resolved(self.method.codec)
        if device is not None:
            model = model.to(device)
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.block_size, self.evict_every = cfg.block_size, cfg.evict_every
        self.store = KVStore(self.config, self.method, cfg.kv_memory, cfg.block_size, cfg.max_batch, self.dtype,
                             self.device, paged_kernels=cfg.paged_kernels)
        linears = PackedLinears(model, min(cfg.max_batch, 64)) \
            if cfg.packed_linear and packing_available(self.device) else None
        self.runner = ModelRunner(model, self.store, linears)
        self.scheduler = Scheduler(self.store, min(cfg.max_batch, self.store.max_slots), cfg.max_prefill_tokens,
                                   chunked=cfg.chunked_prefill)
        self.max_context = int(getattr(self.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos = _eos_ids(model, tokenizer)
        self._lock = threading.RLock()
        self._requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self._ids = itertools.count()
        self._prompt_tokens = 0
        self._gen_tokens = 0
        self._evictions = 0
        self._max_prompt: int | None = None

    # ------------------------------------------------------------------------------------- API
    def max_prompt_tokens(self) -> int:
        """The longest prompt that can ever be admitted (pool and model context)."""
        if self._max_prompt is None:
            st = self.store
            lo, hi = 0, self.max_context - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if st.blocks_for_prompt(mid) + st.L <= st.num_blocks:
                    lo = mid
                else:
                    hi = mid - 1
            self._max_prompt = lo
        return self._max_prompt

    def add_request(self, prompt_token_ids: list[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        sampling = sampling or SamplingParams()
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError("prompt_token_ids must not be empty")
        if len(ids) > self.max_prompt_tokens():
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the maximum of {self.max_prompt_tokens()} "
                             f"(KV pool of {self.store.bytes_total} bytes under {self.method.spec}, model context "
                             f"{self.max_context})")
        vocab = getattr(self.config, "vocab_size", None)
        if vocab and (min(ids) < 0 or max(ids) >= vocab):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        with self._lock:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
            if rid in self._requests:
                raise ValueError(f"request_id {rid!r} already in use")
            req = Request(rid, ids, sampling)
            if sampling.temperature > 0:
                req.generator = torch.Generator(device=self.device)
                req.generator.manual_seed(sampling.seed if sampling.seed is not None else
                                          int(torch.randint(0, 2**62, (1,)).item()))
            self._requests[rid] = req
            self.scheduler.add(req)
            return rid

    def abort(self, request_id: str) -> None:
        with self._lock, torch.inference_mode():  # the store's tensors are inference tensors
            req = self._requests.get(request_id)
            if req is None or req.finished:
                return
            self.scheduler.remove(req)
            self._finish(req, "abort")
            self._pending.append(self._output(req))

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self.scheduler.waiting or self.scheduler.running or self._pending)

    def stats(self) -> EngineStats:
        with self._lock:
            st = self.store
            # against what an fp cache would hold for the running sequences' whole contexts, so that
            # evicted tokens count as saved (the last token's KV is written by the next step)
            # (per layer type: a sliding layer's fp cache holds its window)
            fp = sum(st.fp_bytes(len(r.prompt) + max(len(r.output) - 1, 0))
                     for r in self.scheduler.running if r.slot is not None)
            used = st.bytes_used
            return EngineStats(
                running=len(self.scheduler.running), waiting=len(self.scheduler.waiting), kv_bytes_used=used,
                kv_bytes_total=st.bytes_total, blocks_used=st.pool.num_used, blocks_free=st.pool.num_free,
                preemptions=self.scheduler.preemptions, compression=(fp / used) if used and fp else 1.0,
                prompt_tokens=self._prompt_tokens, generation_tokens=self._gen_tokens, evictions=self._evictions,
            )

    def step(self) -> list[RequestOutput]:
        with self._lock, torch.inference_mode():
            outputs, self._pending = self._pending, []
            with timed("schedule"):
                plan = self.scheduler.schedule()
            touched = self._execute(plan)
            return outputs + self._update(touched)

    def _execute(self, plan: SchedulerOutput) -> list[Request]:
        """The step's forwards (one, packed; unchunked: decode, then one per prompt); returns every
        request the step touched."""
        touched = list(plan.too_long)
        for req in plan.too_long:
            self._finish(req, "length", "sequence grew beyond what the KV pool can hold")
        with self.runner.attention():
            if self.cfg.chunked_prefill:
                parts = [(plan.decode, plan.chunks)] if plan.decode or plan.chunks else []
            else:
                parts = ([(plan.decode, [])] if plan.decode else []) + [([], [c]) for c in plan.chunks]
            for decode, chunks in parts:
                touched += decode + [c.req for c in chunks]
                self._forward(plan, decode, chunks)
        return touched

    def _forward(self, plan: SchedulerOutput, decode: list[Request], chunks: list[PrefillChunk]) -> None:
        """One forward of ``decode`` (one token each) and prefill ``chunks``, then sampling where a
        token is due (every decode row; a prompt whose last chunk ran) and eviction. An error fails
        the forward's requests, never the engine."""
        done = [c.req for c in chunks if c.last]
        try:
            with timed("mixed" if decode and chunks else "decode" if decode else "prefill"):
                ids = [r.output[-1] for r in decode]
                pos = [len(r.context) - 1 for r in decode]
                segments, keep = [], list(range(len(decode)))
                for c in chunks:
                    r = c.req
                    if r.staging is None and not (c.start == 0 and c.last):  # a split prompt's first chunk
                        r.staging = PrefillStaging(self.store, r.prefill_len)
                    segments.append(PrefillSegment(r.slot, c.start, c.end, r.prefill_len, len(ids), r.staging))
                    ids += r.context[c.start : c.end]
                    pos += range(c.start, c.end)
                    if c.last:
                        keep.append(len(ids) - 1)
                batch = DecodeBatch(self.store, plan.growth) if decode else None
                logits = self.runner.forward(batch, segments, ids, pos, keep)
            if decode:
                self.store.advance(plan.growth)
            self._prompt_tokens += sum(c.end - c.start for c in chunks)
            for r in done:
                r.prefills += 1
                r.staging = None  # stored in the pool now
            with timed("sample"):
                tokens = self._sample(decode + done, logits)
            for r, t in zip(decode + done, tokens):
                self._accept(r, t)
            with timed("compact"):
                alive = [r.slot for r in decode if not r.finished]
                if alive:
                    self._evictions += evict_due(self.store, torch.tensor(alive), self.evict_every)
        except Exception as e:  # noqa: BLE001 - the forward's requests fail, never the engine
            for r in decode + [c.req for c in chunks]:
                self.scheduler.remove(r)
                self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _update(self, touched: list[Request]) -> list[RequestOutput]:
        """Free what finished; one output per request that produced tokens or finished."""
        outputs, seen = [], set()
        for req in touched:
            if req.finished and req.slot is not None:
                self.scheduler.remove(req)
        for req in touched:
            if req.request_id in seen or (not req.new_tokens and not req.finished):
                continue
            seen.add(req.request_id)
            outputs.append(self._output(req))
        return outputs

    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams] | None = None) -> list[dict]:
        """Run prompts (token id lists, or strings with a tokenizer) to completion."""
        if sampling is None:
            sampling = SamplingParams()
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one")
        ids = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer")
                p = self.tokenizer(p)["input_ids"]
            ids.append(list(p))
        with self._lock:
            rids = [self.add_request(p, s) for p, s in zip(ids, params)]
            reqs = [self._requests[r] for r in rids]
        while any(not r.finished for r in reqs):
            self.step()
        out = []
        for r in reqs:
            d = {
                "request_id": r.request_id, "token_ids": list(r.output), "finish_reason": r.finish_reason,
                "prompt_tokens": len(r.prompt), "output_tokens": len(r.output),
                "ttft_s": (r.first_token_time - r.arrival) if r.first_token_time else None,
                "e2e_s": (r.finish_time - r.arrival) if r.finish_time else None, "error": r.error,
            }
            if self.tokenizer is not None:
                d["text"] = self.tokenizer.decode(r.output, skip_special_tokens=True)
            out.append(d)
        return out

    # ------------------------------------------------------------------------------- internals
    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.staging = None
        if req.finish_reason is None:
            req.finish_reason, req.error = reason, error
            req.finish_time = time.perf_counter()
            req.status = RequestStatus.FINISHED

    def _output(self, req: Request) -> RequestOutput:
        out = RequestOutput(req.request_id, list(req.new_tokens), req.finished, req.finish_reason, len(req.prompt),
                            len(req.output), req.error)
        req.new_tokens = []
        if req.finished:
            self._requests.pop(req.request_id, None)
        return out

    def _accept(self, req: Request, tok: int) -> None:
        req.output.append(tok)
        req.new_tokens.append(tok)
        self._gen_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        sp = req.sampling
        if (not sp.ignore_eos and tok in self.eos) or tok in sp.stop_token_ids:
            self._finish(req, "stop")
        elif len(req.output) >= sp.max_tokens or len(req.context) >= self.max_context:
            self._finish(req, "length")

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        toks = logits.argmax(-1).tolist()
        for i, r in enumerate(reqs):
            sp = r.sampling
            if sp.temperature <= 0:
                continue
            x = logits[i] / sp.temperature
            probs = torch.softmax(x, -1)
            if sp.top_p < 1.0:
                sp_probs, idx = probs.sort(descending=True)
                cum = sp_probs.cumsum(-1)
                cut = cum - sp_probs > sp.top_p
                sp_probs[cut] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, idx, sp_probs)
            toks[i] = int(torch.multinomial(probs, 1, generator=r.generator).item())
        return toks
