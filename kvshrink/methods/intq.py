"""``int8`` and ``int4``: per-token, per-head KV quantisation as serving engines store it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvshrink.methods.base import Codec, Encoder, check
from kvshrink.methods.quant import GroupQuantEncoder
from kvshrink.methods.registry import register


@dataclass
class IntQ(Codec):
    """Per-token, per-head uniform quantisation of keys and values, every token encoded at once.

    What serving engines do with a quantised KV cache: each token of each KV head is quantised on
    its own at write time (dynamic, no calibration), over ``group`` consecutive channels
    (``group=0``: the whole head dim, one scale per token per head; a group that does not divide the
    head dim also falls back to the whole head dim). No full-precision window
    (``StreamPolicy(residual=0)``, chunk 1).

    - ``int8``: symmetric absmax, ``s = max|x| / 127``, ``q = round(x / s)``, scale float16
      (llama.cpp's ``q8_0`` cache type, which uses groups of 32: ``int8:group=32``).
    - ``int4``: asymmetric min/max, ``s = (max - min) / 15``, ``z = min``, ``q = round((x - z) / s)``,
      scale and zero float16, codes packed two per byte (LMDeploy's online int4 KV: per head, per
      token, asymmetric; llama.cpp's ``q4_1`` is the same with groups of 32: ``int4:group=32``).
    Deviation: LMDeploy's int8 KV is asymmetric too; ``int8`` here is symmetric, as ``q8_0``
    (at 8 bits the two differ by less than one code step).

    Bytes per token and head: ``D*b/8 + n_meta * 2 * D/group`` (``n_meta`` 1 symmetric, 2 asymmetric).
    """

    bits: ClassVar[int] = 8
    symmetric: ClassVar[bool] = True

    group: int = 0

    def __post_init__(self) -> None:
        check(
            self.group == 0 or (self.group > 0 and self.group % 8 == 0),
            f"{self.name}: group must be 0 (whole head dim) or a positive multiple of 8, got {self.group}",
        )

    def _encoder(self) -> Encoder:
        return GroupQuantEncoder(self.bits, self.group, along="channels", symmetric=self.symmetric)

    def key_encoder(self) -> Encoder:
        return self._encoder()

    def value_encoder(self) -> Encoder:
        return self._encoder()


@register
@dataclass
class Int8(IntQ):
    """int8 symmetric, one float16 scale per token per KV head (per group of ``group`` channels)."""

    name = "int8"
    bits = 8
    symmetric = True


@register
@dataclass
class Int4(IntQ):
    """int4 asymmetric, float16 scale and zero per token per KV head (per group of ``group`` channels)."""

    name = "int4"
    bits = 4
    symmetric = False
