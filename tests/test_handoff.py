"""The hold hand-off: a prompt routing judged harmful stays with the unwilling expert to the end of the answer.

Pins, on every family: benign rows are exactly the paper's fixed hand-off; held rows are exactly the routed
prefix followed by the unwilling expert (an uncached reference); mixed, left-padded batches equal single
rows; streaming sees each token once; the fixed hand-off is still available."""

from __future__ import annotations

import copy

import pytest
import torch

from mogu import MoGUConfig, MoGUModel
from mogu.errors import ConfigError
from tiny_models import FAMILY_CONFIGS, RecordingStreamer, left_pad, randomize_added, tiny_model

FAMILIES = sorted(FAMILY_CONFIGS)
BIAS = 12.0  # a router logit shift that makes u ~ 1, g ~ 0 (or the reverse) at every token


MILD = 1.5  # a shift that tips the prefix toward unwill (held) while u and g stay far from 0 and 1


def make(family, *, lean: str | None = None, router_type: str = "token", seed: int = 0, bias: float = BIAS):
    base = tiny_model(family, seed)
    model = MoGUModel.from_base(base, MoGUConfig(router_type=router_type, lora_dropout=0.0))
    randomize_added(model)
    if lean is not None and router_type == "token":
        sign = 1.0 if lean == "unwill" else -1.0
        with torch.no_grad():
            for m in model.routed_modules.values():
                m.router.unwill.linear_2.bias.add_(sign * bias)
                m.router.glad.linear_2.bias.add_(-sign * bias)
    return model


def ids(batch=1, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def greedy(model, x, **kw):
    mask = kw.pop("attention_mask", torch.ones_like(x))
    return model.generate(input_ids=x, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)


def uncached_reference(model, x, route_tokens, total):
    """Routed argmax for m tokens, then the unwilling expert alone, without any cache."""
    seq = x
    with torch.no_grad():
        for step in range(total):
            mode = "auto" if step < route_tokens else "unwill"
            with model.routing(mode):
                logits = model(input_ids=seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    return seq


def cached_reference(model, x, route_tokens, total):
    """Greedy on one KV cache: the prompt and the first m - 1 routed tokens are read with routing on (the
    forwards that pick the m routed tokens), every later forward by the unwilling expert alone, on that same
    cache. This is what a held row is: the routed prefix's own cache, continued."""
    from transformers import DynamicCache

    cache, seq, step_input = DynamicCache(), x, x
    with torch.no_grad():
        for step in range(total):
            with model.routing("auto" if step < route_tokens else "unwill"):
                logits = model.base_model(input_ids=step_input, past_key_values=cache, use_cache=True).logits
            nxt = logits[:, -1:].argmax(-1)
            seq, step_input = torch.cat([seq, nxt], dim=1), nxt
    return seq


@pytest.mark.parametrize("family", FAMILIES)
def test_held_row_is_the_routed_prefix_then_the_unwilling_expert(family):
    model = make(family, lean="unwill")
    x = ids(seed=3)
    got = greedy(model, x, max_new_tokens=10, route_tokens=4, handoff="hold")
    assert model.last_generate_timing["held_rows"] == 1
    assert got.tolist() == uncached_reference(model, x, 4, 10).tolist()  # saturated routers: auto = unwill


@pytest.mark.parametrize("family", FAMILIES)
def test_held_row_with_unsaturated_routers_continues_on_the_routed_prefix_cache(family):
    """With u and g strictly between 0 and 1 the routed prefix's cache differs from the unwilling expert's
    reading of it: a held row is the cached continuation (as likelihood.answer_logits scores it), with or
    without use_cache."""
    held = 0
    for seed in range(3):
        model = make(family, lean="unwill", bias=MILD, seed=seed)
        x = ids(seed=5 + seed)
        got = greedy(model, x, max_new_tokens=10, route_tokens=4, handoff="hold")
        if model.last_generate_timing["held_rows"] != 1:
            continue
        held += 1
        assert got.tolist() == cached_reference(model, x, 4, 10).tolist(), seed
        assert torch.equal(greedy(model, x, max_new_tokens=10, route_tokens=4, handoff="hold", use_cache=False), got)
    assert held, "no seed held its row: the test would be hollow"


@pytest.mark.parametrize("family", FAMILIES)
def test_benign_row_is_exactly_the_fixed_handoff(family):
    model = make(family, lean="glad")
    x = ids(seed=4)
    hold = greedy(model, x, max_new_tokens=10, route_tokens=4, handoff="hold")
    assert model.last_generate_timing["held_rows"] == 0
    fixed = greedy(model, x, max_new_tokens=10, route_tokens=4, handoff="fixed")
    assert torch.equal(hold, fixed)


def test_fixed_handoff_gives_the_harmful_row_to_the_base_model():
    model = make("llama", lean="unwill")
    reference = copy.deepcopy(model.base_model)
    x = ids(seed=5)
    got = greedy(model, x, max_new_tokens=9, route_tokens=3, handoff="fixed")
    with model.routing("off"):
        expected = greedy(model, got[:, :x.shape[1] + 3], max_new_tokens=6, route_tokens=None)
    assert got.tolist() == expected.tolist()
    with torch.no_grad():  # the base model's own weights answered: the routing did not touch them
        for (name, p), (_, q) in zip(reference.named_parameters(), model.base_model.named_parameters()):
            if "lora" not in name and "router" not in name:
                assert torch.equal(p, q), name


def test_the_config_sets_the_default_handoff_and_rejects_unknown_ones():
    assert MoGUConfig().handoff == "hold"
    assert MoGUConfig(handoff="fixed").handoff == "fixed"
    with pytest.raises(ConfigError, match="handoff"):
        MoGUConfig(handoff="sometimes")
    model = make("llama", lean="unwill")
    model.config.handoff = "fixed"
    x = ids(seed=6)
    assert torch.equal(greedy(model, x, max_new_tokens=8, route_tokens=3),
                       greedy(model, x, max_new_tokens=8, route_tokens=3, handoff="fixed"))
    with pytest.raises(ConfigError, match="handoff"):
        greedy(model, x, max_new_tokens=8, route_tokens=3, handoff="never")


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon", "qwen3"])
def test_mixed_left_padded_batch_equals_single_rows_with_a_pinned_gate_decision(family):
    """Rows 0 and 2 are judged harmful and held, row 1 hands off; each equals its row generated alone."""
    model = make(family, router_type="prompt")
    rows = [ids(1, n, seed=n)[0].tolist() for n in (4, 7, 9)]
    decisions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    x, mask = left_pad(rows)
    with model.pin_routing(decisions):
        batched = greedy(model, x, attention_mask=mask, max_new_tokens=8, route_tokens=3)
    assert model.last_generate_timing["held_rows"] == 2
    for i, r in enumerate(rows):
        with model.pin_routing(decisions[i:i + 1]):
            single = greedy(model, torch.tensor([r]), max_new_tokens=8, route_tokens=3)
        assert batched[i, x.shape[1]:].tolist()[: single.shape[1] - len(r)] == single[0, len(r):].tolist()
    # The held rows are the unwilling expert's own continuation, the handed-off row the base model's.
    with model.pin_routing(decisions[:1]):
        fixed = greedy(model, torch.tensor([rows[0]]), max_new_tokens=8, route_tokens=3, handoff="fixed")
    held = batched[0, x.shape[1]:x.shape[1] + 8].tolist()
    assert held[:3] == fixed[0, 4:7].tolist()


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_held_token_router_batch_with_left_padding_equals_single_rows(family):
    model = make(family, lean="unwill")
    rows = [ids(1, n, seed=n)[0].tolist() for n in (4, 7, 9)]
    x, mask = left_pad(rows)
    batched = greedy(model, x, attention_mask=mask, max_new_tokens=8, route_tokens=3)
    assert model.last_generate_timing["held_rows"] == 3
    for i, r in enumerate(rows):
        single = greedy(model, torch.tensor([r]), max_new_tokens=8, route_tokens=3)
        assert batched[i, x.shape[1]:].tolist()[: single.shape[1] - len(r)] == single[0, len(r):].tolist()


def test_the_gate_decides_the_hold_from_its_own_score():
    model = make("llama", router_type="prompt")
    x = ids(seed=8)
    model.gate.threshold.fill_(-1e9)  # every prompt scores above: harmful, held
    held = greedy(model, x, max_new_tokens=8, route_tokens=3)
    assert model.last_generate_timing["held_rows"] == 1
    assert held.tolist() == uncached_reference_unwill(model, x, 8).tolist()
    model.gate.threshold.fill_(1e9)  # every prompt benign: the fixed hand-off
    benign = greedy(model, x, max_new_tokens=8, route_tokens=3)
    assert model.last_generate_timing["held_rows"] == 0
    assert torch.equal(benign, greedy(model, x, max_new_tokens=8, route_tokens=3, handoff="fixed"))


def uncached_reference_unwill(model, x, total):
    seq = x
    with torch.no_grad(), model.routing("unwill"):
        for _ in range(total):
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return seq


def test_streamer_sees_each_token_of_a_held_answer_once():
    model = make("llama", lean="unwill")
    x = ids(seed=9)

    streamer = RecordingStreamer()
    out = greedy(model, x, max_new_tokens=9, route_tokens=3, streamer=streamer)
    assert model.last_generate_timing["held_rows"] == 1
    assert streamer.chunks[0] == x[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, x.shape[1]:].tolist()
    assert streamer.ends == 1


def test_held_row_that_emits_eos_stops_there():
    model = make("llama", lean="unwill")
    x = ids(seed=10)
    free = greedy(model, x, max_new_tokens=12, route_tokens=3)[0, x.shape[1]:].tolist()
    # The first token the unwilling expert picks after the prefix that did not occur before becomes "EOS".
    j = next(j for j in range(3, 12) if free[j] not in free[:j])
    eos = free[j]
    out = greedy(model, x, max_new_tokens=12, route_tokens=3, eos_token_id=eos)
    new = out[0, x.shape[1]:].tolist()
    assert new[:j + 1] == free[:j + 1] and all(t == 0 for t in new[j + 1:])


def test_sampling_with_a_held_row_runs_and_respects_the_length():
    model = make("llama", lean="unwill")
    x = ids(batch=2, seed=11)
    torch.manual_seed(0)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0,
                         max_new_tokens=7, min_new_tokens=7, route_tokens=3, pad_token_id=127)
    assert out.shape == (2, x.shape[1] + 7)
    assert model.last_generate_timing["held_rows"] == 2


def test_held_row_without_a_kv_cache_gives_the_same_tokens():
    model = make("llama", lean="unwill", bias=MILD, seed=0)
    x = ids(seed=5)
    cached = greedy(model, x, max_new_tokens=10, route_tokens=4)
    uncached = greedy(model, x, max_new_tokens=10, route_tokens=4, use_cache=False)
    assert model.last_generate_timing["held_rows"] == 1
    assert torch.equal(cached, uncached)
    # Here the cache matters: the unwilling expert re-reading the prefix alone would answer otherwise.
    assert cached.tolist() != uncached_reference(model, x, 4, 10).tolist()


def test_a_static_cache_works_whether_or_not_a_row_is_held():
    for lean, held in (("unwill", 1), ("glad", 0)):
        model = make("llama", lean=lean)
        x = ids(seed=7)
        dynamic = greedy(model, x, max_new_tokens=10, route_tokens=4)
        static = greedy(model, x, max_new_tokens=10, route_tokens=4, cache_implementation="static")
        assert model.last_generate_timing["held_rows"] == held
        assert torch.equal(static, dynamic)


def test_a_stop_string_met_inside_the_routed_prefix_ends_the_answer_there():
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    for lean in ("unwill", "glad"):
        model = make("llama", lean=lean)
        x = ids(seed=8)
        full = greedy(model, x, max_new_tokens=10, route_tokens=5)
        # Stop on the text of the third generated token: plain generate would end the row right there.
        stop = tok.decode(full[0, x.shape[1] + 2:x.shape[1] + 3])
        if not stop.strip():
            continue
        got = greedy(model, x, max_new_tokens=10, route_tokens=5, stop_strings=[stop], tokenizer=tok)
        text = tok.decode(got[0, x.shape[1]:], skip_special_tokens=True)
        assert stop in text and got.shape[1] <= x.shape[1] + 5, (lean, stop, text)


def test_route_tokens_zero_routes_every_token_and_a_negative_one_is_a_config_error():
    model = make("llama", lean="unwill")
    x = ids(seed=9)
    assert torch.equal(greedy(model, x, max_new_tokens=6, route_tokens=0),
                       greedy(model, x, max_new_tokens=6, route_tokens=None))
    with pytest.raises(ConfigError, match="route_tokens"):
        greedy(model, x, max_new_tokens=6, route_tokens=-2)
