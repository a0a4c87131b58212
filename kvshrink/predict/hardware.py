"""Hardware descriptions for the roofline: memory, memory bandwidth and peak FLOP/s.

A description is ``Hardware(name, mem_bytes, bandwidth, flops, vector_flops)``; units are bytes,
bytes/s and FLOP/s. ``flops`` is the dense tensor-core peak for the model's dtype (what matrix
multiplies can reach); ``vector_flops`` the non-tensor (CUDA-core FP32) peak, which element-wise
work such as dequantisation runs on. Presets carry vendors' published figures; give your own as
``name=mygpu,mem=80GB,bw=3.35TB/s,flops=989T[,vflops=67T]`` or a JSON file with the same keys.

``--hardware measure`` (``measure_host``) describes the CPU the command runs on the same way, from
torch micro-benchmarks at a given thread count: a streaming read (sum, matrix-vector) for the
bandwidth, a large fp32 GEMM for ``flops``; ``Hardware.to_dict`` saved as JSON reads back as a spec.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Hardware:
    name: str
    mem_bytes: float  # device memory
    bandwidth: float  # peak memory bandwidth, bytes/s
    flops: float  # dense tensor peak FLOP/s for the model dtype (bf16/fp16)
    vector_flops: float | None = None  # non-tensor FP32 peak FLOP/s (None: element-wise work uses ``flops``)
    source: str = ""
    threads: int | None = None  # a measured CPU: the torch threads the figures were measured with
    measured: bool = False  # figures measured on this machine (achieved, not vendors' peaks)

    def to_dict(self) -> dict:
        return asdict(self)


# Published figures (decimal units, dense i.e. without 2:4 sparsity):
# - A100-80G SXM: NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4): 80 GB HBM2e,
#   2,039 GB/s, BF16 tensor 312 TFLOPS (624 sparse), FP32 19.5 TFLOPS.
# - H100-80G SXM5: NVIDIA H100 datasheet (h100-datasheet-2287922): 80 GB HBM3, 3.35 TB/s,
#   BF16 tensor 1,979 TFLOPS *with sparsity* -> 989 dense, FP32 67 TFLOPS.
# - H200 SXM: NVIDIA H200 product page/datasheet: 141 GB HBM3e, 4.8 TB/s, BF16 tensor 1,979 TFLOPS
#   with sparsity -> 989 dense, FP32 67 TFLOPS (same compute die as H100 SXM).
# - L4: NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s, BF16 tensor 242 TFLOPS with sparsity -> 121 dense,
#   FP32 30.3 TFLOPS.
PRESETS: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("A100-80G", 80e9, 2039e9, 312e12, 19.5e12, "NVIDIA A100 SXM datasheet"),
        Hardware("H100-80G", 80e9, 3350e9, 989e12, 67e12, "NVIDIA H100 SXM5 datasheet"),
        Hardware("H200", 141e9, 4800e9, 989e12, 67e12, "NVIDIA H200 SXM datasheet"),
        Hardware("L4", 24e9, 300e9, 121e12, 30.3e12, "NVIDIA L4 datasheet"),
    )
}
_ALIASES = {"a100": "A100-80G", "a100-80g": "A100-80G", "a100-80gb": "A100-80G", "h100": "H100-80G",
            "h100-80g": "H100-80G", "h100-80gb": "H100-80G", "h200": "H200", "l4": "L4"}

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15,
           "ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}


def parse_quantity(text: str | float | int, unit: str = "") -> float:
    """``"80GB"`` -> 8e10, ``"3.35TB/s"`` -> 3.35e12, ``"989T"`` -> 9.89e14, ``"512MiB"`` -> 2**29.

    Decimal prefixes (k, M, G, T, P) are powers of 1000, binary ones (Ki, Mi, Gi, Ti) of 1024; the
    unit letters after the prefix (B, B/s, FLOPS, FLOP/s) are optional and ignored."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)([kKmMgGtTpP]i?)?(.*)", s)
    rest = (m.group(3) if m else "").lower()
    if not m or rest not in ("", "b", "b/s", "bps", "flops", "flop/s", "/s", unit):
        raise ValueError(f"cannot read {text!r} as a quantity (e.g. 80GB, 3.35TB/s, 989T, 512MiB)")
    prefix = (m.group(2) or "").lower()
    return float(m.group(1)) * _SUFFIX[prefix]


_KEYS = {"name": "name", "mem": "mem_bytes", "memory": "mem_bytes", "mem_bytes": "mem_bytes", "bw": "bandwidth",
         "bandwidth": "bandwidth", "flops": "flops", "vflops": "vector_flops", "vector_flops": "vector_flops",
         "threads": "threads", "measured": "measured"}
_RAW = {"name", "threads", "measured"}  # keys whose values are not quantities


def _from_mapping(d: dict, origin: str) -> Hardware:
    kw: dict = {}
    for k, v in d.items():
        if k == "source":
            continue
        if k not in _KEYS:
            raise ValueError(f"{origin}: unknown hardware key {k!r}; keys: name, mem, bw, flops, vflops, threads")
        if v is None:  # to_dict() writes None for an absent vector peak or thread count
            continue
        kw[_KEYS[k]] = v if _KEYS[k] in _RAW else parse_quantity(v)
    missing = [u for k, u in (("mem_bytes", "mem"), ("bandwidth", "bw"), ("flops", "flops")) if k not in kw]
    if missing:
        raise ValueError(f"{origin}: hardware needs mem, bw and flops (missing {', '.join(missing)})")
    for k in ("mem_bytes", "bandwidth", "flops", "vector_flops"):
        if k in kw and kw[k] <= 0:
            raise ValueError(f"{origin}: {k} must be > 0")
    kw.setdefault("name", "custom")
    if "threads" in kw:
        kw["threads"] = int(kw["threads"])
    if "measured" in kw:
        kw["measured"] = str(kw["measured"]).lower() in ("1", "true", "yes")
    return Hardware(**kw, source=str(d.get("source", origin)))


def get_hardware(name: str | None = None, spec: str | None = None) -> Hardware:
    """A preset by name (case-insensitive), or ``spec``: a JSON file path or ``key=value,...``."""
    if spec:
        p = Path(spec)
        if p.suffix == ".json" or p.is_file():
            if not p.is_file():
                raise FileNotFoundError(f"hardware spec file {spec} not found")
            return _from_mapping(json.loads(p.read_text()), str(p))
        items = {}
        for part in spec.split(","):
            k, eq, v = part.partition("=")
            if not eq:
                raise ValueError(f"hardware spec {spec!r}: expected key=value, got {part!r}")
            items[k.strip()] = v.strip()
        return _from_mapping(items, "--hardware-spec")
    if not name:
        raise ValueError(f"give a hardware name ({', '.join(PRESETS)}) or a spec")
    if name.lower() == MEASURE:
        return measure_host()
    if "=" in name:
        return get_hardware(spec=name)
    key = _ALIASES.get(name.lower(), name)
    if key not in PRESETS:
        raise ValueError(f"unknown hardware {name!r}; presets: {', '.join(PRESETS)} "
                         f"(or '{MEASURE}': this CPU, measured; or --hardware-spec "
                         f"name=...,mem=80GB,bw=3.35TB/s,flops=989T)")
    return PRESETS[key]


# ------------------------------------------------------------------------------------- this machine

MEASURE = "measure"  # --hardware measure: describe the CPU the command runs on


@dataclass(frozen=True)
class MeasureConfig:
    """Sizes of the micro-benchmarks behind ``measure_host``."""

    stream_bytes: int = 256 << 20  # per buffer: far beyond any CPU's last-level cache, so DRAM is measured
    gemm_n: int = 1024  # n x n x n fp32 GEMM: large enough that packing and threading costs amortise
    repeats: int = 5  # best of: the fastest run is the least disturbed by other processes
    dtype: str = "float32"  # kvshrink's dtype on a CPU


@dataclass(frozen=True)
class HostMeasurement:
    """What ``measure_host`` measured (bytes/s, FLOP/s), kept next to the description it gave."""

    read_bw: float  # sum of a large buffer: bytes read / s
    copy_bw: float  # copy between two large buffers: bytes read + written / s
    gemv_bw: float  # matrix-vector product over a large matrix (a batch-1 linear layer): bytes read / s
    gemm_flops: float  # 2 n^3 / s
    threads: int
    mem_bytes: float
    cpu: str

    def lines(self) -> list[str]:
        return [f"{self.cpu}, {self.threads} torch thread(s): read {self.read_bw / 1e9:.2f} GB/s (sum), "
                f"{self.gemv_bw / 1e9:.2f} GB/s (matrix-vector), copy {self.copy_bw / 1e9:.2f} GB/s (read + write), "
                f"GEMM {self.gemm_flops / 1e9:.1f} GFLOP/s"]

    @property
    def bandwidth(self) -> float:
        """The best read rate reached: a single thread's sum kernel can be limited by its own adds,
        the matrix-vector product by its FMAs; whichever streams faster is closer to the memory's."""
        return max(self.read_bw, self.gemv_bw)


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _best(fn, repeats: int) -> float:
    import time

    fn()  # warm-up: first-touch page faults, thread-pool start, GEMM packing buffers
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _stream_times(torch, n: int, dt, repeats: int) -> tuple[float, float, float]:
    """Best seconds of a sum over, a copy between, and a matrix-vector product over buffers of ``n``
    elements (freed on return)."""
    x = torch.ones(n, dtype=dt)  # ones, not empty: every page is touched before timing
    y = torch.zeros(n, dtype=dt)
    rows = 8192  # a tall matrix of the same bytes: the output vector stays in cache
    mat = x[: n - n % rows].view(rows, -1)
    vec, out = torch.ones(mat.shape[1], dtype=dt), torch.empty(rows, dtype=dt)
    return (_best(lambda: x.sum(), repeats), _best(lambda: y.copy_(x), repeats),
            _best(lambda: torch.mv(mat, vec, out=out), repeats) * n / mat.numel())


def measure_host_figures(threads: int | None = None, cfg: MeasureConfig = MeasureConfig()) -> HostMeasurement:
    """Memory bandwidth (large sum, large copy) and fp32 GEMM FLOP/s of this CPU, with torch.

    ``threads``: torch intra-op threads for the measurement (restored afterwards); None: torch's
    current setting. Run it with the thread count the workload uses (``--threads``)."""
    import os

    import torch

    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dt = getattr(torch, cfg.dtype)
        n = cfg.stream_bytes // torch.tensor([], dtype=dt).element_size()
        t_sum, t_copy, t_mv = _stream_times(torch, n, dt, cfg.repeats)
        g = torch.Generator().manual_seed(0)
        a = torch.randn(cfg.gemm_n, cfg.gemm_n, generator=g, dtype=dt)
        b = torch.randn(cfg.gemm_n, cfg.gemm_n, generator=g, dtype=dt)
        c = torch.empty(cfg.gemm_n, cfg.gemm_n, dtype=dt)
        t_mm = _best(lambda: torch.mm(a, b, out=c), cfg.repeats)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)
    try:
        mem = float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        mem = 0.0
    return HostMeasurement(read_bw=cfg.stream_bytes / t_sum, copy_bw=2 * cfg.stream_bytes / t_copy,
                           gemv_bw=cfg.stream_bytes / t_mv,
                           gemm_flops=2 * cfg.gemm_n**3 / t_mm, threads=used, mem_bytes=mem, cpu=_cpu_name())


def host_hardware(m: HostMeasurement) -> Hardware:
    """The roofline's description of a measured CPU. ``bandwidth`` is a read figure
    (``HostMeasurement.bandwidth``): a decode step's traffic is reads (weights, KV), and a copy's
    write-allocate traffic makes its byte count ambiguous.
    ``vector_flops`` is left out: on a CPU element-wise work runs on the same SIMD units as a GEMM, so
    the GEMM figure with the lower vector efficiency factor stands for it."""
    return Hardware(name=f"cpu-{m.threads}t", mem_bytes=m.mem_bytes or 1.0, bandwidth=m.bandwidth,
                    flops=m.gemm_flops, vector_flops=None,
                    source=f"measured: {m.lines()[0]}", threads=m.threads, measured=True)


def measure_host(threads: int | None = None, cfg: MeasureConfig = MeasureConfig()) -> Hardware:
    """This CPU described as ``Hardware`` (see ``measure_host_figures`` and ``host_hardware``)."""
    return host_hardware(measure_host_figures(threads, cfg))
