"""OpenAI-compatible request models, validation and error bodies.

Every client error is HTTP 400 with an OpenAI-style body ``{"error": {"message", "type", "param",
"code"}}`` whose ``param`` names the offending field (FastAPI's default 422 is replaced in app.py).
Unknown fields are accepted and ignored, as OpenAI clients send extras (``logprobs``, ``user``...).

Two layers keep client input from ever reaching a 5xx: the pydantic models here (strict types, finite
numbers, text that is valid Unicode, known roles) and ``encode_prompt``/``encode_chat``, the only place
text becomes token ids, which turn any tokenizer or chat-template failure into a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from pydantic_core import PydanticCustomError

MAX_STOP = 4
# The chat roles accepted; "developer" (OpenAI's newer name for "system") is templated as "system", as
# HF chat templates do not know it. "tool"/"function" need the tools API, which this server lacks.
Role = Literal["system", "user", "assistant", "developer"]


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


def _valid_unicode(s: Any) -> Any:
    # JSON escapes can carry lone UTF-16 surrogates ("\\udcff"), which Python keeps in a str but no
    # tokenizer (nor UTF-8) can take. NUL and noncharacters (U+FFFE) are valid Unicode and pass: the
    # tokenizer maps them like any character and generation works. Runs before pydantic's own str check,
    # which would refuse some surrogates with a vaguer message.
    if isinstance(s, str) and not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            where = {"ch": f"U+{ord(s[e.start]):04X}", "i": e.start}
            raise PydanticCustomError("invalid_unicode", "the text contains a lone UTF-16 surrogate ({ch} at "
                                      "index {i}); send valid Unicode", where) from None
    return s


# Every string a client sends: valid Unicode, so it can be tokenised and echoed back in an error body.
Text = Annotated[StrictStr, BeforeValidator(_valid_unicode)]
NonEmptyText = Annotated[StrictStr, Field(min_length=1), BeforeValidator(_valid_unicode)]
NonNegFloat = Annotated[StrictFloat, Field(ge=0.0, le=2.0)]
_STRICT = ConfigDict(extra="allow", allow_inf_nan=False)  # NaN/Infinity parse as JSON in Python: refuse them


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = _STRICT

    model: Text | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: NonNegFloat | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None  # the engine's generator takes int64
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None  # < vocab size: checked in app.py

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    # An empty prompt is a 400, as OpenAI answers; token ids are checked against the vocabulary in app.py.
    prompt: NonEmptyText | Annotated[list[StrictInt], Field(min_length=1)] | Annotated[
        list[NonEmptyText], Field(min_length=1, max_length=1)]
    echo: StrictBool = False


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Role  # the 400 lists them: "Input should be 'system', 'user', ..."
    content: Text | list[TextPart] | None = None

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role

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


def _first_error(errors: list[dict]) -> dict:
    """The error to report. A union field (``prompt``, ``stop``, ``content``) yields one error per
    branch; a branch's plain type mismatch ("should be a valid list") hides the real problem (a
    surrogate, an empty string), so prefer the first error on that field (or inside it) that is not one."""
    first = errors[0]
    field = loc_to_param(tuple(first.get("loc", ())))
    if field is None:
        return first
    for e in errors:
        p = loc_to_param(tuple(e.get("loc", ()))) or ""
        if (p == field or p.startswith(field + ".")) and not str(e.get("type", "")).endswith("_type"):
            return e
    return first


def _shown(value: Any) -> str:
    # never repr a whole container: it may be huge or nested deeper than repr can recurse
    if isinstance(value, (dict, list, tuple)):
        return type(value).__name__
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """The most useful pydantic error as (message, param)."""
    if not errors:
        return "invalid request", None
    e = _first_error(errors)
    if e.get("type") == "json_invalid":
        ctx = e.get("ctx") or {}
        return f"malformed JSON body: {ctx.get('error', e.get('msg'))}", None
    param = loc_to_param(tuple(e.get("loc", ())))
    msg = e.get("msg", "invalid value")
    if param is None:  # the body itself: missing, or not a JSON object
        if e.get("type") == "missing":
            return "the request body is empty: send a JSON object", None
        return f"the request body must be a JSON object: {msg} (got {_shown(e.get('input'))})", None
    if e.get("type") == "missing":
        return f"'{param}' is a required field", param
    return f"invalid value for '{param}': {msg} (got {_shown(e.get('input'))})", param


# ----------------------------------------------------------------------------- text -> token ids
def _tokenize(tokenizer, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    """The one call that turns client text into ids. Validation has already refused what is known to
    break tokenizers (surrogates); anything else a tokenizer cannot take is still the client's text,
    so it is a 400 naming the field, never a 500."""
    try:
        return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
    except Exception as e:
        raise bad_request(f"the tokenizer cannot encode '{param}': {type(e).__name__}: {e}", param,
                          code="invalid_text") from None


def encode_prompt(tokenizer, req: CompletionRequest) -> list[int]:
    """A completion's prompt as ids: text is tokenised, ids are passed through (checked by the caller)."""
    if isinstance(req.prompt, str):
        return _tokenize(tokenizer, req.prompt, "prompt")
    if isinstance(req.prompt[0], str):
        return _tokenize(tokenizer, req.prompt[0], "prompt")
    return list(req.prompt)  # type: ignore[arg-type]


def encode_chat(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Chat messages -> template -> ids. A template or tokenizer failure is a 400; when the tokenizer
    fails, the message it fails on is named (``messages.2.content``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model's tokenizer has no chat template; use /v1/completions", "messages")
    msgs = [{"role": m.template_role(), "content": m.text()} for m in messages]
    try:
        templated = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as e:
        raise bad_request(f"the chat template rejected the messages: {type(e).__name__}: {e}", "messages",
                          code="invalid_messages") from None
    try:
        # the template adds the special tokens it wants
        return _tokenize(tokenizer, templated, "messages", add_special_tokens=False)
    except APIError:
        for i, m in enumerate(msgs):
            _tokenize(tokenizer, m["content"], f"messages.{i}.content", add_special_tokens=False)
        raise
