"""``kvshrink methods``: every registered method with its parameters and defaults."""

from __future__ import annotations

import dataclasses

from kvshrink.methods.registry import registered, spec_fields


def describe() -> list[dict]:
    rows = []
    for name, cls in registered().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        params = {k: f.default for k, f in spec_fields(cls).items() if f.default is not dataclasses.MISSING}
        rows.append({"name": name, "kind": cls.kind, "summary": doc[0] if doc else "", "params": params})
    return rows


def print_methods() -> None:
    rows = describe()
    for kind in ("selector", "codec"):
        print(f"{kind}s ({'which tokens stay' if kind == 'selector' else 'how a kept token is stored'}):")
        for r in (r for r in rows if r["kind"] == kind):
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
            print(f"  {r['name']:<13} {params}")
            if r["summary"]:
                print(f"  {'':<13} {r['summary']}")
        print()
    print("Compose a selector and a codec with '+', e.g. snapkv:ratio=0.75+kivi:bits=4")
