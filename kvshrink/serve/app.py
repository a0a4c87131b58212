"""The OpenAI-compatible HTTP server: ``create_app`` builds a FastAPI app around one engine; ``serve``
loads a model and runs it under uvicorn.

Routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models`` (all behind ``--api-key`` when
given), ``/health``, ``/metrics``. Request handling never calls the engine: it goes through the
``EngineWorker`` inbox (worker.py). Text is detokenised incrementally here; a stop string ends the
request (trimmed from the text, finish_reason "stop") and aborts it in the engine. In a stream the
last ``len(longest stop) - 1`` characters are held back so no part of a stop string is ever sent.
A client that goes away (checked while waiting for tokens) aborts its request at once.

Client input is validated by the models in protocol.py and turned into ids only by its
``encode_prompt``/``encode_chat``, so a bad request is a 4xx naming the field; a 5xx means a server
fault, answered by ``_AnswerErrors`` without dropping the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvshrink.serve.metrics import ServerMetrics
from kvshrink.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    encode_chat,
    encode_prompt,
    error_body,
    validation_message,
)
from kvshrink.serve.worker import EngineWorker, QueueFull

log = logging.getLogger("kvshrink.serve")
DISCONNECT_POLL_S = 0.25
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop_token_ids", "ignore_eos")


# ----------------------------------------------------------------------------------- detokenisation
class TextStream:
    """Incremental detokenisation with stop strings.

    Decodes a short window of ids (from the previous read offset) and appends what the window adds,
    so each step costs O(new tokens), and an incomplete UTF-8 sequence (``\\ufffd`` at the end) waits
    for the next token.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tok = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""
        self.sent = 0
        self.stopped = False

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if ids else ""

    def add(self, new_ids: list[int]) -> None:
        if self.stopped or not new_ids:
            return
        self.ids.extend(int(i) for i in new_ids)
        before = self._decode(self.ids[self.prefix:self.read])
        window = self._decode(self.ids[self.prefix:])
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return
        search_from = max(0, len(self.text) - self.hold)
        self.text += window[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self._check_stop(search_from)

    def _check_stop(self, search_from: int) -> None:
        if not self.stops:
            return
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def finish(self) -> None:
        """Flush bytes still held for an incomplete character."""
        if self.stopped or self.read == len(self.ids):
            return
        full = self._decode(self.ids)
        if full.startswith(self.text) and len(full) > len(self.text):
            search_from = max(0, len(self.text) - self.hold)
            self.text = full
            self._check_stop(search_from)

    def take(self, final: bool = False) -> str:
        """The text not yet sent that is safe to send."""
        end = len(self.text) if (final or self.stopped) else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta


# ------------------------------------------------------------------------------------------ errors
class _ErrorResponse(JSONResponse):
    """Error bodies as ASCII JSON: a message may quote client text, and a character UTF-8 cannot
    encode (a lone surrogate) must not make the error itself fail."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


class _AnswerErrors:
    """Catch-all for genuine server faults (client input never gets here). Starlette runs a handler for
    ``Exception`` in its outermost middleware, which answers and then re-raises: uvicorn logs the
    traceback again and closes the connection, so the client's next request on it goes unanswered.
    Inside that layer, this answers 500 with one logged traceback and returns, keeping the connection."""

    def __init__(self, app, on_error=None):
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.exception("request failed: %s %s", scope.get("method"), scope.get("path"))
            if self.on_error is not None:
                self.on_error()
            if started:  # part of a response went out: nothing valid can follow it on this connection
                return
            body = error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", None, "internal_error")
            await _ErrorResponse(body, status_code=500)(scope, receive, send)


def _body_error(exc: StarletteHTTPException) -> tuple[str, str | None]:
    """FastAPI answers a body it could not parse (other than a JSON syntax error) with a bare 400 whose
    cause says why; name it."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return str(exc.detail), None
    if isinstance(cause, RecursionError):
        return "the JSON body is nested too deeply to parse", "invalid_json"
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8: {cause.reason} at byte {cause.start}", "invalid_json"
    return f"the body could not be parsed: {type(cause).__name__}", "invalid_json"


# ------------------------------------------------------------------------------------------ the app
def _sampling_error(e: ValueError) -> APIError:
    msg = str(e)
    param = next((f for f in _SAMPLING_FIELDS if f in msg), None)
    return bad_request(msg, param)


def _eos_ids(tokenizer, model) -> tuple[int, ...]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(getattr(model, "config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return tuple(sorted(ids))


def create_app(
    engine,
    tokenizer,
    model_name: str = "kvshrink",
    method: str = "full",
    max_waiting: int = 256,
    api_key: str | None = None,
    context_len: int | None = None,
    sampling_cls=None,
    grace_s: float = 30.0,
) -> FastAPI:
    """A FastAPI app serving ``engine``. The engine's worker thread starts with the app's lifespan
    and stops (aborting what is left) when the app shuts down."""
    if sampling_cls is None:
        from kvshrink.engine.types import SamplingParams as sampling_cls  # noqa: N813
    model = getattr(engine, "model", None)
    if context_len is None:
        cfg = getattr(model, "config", None)
        context_len = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 2048
    eos_ids = _eos_ids(tokenizer, model)
    vocab_size = len(tokenizer)
    try:
        pool_prompt_limit = int(engine.max_prompt_tokens())
    except Exception:
        pool_prompt_limit = context_len
    worker = EngineWorker(engine, max_waiting=max_waiting)
    metrics = ServerMetrics(lambda: worker.stats, model_name=model_name, method=method)
    worker.on_step = metrics.step.observe
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            app.state.draining = True
            await asyncio.get_running_loop().run_in_executor(None, worker.stop, grace_s)

    app = FastAPI(title="kvshrink", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_AnswerErrors, on_error=lambda: metrics.rejected.labels("500").inc())
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.draining = False
    app.state.model_name = model_name

    # ---------------------------------------------------------------- errors: OpenAI-style bodies
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.status >= 400:
            metrics.rejected.labels(str(exc.status)).inc()
        return _ErrorResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        msg, param = validation_message(list(exc.errors()))
        metrics.rejected.labels("400").inc()
        code = "invalid_json" if param is None and msg.startswith("malformed") else "invalid_value"
        return _ErrorResponse(error_body(msg, "invalid_request_error", param, code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg, code = _body_error(exc)
        if code is not None:
            metrics.rejected.labels("400").inc()
        return _ErrorResponse(error_body(msg, "invalid_request_error", None, code),
                              status_code=exc.status_code, headers=getattr(exc, "headers", None))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # --------------------------------------------------------------------------- plain routes
    @app.get("/health")
    async def health():
        if not worker.alive:
            return JSONResponse({"status": "starting" if worker._thread is None else "dead"}, status_code=503)
        return {"status": "draining" if app.state.draining else "ok"}

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kvshrink", "root": model_name,
                                            "max_model_len": context_len}]}

    # --------------------------------------------------------------------------- generation
    def make_sampling(req, prompt_len: int, default_max: int, prompt_param: str):
        max_tokens = req.max_tokens
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        if prompt_len == 0:
            raise bad_request("the prompt is empty", prompt_param)
        if prompt_len >= context_len:
            raise bad_request(f"the prompt has {prompt_len} tokens; this model's maximum context length is "
                              f"{context_len} tokens", prompt_param, code="context_length_exceeded")
        if prompt_len > pool_prompt_limit:
            raise bad_request(f"the prompt has {prompt_len} tokens but the KV pool holds at most "
                              f"{pool_prompt_limit} tokens of one request", prompt_param,
                              code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = default_max if default_max > 0 else context_len - prompt_len
            max_tokens = min(max_tokens, context_len - prompt_len)
        elif prompt_len + max_tokens > context_len:
            field = "max_completion_tokens" if (isinstance(req, ChatCompletionRequest)
                                                and req.max_completion_tokens is not None) else "max_tokens"
            raise bad_request(f"this model's maximum context length is {context_len} tokens; you requested "
                              f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} for the "
                              f"completion)", field, code="context_length_exceeded")
        stop_ids = tuple(req.stop_token_ids or ())
        bad = [t for t in stop_ids if t >= vocab_size]
        if bad:  # an id the engine can never produce; refused here, before it can reach a tensor
            raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "stop_token_ids")
        if not req.ignore_eos:
            stop_ids = tuple(sorted(set(stop_ids) | set(eos_ids)))
        kw = dict(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                  top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop_token_ids=stop_ids,
                  ignore_eos=req.ignore_eos)
        try:
            return sampling_cls(**kw)
        except ValueError as e:
            raise _sampling_error(e) from None

    async def admit(prompt_ids, sampling, prompt_param: str):
        if app.state.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="unavailable")
        try:
            stream = worker.submit(prompt_ids, sampling, asyncio.get_running_loop())
        except QueueFull as e:
            raise APIError(429, f"too many requests waiting: {e}; retry later", type="rate_limit_exceeded",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        try:
            await stream.added
        except ValueError as e:
            raise bad_request(f"the request can never fit: {e}", prompt_param,
                              code="context_length_exceeded") from None
        except asyncio.CancelledError:
            worker.abort(stream.request_id)
            raise
        except Exception as e:
            raise APIError(500, f"the engine refused the request: {type(e).__name__}: {e}", type="server_error",
                           code="internal_error") from None
        return stream

    async def events(request: Request, stream, text: TextStream):
        """Yield (delta_text, finish_reason, error) as outputs arrive; aborts the request on exit
        unless it finished (client gone, stop string, cancellation)."""
        done = False
        try:
            while True:
                try:
                    first = await asyncio.wait_for(stream.queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                outs = [first]
                while not stream.queue.empty():
                    outs.append(stream.queue.get_nowait())
                finish = None
                for out in outs:
                    if out.finish_reason == "error":  # ("length" may carry an explanatory error too)
                        done = out.finished
                        yield "", "error", (getattr(out, "error", None) or "the request failed in the engine")
                        return
                    text.add(list(out.new_token_ids))
                    if text.stopped:
                        finish = "stop"
                        break
                    if out.finished:
                        done = True
                        finish = out.finish_reason or "stop"
                        if finish == "abort":
                            finish = "abort"
                        text.finish()
                        break
                yield text.take(final=finish is not None), finish, None
                if finish is not None:
                    return
        finally:
            if not done:
                worker.abort(stream.request_id)

    def usage(prompt_len: int, text: TextStream) -> dict:
        n = len(text.ids)
        return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}

    async def generate(request: Request, req, prompt_ids: list[int], chat: bool, prompt_param: str):
        t0 = time.perf_counter()
        sampling = make_sampling(req, len(prompt_ids), 16 if not chat else 0, prompt_param)
        stream = await admit(prompt_ids, sampling, prompt_param)
        text = TextStream(tokenizer, req.stop_strings())
        rid = ("chatcmpl-" if chat else "cmpl-") + stream.request_id
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        plen = len(prompt_ids)
        timing = {"ttft": None}

        def mark_first():
            if timing["ttft"] is None and text.ids:
                timing["ttft"] = time.perf_counter() - t0

        def observe(finish):
            if not timing.get("observed"):
                timing["observed"] = True
                metrics.observe(timing["ttft"], time.perf_counter() - t0, len(text.ids), finish)

        if not req.stream:
            finish, error = None, None
            async for _delta, f, err in events(request, stream, text):
                mark_first()
                if err:
                    error = err
                finish = f or finish
            if error:
                observe("error")
                raise APIError(500, error, type="server_error", code="internal_error")
            if finish is None:  # client went away
                observe("abort")
                return Response(status_code=499)
            observe(finish)
            body_text = text.text
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": body_text},
                          "logprobs": None, "finish_reason": finish}
            else:
                if getattr(req, "echo", False) and isinstance(req.prompt, str):
                    body_text = req.prompt + body_text
                choice = {"index": 0, "text": body_text, "logprobs": None, "finish_reason": finish}
            return JSONResponse({"id": rid, "object": obj, "created": now, "model": model_name,
                                 "choices": [choice], "usage": usage(plen, text)})

        include_usage = req.include_usage()
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish, first: bool) -> str:
            if chat:
                d = {} if delta is None else {"content": delta}
                if first:
                    d = {"role": "assistant", **d} if d else {"role": "assistant", "content": ""}
                c = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": chunk_obj, "created": now, "model": model_name, "choices": [c]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def sse():
            sent_first = False
            finish = None
            try:
                async for delta, f, err in events(request, stream, text):
                    mark_first()
                    if err:
                        observe("error")
                        finish = "error"
                        yield f"data: {json.dumps(error_body(err, 'server_error', None, 'internal_error'))}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    if delta or f is not None:
                        if f is not None and delta:
                            # text and the end in one chunk, as OpenAI does
                            yield chunk(delta, f, not sent_first)
                        elif f is not None:
                            yield chunk(None if chat else "", f, not sent_first)
                        else:
                            yield chunk(delta, None, not sent_first)
                        sent_first = True
                    if f is not None:
                        finish = f
                if finish is None:
                    return  # client gone
                observe(finish)
                if include_usage:
                    body = {"id": rid, "object": chunk_obj, "created": now, "model": model_name, "choices": [],
                            "usage": usage(plen, text)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as e:  # a failure after the headers went out: an error event ends the stream
                log.exception("stream failed")
                worker.abort(stream.request_id)
                observe("error")
                yield f"data: {json.dumps(error_body(f'internal error: {e}', 'server_error', None, 'internal_error'))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                observe("abort")  # no-op when the request already ended; else the client went away

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def check_model(req) -> None:
        if req.model is not None and req.model not in (model_name,):
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request, req: CompletionRequest):
        check_model(req)
        ids = encode_prompt(tokenizer, req)
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
        return await generate(request, req, ids, False, "prompt")

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request, req: ChatCompletionRequest):
        check_model(req)
        return await generate(request, req, encode_chat(tokenizer, req.messages), True, "messages")

    return app


# ------------------------------------------------------------------------------------------- serving
def _make_server(app: FastAPI, host: str, port: int, grace_s: float, log_level: str = "info"):
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining = True  # refuse new requests at once; running ones go on
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)  # a drained SIGTERM exits 0, not by the signal

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s,
                            access_log=False, lifespan="on")
    return _Server(config)


def serve(args) -> int:
    """``kvshrink serve``: load the model, build the engine, run uvicorn until SIGTERM/SIGINT."""
    from kvshrink.engine import Engine
    from kvshrink.methods import parse
    from kvshrink.models import load_model

    parse(args.method)  # a bad spec fails before the model loads

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    kw = dict(method=args.method, kv_memory=args.kv_memory)
    if getattr(args, "block_size", None):
        kw["block_size"] = args.block_size
    if getattr(args, "max_batch", None):
        kw["max_batch"] = args.max_batch
    if getattr(args, "max_prefill_tokens", None):
        kw["max_prefill_tokens"] = args.max_prefill_tokens
    if getattr(args, "no_chunked_prefill", False):
        kw["chunked_prefill"] = False
    if getattr(args, "no_packed_linear", False):
        kw["packed_linear"] = False
    if getattr(args, "no_paged_kernels", False):
        kw["paged_kernels"] = False
    engine = Engine(model, tokenizer=tok, **kw)
    name = args.served_model_name or args.model
    app = create_app(engine, tok, model_name=name, method=args.method, max_waiting=args.max_waiting,
                     api_key=args.api_key, grace_s=args.grace)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the server is reachable from other machines", args.host)
    log.info("serving %s (method %s, KV pool %s) on http://%s:%d", name, args.method, args.kv_memory,
             args.host, args.port)
    server = _make_server(app, args.host, args.port, args.grace)
    server.run()
    return 0
