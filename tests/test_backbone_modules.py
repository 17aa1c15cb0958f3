"""v2's router stage with backbone modules (`router_backbone`: experts | lora | o_proj, issue 22's ablation).

The modules start at zero and act only in the routed ("auto") mode: a fresh model computes what the
experts-only model computes, routing off is the base model, and the checkpoint carries them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import make_base, make_data

from mogu import MoGUConfig, MoGUModel
from mogu.errors import CheckpointMismatchError, ConfigError
from mogu.tuner.backbone import BACKBONE_FILE, BackboneLoRA
from tiny_models import FAMILY_CONFIGS, tiny_model

IDS = torch.tensor([[5, 17, 33, 9, 60, 21], [7, 7, 41, 90, 12, 30]])
KINDS = ("lora", "o_proj")


def _model(family: str = "llama", kind: str = "experts", seed: int = 0) -> MoGUModel:
    torch.manual_seed(seed)
    return MoGUModel.from_base(tiny_model(family), MoGUConfig(version="v2", routed_layers=[1], router_hidden=16,
                                                              router_backbone=kind, lora_dropout=0.0))


def _randomize_everything(model: MoGUModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.added_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_fresh_backbone_modules_compute_exactly_what_the_experts_only_model_computes(family, kind):
    plain, extended = _model(family), _model(family, kind)
    assert extended.backbone_parameters() and not plain.backbone_parameters()
    for a, b in zip(plain.router_parameters() + plain.expert_parameters("glad"),
                    extended.router_parameters() + extended.expert_parameters("glad")):
        assert torch.equal(a, b)  # attached last: the experts' and routers' initialisation is unchanged
    plain.eval(), extended.eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, extended(input_ids=IDS).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_routing_off_with_trained_backbone_modules_gives_exactly_the_base_logits(kind):
    base = tiny_model("llama")
    model = _model("llama", kind)
    _randomize_everything(model)
    model.eval()
    with torch.no_grad():
        want = base(input_ids=IDS).logits
        with model.routing("off"):
            assert torch.equal(model(input_ids=IDS).logits, want)
        with model.routing("glad"):  # a single expert is PEFT's LoRA: the backbone modules stay out of it
            glad = model(input_ids=IDS).logits
        reference = _model("llama")
        _randomize_everything(reference)  # same experts and routers, drawn in the same order, no modules
        for a, b in zip(reference.added_parameters(), model.added_parameters()):
            a.copy_(b)
        reference.eval()
        with reference.routing("glad"):
            assert torch.equal(reference(input_ids=IDS).logits, glad)
        assert not torch.equal(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)  # auto: they act


def test_lora_wraps_every_other_projection_of_the_routed_layers_only():
    model = _model("llama", "lora")
    wrapped = sorted(n for n, m in model.base_model.named_modules() if isinstance(m, BackboneLoRA))
    assert wrapped == [f"model.layers.1.{p}" for p in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
                                                        "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj")]


@pytest.mark.parametrize("kind", KINDS)
def test_router_stage_gradients_reach_routers_experts_and_backbone_modules_exactly(kind, tmp_path):
    from mogu.train.stages import Trainer, TrainConfig
    from tiny_models import tiny_tokenizer

    model = _model("llama", kind)
    _randomize_everything(model)
    trainer = Trainer(model, tiny_tokenizer(), TrainConfig(data_dir=str(tmp_path), output_dir=str(tmp_path / "o")),
                      progress=False, log=lambda m: None)
    params = trainer._stage_params("router")
    want = {id(p) for p in model.router_parameters() + model.expert_parameters("glad")
            + model.expert_parameters("unwill") + model.backbone_parameters()}  # v2: the joint stage
    assert {id(p) for p in params.values()} == want
    groups = trainer._param_groups("router", params, 1e-3)
    assert {id(p) for p in groups[1]["params"]} >= {id(p) for p in model.backbone_parameters()}
    assert groups[1]["lr"] == trainer.cfg.joint_expert_lr
    model.set_trainable(list(params.values()))
    model.train()
    with model.routing("auto"):
        model(input_ids=IDS, labels=IDS).loss.backward()
    assert {id(p) for p in model.parameters() if p.grad is not None} == want
    assert all(p.grad.abs().sum() > 0 for p in model.backbone_parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trips_backbone_modules_bit_exactly(kind, tmp_path):
    model = _model("llama", kind)
    _randomize_everything(model)
    model.save_pretrained(tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / BACKBONE_FILE))
    assert saved.keys() == model.backbone_state_dict().keys()
    assert json.loads((tmp_path / "ckpt" / "mogu_config.json").read_text())["router_backbone"] == kind
    loaded = MoGUModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model("llama"))
    for n, t in model.backbone_state_dict().items():
        assert torch.equal(loaded.backbone_state_dict()[n], t)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, loaded(input_ids=IDS).logits)
    (tmp_path / "ckpt" / BACKBONE_FILE).unlink()
    with pytest.raises(CheckpointMismatchError, match=BACKBONE_FILE):
        MoGUModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model("llama"))


@pytest.mark.parametrize("kind", KINDS)
def test_cached_and_uncached_decoding_agree_with_backbone_modules(kind):
    model = _model("llama", kind)
    _randomize_everything(model)
    model.eval()
    kw = dict(input_ids=IDS[:1], attention_mask=torch.ones(1, IDS.shape[1], dtype=torch.long), max_new_tokens=8,
              do_sample=False, pad_token_id=0, route_tokens=3)
    with torch.no_grad():
        assert torch.equal(model.generate(**kw, use_cache=True), model.generate(**kw, use_cache=False))


def test_backbone_modules_with_a_prompt_gate_or_an_unknown_kind_are_config_errors():
    with pytest.raises(ConfigError, match="prompt gate is fitted"):
        MoGUConfig(router_type="prompt", router_backbone="lora").validate()
    with pytest.raises(ConfigError, match="router_backbone must be one of"):
        MoGUConfig(router_backbone="mlp").validate()


def test_train_with_router_backbone_lora_saves_trained_backbone_modules(tmp_path):
    from mogu.cli import app
    from typer.testing import CliRunner

    base, data = make_base(tmp_path / "base"), make_data(tmp_path / "data")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--model", str(base), "--out", str(out),
                                      "--version", "v2", "--routed-layers", "1", "--router-hidden", "16",
                                      "--router-backbone", "lora", "--glad-epochs", "1", "--unwill-epochs", "1",
                                      "--router-epochs", "1", "--router-lr", "0.01", "--joint-expert-lr", "0.01",
                                      "--max-response-tokens", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    tensors = load_file(str(out / "model" / BACKBONE_FILE))
    lora_b = [t for n, t in tensors.items() if n.endswith("lora_B.weight")]
    assert len(lora_b) == 6 and all(t.abs().sum() > 0 for t in lora_b)  # B left zero: they trained


def test_a_task_lora_on_a_lora_backbone_model_targets_the_projections_not_their_backbone_factors():
    from mogu.tuner.task_adapter import default_task_targets

    targets = default_task_targets(_model("llama", "lora"))
    assert not any(t.endswith(("lora_A", "lora_B")) for t in targets), targets
    assert {"q_proj", "down_proj"} <= {t.split(".")[0] if "." in t else t for t in targets}, targets
