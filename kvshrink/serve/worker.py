"""The engine loop thread and its bridge to asyncio.

One background thread owns the engine: it adds and aborts requests and calls ``engine.step()`` in a
loop. The HTTP side never touches the engine: it posts commands to a thread-safe inbox and awaits the
step outputs of its request on an ``asyncio.Queue`` that the thread fills with
``loop.call_soon_threadsafe``. So a slow step never blocks the event loop, and a request handler never
waits for the engine's lock.

Admission is bounded: ``submit`` refuses (``QueueFull``) when ``max_waiting`` requests already wait —
queued in the inbox or in the engine's waiting queue. An exception in ``step()`` fails the requests
in flight (each gets an error output) and the loop goes on; the thread only ends on ``stop()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("kvshrink.serve")


class QueueFull(Exception):
    """The waiting queue is full; retry later."""


@dataclass
class ErrorOutput:
    """Stands in for a RequestOutput when the worker fails a request itself."""

    request_id: str
    error: str
    new_token_ids: list = field(default_factory=list)
    finished: bool = True
    finish_reason: str = "error"
    prompt_tokens: int = 0
    output_tokens: int = 0


class RequestStream:
    """The async side of one request: step outputs arrive on ``queue``."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.added: asyncio.Future = loop.create_future()  # resolves once the engine accepted it
        self.finished = False

    def _push(self, out) -> None:
        self.queue.put_nowait(out)

    def _accepted(self, exc: BaseException | None) -> None:
        if self.added.done():
            return
        if exc is None:
            self.added.set_result(True)
        else:
            self.added.set_exception(exc)


class EngineWorker:
    def __init__(self, engine, max_waiting: int = 256, idle_wait_s: float = 0.05):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.idle_wait_s = idle_wait_s
        self._inbox: deque = deque()
        self._lock = threading.Lock()  # guards _inbox, _queued_adds, _engine_waiting, _streams
        self._queued_adds = 0
        self._engine_waiting = 0
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = None  # the engine's latest EngineStats, refreshed by the thread
        self.step_errors = 0
        self.steps = 0
        self.on_stats = None  # optional callback(stats) from the worker thread
        self.on_step = None  # optional callback(seconds) after each engine step, from the worker thread
        self._refresh_stats()

    # ------------------------------------------------------------------ async side (event loop thread)
    def submit(self, prompt_ids: list[int], sampling, loop: asyncio.AbstractEventLoop) -> RequestStream:
        rid = uuid.uuid4().hex
        stream = RequestStream(rid, loop)
        with self._lock:
            if self._stop.is_set():
                raise QueueFull("the server is shutting down")
            if self._queued_adds + self._engine_waiting >= self.max_waiting:
                raise QueueFull(f"{self._queued_adds + self._engine_waiting} requests are already waiting "
                                f"(--max-waiting {self.max_waiting})")
            self._queued_adds += 1
            self._streams[rid] = stream
            self._inbox.append(("add", rid, list(prompt_ids), sampling))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request (client gone, stop string seen...). Safe to call twice or after it ended."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.finished = True
            self._inbox.append(("abort", request_id, None, None))
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return self._queued_adds + self._engine_waiting

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvshrink-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything still in flight and end the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------ worker thread
    def _deliver(self, stream: RequestStream, out) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream._push, out)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            pass

    def _resolve_add(self, stream: RequestStream, exc: BaseException | None) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream._accepted, exc)
        except RuntimeError:
            pass

    def _refresh_stats(self) -> None:
        try:
            st = self.engine.stats()
        except Exception:  # stats are best effort
            log.exception("engine.stats() failed")
            return
        self.stats = st
        with self._lock:
            self._engine_waiting = int(getattr(st, "waiting", 0))
        if self.on_stats is not None:
            try:
                self.on_stats(st)
            except Exception:
                log.exception("stats callback failed")

    def _handle_commands(self) -> None:
        with self._lock:
            cmds = list(self._inbox)
            self._inbox.clear()
        adds = 0
        for kind, rid, prompt_ids, sampling in cmds:
            if kind == "add":
                adds += 1
                with self._lock:
                    stream = self._streams.get(rid)
                if stream is None:  # aborted before it reached the engine
                    continue
                try:
                    self.engine.add_request(prompt_ids, sampling, request_id=rid)
                except Exception as e:  # ValueError: can never fit; anything else: fail this request only
                    with self._lock:
                        self._streams.pop(rid, None)
                    self._resolve_add(stream, e)
                    continue
                self._resolve_add(stream, None)
            else:
                try:
                    self.engine.abort(rid)
                except Exception:  # unknown or finished id
                    pass
        if cmds:
            st = None
            try:
                st = self.engine.stats()
            except Exception:
                log.exception("engine.stats() failed")
            with self._lock:
                self._queued_adds -= adds
                if st is not None:
                    self._engine_waiting = int(getattr(st, "waiting", 0))
            if st is not None:
                self.stats = st
                if self.on_stats is not None:
                    try:
                        self.on_stats(st)
                    except Exception:
                        log.exception("stats callback failed")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            streams = list(self._streams.items())
            self._streams.clear()
        for rid, stream in streams:
            try:
                self.engine.abort(rid)
            except Exception:
                pass
            self._deliver(stream, ErrorOutput(rid, message))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._handle_commands()
                busy = self.engine.has_unfinished()
            except Exception:
                log.exception("engine loop error")
                busy = False
            if not busy:
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                outs = self.engine.step()
                self.steps += 1
            except Exception as e:
                self.step_errors += 1
                log.exception("engine.step() failed; failing the requests in flight")
                self._fail_all(f"internal error in the engine step: {type(e).__name__}: {e}")
                time.sleep(0.01)
                continue
            if self.on_step is not None:  # outside the step's try: a metrics fault fails no request
                try:
                    self.on_step(time.perf_counter() - t0)
                except Exception:
                    log.exception("step callback failed")
            for out in outs or ():
                with self._lock:
                    stream = self._streams.get(out.request_id)
                    if stream is not None and out.finished:
                        self._streams.pop(out.request_id, None)
                if stream is not None:
                    self._deliver(stream, out)
            self._refresh_stats()
        # shutting down: abort whatever is left so the pool is empty
        self._handle_commands()
        self._fail_all("the server shut down before the request finished")
        self._refresh_stats()
