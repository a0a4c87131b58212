"""The model's linear layers on CPU through oneDNN with weights packed once (what vLLM's CPU backend
and inductor's freezing pass do), active only inside the engine's forwards.

Why: a decode step multiplies a few rows (the batch) by every weight matrix. ``F.linear`` on an
fp32 ``[out, in]`` weight reaches about a third of this machine's memory bandwidth at 4 rows
(measured: 30 layers of SmolLM2-135M, 74 ms unpacked, 30 ms packed, at 4 rows on 2 cores), so
the model, not the KV cache, set the step's cost. Packing reorders each weight once into oneDNN's
blocked layout (``mkldnn._reorder_linear_weight``); ``mkldnn._linear_pointwise`` then runs the
same product, any number of rows, in the same dtype (fp32 or bf16), up to float rounding.

Generic: every module whose type is exactly ``nn.Linear`` (not a quantised subclass), fp32 or bf16,
on the CPU. The packed copies are extra memory (``nbytes``: about the size of those weights), and
the stock ``forward`` is back outside ``active()``, so the same model object still serves the HF
path (and a comparison against it) unchanged.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

_PACKABLE = (torch.float32, torch.bfloat16)


def packing_available(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                                      "_reorder_linear_weight")


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return forward


class PackedLinears:
    """oneDNN-packed weights of a model's ``nn.Linear`` layers; ``with packed.active():`` routes them
    there. ``rows_hint``: the rows a typical call multiplies (the decode batch), for oneDNN's blocking."""

    def __init__(self, model: nn.Module, rows_hint: int):
        self._modules: list[tuple[nn.Module, object]] = []
        self.nbytes = 0
        with torch.no_grad():
            for module in model.modules():
                w = getattr(module, "weight", None)
                if type(module) is not nn.Linear or w is None or w.device.type != "cpu" or w.dtype not in _PACKABLE:
                    continue
                if module.bias is not None and module.bias.dtype != w.dtype:
                    continue
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows_hint)
                bias = module.bias.detach() if module.bias is not None else None
                self._modules.append((module, types.MethodType(_packed_forward(packed, bias), module)))
                self.nbytes += w.numel() * w.element_size()

    def __len__(self) -> int:
        return len(self._modules)

    @contextlib.contextmanager
    def active(self):
        for module, forward in self._modules:
            module.forward = forward
        try:
            yield
        finally:
            for module, _ in self._modules:
                module.__dict__.pop("forward", None)
