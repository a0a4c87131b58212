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
plain rows in the model's dtype (``full``, ``fp``: fp32, or bf16/fp16 widened to fp32 a block at a
time in L1) on both sides, and residual rings the same; bit-packed codes with per-channel token groups
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
_P, _I64, _F32, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32


class _Blocks(ctypes.Structure):  # paged_kernels.cpp: struct Blocks
    _fields_ = [("bits", _I32), ("per_channel", _I32), ("group", _I64), ("data", _P), ("scale", _P), ("zero", _P),
                ("elem", _I32)]


class _Side(ctypes.Structure):  # struct Side
    _fields_ = [("blocks", _Blocks), ("encoded", _P), ("ring", _P), ("R", _I64), ("ring_start", _P),
                ("ring_len", _P), ("write_new", _I32), ("ring_elem", _I32), ("leaving", _P)]


# plain rows (blocks of bits 0, residual rings) in the model's dtype: paged_kernels.cpp's enum Elem
ELEM = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class _Step(ctypes.Structure):  # struct Step
    _fields_ = [("q", _P), ("knew", _P), ("vnew", _P), ("tables", _P), ("slots", _P), ("stored", _P),
                ("tstride", _I64), ("cstride", _I64), ("scaling", _F32), ("softcap", _F32), ("window", _I64),
                ("sinks", _P), ("out", _P), ("probs", _P), ("probs_w", _I64)]


_PTR = ctypes.POINTER
_SIGNATURES = {
    "kvs_scores": [_PTR(_Blocks), _P, _P, _I64, _P, _P, _I64, _F32] + [_I64] * 6,
    "kvs_values": [_PTR(_Blocks), _P, _I64, _P, _I64, _P, _P] + [_I64] * 6,
    "kvs_decode": [_PTR(_Side), _PTR(_Side), _PTR(_Step)] + [_I64] * 6,
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
        # per-token rows (plain, or channel groups): the kernels weight them and store a token into them;
        # per-channel token groups (KIVI keys) are scored only (no codec keeps values that way)
        self.can_weight = self.can_store = not fmt.per_channel
        quant = fmt.bits != 0
        self.blocks = _Blocks(fmt.bits, int(fmt.per_channel), fmt.group,
                              _ptr(fields["q"] if quant else fields["x"]),
                              _ptr(fields["scale"]) if quant else None, _ptr(fields.get("zero")),
                              0 if quant else ELEM[fields["x"].dtype])

    def _check(self, rc: int) -> None:
        if rc:
            raise ValueError(f"paged kernels: unsupported row format {self.fmt}")

    def scores(self, q: torch.Tensor, tables: torch.Tensor, valid: torch.Tensor, out: torch.Tensor,
               scaling: float) -> None:
        q, valid = q.float().contiguous(), valid.contiguous()
        B, H, g, D = q.shape
        self._check(self.lib.kvs_scores(ctypes.byref(self.blocks), _ptr(q), _ptr(tables), tables.stride(0),
                                        _ptr(valid), _ptr(out), out.shape[-1], scaling,
                                        B, H, g, D, tables.shape[1], self.bs))

    def values(self, p: torch.Tensor, tables: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        p, valid = p.float().contiguous(), valid.contiguous()
        B, H, g, W = p.shape
        out = torch.empty(B, H, g, self.D, dtype=torch.float32)
        self._check(self.lib.kvs_values(ctypes.byref(self.blocks), _ptr(p), W, _ptr(tables), tables.stride(0),
                                        _ptr(valid), _ptr(out), B, H, g, self.D, tables.shape[1], self.bs))
        return out


class DecodeKernel:
    """One layer's whole decode attention in one call, from the pool's blocks and residual rings:
    block, ring and new-token scores, soft-cap, sliding window, sink, softmax and weighted values for
    every (sequence, KV head) pair; then the stores: per side, the new token into the ring or into
    the blocks (copied, or encoded into per-token groups: ``write_new``), and the rows that leave a
    chunk-1 ring this step encoded into the blocks (``flush``) — for those sides that is all a commit
    does. What ``decode_attention``'s eager and per-reader paths compute, without their ~40 small
    tensor ops per layer, and without a commit's gather, encode and scatter of one token per layer.

    ``rings``: per side, the pool's ``[L, S, H, R, D]`` residual rings (fp32, bf16 or fp16), or None."""

    def __init__(self, k: BlockReader, v: BlockReader, rings: tuple[torch.Tensor | None, torch.Tensor | None],
                 write_new: tuple[bool, bool], flush: tuple[bool, bool] = (False, False)):
        self.lib, self.bs = k.lib, k.bs
        self.readers, self.rings, self.write_new, self.flush = (k, v), rings, write_new, flush

    def __call__(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, tables: torch.Tensor,
                 slots: torch.Tensor, stored: torch.Tensor, counters: tuple[tuple[torch.Tensor, ...], ...],
                 scaling: float, softcap: float | None, window: int | None, sinks: torch.Tensor | None,
                 probs_width: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q`` [B, H, g, D]; ``key``/``value`` [B, H, 1, D] (the new token); ``tables`` [B, nb] (row
        stride free); ``stored`` and ``counters`` (per side: encoded, ring start, ring length, rows
        leaving the ring this step) [B] columns of one [B, L] step tensor (same stride). Returns the
        output [B, H, g, D] float32 and, if ``probs_width``, the probabilities [B, H, g, probs_width]
        in stored order."""
        B, H, g, D = q.shape
        q, key, value = q.contiguous(), key.contiguous(), value.contiguous()
        out = torch.empty(B, H, g, D, dtype=torch.float32)
        probs = torch.empty(B, H, g, probs_width, dtype=torch.float32) if probs_width else None
        sides = []
        for reader, ring, write, flush, (encoded, start, length, leaving) in zip(
                self.readers, self.rings, self.write_new, self.flush, counters):
            r = ring[layer] if ring is not None else None
            sides.append(_Side(reader.blocks, _ptr(encoded), _ptr(r), r.shape[2] if r is not None else 0,
                               _ptr(start) if r is not None else None, _ptr(length) if r is not None else None,
                               int(write), ELEM[r.dtype] if r is not None else 0, _ptr(leaving) if flush else None))
        sink = sinks.float().contiguous() if sinks is not None else None
        step = _Step(_ptr(q), _ptr(key), _ptr(value), _ptr(tables), _ptr(slots), _ptr(stored), tables.stride(0),
                     stored.stride(0), scaling, float(softcap or 0.0), int(window or 0), _ptr(sink), _ptr(out),
                     _ptr(probs), probs_width)
        rc = self.lib.kvs_decode(ctypes.byref(sides[0]), ctypes.byref(sides[1]), ctypes.byref(step),
                                 B, H, g, D, tables.shape[1], self.bs)
        if rc:
            raise ValueError("paged kernels: unsupported row format")
        return out, probs


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
        return dtype in ELEM and fields["x"].dtype == dtype
    per = 8 // fmt.bits if fmt.bits in (1, 2, 4, 8) else 0
    if not per or head_dim % per or fields["scale"].dtype != torch.float16:
        return False
    if fmt.per_channel:
        return block_size % fmt.group == 0
    return head_dim % fmt.group == 0 and fmt.group % per == 0
