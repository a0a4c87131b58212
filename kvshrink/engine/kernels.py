"""Decode attention that reads the pool's blocks in place (CPU): no gathered copy of the blocks, no
decoded (dequantised) keys or values in memory. The kernels are ``paged_kernels.cpp``, compiled
once per machine on first use (about 4 s, g++ and torch's headers) into a cache directory
(``$KVSHRINK_CACHE``, default ``~/.cache/kvshrink``) and called through ``ctypes``; they run on
torch's intra-op threads (``at::parallel_for``).

Why: the eager path gathers a step's blocks with ``index_select`` (a copy of every block it reads)
and decodes them whole before two batched matmuls, so a quantised cache paid three passes over
full-precision bytes for every layer of every step: at batch 16 and 1k context a KIVI-4 step cost
1.4x a ``full`` one (``benchmarks/decode_step.py``). Reading codes in place makes a step's KV
traffic what the codec stores, and scores are computed in the code domain (see the .cpp header).

Which payloads: what an encoder declares in ``Encoder.row_format`` (``methods.base.RowFormat``):
plain fp32 rows (``full``, ``fp``) on both sides; bit-packed codes with per-channel token groups
(KIVI keys: scores only) or per-token channel groups (KIVI values, ``int8``/``int4``: scores and
values). Anything else, another device, or a build that fails (a warning says why) runs the eager
path, which stays the reference the tests compare against.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from kvshrink.methods.base import RowFormat

SOURCE = Path(__file__).with_name("paged_kernels.cpp")
_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "kvs_scores_plain": [_P, _P, _P, _I64, _P, _P, _I64, _F32] + [_I64] * 6,
    "kvs_values_plain": [_P, _I64, _P, _P, _I64, _P, _P] + [_I64] * 6,
    "kvs_scores_quant": [_INT, _INT, _I64, _P, _P, _P, _P, _P, _I64, _P, _P, _I64, _F32] + [_I64] * 6,
    "kvs_values_quant": [_INT, _I64, _P, _I64, _P, _P, _P, _P, _I64, _P, _P] + [_I64] * 6,
}
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(cache: Path) -> Path:
    from torch.utils.cpp_extension import include_paths, library_paths

    src = SOURCE.read_text()
    key = hashlib.sha256("\n".join([src, torch.__version__, platform.machine(), _cpu_flags(), *FLAGS]).encode())
    lib = cache / f"paged_kernels-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++/g++) on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    libdirs = library_paths()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / lib.name
        cmd = [cxx, *FLAGS, *(f"-I{p}" for p in include_paths()), str(SOURCE), "-o", str(out),
               *(f"-L{p}" for p in libdirs), *(f"-Wl,-rpath,{p}" for p in libdirs), "-lc10", "-ltorch_cpu"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd[:2])} ... failed:\n{done.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: a concurrent build of the same source leaves one whole file
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None (with a warning) if they cannot be built."""
    cache = Path(os.environ.get("KVSHRINK_CACHE") or Path.home() / ".cache" / "kvshrink")
    try:
        lib = ctypes.CDLL(str(_build(cache)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"kvshrink: paged CPU kernels unavailable, decode attention runs eager PyTorch: {e}",
                      stacklevel=2)
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class BlockReader:
    """Scores against, or weights, one side's (keys' or values') blocks in place.

    ``tables`` ``[B, nb]`` int64 block ids and ``valid`` ``[B]`` int64 stored tokens per row: positions
    at or past ``valid`` are never read (logits -inf, weight 0). ``scores`` writes ``scaling * q.k``
    into ``out[..., :nb*bs]`` of a contiguous ``[B, H, g, W]`` float32 tensor; ``values`` returns
    ``sum_t p_t v_t`` ``[B, H, g, D]`` float32 for probabilities ``p`` ``[B, H, g, W]``."""

    def __init__(self, lib: ctypes.CDLL, fmt: RowFormat, fields: dict[str, torch.Tensor], heads: int,
                 head_dim: int, block_size: int):
        self.lib, self.fmt, self.fields = lib, fmt, fields
        self.H, self.D, self.bs = heads, head_dim, block_size
        self.can_weight = not fmt.per_channel  # values in per-channel token groups: not written (no codec uses it)

    def scores(self, q: torch.Tensor, tables: torch.Tensor, valid: torch.Tensor, out: torch.Tensor,
               scaling: float) -> None:
        q, valid = q.float().contiguous(), valid.contiguous()
        B, H, g, D = q.shape
        dims = [B, H, g, D, tables.shape[1], self.bs]
        f, W = self.fmt, out.shape[-1]
        if f.bits == 0:
            rc = self.lib.kvs_scores_plain(_ptr(q), _ptr(self.fields["x"]), _ptr(tables), tables.stride(0),
                                           _ptr(valid), _ptr(out), W, scaling, *dims)
        else:
            rc = self.lib.kvs_scores_quant(int(f.per_channel), f.bits, f.group, _ptr(q), _ptr(self.fields["q"]),
                                           _ptr(self.fields["scale"]), _ptr(self.fields.get("zero")), _ptr(tables),
                                           tables.stride(0), _ptr(valid), _ptr(out), W, scaling, *dims)
        if rc:
            raise ValueError(f"paged kernels: unsupported row format {f}")

    def values(self, p: torch.Tensor, tables: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        p, valid = p.float().contiguous(), valid.contiguous()
        B, H, g, W = p.shape
        out = torch.empty(B, H, g, self.D, dtype=torch.float32)
        dims = [B, H, g, self.D, tables.shape[1], self.bs]
        f = self.fmt
        if f.bits == 0:
            rc = self.lib.kvs_values_plain(_ptr(p), W, _ptr(self.fields["x"]), _ptr(tables), tables.stride(0),
                                           _ptr(valid), _ptr(out), *dims)
        else:
            rc = self.lib.kvs_values_quant(f.bits, f.group, _ptr(p), W, _ptr(self.fields["q"]),
                                           _ptr(self.fields["scale"]), _ptr(self.fields.get("zero")), _ptr(tables),
                                           tables.stride(0), _ptr(valid), _ptr(out), *dims)
        if rc:
            raise ValueError(f"paged kernels: unsupported row format {f}")
        return out


def block_reader(fmt: RowFormat | None, fields: dict[str, torch.Tensor], heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, device: torch.device) -> BlockReader | None:
    """A reader for blocks of layout ``fmt`` (an encoder's ``row_format``) in ``fields`` (the pool's
    tensors), or None where the kernels do not apply (not the CPU, a layout they do not read, no
    compiler)."""
    if device.type != "cpu" or fmt is None or not _supported(fmt, fields, head_dim, block_size, dtype):
        return None
    lib = library()
    return BlockReader(lib, fmt, fields, heads, head_dim, block_size) if lib is not None else None


def _supported(fmt: RowFormat, fields: dict[str, torch.Tensor], head_dim: int, block_size: int,
               dtype: torch.dtype) -> bool:
    if head_dim % 8 or any(not t.is_contiguous() for t in fields.values()):  # the kernels step 8 channels
        return False
    if fmt.bits == 0:
        return dtype == torch.float32 and fields["x"].dtype == torch.float32
    per = 8 // fmt.bits if fmt.bits in (1, 2, 4, 8) else 0
    if not per or head_dim % per or fields["scale"].dtype != torch.float16:
        return False
    if fmt.per_channel:
        return block_size % fmt.group == 0
    return head_dim % fmt.group == 0 and fmt.group % per == 0
