"""The server through the official openai client: completions and chat, streaming, usage, stop strings,
finish reasons, errors, admission, cancellation, overload and shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from kvshrink.serve.app import TextStream


def client(s, key="none", **kw):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=30,
                         http_client=httpx.Client(trust_env=False), **kw)


def post(s, path, body, **kw):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(s.url + path, content=data, headers={"content-type": "application/json", **kw}, timeout=30,
                      trust_env=False)


def test_completion_chat_and_streaming(make_server):
    s = make_server()
    c = client(s)
    r = c.completions.create(model="tiny", prompt="hello there", max_tokens=6, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(s.tokenizer("hello there").input_ids)
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.choices[0].finish_reason == "length"
    full = r.choices[0].text

    chunks = list(c.completions.create(model="tiny", prompt="hello there", max_tokens=6, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices

    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    templated = s.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                tokenize=False)
    assert r.usage.prompt_tokens == len(s.tokenizer(templated, add_special_tokens=False).input_ids)
    assert r.usage.completion_tokens == 5
    chat_text = r.choices[0].message.content
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_completion_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat_text
    assert chunks[-1].usage.completion_tokens == 5
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert httpx.get(s.url + "/health", trust_env=False).json()["status"] == "ok"


def test_stop_strings_trim_and_abort(make_server):
    s = make_server()
    c = client(s)
    full = c.completions.create(model="tiny", prompt="abc", max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    # a stop string from the middle of the greedy output (two characters: spans token boundaries)
    i = next((k for k in range(3, len(full) - 2) if full[k:k + 2].strip()), None)
    if i is None:
        pytest.skip(f"greedy output has no usable stop string: {full!r}")
    stop = full[i:i + 2]
    expect = full[: full.find(stop)]
    r = c.completions.create(model="tiny", prompt="abc", max_tokens=24, temperature=0, stop=[stop, "\x00zz"],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == expect and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    chunks = list(c.completions.create(model="tiny", prompt="abc", max_tokens=24, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == expect
    assert chunks[-1].choices[0].finish_reason == "stop"
    s.wait_blocks_free()  # the stopped request was aborted in the engine


def test_text_stream_holds_back_partial_stop():
    from tests.conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    ts = TextStream(tok, ["STOP"])
    sent = ""
    for ch in "abcST":
        ts.add(tok(ch).input_ids)
        sent += ts.take()
    assert sent == "ab"  # "cST" might start "STOP": held back
    ts.add(tok("O").input_ids)
    ts.add(tok("P").input_ids)
    assert ts.stopped and ts.text == "abc" and sent + ts.take(final=True) == "abc"


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": 5}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": [1, 2, 999999]}, "prompt"),
    ({"prompt": "x" * 5000, "max_tokens": 1}, "prompt"),
    ({"prompt": "hi", "max_tokens": 10_000_000}, "max_tokens"),
])
def test_bad_requests_are_400_naming_the_field(make_server, body, param):
    s = make_server()
    r = post(s, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_bad_chat_and_malformed_json(make_server):
    s = make_server()
    r = post(s, "/v1/completions", '{"prompt": "hi", ')
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.content")
    r = post(s, "/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError):
        client(s).completions.create(model="tiny", prompt="hi", max_tokens=0)


def test_api_key(make_server):
    s = make_server(api_key="sekret")
    with pytest.raises(openai.AuthenticationError):
        client(s, key="wrong").models.list()
    r = post(s, "/v1/completions", {"prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client(s, key="sekret").completions.create(model="tiny", prompt="hi", max_tokens=2).usage
    assert httpx.get(s.url + "/health", trust_env=False).status_code == 200  # not behind the key
    assert httpx.get(s.url + "/metrics", trust_env=False).status_code == 200


async def _fire(url, n, body, timeout=20.0):
    async with httpx.AsyncClient(trust_env=False, timeout=timeout,
                                 limits=httpx.Limits(max_connections=n + 4)) as cl:
        async def one():
            try:
                r = await cl.post(url + "/v1/completions", json=body)
                return r.status_code, r.headers, r.json()
            except httpx.HTTPError as e:
                return None, {}, str(e)

        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout + 5)


def test_429_when_waiting_queue_full(make_server):
    s = make_server(fake=True, engine_kw={"max_batch": 1, "step_s": 0.01}, max_waiting=2)
    res = asyncio.run(_fire(s.url, 8, {"prompt": "hi", "max_tokens": 8, "ignore_eos": True}))
    codes = [c for c, _, _ in res]
    assert codes.count(429) >= 1 and codes.count(200) >= 2, codes
    for code, headers, body in res:
        if code == 429:
            assert headers["retry-after"] == "1"
            assert body["error"]["code"] == "rate_limit_exceeded"
        elif code == 200:
            assert body["usage"]["completion_tokens"] == 8
    s.wait_blocks_free()


def test_cancel_mid_stream_frees_blocks(make_server):
    s = make_server(engine_kw={"max_batch": 2})
    body = {"prompt": "hello", "max_tokens": 1500, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.Client(trust_env=False, timeout=20) as cl:
        with cl.stream("POST", s.url + "/v1/completions", json=body) as r:
            it = r.iter_lines()  # held open: leaving the loop would close the connection
            lines = 0
            while lines < 3:
                lines += next(it).startswith("data:")
            m = s.metrics()
            assert m["kvshrink_kv_blocks_used"] > 0 and m["kvshrink_num_requests_running"] == 1
    m = s.wait_blocks_free(timeout=5)
    assert m["kvshrink_generation_tokens_total"] < 1500
    assert 'finish_reason="abort"' in httpx.get(s.url + "/metrics", trust_env=False).text


def test_overload_every_request_ends(make_server):
    s = make_server(engine_kw={"max_batch": 2}, max_waiting=3)
    t0 = time.monotonic()
    res = asyncio.run(_fire(s.url, 24, {"prompt": "overload", "max_tokens": 6, "ignore_eos": True}, timeout=30))
    assert time.monotonic() - t0 < 35
    codes = [c for c, _, _ in res]
    assert set(codes) <= {200, 429}, res
    assert codes.count(200) >= 3
    for code, _, body in res:
        if code == 200:
            assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 6
    s.wait_blocks_free()
    assert client(s).completions.create(model="tiny", prompt="still here", max_tokens=2).usage.completion_tokens >= 1


def test_step_exception_fails_request_and_server_goes_on(make_server):
    s = make_server()
    real_step = s.engine.step
    state = {"armed": True}

    def step():
        if state["armed"]:
            state["armed"] = False
            raise RuntimeError("boom in step")
        return real_step()

    s.engine.step = step
    r = post(s, "/v1/completions", {"prompt": "hi", "max_tokens": 4})
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    r = post(s, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    s.wait_blocks_free()
    assert httpx.get(s.url + "/health", trust_env=False).json()["status"] == "ok"


def test_sigterm_drains():
    from kvshrink.serve.app import _make_server, create_app
    from tests.conftest import tiny_tokenizer
    from tests.serve.fake_engine import FakeEngine

    tok = tiny_tokenizer()
    app = create_app(FakeEngine(tok, step_s=0.01), tok, context_len=256)
    server = _make_server(app, "127.0.0.1", 0, grace_s=5, log_level="warning")
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    got = {}

    def stream():
        body = {"prompt": "drain", "max_tokens": 40, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=20, trust_env=False) as r:
            got["lines"] = [ln for ln in r.iter_lines() if ln.startswith("data:")]

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.15)
    server.handle_exit(signal.SIGTERM, None)
    assert app.state.draining
    t.join(20)
    th.join(20)
    assert not th.is_alive()
    assert got["lines"][-1] == "data: [DONE]"
    last = json.loads(got["lines"][-2][5:])
    assert last["choices"][0]["finish_reason"] == "length"
    assert server._captured_signals == []  # SIGTERM is not re-raised: the process exits 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", trust_env=False, timeout=2)


def test_prompt_larger_than_kv_pool_is_400(make_server):
    from tests.serve.conftest import real_engine_cls

    kw = {"kv_memory": "96KiB"} if real_engine_cls() else {"num_blocks": 16}
    s = make_server(engine_kw=kw)
    limit = s.engine.max_prompt_tokens()
    assert limit < 1000
    r = post(s, "/v1/completions", {"prompt": "y" * (limit + 1), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "KV pool" in r.json()["error"]["message"]
    r = post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * (limit + 1)}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = post(s, "/v1/completions", {"prompt": "y" * (limit // 2), "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_metrics_count_every_engine_step_and_its_wall_time(make_server):
    from kvshrink.bench.serve import engine_steps

    s = make_server(fake=True, engine_kw={"max_batch": 1, "step_s": 0.02})
    assert engine_steps(s.url) == (0, 0.0)
    body = {"prompt": "hi", "max_tokens": 5, "ignore_eos": True}
    t0 = time.perf_counter()
    assert post(s, "/v1/completions", body).json()["usage"]["completion_tokens"] == 5
    elapsed = time.perf_counter() - t0
    steps, seconds = engine_steps(s.url)
    assert steps == s.app.state.worker.steps >= 5  # a token a step, at least
    assert 0.02 * steps <= seconds <= elapsed  # every step sleeps step_s; all ran within the request


def test_a_failing_step_callback_fails_no_request(make_server):
    s = make_server(fake=True, engine_kw={"max_batch": 1})

    def boom(seconds):
        raise RuntimeError("metrics backend down")

    s.app.state.worker.on_step = boom
    r = post(s, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert s.app.state.worker.step_errors == 0
