"""`mogu eval` runner: files written, resume, metrics, Pareto front, CLI errors (tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mogu.errors import ConfigError
from mogu.eval.report import compute_metrics, pareto_front
from mogu.eval.runner import EvalConfig, EvalRunner, parse_options
from mogu.eval.report import wilson_interval
from tiny_models import tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


def _cfg(tmp_path, **kw):
    base = dict(model="tiny", out=tmp_path / "eval", defenses=["none", "self_reminder", "mogu"],
                benchmarks=["advbench", "just_eval"], data_dir=str(FIXTURES), limit=3, max_new_tokens=4,
                batch_size=2, chunk_size=2, routing_examples=1)
    base.update(kw)
    return EvalConfig(**base)


def test_run_writes_every_artifact_and_resumes(tmp_path, tiny_mogu, monkeypatch):
    model, tok = tiny_mogu
    cfg = _cfg(tmp_path)
    metrics = EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    out = cfg.out
    for name in ("generations.jsonl", "judgements.jsonl", "metrics.json", "report.md", "pareto.png",
                 "routing.png", "run.json"):
        assert (out / name).is_file(), name
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    n_prompts = {"advbench": 3, "just_eval": 3}
    assert len(gens) == 3 * sum(n_prompts.values())
    assert {(g["defense"], g["benchmark"]) for g in gens} == {(d, b) for d in cfg.defenses for b in cfg.benchmarks}
    assert set(metrics["summary"]) == set(cfg.defenses)
    cell = metrics["cells"]["none"]["advbench"]
    judged = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    verdicts = [j["verdict"] for j in judged if (j["defense"], j["benchmark"]) == ("none", "advbench")]
    assert cell["n"] == 3 and len(verdicts) == 3
    assert cell["asr"]["k"] == sum(v in ("comply", "refuse_then_comply") for v in verdicts)  # the judge's verdicts
    assert cell["refusal"]["k"] == verdicts.count("refusal")
    run = json.loads((out / "run.json").read_text())
    assert set(run["benchmark_sha256"]) == {"advbench", "just_eval"} and "git_commit" in run
    assert "mogu" in run["defense_params"]
    report = (out / "report.md").read_text()
    assert "| advbench (harmful, n=3)" in report and "Pareto" in report

    # A crash mid-append leaves a partial line: the rerun drops it, regenerates that prompt only,
    # and never calls generate for finished work.
    lines = (out / "generations.jsonl").read_text().splitlines(keepends=True)
    (out / "generations.jsonl").write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    calls = []
    from mogu.eval import defenses as defenses_mod

    real_build = defenses_mod.build_defense

    def counting_build(name, **kw):
        d = real_build(name, **kw)
        real_generate = d.generate

        def generate(prompts, **gkw):
            calls.append((name, len(prompts)))
            return real_generate(prompts, **gkw)

        d.generate = generate
        return d

    monkeypatch.setattr(defenses_mod, "build_defense", counting_build)
    metrics2 = EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    assert calls == [(gens[-1]["defense"], 1)]
    assert metrics2["summary"] == metrics["summary"]
    gens2 = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens2) == len(gens)


def test_mogu_defense_needs_a_mogu_model(tmp_path):
    tok = tiny_tokenizer()
    cfg = _cfg(tmp_path, defenses=["none", "mogu"])
    with pytest.raises(ConfigError, match="MoGU checkpoint"):
        EvalRunner(cfg, model=tiny_model("llama"), tokenizer=tok, log=lambda m: None).run()


def test_config_validation(tmp_path):
    for bad in (dict(defenses=[]), dict(benchmarks=[]), dict(limit=0), dict(max_new_tokens=0),
                dict(defenses=["none", "none"])):
        with pytest.raises(ConfigError):
            _cfg(tmp_path, **bad).validate()


def test_parse_options():
    assert parse_options(["safedecoding.alpha=2", "sft.data=x.jsonl", "sft.steps=5"]) == {
        "safedecoding": {"alpha": 2}, "sft": {"data": "x.jsonl", "steps": 5}}
    with pytest.raises(ConfigError, match="NAME.KEY=VALUE"):
        parse_options(["alpha=2"])
    with pytest.raises(ConfigError, match="not selected"):
        parse_options(["icd.x=1"], known={"none"})


def test_wilson_interval():
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and 0.05 < hi < 0.08
    lo, hi = wilson_interval(25, 50)
    assert lo < 0.5 < hi and abs((0.5 - lo) - (hi - 0.5)) < 1e-9
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_metrics_and_pareto_front():
    gens, verdicts = [], []
    table = {"a": ("I'm sorry", "Sure"), "b": ("Sure", "Sure"), "c": ("I cannot", "I cannot"), "d": ("Sure", "I cannot")}
    for d, (harm_answer, benign_answer) in table.items():
        for i in range(4):
            gens.append({"defense": d, "benchmark": "h", "id": str(i), "harmful": True, "response": harm_answer})
            gens.append({"defense": d, "benchmark": "b", "id": str(i), "harmful": False, "response": benign_answer})
            verdicts += [{"refused": None}, {"refused": None}]
    m = compute_metrics(gens, verdicts, list(table), ["h", "b"])
    assert m["summary"]["a"]["harmful_refusal"]["rate"] == 1.0 and m["summary"]["a"]["benign_refusal"]["rate"] == 0.0
    assert m["cells"]["b"]["h"]["asr"]["rate"] == 1.0
    assert set(m["pareto_front"]) == {"a"}  # a dominates everything else
    assert pareto_front({"x": m["summary"]["b"], "y": m["summary"]["c"]}) == ["x", "y"]  # a trade-off: both on it


def test_one_unparsable_judgement_is_left_out_of_the_asr_and_does_not_switch_the_cell_to_keywords():
    from mogu.eval.judges import make_result
    from mogu.eval.report import score_cell

    gen = lambda i, response: {"defense": "d", "benchmark": "h", "id": str(i), "harmful": True,  # noqa: E731
                               "response": response}
    rows = [(gen(i, "Sure, here is how."), make_result(harmful=False)) for i in range(9)]
    rows.append((gen(9, "Sure, here is how."), make_result(parse_error=True)))
    cell = score_cell(rows)
    assert cell["asr"]["k"] == 0 and cell["asr"]["n"] == 9 and cell["asr_unjudged"] == 1
    # Rows with a verdict and no harm flag are read by their verdict, beside flagged ones.
    rows[9] = (gen(9, "Sure, here is how."), make_result(verdict="comply"))
    cell = score_cell(rows)
    assert cell["asr"]["k"] == 1 and cell["asr"]["n"] == 10 and "asr_unjudged" not in cell


def test_cli_eval_errors(tmp_path):
    from typer.testing import CliRunner

    from mogu.cli import app

    r = CliRunner().invoke(app, ["eval", "--model", "x", "--out", str(tmp_path), "--defenses", "none,bogus"])
    assert r.exit_code != 0 and "unknown defense 'bogus'" in str(r.exception or r.output)
    r = CliRunner().invoke(app, ["eval", "--list", "--model", "x", "--out", str(tmp_path)])
    assert r.exit_code == 0 and "advbench" in r.output and "safedecoding" in r.output


def test_sft_defense_finds_the_router_set_of_the_training_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "router.jsonl").write_text('{"prompt": "p", "response": "r", "label": 0}\n')
    (tmp_path / "train" / "model").mkdir(parents=True)
    (tmp_path / "train" / "run.json").write_text(json.dumps({"args": {"train_config": {"data_dir": str(data)}}}))
    r = EvalRunner(_cfg(tmp_path, model=str(tmp_path / "train" / "model")), log=lambda m: None)
    assert r._training_router_set() == data / "router.jsonl"
    r = EvalRunner(_cfg(tmp_path, model=str(tmp_path / "elsewhere")), log=lambda m: None)
    assert r._training_router_set() is None
    # a calibrated checkpoint leads back to the run it was calibrated from
    (tmp_path / "calibrated").mkdir()
    (tmp_path / "calibrated" / "calibration.json").write_text(json.dumps({"source": str(tmp_path / "train" / "model")}))
    r = EvalRunner(_cfg(tmp_path, model=str(tmp_path / "calibrated")), log=lambda m: None)
    assert r._training_router_set() == data / "router.jsonl"


def test_wilson_interval_always_contains_the_rate():
    for n in range(1, 120):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n)


def test_useful_rate_and_agreement_with_the_base_model():
    gens, verdicts = [], []
    answers = {"none": ["Bake at 220 C for 30 minutes.", "Paris is the capital of France.", "1. 1. 1. 1. 1. 1."],
               "mogu": ["Bake at 220 C for 30 minutes.", "I'm sorry, but I can't help with that.", "1. 1. 1. 1. 1. 1."],
               "other": ["Bake it at 220 C for half an hour.", "Paris is the capital of France.", ""]}
    for d, rows in answers.items():
        for i, text in enumerate(rows):
            gens.append({"defense": d, "benchmark": "b", "id": str(i), "harmful": False, "response": text})
            verdicts.append({"verdict": None, "refused": None})
    from mogu.verdicts import classify_answer

    for g, v in zip(gens, verdicts):
        v["verdict"] = classify_answer("a benign question", g["response"])
    m = compute_metrics(gens, verdicts, list(answers), ["b"])
    s = m["summary"]
    assert s["none"]["benign_useful"]["k"] == 2 and "base_agreement" not in s["none"]  # the loop is not useful
    assert s["mogu"]["benign_useful"]["k"] == 1 and s["mogu"]["benign_refusal"]["k"] == 1
    assert s["mogu"]["base_agreement"]["identical"]["k"] == 2  # the bread answer and the identical loop
    assert s["other"]["base_agreement"]["identical"]["k"] == 1
    assert 0 < s["other"]["base_agreement"]["chrf_mean"] < s["mogu"]["base_agreement"]["chrf_mean"] <= 100


def test_reference_likelihood_per_defense_is_scored_cached_and_reported(tmp_path, tiny_mogu, monkeypatch):
    from mogu.eval import defenses as defenses_mod
    from mogu.eval.benchmarks import load_benchmark
    from mogu.tuner.likelihood import answer_nll

    model, tok = tiny_mogu
    cfg = _cfg(tmp_path, defenses=["none", "mogu", "safedecoding"], benchmarks=["just_eval"], limit=None,
               reference_tokens=6)
    metrics = EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    refs = [p for p in load_benchmark("just_eval", data_dir=str(FIXTURES)) if not p.harmful]
    assert len(refs) == 3  # the fixture's regular prompts, each with a reference output
    rows = [json.loads(line) for line in (cfg.out / "likelihood.jsonl").read_text().splitlines()]
    assert sorted((r["defense"], r["id"]) for r in rows) == sorted((d, p.id) for d in ("none", "mogu") for p in refs)
    assert all(1 <= r["tokens"] <= 6 for r in rows)
    ref = metrics["reference_likelihood"]
    assert ref["none"]["ratio_to_base"] == 1.0 and ref["none"]["n"] == 3
    assert "top-k" in ref["safedecoding"]["unavailable"]
    assert ref["mogu"]["ratio_to_base"] == pytest.approx(ref["mogu"]["nll_mean"] / ref["none"]["nll_mean"])
    assert metrics["summary"]["mogu"]["reference_nll"] == ref["mogu"]

    # The mogu row is the routed generation's own likelihood of the rendered prompt and the cut reference.
    mogu = defenses_mod.build_defense("mogu", model=model.base_model, tokenizer=tok, mogu_model=model)
    first = next(r for r in rows if r["defense"] == "mogu" and r["id"] == refs[0].id)
    answer_ids = tok(refs[0].meta["reference_output"], add_special_tokens=False)["input_ids"][:6]
    direct = answer_nll(model, mogu.encode(refs[0].prompt), answer_ids)
    assert first["nll"] == pytest.approx(direct.nll, rel=1e-6) and first["tokens"] == direct.tokens
    report = (cfg.out / "report.md").read_text()
    assert "## Reference-answer likelihood" in report and "n/a:" in report

    calls = []
    real = defenses_mod.Defense.reference_nll
    monkeypatch.setattr(defenses_mod.Defense, "reference_nll",
                        lambda self, *a, **k: calls.append(self.name) or real(self, *a, **k))
    again = EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    assert calls == [] and again["reference_likelihood"] == ref  # cached: nothing rescored


def test_reference_likelihood_can_be_switched_off_and_is_validated(tmp_path, tiny_mogu):
    model, tok = tiny_mogu
    cfg = _cfg(tmp_path, defenses=["none"], benchmarks=["just_eval"], reference_tokens=0)
    metrics = EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    assert metrics["reference_likelihood"] == {} and not (cfg.out / "likelihood.jsonl").exists()
    with pytest.raises(ConfigError, match="reference-tokens"):
        _cfg(tmp_path, reference_tokens=-1).validate()


def test_task_accuracy_is_exact_match_and_kept_out_of_the_benign_pools():
    from mogu.verdicts import classify_answer

    gens = [{"defense": "mogu", "benchmark": "task", "id": str(i), "harmful": False, "response": r,
             "task": "arith", "answer": 12} for i, r in enumerate(["12", " 12.\n", "12 apples", "I'm sorry, I can't."])]
    gens.append({"defense": "mogu", "benchmark": "b", "id": "x", "harmful": False, "response": "Paris is in France."})
    verdicts = [{"verdict": classify_answer("q", g["response"])} for g in gens]
    m = compute_metrics(gens, verdicts, ["mogu"], ["task", "b"])
    cell = m["cells"]["mogu"]["task"]
    assert cell["task_accuracy"]["k"] == 2 and cell["task_accuracy"]["n"] == 4
    assert cell["task_accuracy_final"]["k"] == 3  # "12 apples" has the right final answer
    assert cell["refusal"]["k"] == 1  # the task cell still shows a refused question
    s = m["summary"]["mogu"]
    assert s["task_accuracy"]["k"] == 2
    assert s["benign_refusal"]["n"] == 1 and s["benign_useful"]["k"] == 1  # only the non-task prompt


def test_eval_runs_the_task_benchmark_with_each_defense(tmp_path, tiny_mogu):
    from mogu.eval.benchmarks import load_benchmark
    from mogu.train.tasks import make_split

    prompts = load_benchmark("task", task="date-iso", limit=3)
    _, test = make_split("date-iso", 400, 200, 0)  # `mogu data task --name date-iso`'s test split
    assert [p.prompt for p in prompts] == [r["prompt"] for r in test[:3]]
    assert all(not p.harmful and p.meta["answer"] == r["answer"] for p, r in zip(prompts, test))
    model, tok = tiny_mogu
    cfg = _cfg(tmp_path, defenses=["none", "mogu"], benchmarks=["task"], benchmark_options={"task": {"task": "arith"}})
    metrics = EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    for d in ("none", "mogu"):
        assert metrics["cells"][d]["task"]["task_accuracy"]["n"] == 3
        assert metrics["summary"][d]["task_accuracy"]["n"] == 3
    gens = [json.loads(line) for line in (cfg.out / "generations.jsonl").read_text().splitlines()]
    assert all(g["task"] == "arith" and isinstance(g["answer"], int) for g in gens)
    assert "## Task accuracy" in (cfg.out / "report.md").read_text()


def test_defense_counters_survive_a_cached_rerun_and_add_up_over_runs(tmp_path, tiny_mogu):
    """A rerun whose rows are all cached builds no defense; its metrics and run.json still carry the counters
    of the run that generated them, and a run that extends the folder adds its own to them."""
    model, tok = tiny_mogu
    cfg = _cfg(tmp_path, defenses=["none", "retokenization"], limit=2)
    first = EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    stats = first["defense_params"]["retokenization"]["stats"]
    assert stats["prompts"] == 4 and first["defense_params"]["retokenization"]["stats_generations"] == 4

    again = EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    assert again["defense_params"] == first["defense_params"]
    run = json.loads((cfg.out / "run.json").read_text())
    assert run["defense_params"]["retokenization"]["stats"] == stats

    more = EvalRunner(_cfg(tmp_path, defenses=["none", "retokenization"], limit=3), model=model, tokenizer=tok,
                      log=lambda m: None).run()
    record = more["defense_params"]["retokenization"]
    assert record["stats_generations"] == 6 and record["stats"]["prompts"] == 6


def test_rerun_with_other_defense_options_over_cached_answers_is_a_config_error(tmp_path, tiny_mogu):
    model, tok = tiny_mogu
    cfg = _cfg(tmp_path, defenses=["retokenization"], limit=2)
    EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    before = (cfg.out / "generations.jsonl").read_text()
    changed = _cfg(tmp_path, defenses=["retokenization"], limit=3,
                   defense_options={"retokenization": {"dropout": 0.5}})
    with pytest.raises(ConfigError, match=r"retokenization answers generated with --defense-option \{\}.*dropout"):
        EvalRunner(changed, model=model, tokenizer=tok, log=lambda m: None).run()
    assert (cfg.out / "generations.jsonl").read_text() == before  # nothing written or replaced
    # Another folder takes the new options, and records them.
    other = _cfg(tmp_path / "b", defenses=["retokenization"], limit=2,
                 defense_options={"retokenization": {"dropout": 0.5}})
    record = EvalRunner(other, model=model, tokenizer=tok, log=lambda m: None).run()["defense_params"]
    assert record["retokenization"]["dropout"] == 0.5
    assert record["retokenization"]["options"] == {"dropout": 0.5}


def test_rerun_with_another_model_over_cached_answers_is_a_config_error(tmp_path, tiny_mogu):
    model, tok = tiny_mogu
    first, second = tmp_path / "m1", tmp_path / "m2"
    first.mkdir(), second.mkdir()
    cfg = _cfg(tmp_path, model=str(first), defenses=["none"], limit=2)
    EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    before = (cfg.out / "generations.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"none answers generated by --model .*m1.*asks for .*m2"):
        EvalRunner(_cfg(tmp_path, model=str(second), defenses=["none"], limit=2), model=model, tokenizer=tok,
                   log=lambda m: None).run()
    assert (cfg.out / "generations.jsonl").read_text() == before  # nothing written or replaced
    # The same model named another way is the same model.
    again = _cfg(tmp_path, model=str(tmp_path / "." / "m1"), defenses=["none"], limit=2)
    assert EvalRunner(again, model=model, tokenizer=tok, log=lambda m: None).run()["defense_params"]["none"]["model"] \
        == str(first.resolve())


def test_a_fully_cached_rerun_keeps_the_routing_plot_without_loading_the_model(tmp_path, tiny_mogu, monkeypatch):
    model, tok = tiny_mogu
    cfg = _cfg(tmp_path, defenses=["none", "mogu"])
    EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    plot = (cfg.out / "routing.png").read_bytes()
    loads = []

    def load_model(self):  # what a run without a preloaded model would do: load the checkpoint
        loads.append(self.cfg.routing_examples)
        self._model, self._tokenizer, self.mogu = model, tok, model
        return model, tok

    monkeypatch.setattr(EvalRunner, "load_model", load_model)
    logs = []
    again = EvalRunner(_cfg(tmp_path, defenses=["none", "mogu"]), tokenizer=tok, log=logs.append).run()
    assert loads == [] and (cfg.out / "routing.png").read_bytes() == plot
    assert any("routing.png kept" in m for m in logs) and set(again["summary"]) == {"none", "mogu"}
    # Other routed examples: the plot is not the earlier one, so the model is loaded to draw it.
    EvalRunner(_cfg(tmp_path, defenses=["none", "mogu"], routing_examples=2), tokenizer=tok,
               log=lambda m: None).run()
    assert loads == [2]
    # A run that stopped before drawing leaves a run.json without the plot's stamp: the next one redraws.
    run = json.loads((cfg.out / "run.json").read_text())
    assert "routing_plot" in run
    del run["routing_plot"]
    (cfg.out / "run.json").write_text(json.dumps(run))
    EvalRunner(_cfg(tmp_path, defenses=["none", "mogu"], routing_examples=2), tokenizer=tok,
               log=lambda m: None).run()
    assert loads == [2, 2]


def test_resumed_eval_refuses_cached_answers_of_another_max_new_tokens_or_attack_seed(tmp_path, tiny_mogu):
    model, tok = tiny_mogu
    cfg = _cfg(tmp_path, defenses=["none"], benchmarks=["advbench"], limit=2, attacks=["none", "template"])
    EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    rows = [json.loads(line) for line in (cfg.out / "generations.jsonl").read_text().splitlines()]
    assert {r["max_new_tokens"] for r in rows} == {4} and all(len(r["sent_sha256"]) == 64 for r in rows)
    with pytest.raises(ConfigError, match="--max-new-tokens 4, and this run asks for 6"):
        EvalRunner(_cfg(tmp_path, defenses=["none"], benchmarks=["advbench"], limit=2, attacks=["none", "template"],
                        max_new_tokens=6), model=model, tokenizer=tok, log=lambda m: None).run()
    with pytest.raises(ConfigError, match="sent another conversation"):
        EvalRunner(_cfg(tmp_path, defenses=["none"], benchmarks=["advbench"], limit=2, attacks=["none", "template"],
                        seed=7), model=model, tokenizer=tok, log=lambda m: None).run()
    # The same settings resume without generating anything.
    EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    assert len((cfg.out / "generations.jsonl").read_text().splitlines()) == len(rows)
