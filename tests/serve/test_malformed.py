"""Malformed requests: each is a named 4xx (never a 5xx), the connection it came on goes on serving,
and none of them leaves a KV block allocated. Through raw httpx (bodies the openai client cannot even
encode: lone surrogates, NaN, broken UTF-8, deep nesting) and through the openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

from kvshrink.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    encode_chat,
    encode_prompt,
)
from tests.conftest import tiny_tokenizer

SURR = "\\udcff\\u0000\\ufffe" * 4  # JSON escapes, as the issue sent them: lone surrogate, NUL, noncharacter
DEEP = "[" * 100_000 + "]" * 100_000
C, CHAT = "/v1/completions", "/v1/chat/completions"


def _user(content: str, extra: str = "") -> str:
    """A chat body with one user message of (raw JSON) ``content``, and ``extra`` top-level fields."""
    return '{"messages": [{"role": "user", "content": ' + content + "}]" + extra + "}"


# (name, path, raw JSON body, status, error.param); a param of None means the body as a whole
RAW = [
    ("surrogate prompt", C, '{"prompt": "' + SURR + '"}', 400, "prompt"),
    ("surrogate prompt, stream", C, '{"prompt": "' + SURR + '", "stream": true}', 400, "prompt"),
    ("surrogate in prompt list", C, '{"prompt": ["a\\ud800"]}', 400, "prompt.0"),
    ("surrogate message", CHAT, _user('"' + SURR + '"'), 400, "messages.0.content"),
    ("surrogate message, stream", CHAT, _user('"' + SURR + '"', ', "stream": true'), 400, "messages.0.content"),
    ("surrogate text part", CHAT, _user('[{"type": "text", "text": "\\udfff"}]'), 400,
     "messages.0.content.0.text"),
    ("surrogate model", C, '{"prompt": "hi", "model": "\\udcff"}', 400, "model"),
    ("surrogate stop", C, '{"prompt": "hi", "stop": ["\\udcff"]}', 400, "stop.0"),
    ("unknown role", CHAT, '{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages.0.role"),
    ("unknown role, stream", CHAT, '{"messages": [{"role": "wizard", "content": "hi"}], "stream": true}', 400,
     "messages.0.role"),
    ("tool role", CHAT, '{"messages": [{"role": "tool", "content": "hi"}]}', 400, "messages.0.role"),
    ("image part", CHAT, _user('[{"type": "image_url", "image_url": {"url": "x"}}]'), 400,
     "messages.0.content.0.type"),
    ("stream string", C, '{"prompt": "hi", "stream": "true"}', 400, "stream"),
    ("stream int", CHAT, _user('"hi"', ', "stream": 1'), 400, "stream"),
    ("n 0", C, '{"prompt": "hi", "n": 0}', 400, "n"),
    ("temperature NaN", C, '{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("top_p Infinity", C, '{"prompt": "hi", "top_p": Infinity}', 400, "top_p"),
    ("temperature -Infinity, chat", CHAT, _user('"hi"', ', "temperature": -Infinity'), 400, "temperature"),
    ("seed beyond int64", C, '{"prompt": "hi", "seed": 100000000000000000000000}', 400, "seed"),
    ("stop id outside vocab", C, '{"prompt": "hi", "stop_token_ids": [1000000000]}', 400, "stop_token_ids"),
    ("prompt id outside vocab", C, '{"prompt": [5, -1]}', 400, "prompt"),
    ("empty prompt", C, '{"prompt": ""}', 400, "prompt"),
    ("empty prompt, stream", C, '{"prompt": "", "stream": true}', 400, "prompt"),
    ("empty prompt list", C, '{"prompt": []}', 400, "prompt"),
    ("empty string in prompt list", C, '{"prompt": [""]}', 400, "prompt.0"),
    ("huge prompt", C, '{"prompt": "' + "x" * 5000 + '", "max_tokens": 1}', 400, "prompt"),
    ("huge prompt, stream", C, '{"prompt": "' + "x" * 5000 + '", "stream": true}', 400, "prompt"),
    ("huge message", CHAT, _user('"' + "x" * 5000 + '"'), 400, "messages"),
    ("deeply nested extra field", C, '{"prompt": "hi", "x": ' + DEEP + "}", 400, None),
    ("deeply nested prompt", CHAT, '{"messages": ' + DEEP + "}", 400, None),
    ("invalid UTF-8", C, b'{"prompt": "\xff\xfe"}', 400, None),
    ("truncated JSON", C, '{"prompt": "hi", ', 400, None),
    ("body not an object", C, "[]", 400, None),
    ("empty body", CHAT, "", 400, None),
]


def conn(r: httpx.Response):
    """The client side (address, port) of the connection a response came on."""
    return r.extensions["network_stream"].get_extra_info("client_addr")


def follow_up(cl: httpx.Client, url: str, before: httpx.Response) -> None:
    r = cl.post(url + C, json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text
    assert conn(r) == conn(before), "the follow-up did not reuse the connection"


def test_malformed_raw_requests_are_named_4xx_on_a_live_connection(make_server):
    s = make_server()
    with httpx.Client(trust_env=False, timeout=30, limits=httpx.Limits(max_connections=1)) as cl:
        for name, path, body, status, param in RAW:
            r = cl.post(s.url + path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], (name, err)
            follow_up(cl, s.url, r)
    m = s.wait_blocks_free()
    assert m["kvshrink_num_requests_waiting"] == 0
    assert 'status="500"' not in httpx.get(s.url + "/metrics", trust_env=False).text


def test_messages_name_the_problem(make_server):
    s = make_server()
    with httpx.Client(trust_env=False, timeout=30) as cl:
        def error(path, body):
            return cl.post(s.url + path, content=body, headers={"content-type": "application/json"}).json()["error"]

        assert "lone UTF-16 surrogate (U+DCFF at index 0)" in error(C, '{"prompt": "' + SURR + '"}')["message"]
        msg = error(CHAT, '{"messages": [{"role": "wizard", "content": "hi"}]}')["message"]
        assert all(f"'{role}'" in msg for role in ("system", "user", "assistant", "developer")), msg
        assert "finite" in error(C, '{"prompt": "hi", "temperature": NaN}')["message"]
        huge = error(C, '{"prompt": "' + "x" * 5000 + '"}')
        assert huge["code"] == "context_length_exceeded" and "context length" in huge["message"]
        deep = error(C, '{"prompt": "hi", "x": ' + DEEP + "}")
        assert deep["code"] == "invalid_json" and "nested too deeply" in deep["message"]


def test_nul_and_noncharacters_are_accepted(make_server):
    # valid Unicode and valid JSON: the tokenizer maps them like any character (see protocol._valid_unicode)
    s = make_server()
    r = httpx.post(s.url + C, json={"prompt": "a\x00b\ufffe", "max_tokens": 2, "echo": True}, trust_env=False,
                   timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith("a\x00b\ufffe")
    r = httpx.post(s.url + CHAT, json={"messages": [{"role": "developer", "content": "\x00"},
                                                    {"role": "user", "content": "hi\x00"}], "max_tokens": 2},
                   trust_env=False, timeout=30)
    assert r.status_code == 200, r.text
    s.wait_blocks_free()


# openai-client rows: what its encoder can send (it refuses NaN and surrogates itself)
OPENAI = [
    ("unknown role", "chat", dict(messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
    ("unknown role, stream", "chat", dict(messages=[{"role": "wizard", "content": "hi"}], stream=True),
     "messages.0.role"),
    ("stream not a boolean", "completions", dict(prompt="hi", extra_body={"stream": "yes"}), "stream"),
    ("n 0", "chat", dict(messages=[{"role": "user", "content": "hi"}], n=0), "n"),
    ("empty prompt", "completions", dict(prompt=""), "prompt"),
    ("empty prompt, stream", "completions", dict(prompt="", stream=True), "prompt"),
    ("huge prompt", "completions", dict(prompt="x" * 5000, max_tokens=1), "prompt"),
    ("huge message, stream", "chat", dict(messages=[{"role": "user", "content": "x" * 5000}], stream=True),
     "messages"),
    ("temperature out of range", "completions", dict(prompt="hi", temperature=3.0), "temperature"),
    ("max_tokens 0", "chat", dict(messages=[{"role": "user", "content": "hi"}], max_tokens=0), "max_tokens"),
]


def test_malformed_openai_requests_are_bad_request_errors(make_server):
    s = make_server()
    seen: list = []
    http = httpx.Client(trust_env=False, limits=httpx.Limits(max_connections=1),
                        event_hooks={"response": [lambda r: seen.append(conn(r))]})
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=30, http_client=http)
    with http:
        for name, api, kw, param in OPENAI:
            create = c.chat.completions.create if api == "chat" else c.completions.create
            kw.setdefault("model", "tiny")
            with pytest.raises(openai.BadRequestError) as e:
                create(**kw)
            assert e.value.status_code == 400 and e.value.param == param, (name, e.value.body)
            assert e.value.type == "invalid_request_error", name
            r = c.completions.create(model="tiny", prompt="hi", max_tokens=1)
            assert r.usage.completion_tokens == 1, name
            assert seen[-1] == seen[-2], f"{name}: the follow-up did not reuse the connection"
        r = c.completions.create(model="tiny", prompt="nul\x00", max_tokens=1)  # accepted, see above
        assert r.choices[0].finish_reason in ("length", "stop")
    s.wait_blocks_free()


def test_server_fault_is_500_and_the_connection_survives(make_server):
    s = make_server(fake=True)

    async def boom():
        raise RuntimeError("a genuine server bug")

    s.app.add_api_route("/boom", boom)
    with httpx.Client(trust_env=False, timeout=30) as cl:
        r = cl.get(s.url + "/boom")
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
        assert "a genuine server bug" in r.json()["error"]["message"]
        h = cl.get(s.url + "/health")
        assert h.status_code == 200 and conn(h) == conn(r)
    assert 'kvshrink_requests_rejected_total{status="500"} 1.0' in httpx.get(s.url + "/metrics", trust_env=False).text


class _Picky:
    """The tiny tokenizer, but one that fails on BEL, as a real tokenizer may fail on some text."""

    chat_template = "set"

    def __init__(self):
        self.tok = tiny_tokenizer()

    def apply_chat_template(self, msgs, **kw):
        if any(m["content"] == "break the template" for m in msgs):
            raise ValueError("template error")
        return self.tok.apply_chat_template(msgs, **kw)

    def __call__(self, text, **kw):
        if "\x07" in text:
            raise TypeError("cannot encode BEL")
        return self.tok(text, **kw)


def _api_error(fn, *a) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*a)
    assert e.value.status == 400
    return e.value


def test_tokenizer_and_template_failures_are_400_naming_the_field():
    tok = _Picky()
    e = _api_error(encode_prompt, tok, CompletionRequest(prompt="a\x07"))
    assert e.param == "prompt" and "cannot encode BEL" in e.message
    msgs = ChatCompletionRequest(messages=[{"role": "system", "content": "ok"}, {"role": "user", "content": "\x07"}])
    assert _api_error(encode_chat, tok, msgs.messages).param == "messages.1.content"
    bad = ChatCompletionRequest(messages=[{"role": "user", "content": "break the template"}])
    assert _api_error(encode_chat, tok, bad.messages).param == "messages"
    # "developer" is templated as "system"
    dev = ChatCompletionRequest(messages=[{"role": "developer", "content": "x"}]).messages
    sysm = ChatCompletionRequest(messages=[{"role": "system", "content": "x"}]).messages
    assert encode_chat(tok, dev) == encode_chat(tok, sysm)
