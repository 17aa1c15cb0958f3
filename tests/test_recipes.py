"""The recipes the CLI calls (mogu.train.recipes, mogu.tuner.inference): option handling pinned without
the CLI, and the CLI left with no domain logic."""

import ast
import json
from pathlib import Path

import pytest
import torch

from mogu.errors import ConfigError, MoGUError
from mogu.train.recipes import (BUILTIN, DemoResult, dev_prompts, make_mogu_config, prompt_records, train_config,
                                train_prompts, training_card)
from mogu.tuner.inference import ChatSession, generate_answers, sampling_kwargs

CLI = Path(__file__).resolve().parents[1] / "src" / "mogu" / "cli.py"


def test_train_config_applies_stage_and_top_level_overrides_and_zero_means_every_row(tmp_path):
    cfg = train_config("cpu-fast", "v1", tmp_path / "data", tmp_path / "out",
                       {"glad.lr": 0.5, "router.max_examples": 0, "unwill.max_examples": None, "seed": 7,
                        "stages": ["glad", "router"], "max_response_tokens": 12})
    assert list(cfg.stages) == ["glad", "router"]
    assert cfg.stages["glad"].lr == 0.5 and cfg.stages["router"].max_examples is None
    assert cfg.seed == 7 and cfg.max_response_tokens == 12 and cfg.data_dir == str(tmp_path / "data")
    untouched = train_config("cpu-fast", "v1", tmp_path / "data", tmp_path / "out", {})
    assert untouched.stages["unwill"].max_examples == 128 and set(untouched.stages) == {"glad", "unwill", "router"}


def test_train_config_takes_the_faithful_switches_on_any_preset(tmp_path):
    cfg = train_config("cpu-fast", "v2", tmp_path, tmp_path, {"append_eos": False, "router_weight_average": "example",
                                                              "backbone_sharding": "fsdp2"})
    assert (cfg.append_eos, cfg.router_weight_average, cfg.backbone_sharding) == (False, "example", "fsdp2")
    assert cfg.responder_loss == "sft"  # still cpu-fast
    with pytest.raises(ConfigError, match="router_weight_average"):
        train_config("cpu-fast", "v2", tmp_path, tmp_path, {"router_weight_average": "batch"})


def test_train_config_rejects_an_unknown_stage_and_preset(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage.*'judge'"):
        train_config("paper", "v1", tmp_path, tmp_path, {"stages": ["glad", "judge"]})
    with pytest.raises(ConfigError, match="unknown preset"):
        train_config("fastest", "v1", tmp_path, tmp_path, {})


def test_make_mogu_config_parses_layers_and_zero_routes_every_token():
    cfg = make_mogu_config("o_proj,q_proj", "0,3", r=4, route_tokens=0, version="v2", router_type="prompt")
    assert cfg.target_modules == ["o_proj", "q_proj"] and cfg.routed_layers == [0, 3]
    assert cfg.route_tokens is None and cfg.r == 4 and cfg.version == "v2" and cfg.router_type == "prompt"
    assert make_mogu_config(routed_layers="probe").routed_layers is None
    with pytest.raises(ConfigError, match="comma-separated integers"):
        make_mogu_config(routed_layers="first,last")


def test_builtin_prompts_split_into_train_and_dev_and_files_are_read_whole(tmp_path):
    records = prompt_records(BUILTIN, harmful=False)
    dev = dev_prompts(BUILTIN, harmful=False)
    train = train_prompts(BUILTIN, harmful=False)
    assert dev and train and not set(dev) & set(train)
    assert sorted(dev + train) == sorted(r.prompt for r in records)
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"question {i}"}) for i in range(5)) + "\n")
    assert dev_prompts(str(f), harmful=True) == [f"question {i}" for i in range(5)]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MoGUError):
        dev_prompts(str(empty), harmful=True)


def test_training_card_has_a_row_per_stage():
    card = training_card({"glad": {"steps": 8, "train_s": 1.5, "selection": "last"},
                          "router": {"steps": 0, "train_s": 0.2, "selection": "gate fit"}})
    assert "| glad | 8 | 1.5 | last |" in card and "| router | 0 | 0.2 | gate fit |" in card


def test_demo_result_prints_the_dev_table_and_the_time_per_step():
    rates = {"harmful_dev_refusal_before": 0.0, "harmful_dev_refusal_after": 0.9, "harmful_dev_refuse_then_comply_after": 0.05,
             "benign_dev_refusal_before": 0.0, "benign_dev_refusal_after": 0.1, "n_harmful_dev": 20, "n_benign_dev": 10,
             "keyword": {"harmful_dev_refusal_before": 0.1, "harmful_dev_refusal_after": 0.95,
                         "benign_dev_refusal_before": 0.0, "benign_dev_refusal_after": 0.1},
             "data_s": 1.0, "before_s": 2.0, "after_s": 3.0, "train_s": {"glad": 4.0}, "router_init_s": 0.0,
             "router_type": "prompt", "wall_s": 120.0, "model_dir": "runs/x/calibrated"}
    text = DemoResult(rates=rates, samples={"harmful": [("p", "b", "a")], "benign": []}).to_markdown()
    assert "| harmful (20) | 0% | 90% | 5% | 10% / 95% |" in text
    assert "time (s): data 1, before 2, glad 4, after 3" in text and "wall time 2.0 min" in text


def test_generate_answers_equals_a_direct_generate_and_traces_the_router(tiny_mogu):
    model, tok = tiny_mogu
    answers, weights = generate_answers(model, tok, ["hi", "a longer prompt"], is_mogu=True, max_new_tokens=4,
                                        trace=True)
    from mogu.chat import render_prompt

    enc = tok([render_prompt(tok, p) for p in ["hi", "a longer prompt"]], return_tensors="pt", padding=True,
              add_special_tokens=False)
    out = model.generate(**enc, **sampling_kwargs(tok, 4))
    n = enc["input_ids"].shape[1]
    assert answers == [tok.decode(r[n:], skip_special_tokens=True).strip() for r in out]
    assert set(weights) == {m.layer_idx for m in model.routed_modules.values()}
    assert all(0.0 <= u <= 1.0 and 0.0 <= g <= 1.0 for u, g in weights.values())
    with pytest.raises(ConfigError, match="route-tokens"):
        generate_answers(model, tok, ["hi"], is_mogu=True, route_tokens=-1)


def test_chat_session_renders_the_whole_history_and_reset_keeps_the_system_prompt(tiny_mogu, monkeypatch):
    model, tok = tiny_mogu
    session = ChatSession(model, tok, system="be brief", max_new_tokens=3)
    first = session.reply("hello")
    seen = []
    original = model.generate

    def spy(**kw):
        seen.append(kw["input_ids"])
        return original(**kw)

    monkeypatch.setattr(model, "generate", spy)
    session.reply("and again")
    assert [h["role"] for h in session.history] == ["system", "user", "assistant", "user", "assistant"]
    assert session.history[2]["content"] == first
    rendered = tok.decode(seen[0][0])
    assert "be brief" in rendered and "hello" in rendered and "and again" in rendered
    session.reset()
    assert session.history == [{"role": "system", "content": "be brief"}]
    assert sampling_kwargs(tok, 5, temperature=0.7, top_p=0.9)["do_sample"] is True


def test_the_cli_holds_no_domain_logic():
    """cli.py parses, calls one recipe and prints: it imports no training, data or model internals."""
    tree = ast.parse(CLI.read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    allowed_prefixes = ("mogu.train.recipes", "mogu.train.calibration", "mogu.train.finetune", "mogu.train.tasks",
                        "mogu.train.probe", "mogu.tuner.inference", "mogu.tuner.loading", "mogu.tuner.interop",
                        "mogu.tuner.hub", "mogu.eval", "mogu.serve", "mogu.errors", "transformers", "typing",
                        "pathlib", "__future__")
    assert {m for m in imported if m.startswith("mogu") and not m.startswith(allowed_prefixes)} == set()
    for forbidden in ("mogu.train.stages", "mogu.train.data", "mogu.tuner.model", "mogu.chat"):
        assert forbidden not in imported
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    for recipe in ("build_data", "train_model", "calibrate_and_save", "distill_answers", "run_demo"):
        assert recipe not in functions
    assert len(CLI.read_text().splitlines()) < 700
