"""The model's linear layers on CPU through oneDNN with weights packed once (what vLLM's CPU backend
and inductor's freezing pass do), active only inside the engine's forwards.

Why: a decode step multiplies a few rows (the batch) by every weight matrix. ``F.linear`` on an
fp32 ``[out, in]`` weight reaches about a third of this machine's memory bandwidth at 4 rows
(measured: 30 layers of SmolLM2-135M, 74 ms unpacked, 30 ms packed, at 4 rows on 2 cores), so
the model, not the KV cache, set the step's cost. Packing reorders each weight once into oneDNN's
blocked layout (``mkldnn._reorder_linear_weight``); ``mkldnn._linear_pointwise`` then runs the
same product, any number of rows, in the same dtype (fp32 or bf16), up to float rounding.

Except for a product of very few rows: there MKL's matrix-vector path behind ``F.linear`` can beat
the packed product (measured on a 2-core Intel AVX-512 VM, SmolLM2-135M's 211 linears: 1 row 21.5
ms stock vs 32-35 ms packed, 3 rows 26.5 vs 32-35, 4 rows 39 vs 31). Which row counts go stock is
measured once per model when the layers are packed (``stock_rows``; ``calibrate_stock_rows``), not
assumed: it differs between machines and BLAS builds.

Generic: every module whose type is exactly ``nn.Linear`` (not a quantised subclass), fp32 or bf16,
on the CPU. The packed copies are extra memory (``nbytes``: about the size of those weights), and
the stock ``forward`` is back outside ``active()``, so the same model object still serves the HF
path (and a comparison against it) unchanged.
"""

from __future__ import annotations

import contextlib
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

_PACKABLE = (torch.float32, torch.bfloat16)


def packing_available(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                                      "_reorder_linear_weight")


def _packed_forward(packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, owner: PackedLinears):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= owner.stock_rows * x.shape[-1]:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return forward


class PackedLinears:
    """oneDNN-packed weights of a model's ``nn.Linear`` layers; ``with packed.active():`` routes them
    there. ``rows_hint``: the rows a typical call multiplies (the decode batch), for oneDNN's blocking.
    ``stock_rows``: products of at most this many rows take stock ``F.linear`` (None: measured here,
    ``calibrate_stock_rows``; 0: always packed)."""

    def __init__(self, model: nn.Module, rows_hint: int, stock_rows: int | None = None):
        self._modules: list[tuple[nn.Module, object]] = []
        self._weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # packed, stock, bias
        self.nbytes = 0
        with torch.no_grad():
            for module in model.modules():
                w = getattr(module, "weight", None)
                if type(module) is not nn.Linear or w is None or w.device.type != "cpu" or w.dtype not in _PACKABLE:
                    continue
                if module.bias is not None and module.bias.dtype != w.dtype:
                    continue
                w = w.detach()
                packed = torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)
                bias = module.bias.detach() if module.bias is not None else None
                self._modules.append((module, types.MethodType(_packed_forward(packed, w, bias, self), module)))
                self._weights.append((packed, w, bias))
                self.nbytes += w.numel() * w.element_size()
        self.stock_rows = self.calibrate_stock_rows() if stock_rows is None else stock_rows

    def calibrate_stock_rows(self, max_rows: int = 8, repeats: int = 3) -> int:
        """The most rows for which one pass over every layer is faster stock than packed, counting up
        from 1 row and stopping at the first row count where packed is as fast (best of ``repeats``
        timed passes each, after one untimed)."""
        if not self._weights:
            return 0
        stock_rows = 0
        with torch.no_grad():
            for rows in range(1, max_rows + 1):
                xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for _, w, _ in self._weights}
                if _best_of(self._one_pass, repeats, xs, False) >= _best_of(self._one_pass, repeats, xs, True):
                    break
                stock_rows = rows
        return stock_rows

    def _one_pass(self, xs: dict[int, torch.Tensor], packed: bool) -> None:
        for p, w, b in self._weights:
            x = xs[w.shape[1]]
            if packed:
                torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
            else:
                F.linear(x, w, b)

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


def _best_of(run, repeats: int, *args) -> float:
    run(*args)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(*args)
        best = min(best, time.perf_counter() - t0)
    return best
