"""Every built-in encoder's declared payload layout is what it really encodes."""

import pytest
import torch

from kvshrink.methods import registered
from kvshrink.methods.base import Encoder


@pytest.mark.parametrize("name", [n for n, c in registered().items() if c.kind == "codec"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_declared_layout_matches_encoding(name, dtype):
    codec = registered()[name]()
    for enc in (codec.key_encoder(), codec.value_encoder()):
        declared = enc.layout(3, 64, dtype)
        assert declared == Encoder.layout(enc, 3, 64, dtype)
