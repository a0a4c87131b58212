"""Servers for tests: the app on uvicorn in a thread, bound to 127.0.0.1 on a free port.

``make_server(**kw)`` serves the real engine on a tiny random Llama when ``kvshrink.engine.Engine``
exists, else the FakeEngine test double; ``fake=True`` forces the double (for timing-controlled tests).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from kvshrink.serve.app import create_app
from tests.conftest import tiny_model, tiny_tokenizer
from tests.serve.fake_engine import FakeEngine


def real_engine_cls():
    try:
        from kvshrink.engine import Engine
    except ImportError:
        return None
    return Engine


class ServerThread:
    def __init__(self, app, grace_s: float = 5.0):
        self.app = app
        cfg = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                             timeout_graceful_shutdown=grace_s)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(20)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=5, trust_env=False).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, val = line.rpartition(" ")
                out[name.split("{")[0]] = float(val)
        return out

    def wait_blocks_free(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m.get("kvshrink_kv_blocks_used") == 0 and m.get("kvshrink_num_requests_running") == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"blocks still used: {m}")
            time.sleep(0.05)


@pytest.fixture
def make_server():
    servers = []

    def make(fake: bool = False, engine_kw: dict | None = None, **app_kw):
        tok = tiny_tokenizer()
        cls = None if fake else real_engine_cls()
        if cls is None:
            kw = dict(num_blocks=64, block_size=4, max_batch=4)
            kw.update(engine_kw or {})
            engine = FakeEngine(tok, **kw)
            ctx = 256
        else:
            kw = dict(kv_memory="4MiB", block_size=16, max_batch=8)
            kw.update(engine_kw or {})
            engine = cls(tiny_model("llama"), tokenizer=tok, device="cpu", **kw)
            ctx = None
        app_kw.setdefault("model_name", "tiny")
        app = create_app(engine, tok, context_len=ctx, **app_kw)
        s = ServerThread(app).start()
        s.engine = engine
        s.tokenizer = tok
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()
