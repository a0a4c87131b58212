"""``full``: the uncompressed baseline. Keeps every token (a selector) stored as-is (the ``fp`` codec)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.methods.base import Codec, Encoder, FieldLayout, Payload, RowFormat, Selector
from kvshrink.methods.registry import register


@register
@dataclass
class Full(Selector):
    """Keep every token."""

    name = "full"

    def select(self, inp, budget):  # never called: budget() is None
        raise AssertionError("full keeps every token")


class Identity(Encoder):
    def encode(self, x: torch.Tensor) -> Payload:
        return {"x": x}

    def decode(self, p: Payload, dtype: torch.dtype) -> torch.Tensor:
        return p["x"].to(dtype)

    def layout(self, heads: int, head_dim: int, dtype: torch.dtype) -> list[FieldLayout]:
        return [FieldLayout("x", (heads, 1, head_dim), 1, dtype)]

    def bytes_per_token(self, head_dim: int, dtype_bytes: int) -> float:
        return head_dim * dtype_bytes

    def row_format(self, head_dim: int) -> RowFormat:
        return RowFormat()


@register
@dataclass
class FP(Codec):
    """Store kept tokens in the model's dtype (what an uncompressed cache holds)."""

    name = "fp"

    @property
    def lossless(self) -> bool:
        return True

    def key_encoder(self) -> Encoder:
        return Identity()

    def value_encoder(self) -> Encoder:
        return Identity()
