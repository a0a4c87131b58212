"""One prompt through HF ``generate`` under a compression method, measured: the function behind
``kvshrink generate`` and the per-sample step of ``kvshrink eval``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from kvshrink.cache import cache_bytes, compress, output_cache
from kvshrink.methods import CompressionMethod, parse


@dataclass
class Generation:
    output: str
    output_ids: list[int]
    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # "eos" | "length"
    prefill_s: float
    decode_s: float
    kv_bytes: int  # bytes the method's cache holds at the end
    kv_bytes_full: int  # bytes an uncompressed cache would hold for the same tokens
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


class _FirstToken(LogitsProcessor):
    """Timestamps the first call: the prefill forward has just finished."""

    def __init__(self) -> None:
        self.t: float | None = None

    def __call__(self, input_ids, scores):
        if self.t is None:
            self.t = time.perf_counter()
        return scores


def full_bytes(model, tokens: int) -> int:
    """Bytes of an uncompressed cache (model dtype) holding ``tokens`` tokens."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    esize = torch.finfo(model.dtype).bits // 8
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * esize * tokens


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool) -> torch.Tensor:
    if chat or isinstance(prompt, list):
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
        return torch.tensor([ids])
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def generate_one(
    model,
    tokenizer,
    prompt: str | list[dict],
    method: str | CompressionMethod = "full",
    max_new_tokens: int = 64,
    chat: bool = True,
    do_sample: bool = False,
    seed: int | None = None,
) -> Generation:
    """Greedy (default) generation of one prompt with EOS allowed; times prefill and decode apart."""
    m = parse(method)
    ids = encode_prompt(tokenizer, prompt, chat).to(model.device)
    if seed is not None:
        torch.manual_seed(seed)
    first = _FirstToken()
    with compress(model, m):
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            logits_processor=LogitsProcessorList([first]),
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        t1 = time.perf_counter()
    new = out.sequences[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    finish = "eos" if new and new[-1] in eos else "length"
    cache = output_cache(out)
    t_first = first.t or t1
    return Generation(
        output=tokenizer.decode(new, skip_special_tokens=True),
        output_ids=new,
        prompt_tokens=ids.shape[1],
        output_tokens=len(new),
        finish_reason=finish,
        prefill_s=t_first - t0,
        decode_s=t1 - t_first,
        kv_bytes=cache_bytes(cache),
        kv_bytes_full=full_bytes(model, cache.get_seq_length()),
        method=m.spec,
    )


def generate_cli(args) -> int:
    from kvshrink.models import load_model

    method = parse(args.method)  # fail on a bad spec before loading the model
    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    g = generate_one(model, tok, prompt, method, max_new_tokens=args.max_tokens, chat=args.chat)
    if args.json:
        d = g.to_dict()
        d.pop("output_ids")
        print(json.dumps(d))
    else:
        print(g.output)
        factor = g.kv_bytes_full / max(g.kv_bytes, 1)
        print(
            f"\n[{g.method}] prompt {g.prompt_tokens} tok, output {g.output_tokens} tok ({g.finish_reason}); "
            f"KV {g.kv_bytes / 2**20:.2f} MiB vs {g.kv_bytes_full / 2**20:.2f} MiB uncompressed ({factor:.2f}x); "
            f"prefill {g.prefill_s:.2f}s, decode {g.decode_s:.2f}s"
        )
    return 0
