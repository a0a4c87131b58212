"""The one results format shared by evaluation, benchmarks, serving runs and (later) predictors.

A run is a directory holding:
- ``config.json``: what was asked (model, methods, tasks or workload...). A run directory belongs
  to one configuration: opening it with a different one goes to a new sibling directory instead of
  mixing or overwriting results.
- ``records.jsonl``: one JSON object per measured unit (an eval sample under a method, a request of
  a throughput or serving run). Appended and flushed one line at a time, so a killed run loses at
  most the line being written, and a resumed run skips the keys already present.
- ``summary.json``: aggregates, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    return str(o)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=_default).encode()).hexdigest()[:10]


def open_run(out: str | Path, config: dict) -> Path:
    """The run directory for ``config`` under ``out``: ``out`` itself when it is new or holds the same
    configuration; otherwise ``out/run-<hash>`` (so a changed configuration never touches earlier results)."""
    out = Path(out)
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        existing = json.loads(cfg_path.read_text())
        if config_hash(existing) == config_hash(config):
            return out
        out = out / f"run-{config_hash(config)}"
        return open_run(out, config)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg_path, config)
    return out


class Records:
    """Append-only JSONL of records, keyed for resumption."""

    def __init__(self, path: str | Path, key: Iterable[str] = ()):
        self.path = Path(path)
        self.key_fields = tuple(key)

    def key(self, rec: dict) -> tuple:
        return tuple(rec.get(k) for k in self.key_fields)

    def __iter__(self) -> Iterator[dict]:
        if not self.path.is_file():
            return
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash: ignore it, it will be redone
                    continue

    def load(self) -> list[dict]:
        return list(self)

    def done(self) -> set[tuple]:
        return {self.key(r) for r in self}

    def append(self, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._heal()
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _heal(self) -> None:
        """A crash mid-line leaves a partial last line: end it so the next record starts clean."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows of dicts to CSV (columns: union of keys, in first-seen order), atomically."""
    import csv
    import io

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
