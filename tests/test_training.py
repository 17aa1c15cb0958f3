"""Training stages: gradient isolation, end-to-end run, crash + resume, checkpoint selection records."""

import json

import pytest
import torch

from mogu import MoGUConfig, MoGUModel
from mogu.train.data import build_stage_datasets, builtin_prompts
from mogu.train.stages import STAGE_MODES, StageConfig, TrainConfig, Trainer, _balanced_batches, generate_responses
from mogu.train.losses import collate, ratio_loss, router_loss
from mogu.chat import encode_pair
from tiny_models import FAMILY_CONFIGS, randomize_added, tiny_model, tiny_tokenizer


def _batch(tok, prompts, responses):
    return collate([encode_pair(tok, p, r, 12) for p, r in zip(prompts, responses)], tok.pad_token_id)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("stage", ["glad", "unwill", "router"])
def test_gradients_reach_exactly_the_stage_parameters(family, stage):
    tok = tiny_tokenizer()
    model = MoGUModel.from_base(tiny_model(family), MoGUConfig(lora_dropout=0.0))
    randomize_added(model)  # non-zero B so every stage parameter gets a non-zero gradient
    params = model.router_parameters() if stage == "router" else model.expert_parameters(stage)
    model.set_trainable(params)
    model.set_routing(STAGE_MODES[stage])
    model.train()
    prompts = ["How do I bake bread?", "Write a poem about rain"]
    a = _batch(tok, prompts, ["Sure, here is how.", "Here is a poem."])
    b = _batch(tok, prompts, ["I'm sorry, but I can't help.", "I cannot do that."])
    if stage == "router":
        loss, parts = router_loss(model, a, torch.tensor([1, 0]), weight=2.0)
        assert set(parts) == {"ce", "mse_u", "mse_g"}
    else:
        loss, parts = ratio_loss(model, a, b)
        assert set(parts) == {"ce_num", "ce_den"}
    loss.backward()
    named = dict(model.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {n for n, p in named.items() if any(p is q for q in params)}
    assert with_grad == expected
    assert all(not p.requires_grad for n, p in named.items() if n not in expected)


def _tiny_run(tmp_path, name, stage_names=("glad", "unwill", "router"), train_kw=None, **stage_kw):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(router_hidden=16), tokenizer=tok)
    data = tmp_path / "data"
    if not (data / "router.jsonl").is_file():
        harmful = builtin_prompts("harmful")[:16]
        benign = builtin_prompts("benign")[:16]
        for recs in (harmful, benign):
            for r in recs[:4]:
                r.split = "dev"
            for r in recs[4:]:
                r.split = "train"

        def answer(prompts, sample=False):
            return [f"Here is an answer about {p.split()[0].lower()}." for p in prompts]

        stats = build_stage_datasets(harmful, benign, data, answer_fn=answer, seed=0, log=lambda m: None)
        assert stats["glad_pairs"] == 12 and stats["unwill_pairs"] == 12 and stats["router"] == 24
        assert stats["dev"] == 8
    stages = {s: StageConfig(epochs=2, lr=1e-3, batch_size=4, micro_batch_size=2, **stage_kw)
              for s in stage_names}
    cfg = TrainConfig(data_dir=str(data), output_dir=str(tmp_path / name), stages=stages, save_every=2,
                      max_response_tokens=8, select_max_new_tokens=4, select_batch_size=8, **(train_kw or {}))
    return model, Trainer(model, tok, cfg, log=lambda m: None, progress=False)


def test_end_to_end_training_records_everything(tmp_path):
    model, trainer = _tiny_run(tmp_path, "run")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = trainer.train()
    out = tmp_path / "run"
    run = json.loads((out / "run.json").read_text())
    assert {"args", "versions", "git_commit", "data_sha256"} <= set(run)
    assert len(run["data_sha256"]) == 5 and run["versions"]["torch"]  # 3 stage files, dev, probe
    for stage in ("glad", "unwill", "router"):
        assert summary[stage]["steps"] == (12 if stage == "router" else 6)  # rows / batch 4 x 2 epochs
        assert "kept epoch" in summary[stage]["selection"]
        assert len(summary[stage]["history"]) == 2  # one dev score per epoch
        assert (out / "stages" / stage / "done.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("loss" in r or "dev" in r for r in rows)
    # The backbone never moved; every added parameter group did.
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    added = {n for n, p in after.items() if any(p is q for q in model.added_parameters())}
    assert changed and changed <= added


def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    model_a, trainer_a = _tiny_run(tmp_path, "a")
    trainer_a.train()
    final_a = {n: p.detach().clone() for n, p in model_a.named_parameters()}

    model_b, trainer_b = _tiny_run(tmp_path, "b")
    original = Trainer._append_metrics

    def crash(self, row):
        original(self, row)
        if row.get("stage") == "router" and row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(Trainer, "_append_metrics", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer_b.train()
    monkeypatch.setattr(Trainer, "_append_metrics", original)
    # No half-written checkpoint is visible: every step folder is complete.
    for folder in (tmp_path / "b" / "checkpoints" / "router").iterdir():
        assert not folder.name.startswith(".")
        assert {"trainable.safetensors", "optimizer.pt", "state.json", "rng.pt"} <= {p.name for p in folder.iterdir()}

    model_c, trainer_c = _tiny_run(tmp_path, "b")
    trainer_c.train(resume=True)
    for n, p in model_c.named_parameters():
        assert torch.equal(p, final_a[n]), n
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["stage"] == "router" and "loss" in r]
    assert steps == list(range(1, 13))  # no step duplicated or missing
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert len(run["earlier_runs"]) == 1 and run["earlier_runs"][0]["args"] == run["args"]  # the first record kept


def test_resume_mid_stage_with_another_seed_or_stage_file_is_refused(tmp_path, monkeypatch):
    from mogu.errors import ConfigError

    _, trainer = _tiny_run(tmp_path, "run", stage_names=("glad",))
    original = Trainer._append_metrics

    def crash(self, row):
        original(self, row)
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(Trainer, "_append_metrics", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(Trainer, "_append_metrics", original)
    _, reseeded = _tiny_run(tmp_path, "run", stage_names=("glad",), train_kw={"seed": 5})
    with pytest.raises(ConfigError, match="glad stage, stopped mid-way, with other settings than it ran with: seed"):
        reseeded.train(resume=True)
    glad = tmp_path / "data" / "glad_pairs.jsonl"
    glad.write_text("\n".join(glad.read_text().splitlines()[:-1]) + "\n")
    _, changed = _tiny_run(tmp_path, "run", stage_names=("glad",))
    with pytest.raises(ConfigError, match="glad_pairs.jsonl \\(its contents\\)"):
        changed.train(resume=True)


def test_bad_stage_config_is_rejected(tmp_path):
    from mogu.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple"):
        TrainConfig(data_dir=".", output_dir=".", stages={"glad": StageConfig(batch_size=8, micro_batch_size=3)}).validate()
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(data_dir=".", output_dir=".", stages={"router": StageConfig(lr=5.0)}).validate()


def test_probe_writes_the_exact_affine_map_into_the_factorised_scorer():
    from mogu.train.router_init import write_affine

    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(router_hidden=16))
    scorer = next(iter(model.routed_modules.values())).router.unwill
    w = torch.randn(32, dtype=torch.float64)
    write_affine(scorer, w, 0.7)
    x = torch.randn(5, 32)
    expected = torch.sigmoid((x.double() @ w + 0.7)).float()
    assert torch.allclose(scorer(x).squeeze(-1), expected, atol=1e-5)


def test_fit_probe_separates_and_balances_classes():
    from mogu.train.router_init import fit_probe

    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    x = torch.randn(300, 16, generator=g)
    y = (x @ direction > 0.5).float()  # imbalanced: fewer positives
    w, c = fit_probe(x, y)
    assert (((x.double() @ w + c) > 0).float() == y).float().mean() > 0.95
    with pytest.raises(ValueError, match="both"):
        fit_probe(x, torch.zeros(300))


def test_probe_init_router_stage_scores_the_init_and_keeps_the_best(tmp_path):
    model, trainer = _tiny_run(tmp_path, "probe", stage_names=("router",),
                               train_kw={"router_init": "probe", "router_init_refits": 1})
    experts = {n: t.detach().clone() for n, t in ((f"{e}.{i}", p) for e in ("glad", "unwill")
                                                   for i, p in enumerate(model.expert_parameters(e)))}
    routers = [p.detach().clone() for p in model.router_parameters()]
    summary = trainer.train()
    hist = summary["router"]["history"]
    assert hist[0]["epoch"] == -1 and hist[0]["step"] == 0  # the probe init competes in selection
    assert len(hist) == 3
    best = max(hist, key=lambda h: h["score"])
    assert f"kept epoch {best['epoch']}" in summary["router"]["selection"]
    rows = [json.loads(line) for line in (tmp_path / "probe" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0].get("init") == "probe"
    # Only router parameters were written (by the init and the steps): the experts are as they were.
    after = {f"{e}.{i}": p for e in ("glad", "unwill") for i, p in enumerate(model.expert_parameters(e))}
    assert all(torch.equal(after[n], t) for n, t in experts.items())
    assert any(not torch.equal(p, r) for p, r in zip(model.router_parameters(), routers))
    for module in model.routed_modules.values():  # the probe's bias, not the fresh zero one
        assert module.router.unwill.linear_2.bias.abs().sum() > 0


def test_single_router_candidate_is_kept_unscored_and_all_checkpoints_can_be_kept(tmp_path, monkeypatch):
    import mogu.train.stages as training

    model, trainer = _tiny_run(tmp_path, "one", stage_names=("router",),
                               max_examples=16,
                               train_kw={"router_init": "probe", "score_router_init": False, "keep_checkpoints": 0})
    trainer.cfg.stages["router"].epochs = 1
    scored = []
    monkeypatch.setattr(training, "score_stage", lambda *a, **k: scored.append(a[0]) or {"score": 0.0})
    summary = trainer.train()
    assert scored == []  # neither the probe init nor the only epoch needed a dev pass
    assert summary["router"]["history"] == [] and "one candidate" in summary["router"]["selection"]
    steps = sorted(p.name for p in (tmp_path / "one" / "checkpoints" / "router").glob("step-*"))
    assert steps == ["step-0000002", "step-0000004"]  # every save kept (16 rows / batch 4, save_every 2)


def test_responders_are_scored_even_with_one_epoch(tmp_path, monkeypatch):
    import mogu.train.stages as training

    model, trainer = _tiny_run(tmp_path, "resp", stage_names=("glad",))
    trainer.cfg.stages["glad"].epochs = 1
    scored = []
    monkeypatch.setattr(training, "score_stage", lambda *a, **k: scored.append(a[0]) or {"score": 1.0})
    summary = trainer.train()
    assert scored == ["glad"] and "kept epoch 0" in summary["glad"]["selection"]


@pytest.mark.parametrize("n,batch,sizes", [(66, 32, [22, 22, 22]), (115, 32, [29, 29, 29, 28]), (5, 16, [5]),
                                           (32, 32, [32]), (33, 32, [17, 16]), (0, 8, [])])
def test_generation_batches_are_balanced_and_cover_every_prompt_once(n, batch, sizes):
    spans = _balanced_batches(n, batch)
    assert [size for _, size in spans] == sizes and all(size <= batch for size in sizes)
    assert [i for start, size in spans for i in range(start, start + size)] == list(range(n))


def test_generate_responses_returns_prompt_order_whatever_the_batch_size():
    tok = tiny_tokenizer()
    model = randomize_added(MoGUModel.from_base(tiny_model("llama"), MoGUConfig(), tokenizer=tok))
    prompts = ["Hi", "How do I bake bread at home?", "Name a colour.", "Tell me a joke about cats and dogs.", "Why?"]
    one_by_one = [generate_responses(model, tok, [p], max_new_tokens=4)[0] for p in prompts]
    assert generate_responses(model, tok, prompts, max_new_tokens=4, batch_size=2) == one_by_one


@pytest.mark.parametrize("setting,expected", [(None, 8), ("all", 8), ("route", 3), (2, 2), (50, 8)])
def test_router_rows_keep_the_configured_number_of_response_tokens(tmp_path, setting, expected):
    model, trainer = _tiny_run(tmp_path, "run", train_kw={"router_response_tokens": setting})
    model.config.route_tokens = 3
    rows = trainer._rows("router")
    encoded = trainer._encode("router", rows)
    full = [encode_pair(trainer.tokenizer, r["prompt"], r["response"], 8) for r in rows]
    assert trainer.router_response_tokens() == expected
    for ((ids, n_resp), _), (full_ids, full_resp) in zip(encoded, full):
        # The same prompt, and the response's first tokens: a prefix of the full-length row.
        assert n_resp == min(expected, full_resp) and ids == full_ids[:len(ids)]
        assert len(full_ids) - full_resp == len(ids) - n_resp
    # The responders always train on max_response_tokens.
    glad = trainer._encode("glad", trainer._rows("glad"))
    assert max(n for (_, n), _ in glad) == 8


def test_route_setting_follows_full_routing(tmp_path):
    model, trainer = _tiny_run(tmp_path, "run", train_kw={"router_response_tokens": "route"})
    model.config.route_tokens = None  # every token routed at inference: train on whole targets
    assert trainer.router_response_tokens() == 8


@pytest.mark.parametrize("bad", [0, -1, 5000, "first", 2.5, True])
def test_bad_router_response_tokens_are_rejected(bad):
    from mogu.errors import ConfigError

    with pytest.raises(ConfigError, match="router_response_tokens"):
        TrainConfig(data_dir=".", output_dir=".", router_response_tokens=bad).validate()


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_a_padded_batch_gives_each_rows_loss_as_computed_alone(family):
    """Positions follow the attention mask in training as in generate: GPT-2's absolute positions included."""
    from mogu.train.losses import collate, sequence_nll

    torch.manual_seed(0)
    model = MoGUModel.from_base(tiny_model(family), MoGUConfig(lora_dropout=0.0))
    randomize_added(model)
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(3, 128, (n,), generator=g).tolist(), r) for n, r in ((5, 2), (11, 4), (8, 3))]
    with torch.no_grad():
        batched = sequence_nll(model, collate(rows, 0))
        for i, row in enumerate(rows):
            alone = sequence_nll(model, collate([row], 0))
            torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-5)


def test_router_stage_runs_the_frozen_experts_without_dropout_and_responder_stages_keep_it(tmp_path):
    from mogu.train.losses import collate, sequence_nll

    _, trainer = _tiny_run(tmp_path, "dropout")
    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(lora_dropout=0.5), tokenizer=tiny_tokenizer())
    randomize_added(model)
    trainer.model = model
    batch = collate([(list(range(3, 15)), 5), (list(range(20, 29)), 3)], 0)
    losses = {}
    for stage in ("router", "glad"):
        trainer._train_mode(stage)
        model.set_routing(STAGE_MODES[stage])
        assert model.training
        with torch.no_grad():
            losses[stage] = [sequence_nll(model, batch) for _ in range(3)]
    assert all(torch.equal(losses["router"][0], x) for x in losses["router"][1:])  # the same loss every call
    assert not torch.equal(losses["glad"][0], losses["glad"][1])  # the trained expert keeps its dropout


# -- the faithful preset: the authors' training where mogu's defaults differ ------------------------------
def test_faithful_preset_is_the_paper_schedule_without_eos_and_with_per_example_weight_loss():
    from mogu.train.stages import preset

    paper, faithful = preset("paper"), preset("faithful")
    assert faithful["stages"] == paper["stages"] and faithful["responder_loss"] == paper["responder_loss"]
    assert faithful["append_eos"] is False and faithful["router_weight_average"] == "example"
    cfg = TrainConfig(data_dir="d", output_dir="o", **{k: v for k, v in faithful.items()})
    cfg.validate()
    with pytest.raises(Exception, match="router_weight_average"):
        TrainConfig(data_dir="d", output_dir="o", router_weight_average="sometimes").validate()
    tok = tiny_tokenizer()
    with_eos, n = encode_pair(tok, "Hi", "Hello there.", 32)
    without, m = encode_pair(tok, "Hi", "Hello there.", 32, append_eos=False)
    assert with_eos[-1] == tok.eos_token_id and with_eos[:-1] == without and m == n - 1


def test_per_example_weight_loss_is_the_mean_of_each_examples_own_mean():
    from mogu.train.losses import router_terms

    tok = tiny_tokenizer()
    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(lora_dropout=0.0))
    randomize_added(model)
    batch = _batch(tok, ["Hi", "Write a long poem about the sea, the wind and the night"], ["Sure.", "No."])
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        _, err_u, err_g, layers = router_terms(model, batch, labels, per_example=True)
        per_row = []
        for i in range(2):  # each example alone: its squared errors over its own tokens and the layers
            one = {k: v[i:i + 1, batch["attention_mask"][i].bool()] for k, v in batch.items()}
            _, eu, eg, n_layers = router_terms(model, one, labels[i:i + 1])
            per_row.append((eu / (one["attention_mask"].sum() * n_layers), eg / (one["attention_mask"].sum() * n_layers)))
    for i, (eu, eg) in enumerate(per_row):
        torch.testing.assert_close(err_u[i], eu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(err_g[i], eg, rtol=1e-5, atol=1e-6)
    assert layers == 2


def test_greedy_routed_prefix_when_routed_sampling_is_off():
    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(lora_dropout=0.0, routed_sampling=False))
    randomize_added(model)
    x = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        greedy = model.generate(input_ids=x, max_new_tokens=3, do_sample=False, route_tokens=3, pad_token_id=0)
        prefixes = set()
        for seed in range(4):
            torch.manual_seed(seed)
            out = model.generate(input_ids=x, max_new_tokens=9, do_sample=True, top_k=50, temperature=1.5,
                                 route_tokens=3, pad_token_id=0)
            assert out[0, :10].tolist() == greedy[0].tolist()  # the routed prefix is greedy whatever the seed
            prefixes.add(tuple(out[0, 10:].tolist()))
    assert len(prefixes) > 1  # the rest still samples
    model.config.routed_sampling = True
    sampled = set()
    for seed in range(6):
        torch.manual_seed(seed)
        with torch.no_grad():
            sampled.add(tuple(model.generate(input_ids=x, max_new_tokens=3, do_sample=True, top_k=50, temperature=1.5,
                                             route_tokens=3, pad_token_id=0)[0].tolist()))
    assert len(sampled) > 1  # by default the prefix samples as asked


def test_a_row_past_the_models_context_is_a_data_error_naming_its_file_and_row(tmp_path):
    from mogu.errors import DataError

    model, trainer = _tiny_run(tmp_path, "run")
    glad = tmp_path / "data" / "glad_pairs.jsonl"
    rows = [json.loads(line) for line in glad.read_text().splitlines()]
    rows[2]["prompt"] = "word " * 400
    glad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model.base_model.config.max_position_embeddings = 256
    with pytest.raises(DataError, match=r"glad_pairs\.jsonl row 3 is \d+ tokens .* context of 256"):
        trainer.train()
    assert not (tmp_path / "run" / "stages" / "glad" / "done.json").exists()
    # Rows that fit train as before.
    rows[2]["prompt"] = "a short prompt"
    glad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert trainer._encode("glad", trainer._rows("glad"))
