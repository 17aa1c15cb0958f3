"""Interoperability: the authors' released layout, PEFT adapters in and out, Hub upload, model card.

The reference model below is written from the released layout alone (adapter keys, router keys and
the layer formula), without mogu's classes, so a conversion bug cannot hide in shared code.
"""

import json
import os
import pickle
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from mogu import MoGUConfig, MoGUModel
from mogu.cli import app, main
from mogu.errors import MoGUError
from mogu.tuner.interop import (AdapterMismatchError, ReferenceFormatError, UnsafeCheckpointError, UnsupportedAdapterError, convert_peft, convert_reference, export_experts)
from mogu.tuner.hub import HubError, push_to_hub
from tiny_models import randomize_added, tiny_model, tiny_tokenizer

# Where each family keeps the wrapped projection, in the released layout's naming.
LAYOUT = {
    "llama": {"prefix": "model", "module": "model.layers.{i}.self_attn.o_proj", "peft_target": ["o_proj"]},
    "falcon": {"prefix": "transformer", "module": "transformer.h.{i}.self_attention.dense",
               "peft_target": ["dense"]},
}
SCORER_PARAMS = ("linear_0.weight", "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")
D, HIDDEN, N_LAYERS = 32, 512, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def ids(batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def save_base(family, path):
    tiny_model(family).save_pretrained(path)
    return str(path)


def make_adapter(family, path, seed, *, r=8, lora_alpha=16, target_modules=None, **kw):
    """A PEFT LoRA adapter with random non-zero A and B, saved with PEFT's own save_pretrained."""
    model = tiny_model(family)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.05, task_type="CAUSAL_LM",
                        target_modules=target_modules or LAYOUT.get(family, {}).get("peft_target"), **kw)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(str(path))
    return Path(path)


def router_state_dict(family, seed=3, hidden=HIDDEN, layers=N_LAYERS):
    prefix = LAYOUT[family]["prefix"]
    g = torch.Generator().manual_seed(seed)
    shapes = {"linear_0.weight": (hidden, D), "linear_1.weight": (D, hidden), "linear_1.bias": (D,),
              "linear_2.weight": (1, D), "linear_2.bias": (1,)}
    scale = {"linear_0.weight": 0.1, "linear_1.weight": 0.1, "linear_1.bias": 0.1, "linear_2.weight": 0.5,
             "linear_2.bias": 0.5}
    return {f"{prefix}.routers.{i}.{s}.{p}": torch.randn(shape, generator=g) * scale[p]
            for i in range(layers) for s in ("alpha_", "beta_") for p, shape in shapes.items()}


def release(tmp_path, family, router=None):
    """The authors' layout: resp_glad/<step>_lora, resp_unwill/<step>_lora, router_layer/<step>_router.pth."""
    root = tmp_path / "mogu_param"
    glad = make_adapter(family, root / "resp_glad" / "800_lora", seed=1)
    unwill = make_adapter(family, root / "resp_unwill" / "960_lora", seed=2)
    (root / "router_layer").mkdir(parents=True)
    router_path = root / "router_layer" / "5920_router.pth"
    torch.save(router if router is not None else router_state_dict(family), router_path)
    return {"glad": glad, "unwill": unwill, "router": router_path, "base": save_base(family, tmp_path / "base")}


class ReferenceLayer(nn.Module):
    """(a+b)·proj(x) + 2·(a·B_u A_u x + b·B_g A_g x) with a = alpha_(x), b = beta_(x)."""

    def __init__(self, proj, unwill, glad, alpha, beta):
        super().__init__()
        self.proj, self.unwill, self.glad, self.alpha, self.beta = proj, unwill, glad, alpha, beta

    @staticmethod
    def score(p, x):
        h = F.linear(x, p["linear_0.weight"])
        h = F.linear(h, p["linear_1.weight"], p["linear_1.bias"])
        return torch.sigmoid(F.linear(h, p["linear_2.weight"], p["linear_2.bias"]))

    def forward(self, x):
        a, b = self.score(self.alpha, x), self.score(self.beta, x)
        lu = F.linear(F.linear(x, self.unwill[0]), self.unwill[1])
        lg = F.linear(F.linear(x, self.glad[0]), self.glad[1])
        return (a + b) * self.proj(x) + 2 * (a * lu + b * lg)


def reference_model(family, files):
    model = tiny_model(family)
    glad = load_file(str(files["glad"] / "adapter_model.safetensors"))
    unwill = load_file(str(files["unwill"] / "adapter_model.safetensors"))
    routers = torch.load(files["router"], map_location="cpu", weights_only=True)
    prefix = LAYOUT[family]["prefix"]
    for i in range(N_LAYERS):
        name = LAYOUT[family]["module"].format(i=i)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        ab = lambda sd: (sd[f"base_model.model.{name}.lora_A.weight"], sd[f"base_model.model.{name}.lora_B.weight"])  # noqa: E731
        scorer = lambda s: {p: routers[f"{prefix}.routers.{i}.{s}.{p}"] for p in SCORER_PARAMS}  # noqa: E731
        setattr(parent, child, ReferenceLayer(getattr(parent, child), ab(unwill), ab(glad), scorer("alpha_"),
                                              scorer("beta_")))
    return model.eval()


def reference_generate(base, ref, prompt, route_tokens=5, max_new_tokens=12, eos=2):
    """Their inference: greedy m tokens with the routed model (no cache), then the plain base model."""
    seq = prompt
    with torch.no_grad():
        for _ in range(route_tokens):
            nxt = ref(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            if int(nxt) == eos:
                break
            seq = torch.cat([seq, nxt], dim=1)
    return base.generate(input_ids=seq, attention_mask=torch.ones_like(seq), do_sample=False,
                         max_new_tokens=max_new_tokens - (seq.shape[1] - prompt.shape[1])), seq


# -- convert reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_reference_conversion_reproduces_the_reference_model(family, tmp_path):
    files = release(tmp_path, family)
    out = tmp_path / "converted"
    # The glad adapter is given as its parent folder (resp_glad/ holding one <step>_lora).
    convert_reference(files["glad"].parent, files["unwill"], files["router"], files["base"], out)
    model = MoGUModel.from_pretrained(out, base_model=tiny_model(family))
    cfg = model.config
    assert (cfg.r, cfg.lora_alpha, cfg.router_hidden, cfg.routed_layers, cfg.route_tokens) == (8, 16, 512, None, 5)
    assert cfg.base_model_name_or_path == files["base"] and cfg.base_model_type == family
    ref = reference_model(family, files)
    x = ids()
    with torch.no_grad():
        expected = ref(input_ids=x).logits
        got = model(input_ids=x).logits
        base_logits = tiny_model(family)(input_ids=x).logits
    assert not torch.allclose(expected, base_logits, atol=1e-2)  # the routed model really differs from the base
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # Their generation: a routed greedy 5-token prefix, then the plain base model from prompt + prefix.
    # Prompts whose routed prefix holds EOS are skipped: there the reference drops the EOS and lets
    # the base model go on, while mogu ends the row (its generate stops at EOS like HF generate).
    checked, base = 0, tiny_model(family)
    for seed in range(5):
        prompt = ids(batch=1, length=6, seed=seed)
        expected_ids, prefix = reference_generate(base, ref, prompt)
        if prefix.shape[1] < 11:
            continue
        got_ids = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=12, route_tokens=5)
        assert got_ids.tolist() == expected_ids.tolist()
        checked += 1
    assert checked >= 3


def test_reference_conversion_accepts_a_model_and_a_safetensors_router(tmp_path):
    files = release(tmp_path, "llama")
    save_file(torch.load(files["router"], weights_only=True), str(tmp_path / "router.safetensors"))
    convert_reference(files["glad"], files["unwill"], files["router"], files["base"], tmp_path / "a")
    # An older PEFT layout: adapter_model.bin (read weights-only too).
    unwill_bin = tmp_path / "unwill_bin"
    unwill_bin.mkdir()
    (unwill_bin / "adapter_config.json").write_text((files["unwill"] / "adapter_config.json").read_text())
    torch.save(load_file(str(files["unwill"] / "adapter_model.safetensors")), unwill_bin / "adapter_model.bin")
    base = tiny_model("llama")
    convert_reference(files["glad"], unwill_bin, tmp_path / "router.safetensors", base, tmp_path / "b")
    assert type(base.model.layers[0].self_attn.o_proj) is nn.Linear  # only the model's config was used
    for f in ("router.safetensors", "glad/adapter_model.safetensors", "unwill/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    # alpha_ is the unwilling expert's scorer, beta_ the glad one's.
    router = load_file(str(tmp_path / "a" / "router.safetensors"))
    src = torch.load(files["router"], weights_only=True)
    assert torch.equal(router["model.layers.1.self_attn.o_proj.router.unwill.linear_2.bias"],
                       src["model.routers.1.alpha_.linear_2.bias"])
    assert torch.equal(router["model.layers.1.self_attn.o_proj.router.glad.linear_0.weight"],
                       src["model.routers.1.beta_.linear_0.weight"])
    card = (tmp_path / "a" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mogu\n") and "mogu convert reference" in card


def _assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_router_missing_a_layer_is_named(tmp_path):
    sd = {k: v for k, v in router_state_dict("llama").items() if not k.startswith("model.routers.1.alpha_")}
    files = release(tmp_path, "llama", router=sd)
    out = tmp_path / "out"
    with pytest.raises(ReferenceFormatError, match=r"missing model\.routers\.1\.alpha_\.linear_0\.weight"):
        convert_reference(files["glad"], files["unwill"], files["router"], files["base"], out)
    _assert_nothing_written(out)


def test_router_with_wrong_shapes_and_extra_keys_is_named(tmp_path):
    sd = router_state_dict("falcon")
    sd["transformer.routers.0.beta_.linear_1.bias"] = torch.zeros(31)
    sd["transformer.routers.0.gamma_.linear_0.weight"] = torch.zeros(3)
    sd["transformer.routers.7.alpha_.linear_2.bias"] = torch.zeros(1)
    files = release(tmp_path, "falcon", router=sd)
    out = tmp_path / "out"
    with pytest.raises(ReferenceFormatError) as info:
        convert_reference(files["glad"], files["unwill"], files["router"], files["base"], out)
    msg = str(info.value)
    assert "wrong shape transformer.routers.0.beta_.linear_1.bias (31,) != (32,)" in msg
    assert "unexpected transformer.routers.0.gamma_.linear_0.weight, transformer.routers.7.alpha_.linear_2.bias" in msg
    _assert_nothing_written(out)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_a_pickle_with_code_is_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "pwned.txt"
    files = release(tmp_path, "llama")
    payload = {**router_state_dict("llama"), "evil": _Payload(marker)}
    if how == "torch.save":
        torch.save(payload, files["router"])
    else:
        files["router"].write_bytes(pickle.dumps(payload))
    out = tmp_path / "out"
    with pytest.raises(UnsafeCheckpointError, match="refused: not a plain tensor file"):
        convert_reference(files["glad"], files["unwill"], files["router"], files["base"], out)
    assert not marker.exists()
    _assert_nothing_written(out)


def test_mismatched_adapters_are_named(tmp_path):
    files = release(tmp_path, "llama")
    unwill_r4 = make_adapter("llama", tmp_path / "r4", seed=5, r=4, lora_alpha=8)
    out = tmp_path / "out"
    with pytest.raises(AdapterMismatchError, match="different ranks: r=8 vs r=4"):
        convert_reference(files["glad"], unwill_r4, files["router"], files["base"], out)
    with pytest.raises(AdapterMismatchError, match="different ranks"):
        convert_peft(files["glad"], unwill_r4, files["base"], out)
    falcon_adapter = make_adapter("falcon", tmp_path / "falcon", seed=6)
    with pytest.raises(AdapterMismatchError, match="different modules"):
        convert_peft(files["glad"], falcon_adapter, files["base"], out)
    with pytest.raises(AdapterMismatchError, match="no such folder"):
        convert_reference(tmp_path / "nope", files["unwill"], files["router"], files["base"], out)
    _assert_nothing_written(out)


def test_out_that_is_not_a_checkpoint_is_never_replaced(tmp_path):
    files = release(tmp_path, "llama")
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(MoGUError, match="refusing to replace"):
        convert_reference(files["glad"], files["unwill"], files["router"], files["base"], keep)
    assert (keep / "notes.txt").read_text() == "mine"
    # --overwrite is the user's say-so, as for every other command that writes a checkpoint
    convert_reference(files["glad"], files["unwill"], files["router"], files["base"], keep, overwrite=True)
    assert not (keep / "notes.txt").exists() and (keep / "mogu_config.json").is_file()


# -- convert peft and export: round trips -----------------------------------------------------------

@pytest.mark.parametrize("family,targets", [("llama", ["o_proj"]), ("gpt2", ["attn.c_proj"])])
def test_peft_round_trip_is_bit_identical(family, targets, tmp_path):
    glad = make_adapter(family, tmp_path / "glad", seed=1, target_modules=targets)
    unwill = make_adapter(family, tmp_path / "unwill", seed=2, target_modules=targets)
    base_dir = save_base(family, tmp_path / "base")
    out = convert_peft(glad, unwill, base_dir, tmp_path / "mogu", router_hidden=16)
    exported = export_experts(out, tmp_path / "exported")
    model = MoGUModel.from_pretrained(out, base_model=tiny_model(family))
    assert model.config.router_hidden == 16 and model.config.routed_layers is None
    assert all(torch.isfinite(p).all() for p in model.router_parameters())
    x = ids()
    for expert, src in (("glad", glad), ("unwill", unwill)):
        a = load_file(str(src / "adapter_model.safetensors"))
        b = load_file(str(exported / expert / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        with torch.no_grad():
            original = PeftModel.from_pretrained(tiny_model(family), str(src)).eval()(input_ids=x).logits
            round_trip = PeftModel.from_pretrained(tiny_model(family), str(exported / expert)).eval()(input_ids=x).logits
            with model.routing(expert):
                mogu_single = model(input_ids=x).logits
        assert torch.equal(original, round_trip)
        torch.testing.assert_close(mogu_single, original, rtol=0, atol=1e-6)


def test_adapter_on_some_layers_sets_routed_layers(tmp_path):
    glad = make_adapter("llama", tmp_path / "glad", seed=1, layers_to_transform=[1])
    unwill = make_adapter("llama", tmp_path / "unwill", seed=2, layers_to_transform=[1])
    base_dir = save_base("llama", tmp_path / "base")
    with pytest.raises(AdapterMismatchError, match=r"routed_layers=\[1\] but the config asks for routed_layers=\[0, 1\]"):
        convert_peft(glad, unwill, base_dir, tmp_path / "bad", routed_layers=[0, 1])
    out = convert_peft(glad, unwill, base_dir, tmp_path / "mogu", routed_layers=[1])
    model = MoGUModel.from_pretrained(out, base_model=tiny_model("llama"))
    assert model.config.routed_layers == [1] and [m.layer_idx for m in model.routed_modules.values()] == [1]
    export_experts(model, tmp_path / "glad_only", "glad")
    x = ids()
    with torch.no_grad():
        original = PeftModel.from_pretrained(tiny_model("llama"), str(glad)).eval()(input_ids=x).logits
        exported = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "glad_only")).eval()(input_ids=x).logits
    assert torch.equal(original, exported)


@pytest.mark.parametrize("kw,match", [
    (dict(use_dora=True), "DoRA"),
    (dict(bias="lora_only"), "trained biases"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(target_modules=["q_proj", "o_proj"]), "targets 2 modules in layer 0"),
])
def test_adapters_mogu_cannot_represent_are_refused(kw, match, tmp_path):
    bad = make_adapter("llama", tmp_path / "bad", seed=1, **kw)
    good = make_adapter("llama", tmp_path / "good", seed=2)
    with pytest.raises(UnsupportedAdapterError, match=match):
        convert_peft(bad, good, save_base("llama", tmp_path / "base"), tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_config_overrides_are_checked_against_the_adapters(tmp_path):
    glad = make_adapter("llama", tmp_path / "glad", seed=1)
    unwill = make_adapter("llama", tmp_path / "unwill", seed=2)
    base_dir = save_base("llama", tmp_path / "base")
    with pytest.raises(AdapterMismatchError, match="r=8 but the config asks for r=4"):
        convert_peft(glad, unwill, base_dir, tmp_path / "out", r=4)
    with pytest.raises(AdapterMismatchError, match="do not select"):
        convert_peft(glad, unwill, base_dir, tmp_path / "out", target_modules=["q_proj"])
    gpt2 = make_adapter("gpt2", tmp_path / "gpt2", seed=3, target_modules=["c_proj"])  # attn.c_proj and mlp.c_proj
    with pytest.raises(UnsupportedAdapterError, match="2 modules in layer 0"):
        convert_peft(gpt2, gpt2, save_base("gpt2", tmp_path / "gpt2base"), tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_export_refuses_to_replace_other_folders(tmp_path):
    model = randomize_added(MoGUModel.from_base(tiny_model("llama"), MoGUConfig(router_hidden=16)))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(MoGUError, match="refusing to replace"):
        export_experts(model, tmp_path / "x")
    with pytest.raises(MoGUError, match="expert must be one of"):
        export_experts(model, tmp_path / "y", "both-ish")


# -- model card and the Hub -------------------------------------------------------------------------

def _metrics():
    rate = lambda k, n: {"k": k, "n": n, "rate": k / n, "ci95": [0.1, 0.9]}  # noqa: E731
    return {"summary": {"none": {"harmful_refusal": rate(2, 10), "benign_refusal": rate(1, 10), "usability": None},
                        "mogu": {"harmful_refusal": rate(9, 10), "benign_refusal": rate(2, 10), "usability": 4.25}},
            "cells": {"mogu": {"advbench": {"refusal": rate(9, 10)}, "just_eval": {"refusal": rate(2, 10)}},
                      "none": {"advbench": {"refusal": rate(2, 10)}, "just_eval": {"refusal": rate(1, 10)}}},
            "judge": {"name": "keyword"}, "pareto_front": ["mogu"]}


def _saved(tmp_path, **cfg):
    model = randomize_added(MoGUModel.from_base(tiny_model("llama"),
                                                MoGUConfig(router_hidden=16, base_model_name_or_path="org/tiny", **cfg)))
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "run.json").write_text(json.dumps({"args": {}, "versions": {"mogu": "0.1.0", "torch": "2"},
                                              "git_commit": "abc123", "data_sha256": {"data/router.jsonl": "f" * 64}}))
    return model, model.save_pretrained(run / "model", extra_card="## Training\n\nsteps table")


def test_model_card_has_hub_metadata_config_data_hashes_and_eval(tmp_path):
    model, ckpt = _saved(tmp_path)
    card = (ckpt / "README.md").read_text()
    header = card.split("---\n")[1]
    assert "library_name: mogu" in header and "base_model: org/tiny" in header and "- mogu" in header
    assert "| `router.jsonl` | `" + "f" * 64 + "` |" in card and "commit `abc123`" in card
    assert '"router_hidden": 16' in card and "## Training\n\nsteps table" in card
    assert "## Evaluation" not in card
    from mogu.tuner.card import refresh_card

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(_metrics()))
    refresh_card(ckpt, metrics=tmp_path / "eval", license="llama2")
    card = (ckpt / "README.md").read_text()
    assert "license: llama2" in card.split("---\n")[1]
    assert "| mogu | 90% (9/10, 95% CI 10%–90%) | 20% (2/10, 95% CI 10%–90%) | 4.25 |" in card
    assert "advbench" in card and "## Training\n\nsteps table" in card and "f" * 64 in card
    refresh_card(ckpt)  # nothing new: the license and the eval results stay
    again = (ckpt / "README.md").read_text()
    assert again == card


def test_push_to_hub_uploads_the_folder(tmp_path):
    model, ckpt = _saved(tmp_path)
    api = mock.MagicMock()
    push_to_hub(ckpt, "someone/mogu-tiny", api=api, private=True, metrics=_metrics(), license="apache-2.0")
    api.create_repo.assert_called_once()
    args, kwargs = api.create_repo.call_args
    assert args == ("someone/mogu-tiny",) and kwargs["exist_ok"] is True and kwargs["private"] is True
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "someone/mogu-tiny" and kwargs["folder_path"] == str(ckpt)
    card = (ckpt / "README.md").read_text()
    assert "license: apache-2.0" in card and "## Evaluation" in card

    seen = {}
    api = mock.MagicMock()
    api.upload_folder.side_effect = lambda **kw: seen.update(files=sorted(
        str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*") if p.is_file()))
    model.push_to_hub("someone/mogu-tiny", api=api)
    assert {"README.md", "mogu_config.json", "router.safetensors", "glad/adapter_model.safetensors",
            "unwill/adapter_config.json"} <= set(seen["files"])

    with pytest.raises(HubError, match="invalid repo id"):
        push_to_hub(ckpt, "not a/valid/id", api=mock.MagicMock())
    api = mock.MagicMock()
    api.upload_folder.side_effect = OSError("403 Forbidden: no write access")
    with pytest.raises(HubError, match="push to someone/x failed: 403 Forbidden"):
        push_to_hub(ckpt, "someone/x", api=api)


# -- the command line -----------------------------------------------------------------------------

runner = CliRunner()


def test_cli_convert_export_and_push(tmp_path, monkeypatch):
    files = release(tmp_path, "llama")
    result = runner.invoke(app, ["convert", "reference", "--glad", str(files["glad"]), "--unwill", str(files["unwill"]),
                                 "--router", str(files["router"]), "--base", files["base"], "--out",
                                 str(tmp_path / "ref")])
    assert result.exit_code == 0, result.output
    assert "mogu chat --model" in result.output and (tmp_path / "ref" / "router.safetensors").is_file()
    tiny_tokenizer().save_pretrained(files["base"])  # the converted folder runs like any checkpoint
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "ref"), "--prompt", "Hi", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "### Hi" in result.output

    result = runner.invoke(app, ["convert", "peft", "--glad", str(files["glad"]), "--unwill", str(files["unwill"]),
                                 "--base", files["base"], "--out", str(tmp_path / "peft"), "--router-hidden", "8",
                                 "--r", "8"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "peft" / "mogu_config.json").read_text())["router_hidden"] == 8

    result = runner.invoke(app, ["export", "--model", str(tmp_path / "ref"), "--out", str(tmp_path / "unwill_only"),
                                 "--expert", "unwill"])
    assert result.exit_code == 0, result.output
    a = load_file(str(files["unwill"] / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "unwill_only" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    api = mock.MagicMock()
    api.upload_folder.return_value = mock.Mock(commit_url="https://huggingface.co/me/m/commit/1")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda **kw: api)
    result = runner.invoke(app, ["push", "--model", str(tmp_path / "ref"), "--repo-id", "me/m"])
    assert result.exit_code == 0, result.output
    assert "https://huggingface.co/me/m/commit/1" in result.output
    assert api.upload_folder.call_args.kwargs["folder_path"] == str(tmp_path / "ref")

    result = runner.invoke(app, ["convert", "peft", "--glad", str(files["glad"]), "--unwill", str(files["unwill"]),
                                 "--base", files["base"], "--out", str(tmp_path / "bad"), "--r", "4"])
    assert isinstance(result.exception, AdapterMismatchError) and not (tmp_path / "bad").exists()


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    sd = router_state_dict("llama")
    del sd["model.routers.0.beta_.linear_2.bias"]
    files = release(tmp_path, "llama", router=sd)
    monkeypatch.setattr(sys, "argv", ["mogu", "convert", "reference", "--glad", str(files["glad"]), "--unwill",
                                      str(files["unwill"]), "--router", str(files["router"]), "--base", files["base"],
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "missing model.routers.0.beta_.linear_2.bias" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    for cmd in (["convert", "reference"], ["convert", "peft"], ["export"], ["push"]):
        result = runner.invoke(app, [*cmd, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
