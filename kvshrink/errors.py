"""Errors shared by the HF path (``cache.py``) and the engine."""

from __future__ import annotations


class CompressionNotInEffect(RuntimeError):
    """A forward ran without kvshrink's cache or attention function in every layer: its outputs and
    byte counts would be those of an uncompressed model, so nothing may report them as compressed."""


def untested_transformers() -> str:
    """What to tell the user when transformers no longer calls kvshrink where it used to."""
    import transformers

    return (
        f"transformers {transformers.__version__} is not a version kvshrink was tested with: install the "
        "locked versions (`make install`, requirements/lock.txt) or report the break"
    )
