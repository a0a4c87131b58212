"""Workloads for ``kvshrink bench serve``: ``random``, ``sharegpt:FILE`` and ``task:NAME``.

- ``random``: prompts of exactly ``input_len`` tokens drawn (seeded) from the tokenizer's vocabulary,
  decoded to text and re-encoded so the sent text re-tokenises to that length where the tokenizer
  allows it; ``output_len`` tokens each (send ``--ignore-eos`` to force the length).
- ``sharegpt:FILE``: a ShareGPT JSON file (a list of ``{"conversations": [{"from", "value"}...]}``).
  The first human turn is the prompt, the reply that follows sets the output length (unless
  ``output_len`` is given). vLLM's filters: prompt and reply of at least 4 tokens, prompt at most
  1024 tokens, prompt + reply at most 2048. Conversations are shuffled with the seed.
- ``task:NAME``: kvshrink's own eval prompts (``kvshrink.eval.tasks``: chat, needle, wiki-qa...), sent as
  chat messages (or raw text for non-chat samples), EOS allowed. ``task:chat`` falls back to the first
  turns of the English chatterbot-corpus conversations (found with ``importlib.util.find_spec``), else
  a small built-in list, when the eval tasks are unavailable.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np

from kvshrink.bench.loadgen import BenchRequest

_BUILTIN_CHAT = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about the sea.",
    "Give me three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "How do vaccines work?",
    "Suggest a name for a small bakery.",
    "What are the main causes of inflation?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Why do cats purr?",
    "Describe a healthy breakfast.",
]


def load_dataset(
    spec: str,
    tokenizer,
    num_prompts: int,
    input_len: int = 1024,
    output_len: int | None = 128,
    seed: int = 0,
    ignore_eos: bool = False,
) -> list[BenchRequest]:
    if num_prompts <= 0:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    kind, _, arg = spec.partition(":")
    if kind == "random":
        return random_dataset(tokenizer, num_prompts, input_len, output_len or 128, seed, ignore_eos)
    if kind == "sharegpt":
        if not arg:
            raise ValueError("--dataset sharegpt:FILE needs the path of a ShareGPT JSON file")
        return sharegpt_dataset(arg, tokenizer, num_prompts, output_len, seed, ignore_eos)
    if kind == "task":
        return task_dataset(arg or "chat", tokenizer, num_prompts, output_len, seed, ignore_eos)
    raise ValueError(f"--dataset {spec!r}: use random, sharegpt:FILE or task:NAME")


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def random_dataset(tokenizer, n, input_len, output_len, seed=0, ignore_eos=False) -> list[BenchRequest]:
    if input_len < 1 or output_len < 1:
        raise ValueError(f"random lengths must be >= 1 (input {input_len}, output {output_len})")
    rng = np.random.default_rng(seed)
    special = _special_ids(tokenizer)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
    if len(vocab) == 0:
        raise ValueError("the tokenizer has no non-special tokens")
    out = []
    for _ in range(n):
        ids = rng.choice(vocab, size=input_len).tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        # Decode/encode is not an identity: adjust so the text re-tokenises to ~input_len tokens.
        for _ in range(4):
            re = tokenizer(text, add_special_tokens=False).input_ids
            if len(re) == input_len:
                break
            if len(re) > input_len:
                re = re[:input_len]
            else:
                re = re + rng.choice(vocab, size=input_len - len(re)).tolist()
            text = tokenizer.decode(re, skip_special_tokens=True)
        n_tok = len(tokenizer(text, add_special_tokens=False).input_ids)
        out.append(BenchRequest(text, n_tok, output_len, ignore_eos))
    return out


def sharegpt_dataset(path, tokenizer, n, output_len=None, seed=0, ignore_eos=False) -> list[BenchRequest]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ShareGPT file {str(p)!r} not found")
    data = json.loads(p.read_text())
    pairs = []
    for conv in data:
        turns = conv.get("conversations") or conv.get("conversation") or []
        for i, t in enumerate(turns[:-1]):
            if t.get("from") in ("human", "user"):
                pairs.append((t.get("value", ""), turns[i + 1].get("value", "")))
                break
    random.Random(seed).shuffle(pairs)
    out = []
    for prompt, reply in pairs:
        if len(out) >= n:
            break
        pl = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        ol = len(tokenizer(reply, add_special_tokens=False).input_ids) if output_len is None else output_len
        if pl < 4 or ol < 4 or pl > 1024 or pl + ol > 2048:
            continue
        out.append(BenchRequest(prompt, pl, ol, ignore_eos))
    if not out:
        raise ValueError(f"{path}: no conversation passed the length filters (prompt 4..1024, total <= 2048)")
    return out


def _eval_samples(name: str, tokenizer, seed: int):
    """kvshrink's own eval task ``name`` (kvshrink.eval.tasks), or None when that module is absent."""
    if importlib.util.find_spec("kvshrink.eval") is None or importlib.util.find_spec("kvshrink.eval.tasks") is None:
        return None
    from kvshrink.eval import tasks as _tasks

    return _tasks.load_task(name).samples(tokenizer, _tasks.TaskConfig(seed=seed))


def _corpus_prompts() -> list[str]:
    """First turns of the English chatterbot-corpus conversations, else a small built-in list."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    prompts: list[str] = []
    if spec and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
        for f in sorted(root.glob("*.yml")):
            for line in f.read_text(errors="replace").splitlines():
                if line.startswith("- - "):  # first turn of a conversation
                    s = line[4:].strip().strip("'\"")
                    if len(s) >= 8:
                        prompts.append(s)
    return prompts or list(_BUILTIN_CHAT)


def _prompt_len(tokenizer, prompt) -> int:
    if isinstance(prompt, str):
        return len(tokenizer(prompt, add_special_tokens=False).input_ids)
    try:
        templated = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(templated, add_special_tokens=False).input_ids)
    except Exception:  # no chat template: count the bare text
        return len(tokenizer(" ".join(str(m.get("content", "")) for m in prompt), add_special_tokens=False).input_ids)


def task_dataset(name, tokenizer, n, output_len=None, seed=0, ignore_eos=False) -> list[BenchRequest]:
    """``n`` requests cycling over task ``name``'s prompts (shuffled with the seed). The output length is
    ``output_len`` when given, else the task's own ``max_new_tokens``."""
    samples = None
    try:
        samples = _eval_samples(name, tokenizer, seed)
    except ValueError:
        if name != "chat":
            raise
    except Exception:  # the eval helper's code failed: fall back to the corpus for chat
        if name != "chat":
            raise
    if samples:
        items = [(s.prompt, s.max_new_tokens) for s in samples]
    elif name == "chat":
        items = [([{"role": "user", "content": p}], 128) for p in _corpus_prompts()]
    else:
        raise ValueError(f"--dataset task:{name}: unknown task (kvshrink.eval.tasks is not available; use task:chat)")
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    out = []
    for k in range(n):
        prompt, max_new = items[order[k % len(order)]]
        out.append(BenchRequest(prompt, _prompt_len(tokenizer, prompt), output_len or max_new, ignore_eos))
    return out
