import ctypes.util

import pytest

from kvshrink.cpu_alloc import tune_cpu_allocator


def test_env_turns_it_off(monkeypatch):
    monkeypatch.setenv("KVSHRINK_NO_MALLOC_TUNING", "1")
    assert tune_cpu_allocator() is False


@pytest.mark.skipif(not ctypes.util.find_library("c"), reason="no libc")
def test_tuning_takes_effect_and_is_idempotent(monkeypatch):
    monkeypatch.delenv("KVSHRINK_NO_MALLOC_TUNING", raising=False)
    first = tune_cpu_allocator()
    assert tune_cpu_allocator() == first  # glibc: True; other libcs without mallopt: False, never an error
