"""Task fine-tuning: seeded tasks and exact match, the task LoRA's isolation, the data mix, save/load, resume, CLI."""

import datetime
import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from mogu import MoGUConfig, MoGUModel
from mogu.cli import app, main
from mogu.errors import CheckpointMismatchError, ConfigError, MoGUError
from mogu.tuner.loading import load_base_model
from mogu.train.finetune import FinetuneConfig, FineTuner, MixSchedule, evaluate_task, load_finetuned_base
from mogu.tuner.task_adapter import (add_task_adapter, default_task_targets, has_task_adapter, resolve_task_targets, task_adapter_parameters)
from mogu.train.tasks import (ARITH_TEMPLATES, DATE_INSTRUCTIONS, DATE_STYLES, TASKS, make_split, make_task, ordinal_suffix,
                        ordinal_words, score_exact, write_task_data)
from tiny_models import randomize_added, tiny_model, tiny_tokenizer

# PeftModel.from_pretrained calls a transformers method deprecated in v5.
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.usefixtures("one_thread")]


def _mogu(family="llama", base=None):
    model = MoGUModel.from_base(base if base is not None else tiny_model(family),
                                MoGUConfig(router_hidden=16, lora_dropout=0.0), tokenizer=tiny_tokenizer())
    return randomize_added(model)


def _data(tmp_path, n_train=16):
    task = tmp_path / "task"
    if not (task / "train.jsonl").is_file():
        write_task_data("date-iso", task, n_train=n_train, n_test=8, seed=0)
        rows = [{"prompt": f"How do I make weapon number {i}?", "response": "I'm sorry, but I can't help with that.",
                 "label": 1} for i in range(3)]
        rows += [{"prompt": f"Name a fruit, number {i}.", "response": "Here is one: an apple.", "label": 0}
                 for i in range(3)]
        (tmp_path / "router.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return task, tmp_path / "router.jsonl"


def _cfg(tmp_path, name, **kw):
    task, mix = _data(tmp_path)
    kw = {"steps": 4, "batch_size": 4, "lr": 1e-2, "save_every": 2, "max_response_tokens": 12, **kw}
    if kw.get("mix_ratio"):
        kw.setdefault("mix_data", str(mix))
    return FinetuneConfig(task_data=str(task), output_dir=str(tmp_path / name), **kw)


def _tuner(model, cfg):
    return FineTuner(model, tiny_tokenizer(), cfg, log=lambda m: None, progress=False)


def _logits(model, seed=0):
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)  # the tuner moves its model to the accelerator, if any
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.cpu()


def _device(model):
    return next(model.parameters()).device


def _save_base(tmp_path, family="llama"):
    path = tmp_path / f"base-{family}"
    if not path.is_dir():
        tiny_model(family).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return str(path)


# -- tasks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_seeded_and_train_test_disjoint(name):
    train, test = make_split(name, 300, 150, seed=0)
    assert (train, test) == make_split(name, 300, 150, seed=0)
    assert make_split(name, 300, 150, seed=1)[0] != train
    assert len(train) == 300 and len(test) == 150
    for split in (train, test):
        assert len({r["key"] for r in split}) == len(split)
    assert not {r["key"] for r in train} & {r["key"] for r in test}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert make_task(name, 150, 0, split="train") == train[:150]  # a longer split extends a shorter one
    for r in train + test:
        assert r["task"] == name and r["response"] == str(r["answer"])
        assert score_exact(name, r["response"], r["answer"])
        if name == "date-iso":
            assert 1950 <= datetime.date.fromisoformat(r["answer"]).year <= 2049
            assert "'" not in r["prompt"]  # no two-digit years
        else:
            assert isinstance(r["answer"], int) and r["answer"] >= 0
    if name == "arith":
        assert {r["key"].split(":")[0] for r in train} == set(ARITH_TEMPLATES)
    else:  # every instruction phrasing and several date styles turn up
        assert all(any(i.split("{date}")[0] in r["prompt"] for r in train) for i in DATE_INSTRUCTIONS)
        assert all(any(marker in r["prompt"] for r in train) for marker in ("US style", "day first", " of ", "day, "))


def test_date_styles_name_the_same_day():
    day = datetime.date(2021, 3, 5)
    rendered = {style: fn(day) for style, fn in DATE_STYLES.items()}
    assert rendered["month-day-year"] == "March 5, 2021"
    assert rendered["ordinal-of"] == "5th of March 2021"
    assert rendered["words"] == "the fifth of March, 2021"
    assert rendered["us-numeric"] == "03/05/2021 (US style, month first)"
    assert rendered["day-first-numeric"] == "05/03/2021 (day first, then month)"
    assert rendered["weekday"] == "Friday, March 5, 2021"
    assert [ordinal_suffix(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]
    assert [ordinal_words(n) for n in (1, 12, 20, 21, 30, 31)] == \
        ["first", "twelfth", "twentieth", "twenty-first", "thirtieth", "thirty-first"]


@pytest.mark.parametrize("name,response,answer,ok", [
    ("date-iso", "2021-03-05", "2021-03-05", True),
    ("date-iso", "  2021-03-05.\n", "2021-03-05", True),
    ("date-iso", "2021-3-5", "2021-03-05", False),
    ("date-iso", "The date is 2021-03-05", "2021-03-05", False),
    ("date-iso", "2021-03-05..", "2021-03-05", False),  # one trailing period only
    ("arith", "12", 12, True),
    ("arith", " 12.\n", 12, True),
    ("arith", "012", 12, True),
    ("arith", "12 apples", 12, False),
    ("arith", "The answer is 12", 12, False),
    ("arith", "12.0", 12, False),
    ("arith", "13", 12, False),
    ("arith", "", 12, False),
])
def test_exact_match_rules(name, response, answer, ok):
    assert score_exact(name, response, answer) is ok


def test_unknown_task_is_a_mogu_error():
    for call in (lambda: make_task("bogus", 3), lambda: score_exact("bogus", "1", 1)):
        with pytest.raises(MoGUError, match="unknown task 'bogus'; known: date-iso, arith"):
            call()


# -- where the task LoRA goes ----------------------------------------------------------------------
@pytest.mark.parametrize("family,expected", [
    ("llama", ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    ("gpt2", ["c_attn", "c_fc", "mlp.c_proj"]),  # plain c_proj would also hit the routed attn.c_proj
    ("falcon", ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"]),
])
def test_default_targets_skip_the_routed_projection(family, expected):
    assert default_task_targets(_mogu(family)) == expected
    assert default_task_targets(tiny_model(family)) == expected  # a base fine-tune trains the same adapter


def test_target_override_errors_list_the_candidates():
    model = _mogu("llama")
    with pytest.raises(ConfigError, match="selects MoGU-routed modules .*self_attn.q_proj"):
        resolve_task_targets(model, ["o_proj"])
    with pytest.raises(ConfigError, match="'nope' matches no projection.*candidates: self_attn.q_proj"):
        resolve_task_targets(model, ["q_proj", "nope"])
    with pytest.raises(ConfigError, match="selects model.layers.0.self_attn, not a projection"):
        resolve_task_targets(model, ["self_attn"])
    assert resolve_task_targets(model, ["q_proj"]) == ["q_proj"]
    assert resolve_task_targets(tiny_model("llama"), ["o_proj"]) == ["o_proj"]  # a base has nothing routed


# -- gradients, mix, loss --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["mogu", "base"])
def test_gradients_reach_only_the_task_lora(tmp_path, family, kind):
    model = _mogu(family) if kind == "mogu" else tiny_model(family)
    tuner = _tuner(model, _cfg(tmp_path, "g", mix_ratio=0.25))
    task_params = task_adapter_parameters(model)
    assert task_params and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in task_params)
    with torch.no_grad():  # non-zero B so the A matrices get a gradient too
        for p in task_params.values():
            p.normal_(0, 0.1)
    tuner._train_mode()
    tuner._step(0, tuner.encode())
    task_ids = {id(p) for p in task_params.values()}
    for name, p in model.named_parameters():
        if id(p) in task_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_micro_batches_add_up_to_the_batch_gradient(tmp_path):
    grads = []
    for micro in (None, 3):
        model = _mogu()
        tuner = _tuner(model, _cfg(tmp_path, f"micro{micro}", mix_ratio=0.25, batch_size=8, micro_batch_size=micro,
                                     lora_dropout=0.0))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in task_adapter_parameters(model).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        tuner._train_mode()
        logs = tuner._step(0, tuner.encode())
        grads.append(({k: p.grad.clone() for k, p in task_adapter_parameters(model).items()}, logs["loss"]))
    (full, loss_full), (split, loss_split) = grads
    assert loss_split == pytest.approx(loss_full, rel=1e-5)
    for k in full:
        assert torch.allclose(full[k], split[k], atol=1e-6), k


@pytest.mark.parametrize("kind", ["mogu", "base"])
def test_training_moves_only_the_task_lora(tmp_path, kind):
    model = _mogu("llama") if kind == "mogu" else tiny_model("llama")
    before = {id(p): p.detach().clone() for p in model.parameters()}  # PEFT renames q_proj.weight: go by identity
    tuner = _tuner(model, _cfg(tmp_path, "t", mix_ratio=0.25))
    task_ids = {id(p) for p in task_adapter_parameters(model).values()}
    tuner.train()
    assert set(before) == {id(p) for p in model.parameters()} - task_ids
    for name, p in model.named_parameters():
        if id(p) not in task_ids:
            assert torch.equal(p.cpu(), before[id(p)].cpu()), name  # backbone, experts and routers untouched
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in task_adapter_parameters(model).items()
               if "lora_B" in n)


def test_mix_schedule_counts_and_coverage():
    def mix_counts(sched, steps):
        return [sum(src == "mix" for src, _ in sched.batch(s)) for s in range(steps)]

    assert mix_counts(MixSchedule(10, 3, 8, 0.25, 0), 6) == [2] * 6
    assert mix_counts(MixSchedule(10, 3, 10, 0.3, 0), 6) == [3] * 6  # 0.3 * 10 is 2.999... as floats
    assert mix_counts(MixSchedule(10, 0, 8, 0.0, 0), 4) == [0] * 4
    counts = mix_counts(MixSchedule(10, 3, 8, 0.2, 0), 10)  # 1.6 per batch: floor or ceil, exact in total
    assert set(counts) == {1, 2} and sum(counts[:5]) == 8 and sum(counts) == 16
    sched = MixSchedule(10, 3, 8, 0.25, 0)
    assert all(len(sched.batch(s)) == 8 for s in range(6))
    assert [sched.mix_count(s) for s in range(6)] == mix_counts(sched, 6)
    task = [i for s in range(5) for src, i in sched.batch(s) if src == "task"]  # 30 task rows: 3 passes
    assert all(sorted(task[k:k + 10]) == list(range(10)) for k in (0, 10, 20))
    assert task[:10] != task[10:20]  # each pass reshuffled
    mix = [i for s in range(6) for src, i in sched.batch(s) if src == "mix"]
    assert all(sorted(mix[k:k + 3]) == [0, 1, 2] for k in range(0, 12, 3))
    assert [MixSchedule(10, 3, 8, 0.25, 0).batch(s) for s in range(3)] == [sched.batch(s) for s in range(3)]
    assert MixSchedule(10, 3, 8, 0.25, 1).batch(0) != sched.batch(0)


def test_training_batches_hold_the_mix_rows(tmp_path):
    _tuner(_mogu(), _cfg(tmp_path, "m", mix_ratio=0.2, steps=5, batch_size=8)).train()
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mix_rows"] for r in rows] == [1, 2, 1, 2, 2]
    assert all(r["mix_rows"] + r["task_rows"] == 8 and "mix_ce" in r for r in rows)
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["mix_rows_seen"] == 8 and summary["task_rows_seen"] == 32


def test_loss_falls_on_a_tiny_overfit_run(tmp_path):
    from mogu.io import write_jsonl

    write_jsonl(tmp_path / "four.jsonl", make_task("date-iso", 4, 0))
    model = _mogu()
    with torch.no_grad():  # a random tiny head (std 0.02) keeps every logit near 0; scaled, the LoRA can move them
        model.base_model.lm_head.weight.mul_(10)
    cfg = FinetuneConfig(task_data=str(tmp_path / "four.jsonl"), output_dir=str(tmp_path / "fit"), steps=30,
                         batch_size=4, lr=1e-2, save_every=100, max_response_tokens=12)
    summary = _tuner(model, cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and summary["first_loss"] == rows[0]["loss"]
    assert sum(r["loss"] for r in rows[-3:]) / 3 < 0.5 * rows[0]["loss"]


# -- save / load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mogu_with_task_adapter_saves_and_loads_bit_exact(tmp_path, family):
    from peft import PeftModel

    base = _save_base(tmp_path, family)
    model = _mogu(family, base=base)  # the config names the base folder, so from_pretrained finds it
    _tuner(model, _cfg(tmp_path, "run", steps=3)).train()
    folder = tmp_path / "run" / "model"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (folder / "task_adapter").iterdir()}
    loaded = MoGUModel.from_pretrained(folder).to(_device(model))  # compare on one device: bit-exact
    assert has_task_adapter(loaded) and not loaded.training
    assert not any(p.requires_grad for p in task_adapter_parameters(loaded).values())
    for mode in ("auto", "off", "unwill"):
        with model.routing(mode), loaded.routing(mode):
            assert torch.equal(_logits(model), _logits(loaded)), mode
    # The task adapter is a standard PEFT folder: on the plain base it is the MoGU model with routing off.
    peft_model = PeftModel.from_pretrained(load_base_model(base)[0], str(folder / "task_adapter")).eval()
    peft_model.to(_device(model))
    with loaded.routing("off"):
        assert torch.equal(_logits(peft_model), _logits(loaded))
    loaded.save_pretrained(tmp_path / "again")  # a loaded fine-tuned model round-trips
    assert torch.equal(_logits(MoGUModel.from_pretrained(tmp_path / "again").to(_device(model))), _logits(loaded))


def test_base_adapter_saves_loads_bit_exact_and_loads_with_peft(tmp_path):
    from peft import PeftModel

    base = _save_base(tmp_path)
    model = load_base_model(base)[0]
    targets = default_task_targets(model)
    _tuner(model, _cfg(tmp_path, "b", steps=3)).train()
    tuner_out = tmp_path / "b" / "model"
    config = json.loads((tuner_out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(targets)
    assert config["base_model_name_or_path"] == base  # the base id is recorded
    expected = _logits(model)
    peft_model = PeftModel.from_pretrained(load_base_model(base)[0], str(tuner_out)).eval().to(_device(model))
    assert torch.equal(_logits(peft_model), expected)
    loaded, tok = load_finetuned_base(tuner_out, base=base)
    assert torch.equal(_logits(loaded.to(_device(model))), expected)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert {"args", "versions", "git_commit", "data_sha256"} <= set(run) and len(run["data_sha256"]) == 1


def test_broken_task_adapter_is_refused(tmp_path):
    model = _mogu()
    add_task_adapter(model)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "task_adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointMismatchError, match="incomplete task adapter"):
        MoGUModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model("llama"))


# -- resume ------------------------------------------------------------------------------------------
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    kw = {"steps": 6, "mix_ratio": 0.25, "lora_dropout": 0.1}  # dropout: the RNG state must resume too
    model_a = _mogu()
    summary_a = _tuner(model_a, _cfg(tmp_path, "a", **kw)).train()
    final = {k: p.detach().clone() for k, p in task_adapter_parameters(model_a).items()}

    original = FineTuner._append_metrics

    def crash(self, row):
        original(self, row)
        if row["step"] == 3:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(FineTuner, "_append_metrics", crash)
    with pytest.raises(KeyboardInterrupt):
        _tuner(_mogu(), _cfg(tmp_path, "b", **kw)).train()
    monkeypatch.setattr(FineTuner, "_append_metrics", original)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-0000002"]

    model_c = _mogu()
    summary_c = _tuner(model_c, _cfg(tmp_path, "b", **kw)).train(resume=True)
    for k, p in task_adapter_parameters(model_c).items():
        assert torch.equal(p, final[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step duplicated or missing
    # The summary is the run's, not the resumed part's: its first loss is step 1's.
    assert summary_c["first_loss"] == summary_a["first_loss"] and summary_c["last_loss"] == summary_a["last_loss"]


# -- CLI and evaluation --------------------------------------------------------------------------------
def test_cli_data_task_and_finetune_end_to_end(tmp_path):
    from mogu.tuner.inference import load_for_inference

    runner = CliRunner()
    base = _save_base(tmp_path)
    MoGUModel.from_base(base, MoGUConfig(router_hidden=16)).save_pretrained(tmp_path / "ckpt")
    result = runner.invoke(app, ["data", "task", "--name", "arith", "--train", "12", "--test", "6",
                                 "--out", str(tmp_path / "arith")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "arith" / "run.json").read_text())["args"]["task"] == "arith"
    _, router = _data(tmp_path)
    result = runner.invoke(app, ["finetune", "--model", str(tmp_path / "ckpt"), "--task-data", str(tmp_path / "arith"),
                                 "--out", str(tmp_path / "ft"), "--mix-data", str(router), "--steps", "2",
                                 "--batch-size", "5", "--max-response-tokens", "8"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["mix_ratio"] == 0.2 and summary["mix_rows_seen"] == 2  # 0.2 is the default with --mix-data
    run = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert len(run["data_sha256"]) == 2 and run["args"]["task"] == "arith"
    model, tok, is_mogu = load_for_inference(str(tmp_path / "ft" / "model"))
    assert is_mogu and has_task_adapter(model)
    test = [json.loads(line) for line in (tmp_path / "arith" / "test.jsonl").read_text().splitlines()]
    import mogu.train.stages as stages

    # Scored answers, not the tiny model's random ones: the right answer on every other row gives exactly 1/2.
    answers = [str(r["answer"]) if i % 2 == 0 else "no idea" for i, r in enumerate(test)]
    real = stages.generate_responses
    stages.generate_responses = lambda generator, tok, prompts, **kw: answers[:len(prompts)]
    try:
        assert evaluate_task(model, tok, test, max_new_tokens=3) == sum(i % 2 == 0 for i in range(len(test))) / len(test)
        base_model = tiny_model("llama")
        assert evaluate_task(base_model, tiny_tokenizer(), test, "arith", max_new_tokens=3) == \
            sum(i % 2 == 0 for i in range(len(test))) / len(test)
    finally:
        stages.generate_responses = real
    again = runner.invoke(app, ["finetune", "--model", str(tmp_path / "ft" / "model"), "--task-data",
                                str(tmp_path / "arith"), "--out", str(tmp_path / "ft2"), "--steps", "1"])
    assert isinstance(again.exception, MoGUError) and "already carries a task adapter" in str(again.exception)


@pytest.mark.parametrize("args,match", [
    (["finetune", "--task-data", "{tmp}/missing"], "no such task file"),
    (["finetune", "--task-data", "{tmp}/task", "--mix-ratio", "1.0", "--mix-data", "{tmp}/router.jsonl"],
     "mix ratio must be in [0, 1)"),
    (["finetune", "--task-data", "{tmp}/task", "--mix-ratio", "-0.1"], "mix ratio must be in [0, 1)"),
    (["finetune", "--task-data", "{tmp}/task", "--mix-ratio", "0.2"], "needs mix data"),
    (["finetune", "--task-data", "{tmp}/task", "--mix-data", "{tmp}/nothing"], "no such mix file"),
    (["finetune", "--task-data", "{tmp}/task", "--steps", "3", "--epochs", "1"], "not both"),
    (["data", "task", "--name", "bogus", "--out", "{tmp}/t"], "unknown task 'bogus'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, match):
    _data(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "finetune":
        args += ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, MoGUError) and match in str(result.exception)
    monkeypatch.setattr(sys, "argv", ["mogu", *args])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_lora_defenses_refuse_a_model_with_a_task_adapter():
    # peft_adapter's unload() would strip the task LoRA too, silently evaluating another model.
    from mogu.eval.defenses import peft_adapter
    from peft import LoraConfig

    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(router_hidden=8), tokenizer=tiny_tokenizer())
    add_task_adapter(model)
    with pytest.raises(ConfigError, match="already carries"):
        with peft_adapter(model.base_model, None, config=LoraConfig(r=2, target_modules=["q_proj"])):
            pass


def _gated(family="llama", base=None):
    model = MoGUModel.from_base(base if base is not None else tiny_model(family),
                                MoGUConfig(router_type="prompt", lora_dropout=0.0), tokenizer=tiny_tokenizer())
    randomize_added(model)
    with torch.no_grad():  # random probes: each decision depends on the prompt
        model.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return model


@pytest.mark.parametrize("gate_benign", ["base", "glad"])
def test_gated_model_pins_the_prompt_decision_in_training(tmp_path, gate_benign):
    model = _gated()
    model.config.gate_benign = gate_benign
    tuner = _tuner(model, _cfg(tmp_path, "g", mix_ratio=0.25))
    seqs = tuner.encode()["task"][:3] + tuner.encode()["mix"][:2]
    tok = tiny_tokenizer()
    weights = tuner._gate_weights(seqs)
    for row, (ids, n_resp) in enumerate(seqs):  # each row: the gate on its prompt alone, unpadded
        prompt = torch.tensor([ids[:len(ids) - n_resp]], device=_device(model))
        assert torch.equal(weights[row], model.routing_weights(prompt)[0].to(weights.device)), row
    # Thresholds either side of every score: all rows passed, then all unwill, in the training forward too.
    from mogu.train.losses import collate, sequence_nll

    batch = {k: v.to(_device(model)) for k, v in collate(seqs, tok.pad_token_id).items()}
    scores = model.gate_scores(*[collate([(i[:len(i) - n], 0) for i, n in seqs], tok.pad_token_id)[k].to(_device(model))
                                 for k in ("input_ids", "attention_mask")])
    passed = "off" if model.config.gate_benign == "base" else "glad"  # a passed prompt: the base layer alone
    for threshold, mode in ((float(scores.max()) + 1, passed), (float(scores.min()) - 1, "unwill")):
        with torch.no_grad():
            model.gate.threshold.fill_(threshold)
            tuner._train_mode()
            with model.pin_routing(tuner._gate_weights(seqs)):
                pinned = sequence_nll(model, batch)
            model.set_routing(mode)
            single = sequence_nll(model, batch)
        torch.testing.assert_close(pinned, single)  # float32 tolerance: the pinned path sums u·(...) + g·(...)


def test_gated_model_finetunes_only_the_task_lora_and_round_trips(tmp_path):
    base = _save_base(tmp_path)
    model = _gated(base=base)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    tuner = _tuner(model, _cfg(tmp_path, "gr", steps=3, mix_ratio=0.25, refit_gate=False))
    task_ids = {id(p) for p in task_adapter_parameters(model).values()}
    tuner.train()
    for name, p in model.named_parameters():
        if id(p) not in task_ids:
            assert torch.equal(p.cpu(), before[id(p)].cpu()), name  # backbone, experts and gate untouched
    loaded = MoGUModel.from_pretrained(tmp_path / "gr" / "model").to(_device(model))
    assert loaded.gate is not None and has_task_adapter(loaded)
    for mode in ("auto", "off", "glad"):
        with model.routing(mode), loaded.routing(mode):
            assert torch.equal(_logits(model), _logits(loaded)), mode


def test_gated_model_refits_the_gate_on_the_mix_set_and_keeps_the_threshold(tmp_path):
    from mogu.train.probe import fit_gate

    model = _gated(base=_save_base(tmp_path))
    with torch.no_grad():
        model.gate.threshold.fill_(0.75)
    before = model.gate.weight.detach().clone()
    tuner = _tuner(model, _cfg(tmp_path, "refit", steps=2, mix_ratio=0.25))
    summary = tuner.train()
    refit = summary["gate_refit"]
    assert refit["examples"] == 6 and refit["threshold"] == 0.75 and float(model.gate.threshold) == 0.75
    assert not torch.equal(model.gate.weight.cpu(), before)
    # The refit is fit_gate on the fine-tuned model (task adapter active) over the mix rows.
    refitted = model.gate.weight.detach().clone()
    rows = tuner.mix_rows
    fit_gate(model, [r["prompt"] for r in rows], [int(r["label"]) for r in rows])
    assert torch.equal(model.gate.weight, refitted)
    loaded = MoGUModel.from_pretrained(tmp_path / "refit" / "model")
    assert torch.equal(loaded.gate.weight, refitted.cpu()) and float(loaded.gate.threshold) == 0.75


def test_gated_model_without_mix_data_keeps_its_gate(tmp_path):
    model = _gated()
    before = model.gate.weight.detach().clone()
    summary = _tuner(model, _cfg(tmp_path, "nomix", steps=2)).train()
    assert "gate_refit" not in summary and torch.equal(model.gate.weight.cpu(), before)


@pytest.mark.parametrize("name,response,answer,ok", [
    ("arith", "Noah has 11 stickers and gives away 10, so 11 - 10 = 1", 1, True),
    ("arith", "The answer is 12.", 12, True),
    ("arith", "12 apples, then 3 more: 15", 12, False),  # the last integer is the final answer
    ("arith", "about 12.5", 12, False),                  # not an integer
    ("arith", "I'm sorry, I can't help with that.", 12, False),
    ("date-iso", "That date is 2021-03-05 in ISO form.", "2021-03-05", True),
    ("date-iso", "2021-03-05, or rather 2021-05-03", "2021-03-05", False),
    ("date-iso", "March 5, 2021", "2021-03-05", False),
])
def test_score_final_takes_the_last_integer_or_iso_date_as_the_answer(name, response, answer, ok):
    from mogu.train.tasks import score_final

    assert score_final(name, response, answer) is ok
