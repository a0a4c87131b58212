"""TEST DOUBLE: a minimal stand-in with the engine's step API (kvshrink/engine), used only where the
real engine is not available. It generates a fixed cyclic text token by token and accounts blocks
like a paged pool, so the server's admission, cancellation and metrics can be tested without a model.
It is not an engine: no model runs here."""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from kvshrink.engine.types import EngineStats, RequestOutput

CYCLE = "hello world, the quick brown fox jumps. "


class FakeEngine:
    def __init__(self, tokenizer, num_blocks: int = 64, block_size: int = 4, max_batch: int = 4,
                 step_s: float = 0.002, eos_after: int | None = None):
        self.tok = tokenizer
        self.cycle = tokenizer(CYCLE, add_special_tokens=False).input_ids
        self.eos = tokenizer.eos_token_id
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_batch = max_batch
        self.step_s = step_s
        self.eos_after = eos_after
        self.lock = threading.Lock()
        self.waiting: deque = deque()
        self.running: dict[str, dict] = {}
        self.used = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.fail_next_step = False
        self.model = None
        self._n = 0

    def _blocks(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def max_prompt_tokens(self) -> int:
        return self.num_blocks * self.block_size - 1

    def add_request(self, prompt_token_ids, sampling, request_id=None) -> str:
        if len(prompt_token_ids) > self.max_prompt_tokens():
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens can never fit")
        with self.lock:
            self._n += 1
            rid = request_id or f"r{self._n}"
            self.waiting.append({"id": rid, "prompt": list(prompt_token_ids), "sp": sampling, "out": [],
                                 "blocks": 0})
            return rid

    def abort(self, request_id) -> None:
        with self.lock:
            self.waiting = deque(r for r in self.waiting if r["id"] != request_id)
            r = self.running.pop(request_id, None)
            if r is not None:
                self.used -= r["blocks"]

    def has_unfinished(self) -> bool:
        with self.lock:
            return bool(self.waiting or self.running)

    def stats(self) -> EngineStats:
        with self.lock:
            bs = self.used * self.block_size * 64
            return EngineStats(running=len(self.running), waiting=len(self.waiting), kv_bytes_used=bs,
                               kv_bytes_total=self.num_blocks * self.block_size * 64, blocks_used=self.used,
                               blocks_free=self.num_blocks - self.used, preemptions=0, compression=1.0,
                               prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)
        with self.lock:
            if self.fail_next_step:
                self.fail_next_step = False
                raise RuntimeError("injected step failure")
            while self.waiting and len(self.running) < self.max_batch:
                r = self.waiting[0]
                need = self._blocks(len(r["prompt"]) + 1)
                if self.used + need > self.num_blocks:
                    break
                self.waiting.popleft()
                r["blocks"] = need
                self.used += need
                self.prompt_tokens += len(r["prompt"])
                self.running[r["id"]] = r
            outs = []
            for rid, r in list(self.running.items()):
                sp = r["sp"]
                k = len(r["out"])
                tok = self.cycle[k % len(self.cycle)]
                if self.eos_after is not None and k == self.eos_after and not sp.ignore_eos:
                    tok = self.eos
                r["out"].append(tok)
                self.generation_tokens += 1
                need = self._blocks(len(r["prompt"]) + len(r["out"]) + 1)
                if need > r["blocks"]:
                    self.used += need - r["blocks"]
                    r["blocks"] = need
                reason = None
                if tok in sp.stop_token_ids:
                    reason = "stop"
                elif len(r["out"]) >= sp.max_tokens:
                    reason = "length"
                if reason:
                    self.used -= r["blocks"]
                    del self.running[rid]
                outs.append(RequestOutput(rid, [tok], reason is not None, reason, len(r["prompt"]), len(r["out"])))
            return outs
