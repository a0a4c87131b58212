"""Hardware descriptions for the roofline: memory, memory bandwidth and peak FLOP/s.

A description is ``Hardware(name, mem_bytes, bandwidth, flops, vector_flops)``; units are bytes,
bytes/s and FLOP/s. ``flops`` is the dense tensor-core peak for the model's dtype (what matrix
multiplies can reach); ``vector_flops`` the non-tensor (CUDA-core FP32) peak, which element-wise
work such as dequantisation runs on. Presets carry vendors' published figures; give your own as
``name=mygpu,mem=80GB,bw=3.35TB/s,flops=989T[,vflops=67T]`` or a JSON file with the same keys.
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
         "bandwidth": "bandwidth", "flops": "flops", "vflops": "vector_flops", "vector_flops": "vector_flops"}


def _from_mapping(d: dict, origin: str) -> Hardware:
    kw: dict = {}
    for k, v in d.items():
        if k == "source":
            continue
        if k not in _KEYS:
            raise ValueError(f"{origin}: unknown hardware key {k!r}; keys: name, mem, bw, flops, vflops")
        kw[_KEYS[k]] = v if _KEYS[k] == "name" else parse_quantity(v)
    missing = [u for k, u in (("mem_bytes", "mem"), ("bandwidth", "bw"), ("flops", "flops")) if k not in kw]
    if missing:
        raise ValueError(f"{origin}: hardware needs mem, bw and flops (missing {', '.join(missing)})")
    for k in ("mem_bytes", "bandwidth", "flops", "vector_flops"):
        if k in kw and kw[k] <= 0:
            raise ValueError(f"{origin}: {k} must be > 0")
    kw.setdefault("name", "custom")
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
    if "=" in name:
        return get_hardware(spec=name)
    key = _ALIASES.get(name.lower(), name)
    if key not in PRESETS:
        raise ValueError(f"unknown hardware {name!r}; presets: {', '.join(PRESETS)} "
                         f"(or --hardware-spec name=...,mem=80GB,bw=3.35TB/s,flops=989T)")
    return PRESETS[key]
