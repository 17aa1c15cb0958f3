"""4-bit and 8-bit backbones (bitsandbytes, `--load-in-4bit` / `--load-in-8bit`): the frozen backbone is
quantised, the experts and routers stay float32 and train, and the checkpoint format is the usual one.

bitsandbytes >= 0.49 runs these layers on the CPU, so the tiny random models of every family serve here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import make_data
from typer.testing import CliRunner

from mogu import MoGUConfig, MoGUModel
from mogu.errors import ConfigError, MoGUError
from mogu.extras import MissingExtraError
from mogu.tuner.loading import backbone_quantization, load_base_model
from tiny_models import FAMILY_CONFIGS, randomize_added, tiny_model, tiny_tokenizer

bnb = pytest.importorskip("bitsandbytes")  # the quant extra; `.[all,test]` (scripts/setup.sh, CI) installs it

QUANT_LAYER = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}
IDS = torch.tensor([[5, 17, 33, 9, 60, 2], [7, 7, 41, 90, 12, 3]])


def _save_base(path: Path, family: str) -> Path:
    if not (path / "config.json").is_file():
        tiny_model(family).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return _save_base(tmp_path_factory.mktemp("quant") / "llama", "llama")


def _mogu(base_dir: Path, quantization: str | None) -> MoGUModel:
    torch.manual_seed(0)
    model = MoGUModel.from_base(str(base_dir), MoGUConfig(router_hidden=16), quantization=quantization)
    return randomize_added(model)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_family_quantised_is_frozen_and_its_experts_and_routers_stay_float32(tmp_path, family, quantization):
    if family == "falcon":  # FalconLinear is not an nn.Linear: transformers' integration quantises nothing
        with pytest.raises(MoGUError, match="quantised no layer of FalconForCausalLM"):
            _mogu(_save_base(tmp_path / family, family), quantization)
        return
    model = _mogu(_save_base(tmp_path / family, family), quantization)
    assert backbone_quantization(model.base_model) == quantization
    for routed in model.routed_modules.values():
        assert type(routed.base_layer).__name__ == QUANT_LAYER[quantization]
    added = {id(p) for p in model.added_parameters()}
    assert added and all(p.dtype == torch.float32 for p in model.added_parameters())
    assert not any(p.requires_grad for p in model.base_model.parameters() if id(p) not in added)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantised_routing_off_gives_exactly_the_quantised_base_logits(base_dir, quantization):
    base, _ = load_base_model(str(base_dir), quantization=quantization)
    model = _mogu(base_dir, quantization)
    model.eval()
    with torch.no_grad(), model.routing("off"):
        off = model(input_ids=IDS).logits
        want = base(input_ids=IDS).logits
    assert torch.equal(off, want)
    with torch.no_grad(), model.routing("auto"):
        assert not torch.equal(model(input_ids=IDS).logits, want)  # the experts do act over a quantised base


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.parametrize("stage,mode", [("glad", "glad"), ("unwill", "unwill"), ("router", "auto")])
def test_each_stage_gradients_reach_exactly_its_parameters_over_a_quantised_backbone(base_dir, quantization,
                                                                                      stage, mode):
    model = _mogu(base_dir, quantization)
    params = model.router_parameters() if stage == "router" else model.expert_parameters(stage)
    model.set_trainable(params)
    model.train()
    with model.routing(mode):
        model(input_ids=IDS, labels=IDS).loss.backward()
    want = {id(p) for p in params}
    got = {id(p) for p in model.parameters() if p.grad is not None}
    assert got == want
    assert all(p.grad.abs().sum() > 0 for p in params)


def test_train_on_a_4bit_backbone_writes_the_usual_checkpoint_that_loads_onto_a_4bit_base(base_dir, tmp_path):
    from mogu.cli import app

    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--model", str(base_dir), "--out", str(out), "--router-hidden", "16",
            "--glad-epochs", "1", "--unwill-epochs", "1", "--router-epochs", "1", "--glad-lr", "0.01",
            "--unwill-lr", "0.01", "--router-lr", "0.01", "--max-response-tokens", "8", "--threads", "1",
            "--load-in-4bit"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    files = sorted(str(p.relative_to(out / "model")) for p in (out / "model").rglob("*") if p.is_file())
    reference = tmp_path / "plain"
    _mogu(base_dir, None).save_pretrained(reference)
    assert files == sorted(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file())
    record = json.loads((out / "run.json").read_text())["distribution"]
    assert record["backbone_quantization"] == "4bit"

    quantised = MoGUModel.from_pretrained(out / "model", quantization="4bit")
    again = MoGUModel.from_pretrained(out / "model", quantization="4bit")
    full = MoGUModel.from_pretrained(out / "model")  # the same experts over the float32 base
    for m in (quantised, again, full):
        m.eval()
    with torch.no_grad():
        a, b, c = (m(input_ids=IDS).logits for m in (quantised, again, full))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and torch.allclose(a, c, atol=0.5)  # quantisation error, not a different model
    trained = {n: t for n, t in quantised.router_state_dict().items()}
    assert all(torch.equal(t, full.router_state_dict()[n]) for n, t in trained.items())


def test_load_in_4bit_and_8bit_together_is_a_one_line_error(base_dir):
    out = subprocess.run([sys.executable, "-m", "mogu.cli", "generate", "--model", str(base_dir), "--prompt", "hi",
                          "--load-in-4bit", "--load-in-8bit"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == "error: --load-in-4bit and --load-in-8bit exclude each other; pass one"
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("rows", [1, 2])  # one row takes bitsandbytes' gemv kernel, two its matmul
def test_4bit_gradients_equal_those_over_the_dequantised_float_backbone(base_dir, rows):
    """The experts' and routers' gradients flow back through frozen 4-bit layers as through their float
    equivalent (the same model with each 4-bit weight replaced by its dequantised float32 value), also after an
    inference pass: bitsandbytes' packed CPU inference kernel, which it switches a layer to in place, has no
    backward, so mogu keeps the layers off it."""
    quantised = _mogu(base_dir, "4bit")
    plain = _mogu(base_dir, None)
    dequantised = {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                   for n, m in quantised.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert dequantised
    with torch.no_grad():
        for n, m in plain.named_modules():
            if n in dequantised:
                m.weight.copy_(dequantised[n])
    grads = []
    for model in (quantised, plain):
        model.eval()
        with torch.no_grad():  # an inference pass first, as dev scoring runs between training epochs
            model(input_ids=IDS)
        params = model.router_parameters() + model.expert_parameters("glad") + model.expert_parameters("unwill")
        model.set_trainable(params)
        model.train()
        for routed in model.routed_modules.values():
            routed.lora_dropout.eval()
        with model.routing("auto"):
            model(input_ids=IDS[:rows], labels=IDS[:rows]).loss.backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def test_unknown_quantization_is_a_config_error(base_dir):
    with pytest.raises(ConfigError, match="unknown quantization"):
        load_base_model(str(base_dir), quantization="3bit")


def test_quantisation_names_the_missing_extra(base_dir, monkeypatch):
    import mogu.extras

    monkeypatch.setattr(mogu.extras, "missing_modules", lambda extra, *m: ["bitsandbytes"])
    with pytest.raises(MissingExtraError, match=r"mogu\[quant\]"):
        load_base_model(str(base_dir), quantization="8bit")


def test_a_device_bitsandbytes_does_not_support_is_a_one_line_error(base_dir, monkeypatch):
    monkeypatch.setattr(bnb, "supported_torch_devices", {"npu"}, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MoGUError, match="does not run on cpu") as err:
        load_base_model(str(base_dir), quantization="4bit")
    assert "\n" not in str(err.value)
