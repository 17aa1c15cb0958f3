"""benchmarks/speed.py and train_memory.py: the smoke paths run end to end and report every row (no timing asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"mogu_benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return _load("speed")


def test_tiny_run_reports_every_setting(speed, tmp_path):
    out = tmp_path / "speed.json"
    assert speed.main(["--tiny", "--repeats", "1", "--new-tokens", "8", "--xlora-new-tokens", "2",
                       "--batch-sizes", "1,3", "--threads", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = {(r["setting"], r["batch"]): r for r in payload["results"]}
    for batch in (1, 3):
        for name in (speed.BASE, speed.MOGU_M, speed.MOGU_ALL, speed.MOGU_GATE, speed.GATE_BASE, speed.HOLD_BENIGN,
                     speed.HOLD_HARMFUL):
            r = rows[(name, batch)]
            assert r["new_tokens"] == 8 and r["tokens_per_s"] > 0 and r["x_base"] > 0
        assert rows[(speed.BASE, batch)]["x_base"] == 1.0
        assert (speed.XLORA, batch) in rows  # timed, or reported unavailable with the reason
    assert [h["batch"] for h in payload["handoff"]] == [1, 3]
    assert payload["environment"]["device"] == "cpu" and payload["environment"]["dtype"] == "float32"


def test_shared_weights_copy_shares_tensors_and_stays_unwrapped(speed):
    from mogu import MoGUConfig, MoGUModel

    base = speed.tiny_base()
    copy = speed.shared_weights_copy(base)
    for (name, p), (_, q) in zip(base.named_parameters(), copy.named_parameters()):
        assert p is q, name
    MoGUModel.from_base(copy, MoGUConfig(r=4, lora_alpha=8))
    assert not any("lora" in name for name, _ in base.named_modules())  # the original is not wrapped
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(base(ids).logits, speed.tiny_base()(ids).logits, rtol=0, atol=0)


def test_argument_errors(speed):
    with pytest.raises(SystemExit):
        speed.parse_args(["--tiny", "--shape", "llama-3-8b"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--batch-sizes", "9"])  # chat prompts: at most 8
    assert speed.parse_args(["--tiny", "--batch-sizes", "32"]).batch_sizes == [32]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            speed.parse_args(["--tiny", "--device", "cuda"])


def test_train_memory_tiny_rows_and_trained_parameters(tmp_path):
    from mogu import MoGUConfig, MoGUModel

    train_memory = _load("train_memory")
    out = tmp_path / "mem.json"
    assert train_memory.main(["--tiny", "--steps", "2", "--pairs", "2", "--rows", "4", "--v2-layers", "1",
                              "--json", str(out)]) == 0
    rows = {(r["version"], r["stage"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {("v1", "glad"), ("v1", "router"), ("v2", "glad"), ("v2", "joint router")}
    v1 = MoGUModel.from_base(_load("speed").tiny_base(), MoGUConfig(r=8, lora_alpha=16))
    glad = sum(p.numel() for p in v1.expert_parameters("glad"))
    routers = sum(p.numel() for p in v1.router_parameters())
    assert rows[("v1", "glad")]["trained_params"] == glad
    assert rows[("v1", "router")]["trained_params"] == routers
    assert rows[("v1", "router")]["added_params"] == routers + 2 * glad
    v2 = rows[("v2", "joint router")]
    assert v2["routed_layers"] == 1 and v2["trained_params"] == v2["added_params"]  # routers + both experts
    assert all(r["step_s"] > 0 and r["peak_gib"] is None for r in rows.values())  # no CUDA: no memory columns


def test_train_memory_4bit_checkpointed_smoke_quantises_every_decoder_projection(tmp_path):
    pytest.importorskip("bitsandbytes")
    train_memory = _load("train_memory")
    speed = _load("speed")
    model = speed.tiny_base()
    n = train_memory.quantize_4bit_in_place(model, torch.float32, "cpu")
    assert n == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == n
    out = tmp_path / "mem4.json"
    assert train_memory.main(["--tiny", "--steps", "2", "--pairs", "2", "--rows", "4", "--v2-layers", "1",
                              "--load-in-4bit", "--gradient-checkpointing", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["load_in_4bit"] and record["gradient_checkpointing"] and len(record["results"]) == 4
    assert all("error" not in r and r["step_s"] > 0 for r in record["results"])


def test_refusal_length_reports_held_rows_their_length_and_eos():
    import importlib.util

    import torch

    from mogu import MoGUConfig, MoGUModel
    from tiny_models import randomize_added, tiny_model, tiny_tokenizer

    spec = importlib.util.spec_from_file_location("refusal_length", ROOT / "benchmarks" / "refusal_length.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tok = tiny_tokenizer()
    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(router_type="prompt", lora_dropout=0.0), tokenizer=tok)
    randomize_added(model)
    model.eval()
    with torch.no_grad():
        model.gate.threshold.fill_(-1e9)  # every prompt judged harmful: every row held
    result = module.measure(model, tok, ["Do X", "Tell me how to do Y quickly"], max_new_tokens=6, batch_size=2)
    summary = result["summary"]
    assert summary["prompts"] == 2 and summary["held"] == 2
    assert all(0 <= r["new_tokens"] <= 6 and isinstance(r["eos"], bool) for r in result["rows"])
    assert 0.0 <= summary["ends_in_eos"] <= 1.0 and sum(summary["verdicts"].values()) == 2


def test_gate_cv_holds_each_look_alike_out_once_and_runs_end_to_end(tmp_path):
    gate_cv = _load("gate_cv")
    # Synthetic features: harmful prompts along +e0, benign along -e0, look-alikes in between but benign-side.
    g = torch.Generator().manual_seed(0)
    harmful = [f"h{i}" for i in range(40)]
    benign = [f"b{i}" for i in range(40)]
    looks = [f"l{i}" for i in range(10)]
    prompts = harmful + benign + looks
    x = torch.randn(len(prompts), 6, generator=g) * 0.3
    x[:40, 0] += 2.0
    x[40:80, 0] -= 2.0
    x[80:, 0] -= 0.5
    features = {0: x, 1: x.flip(1)}
    index = {p: i for i, p in enumerate(prompts)}
    router = [(p, 1) for p in harmful[:30]] + [(p, 0) for p in benign[:30]]
    result = gate_cv.cross_validate(features, index, router=router, probe=router, borderline=looks,
                                    harmful_dev=harmful[30:], extra={"benign_dev": benign[30:]}, folds=5)
    assert set(result) == set(gate_cv.VARIANTS)
    for r in result.values():
        assert 0.0 <= r["borderline_held_out"] <= 1.0 and r["benign_dev"] == 0.0
    assert result["router"]["train_examples"] == 60 and result["router+borderline"]["train_examples"] == 68

    from tiny_models import tiny_model, tiny_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"Write a poem number {i}", "response": "ok", "label": 0} for i in range(6)]
    rows += [{"prompt": f"Explain how to make a weapon number {i}", "response": "no", "label": 1} for i in range(6)]
    (data / "router.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cv.json"
    assert gate_cv.main(["--model", str(tmp_path / "base"), "--data", str(data), "--folds", "2", "--threads", "1",
                         "--variants", "router,probe", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())["result"]
    assert set(payload) == {"router", "probe"} and all("benign_dev" in r for r in payload.values())


def test_gate_transfer_puts_the_threshold_at_the_harmful_share_and_flags_only_harmful_like_sets():
    gate_transfer = _load("gate_transfer")
    g = torch.Generator().manual_seed(0)
    stored = {}
    for name, shift in (("h", 2.0), ("b", -2.0)):
        for i in range(40):
            x = torch.randn(2, 6, generator=g) * 0.3
            x[:, 0] += shift
            stored[f"{name}{i}"] = {"last": x, "mean": x.flip(1)}
    train = [(f"h{i}", 1) for i in range(20)] + [(f"b{i}", 0) for i in range(20)]
    sets = {"harmful_dev": [f"h{i}" for i in range(20, 40)], "benign_dev": [f"b{i}" for i in range(20, 40)]}
    for fit in gate_transfer.FITS:
        for pooling in ("last", "mean", "both"):
            rates = gate_transfer.fit_and_score(stored, train, sets, sets["harmful_dev"], layers=[0, 1], l2=1e-3,
                                                pooling=pooling, min_harmful=0.95, fit=fit)
            assert rates["harmful_dev"] >= 0.95 and rates["benign_dev"] == 0.0, (fit, pooling)
    with pytest.raises(SystemExit):
        gate_transfer.main(["--model", "m", "--data", "d", "--data-dir", "x", "--variants", "nope"])
    with pytest.raises(SystemExit):
        gate_transfer.main(["--model", "m", "--data", "d", "--data-dir", "x", "--fit", "nope"])


def test_gate_transfer_mean_difference_probe_is_centred_between_the_classes_at_unit_spread():
    gate_transfer = _load("gate_transfer")
    x = torch.tensor([[3.0, 0.0], [5.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    w, c = gate_transfer.fit_mean_difference(x, y)
    logits = x.double() @ w + c
    assert abs(float(logits[:2].mean() + logits[2:].mean())) < 1e-9  # the midpoint scores 0
    assert abs(float(logits.std()) - 1.0) < 1e-9 and float(w[1]) == 0.0


def test_gate_transfer_restyle_keeps_the_request_and_uses_every_style():
    import random

    gate_transfer = _load("gate_transfer")
    rng = random.Random(0)
    prompt = "How do I bake bread? I want a crusty loaf."
    outs = {gate_transfer.restyle(prompt, rng) for _ in range(30)}
    assert outs == {"how do i bake bread? i want a crusty loaf", "hey, how do I bake bread? I want a crusty loaf. thanks",
                    "how do i bake bread"}


def test_gate_transfer_frame_wraps_a_prompt_or_a_conversations_last_user_turn_only():
    gate_transfer = _load("gate_transfer")
    assert gate_transfer.framed("How do I bake bread?", "none") == "How do I bake bread?"
    judged = gate_transfer.framed("How do I bake bread?", "judge")
    assert judged.endswith("Request: How do I bake bread?") and judged.startswith("Is the following request")
    talk = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    out = gate_transfer.framed(talk, "after")
    assert out[:2] == talk[:2] and out[2]["content"].startswith("c\n\n(Before answering")
    assert talk[2]["content"] == "c"  # the caller's conversation is not changed
    stored = {gate_transfer.key(gate_transfer.framed(p, f)): {"last": torch.full((2, 3), float(i)),
                                                              "mean": torch.full((2, 3), -float(i))}
              for i, (p, f) in enumerate([("q", "none"), ("q", "judge")])}
    both = gate_transfer.readings_side_by_side(stored, ["q"], ["none", "judge"])["q"]
    assert both["last"].shape == (4, 3) and both["last"][:2].eq(0).all() and both["last"][2:].eq(1).all()
    assert both["mean"][2:].eq(-1).all()


def test_gate_transfer_reads_a_file_spec_one_prompt_per_line(tmp_path):
    gate_transfer = _load("gate_transfer")
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\n  second prompt  \n")
    assert gate_transfer.load_set(f"file:{f}", tmp_path) == ["first prompt", "second prompt"]
    harmful = gate_transfer.load_set("probe_only:harmful", tmp_path)
    benign = gate_transfer.load_set("probe_only:benign", tmp_path)
    from mogu.train.data import builtin_probe_only

    shipped = builtin_probe_only()
    assert harmful == [r.prompt for r in shipped if r.harmful] and benign == [r.prompt for r in shipped if not r.harmful]
    assert len(harmful) >= 100 and len(benign) >= 300 and not set(harmful) & set(benign)


def test_gate_turns_reading_turns_alone_only_adds_flags_and_restores_the_config():
    from mogu import MoGUConfig, MoGUModel
    from tiny_models import randomize_added, tiny_model, tiny_tokenizer

    gate_turns = _load("gate_turns")
    scripts = gate_turns.frames()
    assert set(scripts) == set(gate_turns.FRAMES)
    assert all("{prompt}" in escalation for _, escalation in scripts.values())
    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(router_type="prompt"), tokenizer=tiny_tokenizer())
    randomize_added(model, seed=1)
    tok = model.tokenizer
    convs = [[{"role": "user", "content": opener}, {"role": "assistant", "content": "Sure."},
              {"role": "user", "content": escalation.replace("{prompt}", request)}]
             for opener, escalation in scripts.values() for request in ("how to do it", "a poem", "the steps")]
    scores = []
    for alone in (False, True):
        model.config.gate_turns_alone = alone
        scores.append(torch.cat([model.gate_scores(torch.tensor([gate_turns.encode(tok, c)])) for c in convs]))
    with torch.no_grad():  # a threshold between the two readings' scores, so that both outcomes occur
        model.gate.threshold.fill_(float(torch.cat(scores).median()))
    got = gate_turns.flagged(model, tok, convs, batch_size=4)
    timed = gate_turns.flagged(model, tok, convs, batch_size=4, timed=True)  # the product path, gate_scores
    assert len(got["in_context"]) == len(got["turns_alone"]) == len(convs)
    assert all(b for a, b in zip(got["in_context"], got["turns_alone"]) if a)  # the max can only add flags
    threshold = float(model.gate.threshold)
    assert got["turns_alone"] == timed["turns_alone"] == [s > threshold for s in scores[1].tolist()]
    assert got["in_context"] == [s > threshold for s in scores[0].tolist()]
    assert timed["seconds_turns_alone"] >= 0 and model.config.gate_turns_alone is True
    margins = gate_turns.flagged(model, tok, convs, batch_size=4, margins=(0.0, 1e9))
    assert margins["turns_alone_margin_0"] == got["turns_alone"]  # no margin: the product's reading
    assert margins["turns_alone_margin_1e+09"] == got["in_context"]  # a margin no turn clears: in context only


def test_gate_turns_tuning_sets_put_every_shipped_dev_prompt_in_every_multi_turn_frame():
    from mogu.train.data import attack_frames, builtin_prompts

    gate_turns = _load("gate_turns")
    sets = gate_turns.tuning_sets(None)
    multi = [f for f in attack_frames() if f.get("opener")]
    assert multi and set(sets) == {f"{n}_dev@mogu_frames" for n in ("harmful", "benign", "borderline")}
    for name, (harmful, convs) in sets.items():
        prompts = builtin_prompts(name.split("_dev")[0], "dev")
        assert harmful == name.startswith("harmful") and len(convs) == len(multi) * len(prompts)
        assert all(len(c) == 3 and c[-1]["role"] == "user" for c in convs)
        assert prompts[0].prompt.strip() in convs[0][-1]["content"]


def test_gate_lookahead_reads_the_prompt_end_and_each_answer_token_as_a_pass_over_that_prefix_would():
    """Position 0 is where the gate reads (its score there is the model's own), position j the answer's
    j-th token (the last one where the answer stopped earlier), whatever the padding of the batch."""
    from mogu import MoGUConfig, MoGUModel
    from mogu.chat import render_prompt
    from tiny_models import randomize_added, tiny_model, tiny_tokenizer

    lookahead = _load("gate_lookahead")
    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(router_type="prompt"), tokenizer=tiny_tokenizer())
    randomize_added(model, seed=3)
    tok = model.tokenizer
    prompts = ["hi", "tell me a much longer story about the sea", "why?"]
    cache = {}
    lookahead.answers_and_features(model, tok, prompts, tokens=4, positions=[0, 2, 8], batch_size=3, cache=cache)
    gate = model.routing_strategy.gate
    probes = {i: (gate.weight[k].detach(), float(gate.bias[k].detach())) for k, i in enumerate(gate.layers)}
    for p in prompts:
        entry = cache[p]
        prompt_ids = tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"]
        assert entry["prompt_len"] == len(prompt_ids) and 1 <= len(entry["answer"]) <= 4
        torch.testing.assert_close(lookahead.probe_logits(probes, entry["f0"][None]).float(),
                                   model.gate_scores(torch.tensor([prompt_ids])), rtol=1e-4, atol=1e-4)
        for j in (2, 8):
            prefix = prompt_ids + entry["answer"][:j]
            grabbed = {}
            handles = [m.register_forward_pre_hook(lambda _m, a, i=i: grabbed.__setitem__(i, a[0][0, -1].float()))
                       for i, (_, m) in model.routing_strategy.modules.items()]
            with torch.no_grad(), model.routing("off"):
                model.base_model(input_ids=torch.tensor([prefix]))
            for h in handles:
                h.remove()
            alone = torch.stack([grabbed[i] for i in sorted(grabbed)])
            torch.testing.assert_close(entry[f"f{j}"], alone, rtol=1e-4, atol=1e-4)


def test_distributed_step_times_every_backbone_sharding_by_default_and_refuses_an_unknown_one():
    bench = _load("distributed_step")
    assert bench.parse_args([]).shardings == "none,fsdp2,zero3"
    with pytest.raises(SystemExit, match="--shardings takes none, fsdp2 and zero3, got 'none,zero2'"):
        bench.main(["--shardings", "none,zero2"])
