import platform

import pytest

from kvshrink.cpu_alloc import tune_cpu_allocator


def test_env_turns_it_off(monkeypatch):
    monkeypatch.setenv("KVSHRINK_NO_MALLOC_TUNING", "1")
    assert tune_cpu_allocator() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")
def test_glibc_accepts_the_settings(monkeypatch):
    monkeypatch.delenv("KVSHRINK_NO_MALLOC_TUNING", raising=False)
    assert tune_cpu_allocator() is True
    assert tune_cpu_allocator() is True  # idempotent
