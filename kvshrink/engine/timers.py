"""Wall-clock time per engine phase, accumulated per process (``bench throughput`` reads them)."""

from __future__ import annotations

import time
from collections import defaultdict

TIMERS: dict[str, float] = defaultdict(float)


class timed:
    """``with timed("decode.attend"): ...`` adds the block's wall time to ``TIMERS[name]``."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc) -> None:
        TIMERS[self.name] += time.perf_counter() - self.t


def reset_timers() -> None:
    TIMERS.clear()


def timers() -> dict[str, float]:
    return dict(TIMERS)
