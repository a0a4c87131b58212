import pytest
import torch

import kvshrink
from kvshrink import models
from tests.conftest import tiny_model, tiny_tokenizer


def test_local_directory_loads(tmp_path):
    m = tiny_model("llama")
    m.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tok = kvshrink.load_model(str(tmp_path), device="cpu")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(model(ids).logits, m(ids).logits)
    assert tok.pad_token is not None


def test_missing_directory_is_one_line_error(tmp_path):
    with pytest.raises(kvshrink.ModelError) as e:
        kvshrink.load_model(str(tmp_path / "nope"))
    assert "\n" not in str(e.value) and "does not exist" in str(e.value)


def test_malformed_directory_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(kvshrink.ModelError) as e:
        kvshrink.load_model(str(tmp_path))
    assert "\n" not in str(e.value)


def test_embedded_gguf_is_found_without_import():
    path = models.embedded_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000


def test_killed_conversion_is_never_used(tmp_path, monkeypatch):
    """A conversion killed half-way leaves only a hidden temp dir; the next load converts again."""
    monkeypatch.setenv("KVSHRINK_CACHE", str(tmp_path))
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt  # as if killed mid-write

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        models.resolve("smollm2-135m")
    assert calls and not (tmp_path / "smollm2-135m").exists()
    assert list(tmp_path.iterdir()) == []  # the temp dir was cleaned up too
