"""MoGU v2: lighter routers in selected layers only, and the joint router-and-experts stage.

The core behaviour pins (test_model.py) are repeated here on a v2 model that routes layer 1
only, for every family: layer 0 must stay the plain base layer while every mode, cache,
batching, save/load and the trace keep working.
"""

import copy

import pytest
import torch
from peft import PeftModel

from mogu import MoGUConfig, MoGUModel
from mogu.tuner.config import DEFAULT_ROUTER_HIDDEN
from mogu.errors import ConfigError
from mogu.train.stages import STAGE_MODES, StageConfig, TrainConfig, Trainer
from mogu.train.losses import collate, router_loss
from mogu.chat import encode_pair
from tiny_models import FAMILY_CONFIGS, randomize_added, tiny_model, tiny_tokenizer

FAMILIES = sorted(FAMILY_CONFIGS)


def make_v2(family, seed=0, **cfg):
    base = tiny_model(family, seed)
    reference = copy.deepcopy(base)
    model = MoGUModel.from_base(base, MoGUConfig(version="v2", routed_layers=[1], **cfg))
    randomize_added(model)
    return model, reference


def ids(batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def test_v2_defaults_and_round_trip():
    v1, v2 = MoGUConfig(), MoGUConfig(version="v2")
    assert v1.router_hidden == DEFAULT_ROUTER_HIDDEN["v1"] == 512
    assert v2.router_hidden == DEFAULT_ROUTER_HIDDEN["v2"] < 512
    assert MoGUConfig(version="v2", router_hidden=64).router_hidden == 64
    again = MoGUConfig.from_dict(v2.to_dict())
    assert again == v2 and again.router_hidden == v2.router_hidden
    with pytest.raises(ConfigError, match="version"):
        MoGUConfig(version="v3")


def test_v2_adds_a_fraction_of_v1_parameters():
    base = tiny_model("llama")
    v1 = MoGUModel.from_base(copy.deepcopy(base), MoGUConfig())
    v2 = MoGUModel.from_base(copy.deepcopy(base), MoGUConfig(version="v2", routed_layers=[1]))
    d, r, h = 32, 8, DEFAULT_ROUTER_HIDDEN["v2"]
    assert v2.num_added_parameters() == 2 * (d * r + r * d) + 2 * (2 * d * h + 2 * d + 1)
    assert v2.num_added_parameters() < 0.1 * v1.num_added_parameters() * 2  # one of two layers, 16 vs 512 wide


@pytest.mark.parametrize("family", FAMILIES)
def test_only_selected_layers_are_wrapped_and_off_is_the_base(family):
    model, reference = make_v2(family)
    assert [m.layer_idx for m in model.routed_modules.values()] == [1]
    wrapped = [n for n, m in model.base_model.named_modules() if type(m).__name__ == "RoutedLinear"]
    assert len(wrapped) == 1
    x = ids()
    with torch.no_grad():
        expected = reference(input_ids=x).logits
        with model.routing("off"):
            assert torch.equal(model(input_ids=x).logits, expected)
        assert not torch.equal(model(input_ids=x).logits, expected)  # auto routing does change layer 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("expert", ["glad", "unwill"])
def test_v2_single_expert_equals_peft_lora(family, expert, tmp_path):
    model, reference = make_v2(family)
    model.export_adapter(expert, tmp_path / expert)
    peft_model = PeftModel.from_pretrained(reference, str(tmp_path / expert)).eval()
    x = ids()
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
        model.set_routing(expert)
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_v2_cached_equals_uncached_and_batch_equals_single(family):
    model, _ = make_v2(family)
    x = ids(batch=1, length=8)
    enc = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    cached = model.generate(**enc, max_new_tokens=6, do_sample=False, route_tokens=None)
    uncached = model.generate(**enc, max_new_tokens=6, do_sample=False, route_tokens=None, use_cache=False)
    assert torch.equal(cached, uncached)
    rows = [ids(1, n, seed=n)[0].tolist() for n in (4, 9)]
    width = 9
    input_ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    batched = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=0, route_tokens=3)
    for i, r in enumerate(rows):
        single = model.generate(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                max_new_tokens=6, do_sample=False, pad_token_id=0, route_tokens=3)
        assert batched[i, width:].tolist()[: single.shape[1] - len(r)] == single[0, len(r):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_v2_save_load_is_bit_exact_and_traces_only_routed_layers(family, tmp_path):
    model, _ = make_v2(family)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MoGUModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model(family))
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.config.version == "v2" and loaded.config.routed_layers == [1]
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    x = ids()
    loaded.enable_routing_trace()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    assert sorted(loaded.routing_trace()) == [1]


def _stage_data(folder, per_class):
    """Stage files from the first built-in prompts of each class (2 per class held out as dev)."""
    from mogu.train.data import build_stage_datasets, builtin_prompts

    harmful, benign = builtin_prompts("harmful")[:per_class], builtin_prompts("benign")[:per_class]
    for recs in (harmful, benign):
        for i, r in enumerate(recs):
            r.split = "dev" if i < 2 else "train"
    build_stage_datasets(harmful, benign, folder,
                         answer_fn=lambda ps, sample=False: [f"Here is {p.split()[0].lower()}." for p in ps],
                         seed=0, log=lambda m: None)


def _trainer(model, tmp_path, **kw):
    cfg = TrainConfig(data_dir=str(tmp_path), output_dir=str(tmp_path / "out"), **kw)
    return Trainer(model, tiny_tokenizer(), cfg, log=lambda m: None, progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_joint_stage_gradients_reach_routers_and_experts_not_the_backbone(family, tmp_path):
    tok = tiny_tokenizer()
    base = tiny_model(family)
    model = MoGUModel.from_base(base, MoGUConfig(version="v2", routed_layers=[1], lora_dropout=0.0))
    randomize_added(model)
    trainer = _trainer(model, tmp_path)
    assert trainer.joint  # v2 default
    params = trainer._stage_params("router")
    assert set(map(id, params.values())) == set(map(id, model.added_parameters()))
    model.set_trainable(list(params.values()))
    model.set_routing(STAGE_MODES["router"])
    model.train()
    batch = collate([encode_pair(tok, p, r, 12) for p, r in
                     zip(["How do I bake bread?", "Write a poem about rain"], ["Sure, here is how.", "No."])],
                    tok.pad_token_id)
    device = trainer.accelerator.device  # the Trainer moved the model there (CUDA, where there is one)
    batch = {k: v.to(device) for k, v in batch.items()}
    loss, _ = router_loss(model, batch, torch.tensor([1, 0], device=device), weight=2.0)
    loss.backward()
    named = dict(model.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == set(params)
    assert any(".router." in n for n in with_grad) and any("lora_A" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in named.items() if n not in params)


def test_joint_is_off_for_v1_and_overridable(tmp_path):
    v1 = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(router_hidden=16))
    assert not _trainer(v1, tmp_path).joint
    assert set(map(id, _trainer(v1, tmp_path)._stage_params("router").values())) == set(map(id, v1.router_parameters()))
    assert _trainer(v1, tmp_path, joint_experts=True).joint
    v2 = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(version="v2"))
    assert not _trainer(v2, tmp_path, joint_experts=False).joint
    with pytest.raises(ConfigError, match="joint_expert_lr"):
        TrainConfig(data_dir=".", output_dir=".", joint_expert_lr=0).validate()


def test_joint_stage_uses_two_learning_rates_and_moves_experts(tmp_path):

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(version="v2", routed_layers=[1]), tokenizer=tok)
    randomize_added(model)
    _stage_data(tmp_path / "data", per_class=8)
    cfg = TrainConfig(data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "run"),
                      stages={"router": StageConfig(epochs=1, lr=1e-3, batch_size=4, micro_batch_size=4)},
                      joint_expert_lr=3e-4, max_response_tokens=6, select_max_new_tokens=2)
    trainer = Trainer(model, tok, cfg, log=lambda m: None, progress=False)
    groups = trainer._param_groups("router", trainer._stage_params("router"), 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 3e-4]
    assert sum(len(g["params"]) for g in groups) == len(model.added_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".router." in n for n in changed)
    assert any("lora_B" in n and "glad" in n for n in changed) and any("lora_B" in n and "unwill" in n for n in changed)
    assert all(".router." in n or "lora_" in n for n in changed)  # the backbone never moves
    # The selected joint weights (routers and experts) are what resume reloads.
    from safetensors.torch import load_file
    selected = load_file(str(tmp_path / "run" / "stages" / "router" / "selected.safetensors"))
    assert set(selected) == set(trainer._stage_params("router"))


def test_train_v2_selects_layers_by_probe_and_resumes_with_them(tmp_path):
    """`mogu train --version v2`: probe the router set, route only the selected layers, save probe.json."""
    import json

    from mogu.train.recipes import train_model
    from mogu.train.probe import ProbeReport

    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    _stage_data(tmp_path / "data", per_class=12)
    overrides = {"max_response_tokens": 6, "select_max_new_tokens": 2, "router_init": "default",
                 "glad.epochs": 0.5, "unwill.epochs": 0.5, "router.epochs": 0.5}
    model, summary = train_model(str(base_dir), tmp_path / "data", tmp_path / "run",
                                 mogu_config=MoGUConfig(version="v2"), train_overrides=overrides,
                                 preset_name="cpu-fast", layer_selection={"top_k": 1}, progress=False)
    report = ProbeReport.load(tmp_path / "run" / "probe")
    layers = report.selection["layers"]
    assert len(layers) == 1 and model.config.routed_layers == layers
    assert [m.layer_idx for m in model.routed_modules.values()] == layers
    saved = json.loads((tmp_path / "run" / "model" / "mogu_config.json").read_text())
    assert saved["version"] == "v2" and saved["routed_layers"] == layers and saved["router_hidden"] == 16
    assert set(summary) == {"glad", "unwill", "router"}
    # Resume reads the saved selection instead of refitting (a refit could pick other layers).
    again, _ = train_model(str(base_dir), tmp_path / "data", tmp_path / "run", mogu_config=MoGUConfig(version="v2"),
                           train_overrides=overrides, preset_name="cpu-fast", layer_selection={"top_k": 1},
                           resume=True, progress=False)
    assert again.config.routed_layers == layers
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_a_checkpoint_trained_from_a_loaded_base_records_the_name_it_was_given_not_the_cache_path(tmp_path):
    import json

    from mogu.train.recipes import train_model

    base = tiny_model("llama")
    base.config._name_or_path = "/this/machine/cache/tiny"  # what load_base_model resolves an alias to
    _stage_data(tmp_path / "data", per_class=4)
    overrides = {"max_response_tokens": 4, "glad.epochs": 0.5, "unwill.epochs": 0.5, "router.epochs": 0.5,
                 "router_init": "default"}
    train_model("tiny-alias", tmp_path / "data", tmp_path / "run", mogu_config=MoGUConfig(), train_overrides=overrides,
                preset_name="cpu-fast", model=base, tokenizer=tiny_tokenizer(), progress=False)
    saved = json.loads((tmp_path / "run" / "model" / "mogu_config.json").read_text())
    assert saved["base_model_name_or_path"] == "tiny-alias"


def test_bad_routed_layers_option_is_a_clean_error(tmp_path):
    from test_cli import _assert_clean_error, mogu

    _assert_clean_error(mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--routed-layers", "1,x"),
                        "--routed-layers takes")
    _assert_clean_error(mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--version", "v9"),
                        "version must be")


def test_train_continues_from_a_mogu_checkpoint_and_trains_only_the_asked_stage(tmp_path):
    """`mogu convert peft` then `mogu train --model CKPT --stages router`: experts kept, routers trained."""
    from mogu.train.recipes import train_model

    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    start = MoGUModel.from_base(str(base_dir), MoGUConfig(router_hidden=8))
    randomize_added(start)
    start.save_pretrained(tmp_path / "ckpt")
    _stage_data(tmp_path / "data", per_class=8)
    model, summary = train_model(str(tmp_path / "ckpt"), tmp_path / "data", tmp_path / "run",
                                 mogu_config=MoGUConfig(version="v2"), preset_name="cpu-fast", progress=False,
                                 train_overrides={"stages": ["router"], "router_init": "default",
                                                  "max_response_tokens": 6, "select_max_new_tokens": 2},
                                 layer_selection={})
    assert set(summary) == {"router"}
    assert model.config.version == "v1" and model.config.router_hidden == 8  # the checkpoint's config
    before = dict(start.named_parameters())
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert torch.equal(p.cpu(), before[n]), n
    assert any(not torch.equal(p.cpu(), before[n]) for n, p in model.named_parameters() if ".router." in n)


def test_cli_trains_a_v2_prompt_gate_in_the_last_token_probe_selected_layers(tmp_path):
    """`mogu train --version v2 --router-type prompt`: layers ranked by last-token probes, gate reads only them."""
    import json

    from test_cli import mogu

    from mogu.train.probe import ProbeReport

    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    _stage_data(tmp_path / "data", per_class=8)
    result = mogu("train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--model", str(base_dir),
                  "--version", "v2", "--router-type", "prompt", "--select-top-k", "1", "--preset", "cpu-fast",
                  "--glad-epochs", "0.5", "--unwill-epochs", "0.5", "--max-response-tokens", "6", "--threads", "1")
    assert result.returncode == 0, result.stderr
    report = ProbeReport.load(tmp_path / "run" / "probe")
    assert report.selection["pooling"] == "last" and report.selection["top_k"] == 1
    layers = report.selection["layers"]
    saved = json.loads((tmp_path / "run" / "model" / "mogu_config.json").read_text())
    assert saved["version"] == "v2" and saved["router_type"] == "prompt" and saved["routed_layers"] == layers
    model = MoGUModel.from_pretrained(tmp_path / "run" / "model")
    assert model.gate.layers == layers and model.gate.weight.abs().sum() > 0
    done = json.loads((tmp_path / "run" / "stages" / "router" / "done.json").read_text())
    assert done["steps"] == 0 and "prompt gate fitted" in done["selection"]


def test_cpu_fast_gives_the_v2_unwilling_expert_three_epochs():
    """Experts in a few layers need more than v1's one unwilling epoch (docs/RESULTS.md, "MoGU v2 against v1")."""
    from mogu.train.stages import preset

    v1, v2 = preset("cpu-fast")["stages"], preset("cpu-fast", version="v2")["stages"]
    assert v1["unwill"].epochs == 1 and v2["unwill"].epochs == 3
    assert v1["glad"] == v2["glad"] and v1["router"] == v2["router"]
    assert preset("paper", version="v2") == preset("paper")
