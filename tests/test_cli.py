"""The CLI: one-line errors, non-zero exit, no traceback unless --debug."""

import os
import subprocess
import sys

import pytest
import transformers as tf

from tiny_models import tiny_model, tiny_tokenizer


def mogu(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mogu.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _assert_clean_error(result, match):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], result.stderr


def test_malformed_data_file_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": broken\n')
    result = mogu("data", "build", "--out", str(tmp_path / "out"), "--harmful", str(tmp_path / "bad.jsonl"))
    _assert_clean_error(result, "bad.jsonl:2: malformed JSON")
    assert not (tmp_path / "out").exists()
    debug = mogu("--debug", "data", "build", "--out", str(tmp_path / "out"), "--harmful", str(tmp_path / "bad.jsonl"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    _assert_clean_error(mogu("data", "build", "--out", str(tmp_path / "o"), "--benign", str(tmp_path / "empty.txt")),
                        "empty dataset")


def test_out_of_range_hyperparameters(tmp_path):
    _assert_clean_error(mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--r", "0"),
                        "r must be")
    _assert_clean_error(mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--router-lr", "3"),
                        "lr must be")
    _assert_clean_error(mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                             "--router-response-tokens", "first"), "--router-response-tokens must be")
    _assert_clean_error(mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                             "--router-response-tokens", "0"), "router_response_tokens must be")


def test_missing_model_and_unknown_family(tmp_path):
    _assert_clean_error(mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--model",
                             str(tmp_path / "missing")), "no such model folder")
    config = tf.BioGptConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64)
    tf.BioGptForCausalLM(config).save_pretrained(tmp_path / "biogpt")
    tiny_tokenizer().save_pretrained(tmp_path / "biogpt")
    result = mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "biogpt"))
    _assert_clean_error(result, "unknown model family 'biogpt'")
    assert "self_attn.out_proj" in result.stderr


def test_mismatched_checkpoint(tmp_path):
    from mogu import MoGUConfig, MoGUModel

    MoGUModel.from_base(tiny_model("llama"), MoGUConfig()).save_pretrained(tmp_path / "ckpt")
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    import json

    cfg = json.loads((tmp_path / "ckpt" / "mogu_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gpt2")
    (tmp_path / "ckpt" / "mogu_config.json").write_text(json.dumps(cfg))
    _assert_clean_error(mogu("generate", "--model", str(tmp_path / "ckpt"), "--prompt", "hi"), "'llama' model")


def test_generate_on_a_tiny_checkpoint(tmp_path):
    from mogu import MoGUConfig, MoGUModel

    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    MoGUModel.from_base(str(base_dir), MoGUConfig()).save_pretrained(tmp_path / "ckpt")
    result = mogu("generate", "--model", str(tmp_path / "ckpt"), "--prompt", "How do I bake bread?",
                  "--prompt", "Hi", "--max-new-tokens", "4", "--trace")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("### ") == 2 and "layer 0: mean u=" in result.stdout


@pytest.mark.parametrize("cmd", [[], ["data", "build"], ["train"], ["generate"], ["chat"], ["demo"], ["calibrate"]])
def test_help(cmd):
    result = mogu(*cmd, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_demo_under_several_launched_processes_is_a_one_line_error_before_it_writes_anything(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WORLD_SIZE": "2"}
    result = subprocess.run([sys.executable, "-m", "mogu.cli", "demo", "--out", str(tmp_path / "demo")],
                            capture_output=True, text=True, env=env, timeout=300)
    _assert_clean_error(result, "mogu demo runs in one process, and 2 were launched")
    assert not (tmp_path / "demo").exists()


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path):
    # The main job's code path (data with a benign sample, cpu-fast training, before/after, timings) on
    # a tiny random Llama: what it learns is meaningless, that every step runs and records is not.
    import json

    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    result = mogu("demo", "--model", str(base_dir), "--out", str(tmp_path / "demo"), "--eval-tokens", "4",
                  "--threads", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| harmful (" in result.stdout and "time (s): data" in result.stdout
    rates = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert {"data_s", "before_s", "after_s", "router_init_s", "wall_s"} <= set(rates)
    # Judged on whole answers (keyword rates beside), with the default hold hand-off.
    assert rates["judge"] == "whole_answer" and rates["handoff"] == "hold"
    assert set(rates["keyword"]) == {"harmful_dev_refusal_before", "harmful_dev_refusal_after",
                                     "benign_dev_refusal_before", "benign_dev_refusal_after"}
    # The demo's default router is the prompt gate: fitted in the router stage, no probe init of routers.
    assert rates["router_type"] == "prompt" and rates["router_init_s"] == 0
    assert set(rates["train_s"]) == {"glad", "unwill", "router"} and rates["train_s"]["router"] > 0
    config = json.loads((tmp_path / "demo" / "train" / "model" / "mogu_config.json").read_text())
    assert config["router_type"] == "prompt"
    done = json.loads((tmp_path / "demo" / "train" / "stages" / "router" / "done.json").read_text())
    assert done["steps"] == 0 and "prompt gate fitted" in done["selection"]
    stats = json.loads((tmp_path / "demo" / "data" / "data_stats.json").read_text())
    assert stats["benign_train_used"] == 240 < stats["benign_train_available"]
    # The gate is fitted on every labelled train prompt, the benign ones left out of distillation too.
    # ...and framed copies of them (shipped jailbreak-style frames), as many harmful as benign.
    # ...and mogu's probe-only prompts of both labels (on by default; `data build --no-builtin-probe`: off).
    from mogu.train.data import builtin_probe_only

    shipped = builtin_probe_only()
    extra = (sum(not r.harmful for r in shipped), sum(r.harmful for r in shipped))
    assert (stats["probe_extra_benign"], stats["probe_extra_harmful"]) == extra
    assert stats["probe"] == (stats["glad_pairs"] + stats["benign_train_available"] + stats["probe_framed"]
                              + sum(extra))
    assert stats["probe_framed"] == 2 * stats["glad_pairs"]
    assert f"fitted on {stats['probe']} labelled train prompts" in done["selection"]
    assert (tmp_path / "demo" / "train" / "model" / "mogu_config.json").is_file()
    # calibrated by default: the operating point is chosen on the dev split and the judged model is that one,
    # judged on the routed prefix (route_tokens) with the default bisection steps
    calibration = json.loads((tmp_path / "demo" / "calibrated" / "calibration.json").read_text())
    assert rates["calibration"]["glad_bias"] == calibration["chosen"] and calibration["points"]
    assert calibration["max_new_tokens"] == 5 and calibration["refine"] == 2
    assert rates["model_dir"].endswith("calibrated") and "operating point: glad bias" in result.stdout
    assert "generated once per expert" in result.stderr  # the gate's exact calibration, not one pass per point
