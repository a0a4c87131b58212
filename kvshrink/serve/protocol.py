"""OpenAI-compatible request models, validation and error bodies.

Every client error is HTTP 400 with an OpenAI-style body ``{"error": {"message", "type", "param",
"code"}}`` whose ``param`` names the offending field (FastAPI's default 422 is replaced in app.py).
Unknown fields are accepted and ignored, as OpenAI clients send extras (``logprobs``, ``user``...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_STOP = 4


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


NonNegFloat = Annotated[StrictFloat, Field(ge=0.0, le=2.0)]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: NonNegFloat | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    stop_token_ids: list[StrictInt] | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: StrictStr | Annotated[list[StrictInt], Field(min_length=1)] | Annotated[
        list[StrictStr], Field(min_length=1, max_length=1)]
    echo: StrictBool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None


def loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """Pydantic's error location -> the field name a client sees (``messages.0.content``).
    Union branch names (``str``, ``list[int]``...) are dropped."""
    parts = [p for p in loc if p != "body"]
    out = []
    for p in parts:
        if isinstance(p, int):
            out.append(str(p))
        elif isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool", "list", "dict")
                                     or p.startswith(("constrained-", "function-"))):
            continue
        else:
            out.append(str(p))
    return ".".join(out) or None


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """The first pydantic error as (message, param)."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        ctx = e.get("ctx") or {}
        return f"malformed JSON body: {ctx.get('error', e.get('msg'))}", None
    param = loc_to_param(tuple(e.get("loc", ())))
    msg = e.get("msg", "invalid value")
    if e.get("type") == "missing":
        return f"'{param}' is a required field", param
    given = e.get("input")
    shown = repr(given) if not isinstance(given, (dict, list)) or len(repr(given)) < 80 else type(given).__name__
    return f"invalid value for '{param}': {msg} (got {shown})", param
