"""A small quantising codec for engine tests (the real codecs live in kvshrink/methods): keys
per channel grouped along tokens with a full-precision residual flushed in whole windows, values per
token with an overflowing residual, like KIVI's layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshrink.methods.base import Codec, Encoder, StreamPolicy
from kvshrink.methods.quant import dequantize_asym, quantize_asym


class KeyEnc(Encoder):
    chunk = 4

    def encode(self, x):
        B, H, T, D = x.shape
        q, s, z = quantize_asym(x.view(B, H, T // 4, 4, D), 8, dim=3)
        return {"codes": q.view(B, H, T, D), "scale": s.view(B, H, T // 4, D), "zero": z.view(B, H, T // 4, D)}

    def decode(self, p, dtype):
        B, H, T, D = p["codes"].shape
        q = p["codes"].view(B, H, T // 4, 4, D)
        return dequantize_asym(q, p["scale"].unsqueeze(3), p["zero"].unsqueeze(3), dtype).view(B, H, T, D)

    def bytes_per_token(self, head_dim, dtype_bytes):
        return head_dim + head_dim


class ValEnc(Encoder):
    chunk = 1

    def encode(self, x):
        q, s, z = quantize_asym(x, 8, dim=-1)
        return {"codes": q, "scale": s, "zero": z}

    def decode(self, p, dtype):
        return dequantize_asym(p["codes"], p["scale"], p["zero"], dtype)

    def bytes_per_token(self, head_dim, dtype_bytes):
        return head_dim + 4


@dataclass
class TestQ8(Codec):
    name = "_engine_test_q8"
    residual: int = 8

    def key_encoder(self):
        return KeyEnc()

    def value_encoder(self):
        return ValEnc()

    def key_policy(self):
        return StreamPolicy(self.residual, "full")

    def value_policy(self):
        return StreamPolicy(self.residual, "overflow")


def method(selector: str = "full", residual: int = 8):
    from kvshrink.methods import CompressionMethod, parse

    return CompressionMethod(parse(selector).selector, TestQ8(residual=residual))


def hf_generate(model, prompt, n, method_spec):
    """Greedy tokens through the HF path with a compressed cache."""
    from kvshrink.cache import compress

    with compress(model, method_spec):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()
