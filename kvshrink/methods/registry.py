"""Methods registered by name, and the spec grammar.

``spec := part ("+" part)?``, ``part := name (":" key "=" value ("," key "=" value)*)?``.
At most one selector and one codec; a missing half is ``full`` (keep all) or ``fp`` (store as-is).
"""

from __future__ import annotations

import dataclasses
import typing

from kvshrink.methods.base import Codec, CompressionMethod, Method, Selector, SpecError

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` in specs, the CLI, eval and the engine."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Method]]:
    return dict(sorted(_REGISTRY.items()))


def _coerce(cls: type, field: dataclasses.Field, raw: str, method: str):
    hints = typing.get_type_hints(cls)
    tp = hints[field.name]
    try:
        if tp is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        return raw
    except ValueError:
        raise SpecError(f"{method}: {field.name} must be {getattr(tp, '__name__', tp)}, got {raw!r}") from None


def spec_fields(cls: type[Method]) -> dict[str, dataclasses.Field]:
    """Spec parameter name -> dataclass field (``budget`` is an alias of ``budget_tokens``)."""
    aliases = {v: k for k, v in getattr(cls, "SPEC_ALIASES", {}).items()}
    return {aliases.get(f.name, f.name): f for f in dataclasses.fields(cls)}


def build(name: str, params: dict[str, str] | None = None) -> Method:
    """Construct one registered method from string parameters."""
    if name not in _REGISTRY:
        raise SpecError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    fields = spec_fields(cls)
    kwargs = {}
    for key, raw in (params or {}).items():
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise SpecError(f"{name}: unknown parameter {key!r}; allowed: {allowed}")
        f = fields[key]
        kwargs[f.name] = _coerce(cls, f, raw, name)
    return cls(**kwargs)


def _parse_part(part: str) -> Method:
    part = part.strip()
    if not part:
        raise SpecError("empty method spec")
    name, _, rest = part.partition(":")
    params: dict[str, str] = {}
    if rest:
        for item in rest.split(","):
            key, eq, val = item.partition("=")
            if not eq or not key.strip():
                raise SpecError(f"{name}: expected key=value, got {item!r}")
            params[key.strip()] = val.strip()
    return build(name.strip(), params)


def parse(spec: str | CompressionMethod) -> CompressionMethod:
    """Parse ``"snapkv:ratio=0.5+kivi:bits=4"`` into a selector and a codec."""
    if isinstance(spec, CompressionMethod):
        return spec
    selector: Selector | None = None
    codec: Codec | None = None
    for part in spec.split("+"):
        m = _parse_part(part)
        if isinstance(m, Selector):
            if selector is not None and selector.name != "full":
                raise SpecError(f"{spec!r}: more than one selector ({selector.name}, {m.name})")
            if selector is None or m.name != "full":
                selector = m
        elif isinstance(m, Codec):
            if codec is not None and codec.name != "fp":
                raise SpecError(f"{spec!r}: more than one codec ({codec.name}, {m.name})")
            if codec is None or m.name != "fp":
                codec = m
        else:  # pragma: no cover - registry only holds the two kinds
            raise SpecError(f"{m.name} is neither a selector nor a codec")
    return CompressionMethod(selector or build("full"), codec or build("fp"))
