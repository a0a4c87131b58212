"""Tiny random models built from configs: grouped-query attention with 2 KV heads, milliseconds to build."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 128


def tiny_model(arch: str = "llama", layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture(params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture
def llama():
    return tiny_model("llama")


def batch(lengths=(40, 25, 33), seed: int = 1):
    """Left-padded random prompts of mixed lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, T - n :] = 1
    return ids, mask


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer():
    """A character-level tokenizer (ids < 128, matching the tiny models), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


def generate_with(model, spec: str, sample: bool):
    """Six new tokens for a left-padded batch of 3 under ``spec``; returns (output, cache)."""
    from kvshrink.cache import KVShrinkCache, cache_argument, compress

    ids, mask = batch((40, 25, 33))
    torch.manual_seed(0)
    with compress(model, spec):
        cache = KVShrinkCache.for_model(model, spec)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            min_new_tokens=6,
            pad_token_id=0,
            do_sample=sample,
            **{cache_argument(model): cache},
            return_dict_in_generate=True,
            output_logits=True,
        )
    return out, cache
