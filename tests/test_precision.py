"""Backbone dtype (--dtype), float32 experts and routers over a half-precision backbone, gradient checkpointing."""

import os
import subprocess
import sys

import pytest
import torch

from mogu import MoGUConfig, MoGUModel
from mogu.errors import ConfigError
from mogu.tuner.loading import resolve_dtype
from mogu.train.stages import STAGE_MODES, TrainConfig, enable_gradient_checkpointing
from mogu.train.losses import collate, ratio_loss, router_loss
from mogu.chat import encode_pair
from test_cli import mogu
from tiny_models import FAMILY_CONFIGS, randomize_added, tiny_model, tiny_tokenizer


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is bfloat16 on a CUDA GPU")
def test_auto_dtype_is_float32_without_a_gpu():
    assert resolve_dtype("auto") is torch.float32 and resolve_dtype(None) is torch.float32


def test_named_dtypes_resolve_and_an_unknown_one_is_a_config_error():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")


def test_unknown_dtype_on_the_command_line_is_a_one_line_error(tmp_path):
    result = mogu("generate", "--model", str(tmp_path), "--prompt", "hi", "--dtype", "float8")
    assert result.returncode == 2 and "unknown dtype 'float8'" in result.stderr and "Traceback" not in result.stderr


def _help(command: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "250", "TERM": "dumb"}  # no wrapped option names
    result = subprocess.run([sys.executable, "-m", "mogu.cli", command, "--help"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_loading_command_has_a_dtype_option_and_training_has_checkpointing():
    for command in ("train", "finetune", "calibrate", "eval", "serve", "generate", "chat"):
        assert "--dtype" in _help(command), command
    for command in ("train", "finetune"):
        assert "--gradient-checkpointing" in _help(command), command
    assert "--mixed-precision" in _help("train")


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_a_bfloat16_backbone_keeps_float32_experts_and_routers_and_bfloat16_activations(family):
    torch.manual_seed(0)
    base = tiny_model(family).to(torch.bfloat16)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = randomize_added(MoGUModel.from_base(base, MoGUConfig(router_hidden=16)))
    assert {p.dtype for p in model.added_parameters()} == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n and "router" not in n)
    model.eval()
    with torch.no_grad():
        model.set_routing("off")
        assert torch.equal(model(input_ids=ids).logits, base_logits)  # routing off is the base, bit for bit
        for mode in ("glad", "auto"):
            model.set_routing(mode)
            out = model(input_ids=ids).logits
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
            assert not torch.equal(out, base_logits)  # the float32 experts do act


def test_a_bfloat16_single_expert_is_the_backbone_plus_a_float32_lora_cast_back():
    torch.manual_seed(0)
    base = tiny_model("llama").to(torch.bfloat16)
    model = randomize_added(MoGUModel.from_base(base, MoGUConfig(router_hidden=16)))
    layer = next(iter(model.routed_modules.values()))
    x = torch.randn(2, 3, layer.in_features).to(torch.bfloat16)
    model.set_routing("glad")
    with torch.no_grad():
        expected = (layer.base_layer(x) + layer.lora_B["glad"](layer.lora_A["glad"](x.float())) * layer.scaling)
        assert torch.equal(layer(x), expected.to(torch.bfloat16))  # PEFT's order: add in float32, cast back


def test_a_bfloat16_backbone_scores_the_next_token_alike_with_and_without_the_cache():
    torch.manual_seed(0)
    model = randomize_added(MoGUModel.from_base(tiny_model("llama").to(torch.bfloat16), MoGUConfig(router_hidden=16)))
    model.eval()
    model.set_routing("auto")
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[:, -1].float()
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    # bfloat16 keeps about 3 significant digits: bit equality is a float32 property (test_model pins it there)
    assert step.dtype == torch.bfloat16 and torch.allclose(step.float(), full, atol=5e-2, rtol=2e-2)


def _grads(family, stage, checkpointing):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = randomize_added(MoGUModel.from_base(tiny_model(family), MoGUConfig(lora_dropout=0.0, router_hidden=16)))
    params = model.router_parameters() if stage == "router" else model.expert_parameters(stage)
    model.set_trainable(params)
    model.set_routing(STAGE_MODES[stage])
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    prompts = ["How do I bake bread?", "Write a poem about rain"]
    a = collate([encode_pair(tok, p, r, 12) for p, r in zip(prompts, ["Sure, here is how.", "Here is a poem."])], 0)
    b = collate([encode_pair(tok, p, r, 12) for p, r in zip(prompts, ["I'm sorry, I can't.", "I cannot."])], 0)
    if stage == "router":
        loss, _ = router_loss(model, a, torch.tensor([1, 0]), weight=2.0)
    else:
        loss, _ = ratio_loss(model, a, b)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("stage", ["glad", "unwill", "router"])
def test_gradient_checkpointing_gives_each_stage_the_same_loss_and_gradients(family, stage):
    loss, grads = _grads(family, stage, checkpointing=False)
    loss_ckpt, grads_ckpt = _grads(family, stage, checkpointing=True)
    assert grads and set(grads) == set(grads_ckpt)
    assert torch.allclose(loss, loss_ckpt, rtol=0, atol=1e-6)
    for name in grads:  # recomputation reorders no arithmetic that matters beyond float32 rounding
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-5, atol=1e-7), name


def test_gradient_checkpointing_and_mixed_precision_are_checked_config_fields():
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainConfig(data_dir=".", output_dir=".", mixed_precision="fp8").validate()
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        TrainConfig(data_dir=".", output_dir=".", gradient_checkpointing="yes").validate()
    TrainConfig(data_dir=".", output_dir=".", mixed_precision=None, gradient_checkpointing=True).validate()


def test_every_family_supports_gradient_checkpointing():
    for family in sorted(FAMILY_CONFIGS):
        model = MoGUModel.from_base(tiny_model(family), MoGUConfig(router_hidden=16))
        enable_gradient_checkpointing(model)
        assert getattr(model.base_model, "is_activation_checkpointing", None) or model.base_model.is_gradient_checkpointing, family


def test_a_checkpointed_training_run_ends_at_the_weights_of_a_plain_one(tmp_path):
    from test_training import _tiny_run

    weights = {}
    for name, ckpt in (("plain", False), ("ckpt", True)):
        model, trainer = _tiny_run(tmp_path, name, stage_names=("glad",), train_kw={"gradient_checkpointing": ckpt})
        trainer.train()
        assert model.base_model.is_gradient_checkpointing == ckpt
        weights[name] = {k: v.detach().clone() for k, v in model.expert_state_dict("glad").items()}
    assert weights["plain"].keys() == weights["ckpt"].keys()
    for k in weights["plain"]:
        assert torch.allclose(weights["plain"][k], weights["ckpt"][k], rtol=1e-4, atol=1e-6), k
