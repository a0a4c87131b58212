"""Tiny random models built from configs: grouped-query attention with 2 KV heads, milliseconds to build."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 128


def tiny_model(arch: str = "llama", layers: int = 2, seed: int = 0, **overrides):
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
    common.update(overrides)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch in HYBRID:
        model = hybrid_model(arch, common, layers)
    else:
        raise ValueError(arch)
    return model.eval()


WINDOW = 16  # sliding window of the tiny hybrid models: shorter than the test prompts
HYBRID = ("gemma3", "gemma2", "mistral", "qwen3", "gpt_oss")


def hybrid_model(arch: str, common: dict, layers: int):
    """Tiny models of the families that mix layer types (built from configs, no download):

    - ``gemma3``: 2 sliding-window layers : 1 full (``layers`` ignored: 3), per-layer-type RoPE theta,
      QK-norm, 1 KV head, head_dim 32 != hidden / heads (16);
    - ``gemma2``: alternating sliding/full, attention logit soft-capping (2.0, weights drawn wide enough
      for it to matter);
    - ``mistral``: ``sliding_window`` on every layer, no ``layer_types``;
    - ``qwen3``: QK-norm, layer 0 full and layer 1 sliding (``use_sliding_window``, ``max_window_layers``);
    - ``gpt_oss``: alternating sliding/full with attention sinks (``s_aux``), a 4-expert MoE.
    Gemma-2 and gpt-oss run transformers' eager attention (their SDPA is unsupported)."""
    import transformers as tf

    c = dict(common)
    c.setdefault("sliding_window", WINDOW)
    if arch == "gemma3":
        c.update(num_hidden_layers=3, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                 layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**c))
    if arch == "gemma2":
        c.setdefault("attn_logit_softcapping", 2.0)
        c.setdefault("initializer_range", 0.1)  # logits large enough for the soft-cap to matter
        c.update(head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=30.0, attn_implementation="eager")
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**c))
    if arch == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**c))
    if arch == "qwen3":
        c.update(head_dim=16, use_sliding_window=True, max_window_layers=1)
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**c))
    c.update(head_dim=16, num_local_experts=4, num_experts_per_tok=2, attn_implementation="eager",
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return tf.GptOssForCausalLM(tf.GptOssConfig(**c))


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
