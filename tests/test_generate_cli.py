import json

import pytest

from kvshrink import cli
from kvshrink.generate import full_bytes, generate_one
from tests.conftest import tiny_model, tiny_tokenizer


def test_generate_one_reports_bytes_and_timing():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    g = generate_one(model, tok, "hello there", "full", max_new_tokens=5)
    assert g.output_tokens == len(g.output_ids) <= 5
    assert g.kv_bytes == g.kv_bytes_full == full_bytes(model, g.prompt_tokens + g.output_tokens - 1)
    assert g.prefill_s > 0 and g.decode_s >= 0
    assert g.finish_reason in ("eos", "length")


def test_generate_cli_json(tmp_path, capsys, monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    monkeypatch.setattr("kvshrink.models.load_model", lambda *a, **k: (model, tok))
    rc = cli.main(["generate", "--prompt", "hi", "--max-tokens", "4", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("output", "prompt_tokens", "output_tokens", "kv_bytes", "kv_bytes_full"):
        assert k in d


@pytest.mark.parametrize("spec", ["nosuch", "full:x=1", "full+fp+nosuch"])
def test_bad_spec_is_a_clean_error(spec, capsys):
    assert cli.main(["generate", "--prompt", "x", "--method", spec]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_methods_lists_registered(capsys):
    cli.main(["methods"])
    out = capsys.readouterr().out
    assert "full" in out and "fp" in out
