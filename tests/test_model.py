"""PEFT-style behaviour pins for the routed model, on every supported family."""

import copy

import pytest
import torch
from peft import PeftModel

from mogu import MoGUConfig, MoGUModel
from mogu.errors import CheckpointMismatchError, ConfigError, UnknownFamilyError
from tiny_models import (EXPECTED_TARGET, FAMILY_CONFIGS, RecordingStreamer, assert_batch_equals_single, randomize_added,
                         tiny_model, tiny_tokenizer)

FAMILIES = sorted(FAMILY_CONFIGS)


def make(family, seed=0, **cfg):
    base = tiny_model(family, seed)
    reference = copy.deepcopy(base)
    model = MoGUModel.from_base(base, MoGUConfig(**cfg))
    randomize_added(model)
    return model, reference


def ids(batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_wraps_the_family_target(family):
    model, _ = make(family)
    names = list(model.routed_modules)
    assert len(names) == 2  # one per layer
    assert names[0] == EXPECTED_TARGET.get(family, "model.layers.0.self_attn.o_proj")


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_off_is_exactly_the_base_model(family):
    model, reference = make(family)
    x = ids()
    with torch.no_grad():
        expected = reference(input_ids=x).logits
        with model.routing("off"):
            got = model(input_ids=x).logits
    assert torch.equal(got, expected)
    assert model.routing_mode == "auto"  # the context manager restores the mode


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("expert", ["glad", "unwill"])
def test_single_expert_equals_peft_lora(family, expert, tmp_path):
    model, reference = make(family)
    model.export_adapter(expert, tmp_path / expert)
    peft_model = PeftModel.from_pretrained(reference, str(tmp_path / expert)).eval()
    x = ids()
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
        model.set_routing(expert)
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_mode_matches_the_v1_formula(family):
    """An independent re-computation of (u+g) W x + s (u B_u A_u x + g B_g A_g x) on layer 0."""
    model, _ = make(family)
    layer = next(iter(model.routed_modules.values()))
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        got = layer(x)
        base = layer.base_layer(x)
        u = torch.sigmoid(layer.router.unwill.linear_2(layer.router.unwill.linear_1(layer.router.unwill.linear_0(x))))
        g = torch.sigmoid(layer.router.glad.linear_2(layer.router.glad.linear_1(layer.router.glad.linear_0(x))))
        s = model.config.lora_alpha / model.config.r
        lu = x @ layer.lora_A["unwill"].weight.T @ layer.lora_B["unwill"].weight.T
        lg = x @ layer.lora_A["glad"].weight.T @ layer.lora_B["glad"].weight.T
        expected = (u + g) * base + s * (u * lu + g * lg)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The training path (factorised router) agrees with the fused inference path.
    torch.testing.assert_close(layer(x), got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_uncached(family):
    model, _ = make(family)
    x = ids(batch=1, length=8)
    with torch.no_grad():
        full = model(input_ids=x, use_cache=False).logits
        out = model(input_ids=x[:, :5], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(5, 8):
            out = model(input_ids=x[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    # Full routing through generate(): the cached greedy tokens equal uncached greedy decoding.
    enc = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    cached = model.generate(**enc, max_new_tokens=6, do_sample=False, route_tokens=None)
    uncached = model.generate(**enc, max_new_tokens=6, do_sample=False, route_tokens=None, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("route_tokens", [3, None])
def test_batch_equals_single_items(family, route_tokens):
    model, _ = make(family)
    assert_batch_equals_single(model, [ids(1, n, seed=n)[0].tolist() for n in (4, 7, 9)], route_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_handoff_semantics(family):
    """Routed greedy picks m tokens; the plain base then generates from prompt + those tokens."""
    model, reference = make(family)
    x = ids(batch=1, length=6, seed=3)
    enc = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    got = model.generate(**enc, max_new_tokens=10, do_sample=False, route_tokens=4, handoff="fixed")
    # The reference procedure: no cache in the routed phase, a separate plain model after.
    seq = x
    with torch.no_grad():
        for _ in range(4):
            logits = model(input_ids=seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    routed = seq[0, x.shape[1]:].tolist()
    eos = reference.generation_config.eos_token_id
    if eos in routed:  # the routed phase ended the answer: nothing is handed off
        expected = seq[:, : x.shape[1] + routed.index(eos) + 1]
    else:
        expected = reference.generate(input_ids=seq, attention_mask=torch.ones_like(seq), max_new_tokens=6,
                                      do_sample=False)
    assert got.tolist() == expected.tolist()
    assert model.routing_mode == "auto"


def test_rows_that_stop_in_the_routed_phase_stay_stopped():
    model, _ = make("llama")
    x = ids(batch=2, length=5, seed=4)
    enc = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    free = model.generate(**enc, max_new_tokens=3, do_sample=False, route_tokens=3, pad_token_id=0)
    eos = int(free[0, 6])  # row 0's second generated token becomes "EOS"
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, route_tokens=3, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 5:].tolist()
    stop = row0.index(eos)
    assert all(t == 0 for t in row0[stop + 1:])  # nothing generated after EOS


def test_streamer_sees_each_token_once():
    model, _ = make("llama")
    x = ids(batch=1, length=5, seed=5)

    s = RecordingStreamer()
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=7, do_sample=False,
                         streamer=s, route_tokens=3)
    assert s.chunks[0] == x[0].tolist()  # the prompt once
    assert sum(s.chunks[1:], []) == out[0, 5:].tolist()
    assert s.ends == 1


def test_sampling_and_route_tokens_override():
    model, _ = make("llama")
    x = ids(batch=2, length=5)
    torch.manual_seed(0)
    a = model.generate(input_ids=x, max_new_tokens=6, do_sample=True, top_k=20, route_tokens=2)
    torch.manual_seed(0)
    b = model.generate(input_ids=x, max_new_tokens=6, do_sample=True, top_k=20, route_tokens=2)
    assert torch.equal(a, b) and a.shape == (2, 11)
    # route_tokens overrides the config's m: greedy, the first 2 tokens are the routed model's argmax and the
    # rest the plain base model's continuation (fixed hand-off); None routes every token.
    assert model.config.route_tokens != 2
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = model.generate(input_ids=x, route_tokens=2, handoff="fixed", **greedy)
    with torch.no_grad():
        with model.routing("auto"):
            routed_all = model.base_model.generate(input_ids=x, **greedy)
        prefix = routed_all[:, : x.shape[1] + 2]
        with model.routing("off"):
            expected = model.base_model.generate(input_ids=prefix, **{**greedy, "max_new_tokens": 4})
    assert got.tolist() == expected.tolist()
    assert model.generate(input_ids=x, route_tokens=None, **greedy).tolist() == routed_all.tolist()
    with pytest.raises(ConfigError):
        model.generate(input_ids=x, max_new_tokens=4, num_beams=2, route_tokens=2)
    assert model.generate(input_ids=x, max_new_tokens=4, num_beams=2, route_tokens=None).shape[1] == 9


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_is_bit_exact(family, tmp_path):
    model, _ = make(family)
    model.save_pretrained(tmp_path / "ckpt")
    for f in ("mogu_config.json", "router.safetensors", "README.md", "glad/adapter_config.json",
              "glad/adapter_model.safetensors", "unwill/adapter_model.safetensors"):
        assert (tmp_path / "ckpt" / f).is_file(), f
    loaded = MoGUModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model(family))
    assert loaded.config.to_dict() == model.config.to_dict()
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in loaded.named_parameters()]
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)


def test_routed_layers_subset_and_parameter_count():
    model, _ = make("llama", routed_layers=[1], router_hidden=16)
    assert [m.layer_idx for m in model.routed_modules.values()] == [1]
    d, r, h = 32, 8, 16
    expected = 2 * (d * r + r * d) + 2 * (d * h + h * d + d + d + 1)
    assert model.num_added_parameters() == expected
    with pytest.raises(ConfigError, match="out of range"):
        MoGUModel.from_base(tiny_model("llama"), MoGUConfig(routed_layers=[5]))


def test_routing_trace():
    model, _ = make("llama")
    x = ids(batch=2, length=5)
    model.generate(input_ids=x, max_new_tokens=4, do_sample=False, route_tokens=None)
    assert model.routing_trace() == {}  # off by default: nothing recorded
    model.enable_routing_trace()
    model.generate(input_ids=x, max_new_tokens=4, do_sample=False, route_tokens=None)
    trace = model.routing_trace()
    assert sorted(trace) == [0, 1]
    assert trace[0].shape == (2, 5 + 3, 2)  # prompt + 3 cached steps (the 4th token needs no forward)
    assert ((trace[0] > 0) & (trace[0] < 1)).all()
    model.clear_routing_trace()
    assert model.routing_trace() == {}


def test_unknown_family_lists_candidates():
    base = tiny_model("llama")
    base.config.model_type = "mystery"
    with pytest.raises(UnknownFamilyError, match="o_proj"):
        MoGUModel.from_base(base, MoGUConfig())
    model = MoGUModel.from_base(base, MoGUConfig(target_modules=["self_attn.o_proj"]))
    assert len(model.routed_modules) == 2


def test_checkpoint_mismatch_is_named(tmp_path):
    model, _ = make("llama")
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointMismatchError, match="'llama' model, the base is 'gpt2'"):
        MoGUModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model("gpt2"))
    import transformers as tf

    wider = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               num_key_value_heads=2))
    with pytest.raises(CheckpointMismatchError, match="hidden size 32"):
        MoGUModel.from_pretrained(tmp_path / "ckpt", base_model=wider)
    (tmp_path / "ckpt" / "router.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointMismatchError, match="unreadable"):
        MoGUModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model("llama"))


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model, _ = make("llama")
    model.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "router.safetensors").read_bytes()
    import mogu.tuner.model as mm

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mm, "save_file", boom)
    with torch.no_grad():
        next(iter(model.routed_modules.values())).router.glad.linear_2.bias.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "router.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left behind


@pytest.mark.parametrize("bad", [dict(r=0), dict(lora_dropout=1.5), dict(router_hidden=0), dict(route_tokens=0),
                                 dict(version="v9"), dict(routed_layers=[]), dict(lora_alpha=-1),
                                 dict(lora_alpha=float("inf")), dict(lora_alpha=float("nan")), dict(r=True),
                                 dict(route_tokens=True), dict(routed_layers=[True]), dict(router_hidden=True),
                                 dict(extra=[1]), dict(base_hidden_size="x")])
def test_out_of_range_config_is_rejected(bad):
    with pytest.raises(ConfigError):
        MoGUConfig(**bad)


def test_save_pretrained_refuses_an_invalid_config_and_keeps_the_checkpoint_there(tmp_path):
    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(), tokenizer=tiny_tokenizer())
    model.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "mogu_config.json").read_bytes()
    model.config.route_tokens = 0  # set after validation: it would not load again
    with pytest.raises(ConfigError, match="route_tokens"):
        model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "mogu_config.json").read_bytes() == before


def test_config_json_round_trip(tmp_path):
    cfg = MoGUConfig(routed_layers=[3, 1], route_tokens=None, target_modules="o_proj")
    assert cfg.routed_layers == [1, 3] and cfg.target_modules == ["o_proj"]
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert MoGUConfig.from_json_file(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text('{"r": 8,\n "oops"}')
    with pytest.raises(ConfigError, match="line 2"):
        MoGUConfig.from_json_file(tmp_path / "bad.json")
